"""Jobs: the store that is also the queue."""

from ovis_server.jobs.job import CancelOutcome, Job, JobStatus, StoredOutput
from ovis_server.jobs.store import JobStore, LeaseLostError

__all__ = ["CancelOutcome", "Job", "JobStatus", "JobStore", "LeaseLostError", "StoredOutput"]
