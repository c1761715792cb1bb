"""Step progress written from a thread of its own, so that the thread driving the device
never waits on the database between two denoising steps.

The device's thread posts each step (``post``) and reads, without waiting, what the writes
so far have answered: which jobs have a cancel requested and which the worker no longer
holds. Steps are written in the order posted, every one of them (a status stream shows
each step), and the finisher waits for a job's posted steps (``finished``) before it
records the job's end, so no step arrives after it. A cancel is therefore seen a step or
two later than a write on the device's thread would see it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Collection

from sqlalchemy.exc import SQLAlchemyError

from ovis_server.db.retry import is_transient
from ovis_server.jobs.store import JobStore
from ovis_server.worker.failures import database_cause

logger = logging.getLogger(__name__)

# The longest wait for a batch's step progress to be written before its end is recorded.
PROGRESS_WAIT_SECONDS = 30.0


class ProgressWriter:
    def __init__(
        self,
        store: JobStore,
        worker_id: str,
        lease_seconds: float,
        timings: list[float] | None = None,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        # Seconds each write took, appended where given (benchmarks/worker_loop.py).
        self.timings = timings
        self._queue: deque[tuple[list[str], int]] = deque()
        self._pending: Counter[str] = Counter()  # posted and not yet written, per job
        self._cancel: set[str] = set()
        self._lost: set[str] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def post(self, ids: Collection[str], step: int) -> tuple[set[str], set[str]]:
        """Queue ``step`` for the jobs ``ids``; returns (jobs to cancel, jobs no longer
        held) among them, as the writes so far have found."""
        with self._cond:
            self._queue.append((list(ids), step))
            self._pending.update(ids)
            self._cond.notify_all()
            return self._cancel & set(ids), self._lost & set(ids)

    def wait_written(self, ids: Collection[str], timeout: float | None = None) -> bool:
        """Wait until every step posted for ``ids`` is written (or given up on)."""
        with self._cond:
            return self._cond.wait_for(lambda: not any(self._pending[i] for i in ids), timeout)

    def finished(self, ids: Collection[str]) -> None:
        """Wait (``PROGRESS_WAIT_SECONDS`` at most) until every step of the jobs ``ids``
        is written, then forget them: a status stream shows each step, in order, before
        the job's end is recorded."""
        self.wait_written(ids, PROGRESS_WAIT_SECONDS)
        self.forget(ids)

    def forget(self, ids: Collection[str]) -> None:
        """The jobs have ended: drop what was learnt about them."""
        with self._cond:
            self._cancel.difference_update(ids)
            self._lost.difference_update(ids)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                ids, step = self._queue[0]
            started = time.perf_counter()
            cancel, lost = self._write(ids, step)
            if self.timings is not None:
                self.timings.append(time.perf_counter() - started)
            with self._cond:
                self._queue.popleft()
                self._pending.subtract(ids)
                self._pending += Counter()  # drop the zeros
                self._cancel |= cancel
                self._lost |= lost
                self._cond.notify_all()

    def _write(self, ids: list[str], step: int) -> tuple[set[str], set[str]]:
        try:
            return self.store.report_batch_progress(ids, self.worker_id, step, self.lease_seconds)
        except SQLAlchemyError as exc:
            # The database is out: computing goes on; the end is recorded once it is back.
            if is_transient(exc):
                logger.warning("step %d not recorded: %s", step, database_cause(exc))
            else:
                logger.error("step %d not recorded: %s", step, database_cause(exc))
        except Exception:
            logger.exception("step %d not recorded", step)
        return set(), set()
