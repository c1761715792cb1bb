"""Retention: results and their files expire, as RunComfy keeps them for 7 days."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from ovis_server.jobs.store import JobStore, utcnow
from ovis_server.jobs.workers import WorkerRegistry
from ovis_server.storage.base import FileStore

logger = logging.getLogger(__name__)

# Rows of workers killed without deregistering are dropped after this long.
SILENT_WORKER_SECONDS = 24 * 3600


class RetentionSweeper:
    """Deletes jobs finished longer ago than the retention time, files first, then rows."""

    def __init__(
        self,
        store: JobStore,
        files: FileStore,
        workers: WorkerRegistry,
        retention_seconds: float,
        interval_seconds: float,
    ) -> None:
        self.store = store
        self.files = files
        self.workers = workers
        self.retention = timedelta(seconds=retention_seconds)
        self.interval = interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)

    def sweep(self) -> tuple[int, int]:
        """One pass: returns (jobs removed, files removed)."""
        cutoff = utcnow() - self.retention
        jobs_removed = files_removed = 0
        while batch := self.store.finished_before(cutoff):
            for job in batch:
                files_removed += self.files.delete_request(job.id)
            jobs_removed += self.store.delete([job.id for job in batch])
        self.workers.forget_silent(SILENT_WORKER_SECONDS)
        if jobs_removed:
            logger.info(
                "retention: removed %d job(s) finished before %s and %d file(s)",
                jobs_removed,
                cutoff.isoformat(timespec="seconds"),
                files_removed,
            )
        return jobs_removed, files_removed

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:
                logger.exception("retention sweep failed; trying again later")
            self._stop.wait(self.interval)
