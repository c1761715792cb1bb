"""The worker's hand-off from the thread that drives the device: the outcome of each job's
run, the finisher thread that stores and records batches in order (bounded), and the lease
keeper that renews the leases of jobs held from their claim until their end is recorded."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from ovis_server.jobs.job import Job
from ovis_server.jobs.store import JobStore

if TYPE_CHECKING:
    import numpy as np

    Pixels = np.ndarray[Any, np.dtype[np.uint8]]

logger = logging.getLogger(__name__)


class Stop(Enum):
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"


@dataclass
class Outcome:
    """How one claimed job's run ended, handed from the device's thread to the finisher:
    pixels to store, or why there are none. Never an exception: its traceback would keep
    the failed run's device memory alive."""

    job: Job
    started: float  # time.perf_counter() at the start of the run
    batch_size: int = 1
    steps: int = 0
    pixels: Pixels | None = None
    stop: Stop | None = None
    failure: tuple[str, str] | None = None  # (error type, message)


class LeaseKeeper:
    """Renews, from a thread of its own, the leases of the jobs the worker holds: from the
    claim until the finisher has recorded their end (prompt encoding, the VAE decode, a
    first compile and the wait for the finisher can each outlast a step's renewal)."""

    def __init__(self, store: JobStore, worker_id: str, lease_seconds: float) -> None:
        self.store = store
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, ids: Collection[str]) -> None:
        with self._lock:
            self._ids.update(ids)

    def drop(self, ids: Collection[str]) -> None:
        with self._lock:
            self._ids.difference_update(ids)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Renew while inside (nested uses share the one thread)."""
        if self._thread is not None:
            yield
            return
        self._done.clear()
        self._thread = threading.Thread(target=self._renew, name="lease-keeper", daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._done.set()
            self._thread.join()
            self._thread = None

    def _renew(self) -> None:
        interval = max(self.lease_seconds / 3, 0.05)
        while not self._done.wait(interval):
            with self._lock:
                ids = sorted(self._ids)
            if not ids:
                continue
            try:
                self.store.renew_leases(ids, self.worker_id, self.lease_seconds)
            except Exception:
                logger.exception("could not renew the leases of %s", ", ".join(ids))


class Finisher:
    """One thread that finishes batches the device's thread hands over, in order."""

    def __init__(self, finish: Callable[[list[Outcome]], None], capacity: int) -> None:
        self.finish = finish
        self.capacity = max(1, capacity)
        self._queue: deque[list[Outcome]] = deque()
        self._cond = threading.Condition()
        self._batches = 0  # handed over and not yet finished, the one in hand included
        self._jobs = 0  # the same counted in jobs
        self._closed = False
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="finisher", daemon=True)
        self._thread.start()

    @property
    def jobs_pending(self) -> int:
        """Jobs handed over whose end is not recorded yet."""
        return self._jobs

    def has_room(self) -> bool:
        with self._cond:
            return self._batches < self.capacity

    def wait_for_room(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._batches < self.capacity, timeout)

    def put(self, outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        with self._cond:
            self._queue.append(outcomes)
            self._batches += 1
            self._jobs += len(outcomes)
            self._cond.notify_all()

    def raise_failure(self) -> None:
        """Re-raise, on the caller's thread, what broke finishing (a database that refuses
        a job's end for good): the worker ends as it did when it recorded jobs itself."""
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        """Finish every batch handed over, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._closed)
                if not self._queue:
                    return
                outcomes = self._queue.popleft()
            try:
                self.finish(outcomes)
            except BaseException as exc:  # the device's thread re-raises it
                logger.exception("could not record the end of a batch")
                self.failure = exc
            finally:
                with self._cond:
                    self._batches -= 1
                    self._jobs -= len(outcomes)
                    self._cond.notify_all()
