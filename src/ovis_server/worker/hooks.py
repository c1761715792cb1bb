"""Hooks into the worker, for tests only: off unless ``OVIS_SERVER_TEST_HOOKS`` is set.

``OVIS_SERVER_TEST_HOOKS=package.module:function`` names a function the worker calls once
at start; what it returns (a ``StepHook``, a ``Hooks``, or None) is called with each job in
hand after each denoising step, inside the pipeline, where it may raise, hang or end the
process as model code could. A ``Hooks`` can also carry ``before_store``, which the
worker's finisher thread calls with each job whose image it is about to encode and write
(to slow the files store down, or stall it). The reliability tests use them
(tests/e2e/faults.py) to inject faults; a server that does not set the variable imports
nothing and runs no hook.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from ovis_server.jobs.job import Job

ENV_VAR = "OVIS_SERVER_TEST_HOOKS"

StepHook = Callable[[Job, int], None]
StoreHook = Callable[[Job], None]


class Hooks:
    """A step hook that carries hooks at other points of the worker as well."""

    def __init__(self, step: StepHook | None = None, before_store: StoreHook | None = None):
        self.step = step
        self.before_store = before_store

    def __call__(self, job: Job, step: int) -> None:
        if self.step is not None:
            self.step(job, step)


def store_hook(hook: StepHook | None) -> StoreHook | None:
    """The ``before_store`` hook that ``hook`` carries, if any."""
    return hook.before_store if isinstance(hook, Hooks) else None


def load_step_hook() -> StepHook | None:
    """The hook ``OVIS_SERVER_TEST_HOOKS`` names, or None when it is not set."""
    spec = os.environ.get(ENV_VAR, "").strip()
    if not spec:
        return None
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"{ENV_VAR}: expected module:function, got {spec!r}")
    install: Callable[[], StepHook | None] = getattr(
        importlib.import_module(module_name), function_name
    )
    return install()
