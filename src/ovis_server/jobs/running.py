"""The queue's state changes on the worker's side: claim, progress, lease, finish, release,
recover (the API's side is ``queue.py``).

Every state change is one SQL statement whose WHERE clause states what must still hold
(the job is queued; the job is running under this worker), so that concurrent API
processes and workers never overwrite each other: the loser of a race changes no row
and finds out from the row count. Each change is recorded (event log, webhook outbox)
in its own transaction by ``record_changes``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, Row, and_, or_, select, update

from ovis_server.db.retry import DEFAULT_RETRY_SECONDS, retried
from ovis_server.db.schema import jobs
from ovis_server.db.skip_locked import any_row, locked_pick
from ovis_server.jobs.events import record_changes, utcnow
from ovis_server.jobs.job import Job, JobStatus, StoredOutput
from ovis_server.jobs.rows import job_from_row

# A running job put back at its place in the queue (its seq is unchanged).
BACK_IN_QUEUE: dict[str, Any] = {
    "status": JobStatus.QUEUED,
    "worker_id": None,
    "lease_expires_at": None,
    "started_at": None,
    "progress_step": 0,
}


class LeaseLostError(Exception):
    """The job is no longer this worker's: its lease ran out and another took it over."""


class RunningJobs:
    """Claim, run and finish jobs under a lease (a part of ``JobStore``)."""

    def __init__(self, engine: Engine, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.engine = engine
        # How long a call retries a locked or unreachable database before it raises.
        self.retry_seconds = retry_seconds

    @retried
    def set_warnings(self, request_id: str, warnings: Sequence[str]) -> None:
        """Keep notes for the job's client (shown in its status and result bodies)."""
        stmt = update(jobs).where(jobs.c.id == request_id).values(warnings=list(warnings))
        with self.engine.begin() as conn:
            conn.execute(stmt)

    @retried
    def _claim(
        self,
        worker_id: str,
        lease_seconds: float,
        limit: int,
        batch_key: str | None = None,
        model_ids: Collection[str] | None = None,
    ) -> list[Job]:
        """Move up to ``limit`` of the oldest queued jobs (of one batch key, of these
        models, if given) to this worker under a lease, in one statement."""
        now = utcnow()
        # A job past its deadline is never started: expire_deadlines cancels it.
        candidates = select(jobs.c.seq).where(
            jobs.c.status == JobStatus.QUEUED,
            or_(jobs.c.deadline.is_(None), jobs.c.deadline > now),
        )
        if batch_key is not None:
            candidates = candidates.where(jobs.c.batch_key == batch_key)
        if model_ids is not None:
            candidates = candidates.where(jobs.c.model_id.in_(model_ids))
        if not any_row(self.engine, candidates):  # an idle worker's poll ends here
            return []
        # Concurrent workers skip the rows another is claiming (see locked_pick).
        picked = locked_pick(candidates.order_by(jobs.c.seq).limit(limit), "picked")
        stmt = (
            update(jobs)
            .where(jobs.c.seq == picked.c.seq, jobs.c.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.RUNNING,
                worker_id=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                started_at=now,
                progress_step=0,
                attempts=jobs.c.attempts + 1,
            )
            .returning(*jobs.c)
        )
        with self.engine.begin() as conn:
            rows = conn.execute(stmt).all()
            record_changes(conn, rows, now)
            claimed = [job_from_row(row) for row in rows]
        return sorted(claimed, key=lambda job: job.seq)

    def claim_next(
        self, worker_id: str, lease_seconds: float, model_ids: Collection[str] | None = None
    ) -> Job | None:
        """Take the oldest queued job (of one of ``model_ids``, if given: the models the
        worker has loaded) under a lease, or None when there is none."""
        claimed = self._claim(worker_id, lease_seconds, 1, model_ids=model_ids)
        return claimed[0] if claimed else None

    def claim_batch(
        self,
        worker_id: str,
        lease_seconds: float,
        max_batch: int | Callable[[Job], int],
        model_ids: Collection[str] | None = None,
    ) -> list[Job]:
        """The oldest queued job (as ``claim_next`` picks it) and up to ``max_batch - 1``
        more that share its batch key, all under one lease; an empty list when there is none.
        ``max_batch`` may be a function of that oldest job (the worker's: how many of its size
        fit in memory)."""
        head = self.claim_next(worker_id, lease_seconds, model_ids)
        if head is None:
            return []
        limit = max_batch(head) if callable(max_batch) else max_batch
        if limit <= 1:
            return [head]
        return [head, *self._claim(worker_id, lease_seconds, limit - 1, head.batch_key)]

    @retried
    def report_batch_progress(
        self, request_ids: Sequence[str], worker_id: str, step: int, lease_seconds: float
    ) -> tuple[set[str], set[str]]:
        """Record a step for several jobs at once and renew their leases.

        Returns (the jobs to cancel, the jobs no longer this worker's).
        """
        now = utcnow()
        stmt = (
            update(jobs)
            .where(self._held_by(worker_id, request_ids))
            .values(progress_step=step, lease_expires_at=now + timedelta(seconds=lease_seconds))
            .returning(*jobs.c)
        )
        with self.engine.begin() as conn:
            rows = conn.execute(stmt).all()
            record_changes(conn, rows, now)
        held = {row.id for row in rows}
        cancel = {row.id for row in rows if row.cancel_requested}
        return cancel, set(request_ids) - held

    @retried
    def renew_leases(self, request_ids: Sequence[str], worker_id: str, lease_seconds: float) -> int:
        stmt = (
            update(jobs)
            .where(self._held_by(worker_id, request_ids))
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        )
        with self.engine.begin() as conn:
            return int(conn.execute(stmt).rowcount)

    @staticmethod
    def _held_by(worker_id: str, request_ids: Sequence[str]) -> ColumnElement[bool]:
        """The jobs among ``request_ids`` that run under ``worker_id``'s lease still."""
        return and_(
            jobs.c.id.in_(request_ids),
            jobs.c.worker_id == worker_id,
            jobs.c.status == JobStatus.RUNNING,
        )

    @retried
    def _update_owned(
        self, /, request_id: str, owner: str, record: bool = True, **values: Any
    ) -> Row[Any]:
        """Change a running job that ``owner`` still holds (logging the change unless
        ``record`` is false), or raise LeaseLostError."""
        stmt = (
            update(jobs)
            .where(self._held_by(owner, [request_id]))
            .values(**values)
            .returning(*jobs.c)
        )
        with self.engine.begin() as conn:
            row = conn.execute(stmt).first()
            if row is not None and record:
                record_changes(conn, [row], utcnow())
        if row is None:
            raise LeaseLostError(f"job {request_id} is no longer held by worker {owner}")
        return row

    def report_progress(
        self, request_id: str, worker_id: str, step: int, lease_seconds: float
    ) -> bool:
        """Record a finished step and renew the lease; True if the job should be cancelled."""
        row = self._update_owned(
            request_id,
            worker_id,
            progress_step=step,
            lease_expires_at=utcnow() + timedelta(seconds=lease_seconds),
        )
        return bool(row._mapping["cancel_requested"])

    def renew_lease(self, request_id: str, worker_id: str, lease_seconds: float) -> None:
        self._update_owned(
            request_id,
            worker_id,
            record=False,
            lease_expires_at=utcnow() + timedelta(seconds=lease_seconds),
        )

    def complete(self, request_id: str, worker_id: str, outputs: Sequence[StoredOutput]) -> Job:
        return job_from_row(
            self._update_owned(
                request_id,
                worker_id,
                status=JobStatus.SUCCEEDED,
                outputs=[output.to_json() for output in outputs],
                finished_at=utcnow(),
                lease_expires_at=None,
            )
        )

    def fail(self, request_id: str, worker_id: str, error_type: str, message: str) -> Job:
        return job_from_row(
            self._update_owned(
                request_id,
                worker_id,
                status=JobStatus.FAILED,
                error_type=error_type,
                error_message=message,
                finished_at=utcnow(),
                lease_expires_at=None,
            )
        )

    def mark_cancelled(self, request_id: str, worker_id: str) -> Job:
        return job_from_row(
            self._update_owned(
                request_id,
                worker_id,
                status=JobStatus.CANCELLED,
                finished_at=utcnow(),
                lease_expires_at=None,
            )
        )

    def release(self, request_id: str, worker_id: str) -> Job:
        """Put a job this worker stops early back at its place in the queue.

        The interrupted run does not count as an attempt: the job did nothing wrong.
        """
        return job_from_row(
            self._update_owned(
                request_id,
                worker_id,
                **BACK_IN_QUEUE,
                attempts=jobs.c.attempts - 1,
            )
        )

    @retried
    def recover_expired(self, max_attempts: int) -> int:
        """Handle jobs whose worker died: requeue them, or end them; returns how many.

        A job cancelled while its worker was dead ends cancelled; one that has already
        cost ``max_attempts`` workers fails instead of looping for ever.
        """
        now = utcnow()
        expired = (jobs.c.status == JobStatus.RUNNING) & (jobs.c.lease_expires_at < now)
        return self._recover(expired, max_attempts, now)

    @retried
    def release_dead_worker(self, host: str, pid: int, max_attempts: int) -> int:
        """Handle at once, as ``recover_expired`` does when a lease lapses, the jobs of a
        worker process known to be dead (``serve`` saw its child exit): they go back to
        the queue, or end, without waiting out their lease; returns how many.

        A worker's id starts with ``host:pid:`` (worker/process.py ``new_worker_id``).
        """
        held = (jobs.c.status == JobStatus.RUNNING) & jobs.c.worker_id.startswith(
            f"{host}:{pid}:", autoescape=True
        )
        return self._recover(held, max_attempts, utcnow())

    def _recover(self, lost: ColumnElement[bool], max_attempts: int, now: datetime) -> int:
        """Requeue, cancel or fail the ``lost`` running jobs, in one transaction."""
        with self.engine.begin() as conn:
            cancelled = conn.execute(
                update(jobs)
                .where(lost, jobs.c.cancel_requested.is_(True))
                .values(status=JobStatus.CANCELLED, finished_at=now, lease_expires_at=None)
                .returning(*jobs.c)
            ).all()
            failed = conn.execute(
                update(jobs)
                .where(lost, jobs.c.attempts >= max_attempts)
                .values(
                    status=JobStatus.FAILED,
                    error_type="worker_lost",
                    error_message=(
                        f"the worker running this job stopped {max_attempts} times before "
                        "finishing it; it was not retried again"
                    ),
                    finished_at=now,
                    lease_expires_at=None,
                )
                .returning(*jobs.c)
            ).all()
            requeued = conn.execute(
                update(jobs).where(lost).values(**BACK_IN_QUEUE).returning(*jobs.c)
            ).all()
            changed = [*cancelled, *failed, *requeued]
            record_changes(conn, changed, now)
        return len(changed)
