"""Fault injection for the reliability tests: make the pipeline fail, or go slow, on purpose.

The worker loads this module only when ``OVIS_SERVER_TEST_HOOKS`` names it (see
``ovis_server.worker.hooks``): the e2e conftest has every worker the tests start load it
(``install_hooks``). Faults are ``marker=fault`` pairs separated by commas in
``OVIS_SERVER_FAULTS``, which ``use_faults`` sets for a test's servers. A job whose prompt
contains a marker meets its fault inside the pipeline, at the first denoising step:

- ``error``: an exception from the model code (the job fails, the worker goes on);
- ``oom``: ``torch.cuda.OutOfMemoryError``, as a GPU out of memory raises it;
- ``hang``: the step never returns (the stall watchdog ends the worker);
- ``exit``: the worker process dies at once, as under ``kill -9`` or the OOM killer;
- ``slow_store``: not at a step but when the worker's finisher is about to store the job's
  image, it waits ``OVIS_SERVER_FAULT_SECONDS`` (default 5) first, as a slow disk or bucket.

Apart from those, a job whose prompt contains ``SLOW_MARKER`` waits ``SLOW_STEP_SECONDS`` at
each of its denoising steps: slow without working the CPU. Tests that need a job caught
while it runs (cancels, deletes, deadlines, kills and restarts) send ``bodies.SLOW``: a
large image would make it as slow, but its steps take the 2-core machine's CPU from the
tests running beside it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING

from ovis_server.jobs.job import Job
from ovis_server.worker.hooks import ENV_VAR as HOOKS_VAR
from ovis_server.worker.hooks import Hooks, StepHook

if TYPE_CHECKING:
    import pytest

ENV_VAR = "OVIS_SERVER_FAULTS"
SECONDS_VAR = "OVIS_SERVER_FAULT_SECONDS"
KINDS = ("error", "oom", "hang", "exit", "slow_store")
SLOW_MARKER = "[slow steps]"
SLOW_STEP_SECONDS = 0.3

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


class InjectedFaultError(RuntimeError):
    """The ``error`` fault."""


class FaultPlan:
    def __init__(self, faults: dict[str, str]) -> None:
        unknown = sorted(set(faults.values()) - set(KINDS))
        if unknown:
            raise ValueError(f"{ENV_VAR}: unknown faults {unknown}; known: {', '.join(KINDS)}")
        self.faults = faults

    @classmethod
    def from_env(cls) -> FaultPlan:
        spec = os.environ.get(ENV_VAR, "")
        pairs = (item.split("=", 1) for item in spec.split(",") if "=" in item)
        return cls({marker.strip(): kind.strip() for marker, kind in pairs if marker.strip()})

    def strike(self, prompt: str) -> None:
        """Raise, hang or die if ``prompt`` carries a marker; otherwise nothing."""
        for marker, kind in self.faults.items():
            if marker not in prompt or kind == "slow_store":
                continue
            if kind == "error":
                raise InjectedFaultError(f"injected fault for prompts containing {marker!r}")
            if kind == "oom":
                import torch

                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected fault)")
            if kind == "hang":
                threading.Event().wait()
            if kind == "exit":
                os._exit(137)

    def before_store(self, job: Job) -> None:
        """Wait before the image of a job whose prompt carries a ``slow_store`` marker is
        stored."""
        prompt = str(job.input.get("prompt", ""))
        for marker, kind in self.faults.items():
            if kind == "slow_store" and marker in prompt:
                seconds = float(os.environ.get(SECONDS_VAR, "5"))
                logger.warning(
                    "slow store: job %s waits %.1fs before its image is stored", job.id, seconds
                )
                time.sleep(seconds)


def step_hook() -> StepHook:
    """The worker's hooks (named by OVIS_SERVER_TEST_HOOKS): a wait at each step of a job
    marked slow, faults at the first step, and before a job's image is stored."""
    plan = FaultPlan.from_env()

    def strike(job: Job, step: int) -> None:
        prompt = str(job.input.get("prompt", ""))
        if SLOW_MARKER in prompt:
            time.sleep(SLOW_STEP_SECONDS)
        if step == 1:
            plan.strike(prompt)

    return Hooks(step=strike, before_store=plan.before_store)


def install_hooks(environ: MutableMapping[str, str]) -> None:
    """Have every worker started with ``environ`` load this module's hooks."""
    environ[HOOKS_VAR] = f"{__name__}:step_hook"
    # The worker imports this module: the repository root must be on its path.
    path = environ.get("PYTHONPATH", "")
    if str(ROOT) not in path.split(os.pathsep):
        environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), path) if p)


def use_faults(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    """Servers started from now on in this test inject the faults ``spec`` names."""
    monkeypatch.setenv(ENV_VAR, spec)
