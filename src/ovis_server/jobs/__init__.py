"""Jobs: the store that is also the queue."""

from ovis_server.jobs.job import CancelOutcome, Job, JobStatus, StoredOutput
from ovis_server.jobs.store import IdempotencyConflictError, JobStore, LeaseLostError
from ovis_server.jobs.workers import WorkerInfo, WorkerRegistry

__all__ = [
    "CancelOutcome",
    "IdempotencyConflictError",
    "Job",
    "JobStatus",
    "JobStore",
    "LeaseLostError",
    "StoredOutput",
    "WorkerInfo",
    "WorkerRegistry",
]
