"""A hook into the step loop, for tests only: off unless ``OVIS_SERVER_TEST_HOOKS`` is set.

``OVIS_SERVER_TEST_HOOKS=package.module:function`` names a function the worker calls once
at start; what it returns (a ``StepHook``, or None) is called with each job in hand after
each denoising step, inside the pipeline, where it may raise, hang or end the process as
model code could. The reliability tests use it (tests/faults.py) to inject faults; a
server that does not set the variable imports nothing and runs no hook.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from ovis_server.jobs.job import Job

ENV_VAR = "OVIS_SERVER_TEST_HOOKS"

StepHook = Callable[[Job, int], None]


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
