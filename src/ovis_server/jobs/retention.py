"""Retention: results and their files expire, as RunComfy keeps them for 7 days."""

from __future__ import annotations

import logging
from datetime import timedelta

from ovis_server.jobs.store import JobStore, utcnow
from ovis_server.jobs.sweeper import Sweeper
from ovis_server.jobs.workers import WorkerRegistry
from ovis_server.storage.base import FileStore

logger = logging.getLogger(__name__)

# Rows of workers killed without deregistering are dropped after this long.
SILENT_WORKER_SECONDS = 24 * 3600


class RetentionSweeper(Sweeper):
    """Deletes jobs finished longer ago than the retention time, files first, then rows."""

    name = "retention"
    stop_timeout = 30.0

    def __init__(
        self,
        store: JobStore,
        files: FileStore,
        workers: WorkerRegistry,
        retention_seconds: float,
        interval_seconds: float,
    ) -> None:
        super().__init__(interval_seconds)
        self.store = store
        self.files = files
        self.workers = workers
        self.retention = timedelta(seconds=retention_seconds)

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
