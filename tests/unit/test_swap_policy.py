"""worker/swap_policy.plan_swap, beyond tests/e2e/test_many_models.py's cases: ties, several
resident models, the exact boundary, and invariants over a grid of inputs."""

from __future__ import annotations

import itertools

import pytest

from ovis_server.worker.swap_policy import plan_swap


def test_no_resident_model_plans_nothing() -> None:
    assert plan_swap({}, {"a": 0.0}, now=1e9, swap_after=0) is None


def test_ties_between_waiting_models_go_by_name() -> None:
    assert plan_swap({"r": 0.0}, {"c": 5.0, "b": 5.0}, now=6.0, swap_after=30) == ("r", "b")


def test_ties_between_idle_residents_go_by_name() -> None:
    resident = {"y": 1.0, "x": 1.0, "z": 0.5}
    heads = {"w": 0.0}
    # z came in first; among equals, the first name.
    assert plan_swap(resident, heads, now=2.0, swap_after=30) == ("z", "w")
    assert plan_swap({"y": 1.0, "x": 1.0}, heads, now=2.0, swap_after=30) == ("x", "w")


def test_an_idle_resident_goes_before_an_older_busy_one() -> None:
    resident = {"busy": 0.0, "idle": 50.0}
    assert plan_swap(resident, {"busy": 1.0, "new": 60.0}, now=61.0, swap_after=30) == (
        "idle",
        "new",
    )


def test_the_busy_victim_is_the_one_in_longest() -> None:
    resident = {"a": 20.0, "b": 10.0}
    heads = {"a": 0.0, "b": 0.0, "c": 0.0}
    assert plan_swap(resident, heads, now=39.9, swap_after=30) is None
    assert plan_swap(resident, heads, now=40.0, swap_after=30) == ("b", "c")


def test_the_wait_counts_from_the_later_of_queued_and_came_in() -> None:
    # The job was queued after the model came in: its own wait counts.
    assert plan_swap({"a": 0.0}, {"a": 0.0, "b": 100.0}, now=129.9, swap_after=30) is None
    assert plan_swap({"a": 0.0}, {"a": 0.0, "b": 100.0}, now=130.0, swap_after=30) == ("a", "b")


def test_swap_after_zero_swaps_a_busy_model_at_once() -> None:
    assert plan_swap({"a": 5.0}, {"a": 0.0, "b": 5.0}, now=5.0, swap_after=0) == ("a", "b")


def test_the_inputs_are_not_changed() -> None:
    resident = {"a": 0.0}
    heads = {"a": 0.0, "b": 1.0}
    plan_swap(resident, heads, now=100.0, swap_after=1)
    assert resident == {"a": 0.0}
    assert heads == {"a": 0.0, "b": 1.0}


MODELS = ("a", "b", "c")
TIMES = (0.0, 10.0, 40.0)


def _cases() -> list[tuple[dict[str, float], dict[str, float]]]:
    cases = []
    for resident_names in ({"a"}, {"a", "b"}):
        for came in itertools.product(TIMES, repeat=len(resident_names)):
            resident = dict(zip(sorted(resident_names), came, strict=True))
            for queued in itertools.product((None, *TIMES), repeat=len(MODELS)):
                heads = {m: t for m, t in zip(MODELS, queued, strict=True) if t is not None}
                cases.append((resident, heads))
    return cases


@pytest.mark.parametrize("now", [40.0, 55.0, 100.0])
def test_invariants_over_a_grid(now: float) -> None:
    for resident, heads in _cases():
        plan = plan_swap(resident, heads, now, swap_after=30)
        waiting = [m for m in heads if m not in resident]
        if not waiting:
            assert plan is None, (resident, heads)
            continue
        idle = [m for m in resident if m not in heads]
        if idle:
            assert plan is not None
            assert plan[0] in idle
        if plan is None:
            continue
        out, incoming = plan
        assert out in resident
        assert incoming not in resident
        assert heads[incoming] == min(heads[m] for m in waiting)
        if out in heads:  # a busy model leaves only after swap_after
            assert now - max(heads[incoming], resident[out]) >= 30
