"""When a worker of several models swaps one onto its device: ``plan_swap``, a pure function
of the queue's heads.

A model whose oldest queued job exists takes the place of a resident model with no queued
job at once, and of a busy one once that job has waited ``--swap-after`` seconds, counted
from when the busy model came in at the earliest. So one busy model cannot starve another
(its jobs start within ``--swap-after`` plus the batch in hand and a swap), and two busy
models swap at most once per ``--swap-after`` (no thrashing). worker/placement.py makes the
swaps it plans.
"""

from __future__ import annotations

from collections.abc import Mapping


def plan_swap(
    resident: Mapping[str, float],
    heads: Mapping[str, float],
    now: float,
    swap_after: float,
) -> tuple[str, str] | None:
    """The swap to make now, as (model out, model in), or None to keep the resident models.

    ``resident``: each resident model and when it came in; ``heads``: each model with a
    queued job and when its oldest one was queued (models without one are absent); all in
    seconds on one clock. The model to come in is the non-resident one whose oldest job is
    oldest. It replaces a resident model without queued jobs (the one in longest) at once;
    else the model in longest, once that job has waited ``swap_after``, counted from when
    that model came in at the earliest."""
    waiting = {model: queued for model, queued in heads.items() if model not in resident}
    if not waiting or not resident:
        return None
    incoming = min(waiting, key=lambda model: (waiting[model], model))
    idle = [model for model in resident if model not in heads]
    if idle:
        return min(idle, key=lambda model: (resident[model], model)), incoming
    victim = min(resident, key=lambda model: (resident[model], model))
    if now - max(waiting[incoming], resident[victim]) >= swap_after:
        return victim, incoming
    return None
