"""What holds for every tier, set before any test module imports torch."""

from __future__ import annotations

import os

# One OpenMP thread per process unless the caller chose otherwise. The tiny checkpoints
# gain nothing from more, and a test runs several processes at once (the API, workers,
# pytest itself, and a second test beside it under xdist): OpenMP threads that spin while
# waiting for work then take the cores from each other. Measured on the 2-core machine,
# four of test_faults.py's tests on two xdist processes took 185 s of wall time with the
# default (two threads a process) and 90 s with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
