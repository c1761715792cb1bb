"""What holds for every tier, set before any test module imports torch."""

from __future__ import annotations

import os
import ssl
import sys
from typing import Any

import pytest

# One OpenMP thread per process unless the caller chose otherwise. The tiny checkpoints
# gain nothing from more, and a test runs several processes at once (the API, workers,
# pytest itself, and a second test beside it under xdist): OpenMP threads that spin while
# waiting for work then take the cores from each other. Measured on the 2-core machine,
# four of test_faults.py's tests on two xdist processes took 185 s of wall time with the
# default (two threads a process) and 90 s with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Python's usual cache of compiled modules, where the environment turned it off
# (PYTHONDONTWRITEBYTECODE=1 on these machines): the suite starts some 300 Python processes,
# and without it each compiles the project's modules again (0.2 to 0.4 s of CPU a process
# on the 2-core machine, measured importing what a worker and the API import).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


@pytest.fixture
def tls_contexts_made(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of each ``ssl.create_default_context`` call the test makes from
    here on (each reads a whole CA bundle: about 29 ms of CPU on the 2-core machine)."""
    made: list[dict[str, Any]] = []
    make = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made.append(kwargs)
        return make(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)
    return made
