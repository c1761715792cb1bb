"""Retention: results and their files expire, as RunComfy keeps them for 7 days."""

from __future__ import annotations

import logging
from datetime import timedelta

from ovis_server.jobs.deletions import FileDeletions, remove_files
from ovis_server.jobs.store import JobStore, utcnow
from ovis_server.jobs.sweeper import Sweeper
from ovis_server.jobs.workers import WorkerRegistry
from ovis_server.storage.base import FileStore

logger = logging.getLogger(__name__)

# Rows of workers killed without deregistering are dropped after this long.
SILENT_WORKER_SECONDS = 24 * 3600


class RetentionSweeper(Sweeper):
    """Deletes jobs finished longer ago than the retention time as ``DELETE`` does: the
    rows first, with a record of the files owed a deletion (so the request answers 404
    before its files go, and none is lost to a crash or a store that is down), then the
    files; ``DeletionSweeper`` finishes what the store refused."""

    name = "retention"
    stop_timeout = 30.0

    def __init__(
        self,
        store: JobStore,
        deletions: FileDeletions,
        files: FileStore,
        workers: WorkerRegistry,
        retention_seconds: float,
        interval_seconds: float,
    ) -> None:
        super().__init__(interval_seconds)
        self.store = store
        self.deletions = deletions
        self.files = files
        self.workers = workers
        self.retention = timedelta(seconds=retention_seconds)

    def sweep(self) -> tuple[int, int]:
        """One pass: returns (jobs removed, files removed)."""
        cutoff = utcnow() - self.retention
        jobs_removed = files_removed = 0
        store_up = True
        while batch := self.store.finished_before(cutoff):
            request_ids = [job.id for job in batch]
            jobs_removed += self.deletions.delete_requests(request_ids)
            if not store_up:
                continue  # the store refused: the files stay on record, for DeletionSweeper
            confirmed = []
            for request_id in request_ids:
                removed = remove_files(self.files, request_id, attempt=1)
                if removed is None:
                    store_up = False
                    break
                files_removed += removed
                confirmed.append(request_id)
            self.deletions.done(*confirmed)
        self.workers.forget_silent(SILENT_WORKER_SECONDS)
        if jobs_removed:
            logger.info(
                "retention: removed %d job(s) finished before %s and %d file(s)",
                jobs_removed,
                cutoff.isoformat(timespec="seconds"),
                files_removed,
            )
        return jobs_removed, files_removed
