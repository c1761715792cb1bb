"""The job store, which is also the queue: one interface over SQLite and PostgreSQL.

``JobStore`` holds its parts, one concern each, and hands each call to the part that
owns it:

- ``queries``: reads (a job, lists, queue positions, the event log, counts);
- ``queue``: the API's state changes (submit, cancel), each one guarded statement;
- ``running``: the worker's (claim, progress, lease, finish, release, recover);
- ``deadlines``: the Cancel-After pass;
- ``quotas``: what a submit may not exceed, and the transaction that checks it;
- ``events``: the event log and webhook outbox, written with each change;
- ``rows``: rows to dataclasses.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool

from ovis_server.db.loop_reads import LoopReads
from ovis_server.db.retry import DEFAULT_RETRY_SECONDS
from ovis_server.jobs.deadlines import DEADLINE_EXCEEDED, DEADLINE_MESSAGE, DeadlineExpiry
from ovis_server.jobs.events import utcnow
from ovis_server.jobs.job import CancelOutcome, Job, JobEvent, JobState, NewJob, StoredOutput
from ovis_server.jobs.queries import JobQueries
from ovis_server.jobs.queue import IDEMPOTENCY_WINDOW, IdempotencyConflictError, JobQueue
from ovis_server.jobs.quotas import RATE_WINDOW, LimitExceededError, SubmitLimits
from ovis_server.jobs.running import LeaseLostError, RunningJobs

__all__ = [
    "DEADLINE_EXCEEDED",
    "DEADLINE_MESSAGE",
    "IDEMPOTENCY_WINDOW",
    "RATE_WINDOW",
    "IdempotencyConflictError",
    "JobStore",
    "LeaseLostError",
    "LimitExceededError",
    "SubmitLimits",
    "utcnow",
]


class JobStore:
    """Submit, observe, claim, run and finish jobs: each method is its part's (see the
    module's docstring), which documents it."""

    def __init__(self, engine: Engine, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.engine = engine
        # How long a call retries a locked or unreachable database before it raises.
        self.retry_seconds = retry_seconds
        self.reads = JobQueries(engine, retry_seconds)
        self.queue = JobQueue(engine, retry_seconds)
        self.running = RunningJobs(engine, retry_seconds)
        self.deadlines = DeadlineExpiry(engine, retry_seconds)

    # --- reads: queries.py
    def get(self, request_id: str) -> Job | None:
        return self.reads.get(request_id)

    def get_with_position(self, request_id: str) -> tuple[JobState, int | None] | None:
        return self.reads.get_with_position(request_id)

    def get_with_position_once(self, request_id: str) -> tuple[JobState, int | None] | None:
        return self.reads.get_with_position_once(request_id)

    async def get_with_position_on_loop(
        self, reads: LoopReads, request_id: str
    ) -> tuple[JobState, int | None] | None:
        return await self.reads.get_with_position_on_loop(reads, request_id)

    def reads_at_once(self) -> bool:
        """Whether a read now would not wait: on SQLite (a local file in WAL mode, where a
        reader never waits on a writer; microseconds) with an idle pooled connection.
        PostgreSQL's reads are round trips to a server: never."""
        engine = self.reads.engine
        pool = engine.pool
        return (
            engine.dialect.name == "sqlite" and isinstance(pool, QueuePool) and pool.checkedin() > 0
        )

    def queue_position(self, job: Job) -> int:
        return self.reads.queue_position(job)

    def queue_positions(self, request_ids: Sequence[str]) -> dict[str, int]:
        return self.reads.queue_positions(request_ids)

    def snapshot(self, request_id: str) -> tuple[Job, int] | None:
        return self.reads.snapshot(request_id)

    def events_after(self, seq: int, limit: int = 1000, also: Sequence[int] = ()) -> list[JobEvent]:
        return self.reads.events_after(seq, limit, also)

    def last_event_seq(self) -> int:
        return self.reads.last_event_seq()

    def list_for_token(self, token_id: str, limit: int, before_seq: int | None) -> list[Job]:
        return self.reads.list_for_token(token_id, limit, before_seq)

    def count_queued(self, token_id: str | None = None) -> int:
        return self.reads.count_queued(token_id)

    def queued_by_model(self) -> dict[str, int]:
        return self.reads.queued_by_model()

    def queue_heads(self, model_ids: Sequence[str]) -> dict[str, float]:
        return self.reads.queue_heads(model_ids)

    def finished_before(self, cutoff: datetime, limit: int = 500) -> list[Job]:
        return self.reads.finished_before(cutoff, limit)

    # --- the API's changes: queue.py
    def submit(self, job: NewJob, limits: SubmitLimits | None = None) -> Job:
        return self.queue.submit(job, limits)

    def idempotent_twin(self, token_id: str, key: str, request_hash: str | None) -> Job | None:
        return self.queue.idempotent_twin(token_id, key, request_hash)

    def request_cancel(self, request_id: str) -> tuple[Job, CancelOutcome] | None:
        return self.queue.request_cancel(request_id)

    # --- the worker's changes: running.py
    def set_warnings(self, request_id: str, warnings: Sequence[str]) -> None:
        return self.running.set_warnings(request_id, warnings)

    def claim_next(
        self, worker_id: str, lease_seconds: float, model_ids: Collection[str] | None = None
    ) -> Job | None:
        return self.running.claim_next(worker_id, lease_seconds, model_ids)

    def claim_batch(
        self,
        worker_id: str,
        lease_seconds: float,
        max_batch: int | Callable[[Job], int],
        model_ids: Collection[str] | None = None,
    ) -> list[Job]:
        return self.running.claim_batch(worker_id, lease_seconds, max_batch, model_ids)

    def report_batch_progress(
        self, request_ids: Sequence[str], worker_id: str, step: int, lease_seconds: float
    ) -> tuple[set[str], set[str]]:
        return self.running.report_batch_progress(request_ids, worker_id, step, lease_seconds)

    def renew_leases(self, request_ids: Sequence[str], worker_id: str, lease_seconds: float) -> int:
        return self.running.renew_leases(request_ids, worker_id, lease_seconds)

    def report_progress(
        self, request_id: str, worker_id: str, step: int, lease_seconds: float
    ) -> bool:
        return self.running.report_progress(request_id, worker_id, step, lease_seconds)

    def renew_lease(self, request_id: str, worker_id: str, lease_seconds: float) -> None:
        return self.running.renew_lease(request_id, worker_id, lease_seconds)

    def complete(self, request_id: str, worker_id: str, outputs: Sequence[StoredOutput]) -> Job:
        return self.running.complete(request_id, worker_id, outputs)

    def fail(self, request_id: str, worker_id: str, error_type: str, message: str) -> Job:
        return self.running.fail(request_id, worker_id, error_type, message)

    def mark_cancelled(self, request_id: str, worker_id: str) -> Job:
        return self.running.mark_cancelled(request_id, worker_id)

    def release(self, request_id: str, worker_id: str) -> Job:
        return self.running.release(request_id, worker_id)

    def recover_expired(self, max_attempts: int) -> int:
        return self.running.recover_expired(max_attempts)

    def release_dead_worker(self, host: str, pid: int, max_attempts: int) -> int:
        return self.running.release_dead_worker(host, pid, max_attempts)

    # --- Cancel-After: deadlines.py
    def expire_deadlines(self) -> tuple[int, int]:
        return self.deadlines.expire_deadlines()
