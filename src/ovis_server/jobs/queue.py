"""The queue's state changes on the API's side: submit (with idempotency and limits),
cancel, and ``delete_rows``, which a deletion (``DELETE``, retention: jobs/deletions.py)
runs in its transaction. The worker's side (claim, progress, finish, release, recover) is
``running.py``.

Every state change is one SQL statement whose WHERE clause states what must still hold
(the job is queued; the job is running under this worker), so that concurrent API
processes and workers never overwrite each other: the loser of a race changes no row
and finds out from the row count. Each change is recorded (event log, webhook outbox)
in its own transaction by ``record_changes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from ovis_server.db.retry import DEFAULT_RETRY_SECONDS, retried
from ovis_server.db.schema import job_events, jobs, webhook_deliveries
from ovis_server.jobs.events import record_changes, utcnow
from ovis_server.jobs.job import CancelOutcome, Job, JobStatus, NewJob
from ovis_server.jobs.quotas import SubmitLimits, check_limits, submit_transaction
from ovis_server.jobs.rows import job_from_row

IDEMPOTENCY_WINDOW = timedelta(hours=24)


def delete_rows(conn: Connection, request_ids: Sequence[str]) -> int:
    """Delete these jobs' rows, their event log and webhook messages in ``conn``'s
    transaction; returns how many jobs there were."""
    conn.execute(delete(job_events).where(job_events.c.request_id.in_(request_ids)))
    conn.execute(delete(webhook_deliveries).where(webhook_deliveries.c.request_id.in_(request_ids)))
    return int(conn.execute(delete(jobs).where(jobs.c.id.in_(request_ids))).rowcount)


class IdempotencyConflictError(Exception):
    """The idempotency key was used in the last 24 hours for a different request."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"idempotency key already used by request {job.id}")
        self.job = job


class JobQueue:
    """Submit and cancel jobs (a part of ``JobStore``)."""

    def __init__(self, engine: Engine, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.engine = engine
        # How long a call retries a locked or unreachable database before it raises.
        self.retry_seconds = retry_seconds

    @retried
    def submit(self, job: NewJob, limits: SubmitLimits | None = None) -> Job:
        """Queue a job at the back of the queue (cancelled at its deadline if unfinished).

        With an idempotency key, a repeat of the same request (same ``request_hash``) by
        the same token within 24 hours returns the job the first one made; a different
        request under that key raises IdempotencyConflictError.

        ``limits`` are checked and the job inserted in one transaction that no other
        submit of this token (or, for the queue-wide cap, no other submit) interleaves
        with: concurrent submits cannot all pass a check that only one of them may pass.
        A refused submit raises LimitExceededError.
        """
        token_id, key, request_hash = job.token_id, job.idempotency_key, job.request_hash
        if key is not None:
            earlier = self.idempotent_twin(token_id, key, request_hash)
            if earlier is not None:
                return earlier
        now = utcnow()
        stmt = insert(jobs).values(job.row(now)).returning(*jobs.c)
        try:
            with submit_transaction(self.engine, token_id, limits or SubmitLimits()) as conn:
                if limits is not None:
                    check_limits(conn, token_id, limits, now)
                row = conn.execute(stmt).one()
                record_changes(conn, [row], now, notify=False)
                return job_from_row(row)
        except IntegrityError:
            if key is None:
                raise
            # A concurrent twin with the same key was inserted first: answer with it.
            twin = self.idempotent_twin(token_id, key, request_hash)
            if twin is None:
                raise
            return twin

    @retried
    def idempotent_twin(self, token_id: str, key: str, request_hash: str | None) -> Job | None:
        """The job this token submitted under ``key`` in the last 24 hours, if the request
        is the same (else IdempotencyConflictError); frees a key whose day has passed."""
        with self.engine.begin() as conn:
            row = conn.execute(
                select(jobs).where(jobs.c.token_id == token_id, jobs.c.idempotency_key == key)
            ).first()
            if row is None:
                return None
            job = job_from_row(row)
            if job.created_at < utcnow() - IDEMPOTENCY_WINDOW:
                conn.execute(update(jobs).where(jobs.c.seq == job.seq).values(idempotency_key=None))
                return None
        if job.request_hash != request_hash:
            raise IdempotencyConflictError(job)
        return job

    @retried
    def request_cancel(self, request_id: str) -> tuple[Job, CancelOutcome] | None:
        """Cancel a queued job at once, or flag a running one for its worker; None if unknown."""
        with self.engine.connect() as conn:
            seen = conn.execute(select(jobs).where(jobs.c.id == request_id)).first()
        if seen is None:
            return None
        current = job_from_row(seen)
        if current.status == JobStatus.RUNNING and current.cancel_requested:
            # Already asked: a repeated cancel is a read, not another write to queue up.
            return current, CancelOutcome.REQUESTED
        if current.status.is_final:
            if current.status == JobStatus.CANCELLED:
                return current, CancelOutcome.CANCELLED
            return current, CancelOutcome.NOT_CANCELLABLE
        now = utcnow()
        with self.engine.begin() as conn:
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == request_id, jobs.c.status == JobStatus.QUEUED)
                .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now)
                .returning(*jobs.c)
            ).first()
            if row is not None:
                record_changes(conn, [row], now)
                return job_from_row(row), CancelOutcome.CANCELLED
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == request_id, jobs.c.status == JobStatus.RUNNING)
                .values(cancel_requested=True)
                .returning(*jobs.c)
            ).first()
            if row is not None:
                return job_from_row(row), CancelOutcome.REQUESTED
            row = conn.execute(select(jobs).where(jobs.c.id == request_id)).first()
        if row is None:
            return None
        job = job_from_row(row)
        if job.status == JobStatus.CANCELLED:
            return job, CancelOutcome.CANCELLED
        return job, CancelOutcome.NOT_CANCELLABLE
