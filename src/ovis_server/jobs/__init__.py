"""Jobs: the store that is also the queue."""

from ovis_server.jobs.job import CancelOutcome, Job, JobStatus, NewJob, StoredOutput
from ovis_server.jobs.store import IdempotencyConflictError, JobStore, LeaseLostError
from ovis_server.jobs.workers import WorkerInfo, WorkerRegistry, WorkerState

__all__ = [
    "CancelOutcome",
    "IdempotencyConflictError",
    "Job",
    "JobStatus",
    "JobStore",
    "LeaseLostError",
    "NewJob",
    "StoredOutput",
    "WorkerInfo",
    "WorkerRegistry",
    "WorkerState",
]
