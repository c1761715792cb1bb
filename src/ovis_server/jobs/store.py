"""The job store, which is also the queue: one interface over SQLite and PostgreSQL.

Every state change is one SQL statement whose WHERE clause states what must still hold
(the job is queued; the job is running under this worker), so that concurrent API
processes and workers never overwrite each other: the loser of a race changes no row
and finds out from the row count.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from ovis_server.db.retry import DEFAULT_RETRY_SECONDS, retried
from ovis_server.db.schema import job_events, jobs, webhook_deliveries
from ovis_server.jobs.job import (
    CancelOutcome,
    DeliveryState,
    Job,
    JobEvent,
    JobStatus,
    StoredOutput,
)

IDEMPOTENCY_WINDOW = timedelta(hours=24)
# The error a job carries when its deadline (the submit's Cancel-After) cancels it.
DEADLINE_EXCEEDED = "deadline_exceeded"
DEADLINE_MESSAGE = "the request did not complete before its Cancel-After deadline; it was cancelled"


RATE_WINDOW = timedelta(minutes=1)
# PostgreSQL advisory lock namespaces (the two-key form) for the submit's limit checks:
# one lock per token, and one for the whole queue.
_PG_TOKEN_LOCKS = 0x0715_0001
_PG_QUEUE_LOCK = 0x0715_0002


@dataclass(frozen=True)
class SubmitLimits:
    """What a submit may not exceed; 0 turns a limit off."""

    per_minute: int = 0
    queued_per_token: int = 0
    queued: int = 0

    @property
    def any(self) -> bool:
        return bool(self.per_minute or self.queued_per_token or self.queued)


class LimitExceededError(Exception):
    """A submit refused because a limit is reached: ``kind`` is ``rate``, ``token_queue``
    or ``queue``; ``count`` what is counted; ``retry_after`` seconds until it may pass."""

    def __init__(self, kind: str, count: int, retry_after: float) -> None:
        super().__init__(f"{kind} limit reached ({count})")
        self.kind = kind
        self.count = count
        self.retry_after = retry_after


class LeaseLostError(Exception):
    """The job is no longer this worker's: its lease ran out and another took it over."""


class IdempotencyConflictError(Exception):
    """The idempotency key was used in the last 24 hours for a different request."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"idempotency key already used by request {job.id}")
        self.job = job


def utcnow() -> datetime:
    return datetime.now(UTC)


def _job(row: Row[Any]) -> Job:
    data = row._mapping
    return Job(
        id=data["id"],
        seq=data["seq"],
        token_id=data["token_id"],
        model_id=data["model_id"],
        input=dict(data["input"]),
        seed=data["seed"],
        batch_key=data["batch_key"],
        status=JobStatus(data["status"]),
        cancel_requested=bool(data["cancel_requested"]),
        progress_step=data["progress_step"],
        progress_total=data["progress_total"],
        attempts=data["attempts"],
        worker_id=data["worker_id"],
        lease_expires_at=data["lease_expires_at"],
        created_at=data["created_at"],
        started_at=data["started_at"],
        finished_at=data["finished_at"],
        error_type=data["error_type"],
        error_message=data["error_message"],
        outputs=tuple(StoredOutput.from_json(item) for item in data["outputs"] or ()),
        idempotency_key=data["idempotency_key"],
        request_hash=data["request_hash"],
        webhook_url=data["webhook_url"],
        webhook_intermediate=bool(data["webhook_intermediate"]),
        base_url=data["base_url"],
        deadline=data["deadline"],
        warnings=tuple(str(item) for item in data["warnings"] or ()),
    )


def _event(row: Row[Any]) -> JobEvent:
    data = row._mapping
    return JobEvent(
        seq=data["seq"],
        request_id=data["request_id"],
        status=JobStatus(data["status"]),
        step=data["step"],
        total=data["total"],
        at=data["at"],
    )


def _record(conn: Connection, rows: Iterable[Row[Any]], at: datetime, notify: bool = True) -> None:
    """Append the new state of each changed job to the event log and, where its submitter
    asked for webhooks, queue the message it is owed, in the caller's transaction.

    A final state owes a message to every webhook; any other change only to webhooks that
    asked for intermediate status. ``notify=False`` (the submit itself) owes none.
    """
    events: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for row in rows:
        data = row._mapping
        state = {
            "request_id": data["id"],
            "status": data["status"],
            "step": data["progress_step"],
            "total": data["progress_total"],
        }
        events.append({**state, "at": at})
        final = JobStatus(data["status"]).is_final
        if notify and data["webhook_url"] and (final or data["webhook_intermediate"]):
            messages.append(
                {
                    **state,
                    "id": "msg_" + uuid.uuid4().hex,
                    "token_id": data["token_id"],
                    "url": data["webhook_url"],
                    "state": DeliveryState.PENDING,
                    "attempts": 0,
                    "next_attempt_at": at,
                    "created_at": at,
                }
            )
    if events:
        conn.execute(insert(job_events), events)
    if messages:
        conn.execute(insert(webhook_deliveries), messages)


class JobStore:
    """Submit, observe, claim, run and finish jobs."""

    def __init__(self, engine: Engine, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.engine = engine
        # How long a call retries a locked or unreachable database before it raises.
        self.retry_seconds = retry_seconds

    # --- the API's side -------------------------------------------------------------

    @retried
    def submit(
        self,
        *,
        request_id: str,
        token_id: str,
        model_id: str,
        input: dict[str, Any],
        seed: int,
        total_steps: int,
        batch_key: str,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        webhook_url: str | None = None,
        webhook_intermediate: bool = False,
        base_url: str | None = None,
        deadline: datetime | None = None,
        limits: SubmitLimits | None = None,
    ) -> Job:
        """Queue a job at the back of the queue (cancelled at ``deadline`` if unfinished).

        With an idempotency key, a repeat of the same request (same ``request_hash``) by
        the same token within 24 hours returns the job the first one made; a different
        request under that key raises IdempotencyConflictError.

        ``limits`` are checked and the job inserted in one transaction that no other
        submit of this token (or, for the queue-wide cap, no other submit) interleaves
        with: concurrent submits cannot all pass a check that only one of them may pass.
        A refused submit raises LimitExceededError.
        """
        if idempotency_key is not None:
            earlier = self.idempotent_twin(token_id, idempotency_key, request_hash)
            if earlier is not None:
                return earlier
        now = utcnow()
        stmt = (
            insert(jobs)
            .values(
                id=request_id,
                token_id=token_id,
                model_id=model_id,
                input=input,
                seed=seed,
                batch_key=batch_key,
                status=JobStatus.QUEUED,
                cancel_requested=False,
                progress_step=0,
                progress_total=total_steps,
                attempts=0,
                created_at=now,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                webhook_url=webhook_url,
                webhook_intermediate=webhook_intermediate,
                base_url=base_url,
                deadline=deadline,
            )
            .returning(*jobs.c)
        )
        try:
            with self._submit_transaction(token_id, limits or SubmitLimits()) as conn:
                if limits is not None:
                    self._check_limits(conn, token_id, limits, now)
                row = conn.execute(stmt).one()
                _record(conn, [row], now, notify=False)
                return _job(row)
        except IntegrityError:
            if idempotency_key is None:
                raise
            # A concurrent twin with the same key was inserted first: answer with it.
            twin = self.idempotent_twin(token_id, idempotency_key, request_hash)
            if twin is None:
                raise
            return twin

    @contextmanager
    def _submit_transaction(self, token_id: str, limits: SubmitLimits) -> Iterator[Connection]:
        """A transaction holding the locks the limit checks need until it ends.

        SQLite: BEGIN IMMEDIATE takes the database's write lock before the counts are
        read. PostgreSQL: transaction-scoped advisory locks on the token and, with a
        queue-wide cap, on the queue (always in that order, so that no two submits
        deadlock); each count then sees every submit committed before it.
        """
        if not limits.any:
            with self.engine.begin() as conn:
                yield conn
            return
        with self.engine.connect() as conn:
            if self.engine.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:space, hashtext(:token))"),
                    {"space": _PG_TOKEN_LOCKS, "token": token_id},
                )
                if limits.queued:
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:space, 0)"),
                        {"space": _PG_QUEUE_LOCK},
                    )
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    @staticmethod
    def _check_limits(conn: Connection, token_id: str, limits: SubmitLimits, now: datetime) -> None:
        if limits.per_minute:
            count, first = conn.execute(
                select(func.count(), func.min(jobs.c.created_at)).where(
                    jobs.c.token_id == token_id, jobs.c.created_at > now - RATE_WINDOW
                )
            ).one()
            if count >= limits.per_minute:
                if isinstance(first, str):  # SQLite's min() hands back the stored text
                    first = datetime.fromisoformat(first).replace(tzinfo=UTC)
                wait = (first + RATE_WINDOW - now).total_seconds() if first else 1.0
                raise LimitExceededError("rate", int(count), wait)
        queued = select(func.count()).select_from(jobs).where(jobs.c.status == JobStatus.QUEUED)
        if limits.queued_per_token:
            mine = int(conn.execute(queued.where(jobs.c.token_id == token_id)).scalar_one())
            if mine >= limits.queued_per_token:
                raise LimitExceededError("token_queue", mine, 0)
        if limits.queued:
            total = int(conn.execute(queued).scalar_one())
            if total >= limits.queued:
                raise LimitExceededError("queue", total, 0)

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
            job = _job(row)
            if job.created_at < utcnow() - IDEMPOTENCY_WINDOW:
                conn.execute(update(jobs).where(jobs.c.seq == job.seq).values(idempotency_key=None))
                return None
        if job.request_hash != request_hash:
            raise IdempotencyConflictError(job)
        return job

    @retried
    def get(self, request_id: str) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == request_id)).first()
        return None if row is None else _job(row)

    @retried
    def queue_position(self, job: Job) -> int:
        """How many queued jobs run before this one: 0 means it is next."""
        stmt = (
            select(func.count())
            .select_from(jobs)
            .where(jobs.c.status == JobStatus.QUEUED, jobs.c.seq < job.seq)
        )
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    @retried
    def queue_positions(self, request_ids: Sequence[str]) -> dict[str, int]:
        """The queue position of each of these jobs that is queued, in one query."""
        if not request_ids:
            return {}
        ranked = (
            select(
                jobs.c.id,
                (func.row_number().over(order_by=jobs.c.seq) - 1).label("position"),
            )
            .where(jobs.c.status == JobStatus.QUEUED)
            .subquery()
        )
        stmt = select(ranked.c.id, ranked.c.position).where(ranked.c.id.in_(request_ids))
        with self.engine.connect() as conn:
            return {row.id: int(row.position) for row in conn.execute(stmt)}

    @retried
    def snapshot(self, request_id: str) -> tuple[Job, int] | None:
        """The job and the seq of its latest event, read together."""
        latest = (
            select(func.coalesce(func.max(job_events.c.seq), 0))
            .where(job_events.c.request_id == request_id)
            .scalar_subquery()
        )
        with self.engine.connect() as conn:
            row = conn.execute(
                select(jobs, latest.label("latest_event")).where(jobs.c.id == request_id)
            ).first()
        return None if row is None else (_job(row), int(row._mapping["latest_event"]))

    @retried
    def events_after(self, seq: int, limit: int = 1000, also: Sequence[int] = ()) -> list[JobEvent]:
        """Events of all jobs with a larger seq than ``seq`` (at most ``limit``), and those
        of the seqs in ``also`` that exist by now, oldest first."""
        newer = select(job_events).where(job_events.c.seq > seq).order_by(job_events.c.seq)
        with self.engine.connect() as conn:
            found = [_event(row) for row in conn.execute(newer.limit(limit))]
            if also:
                late = select(job_events).where(job_events.c.seq.in_(list(also)))
                found += [_event(row) for row in conn.execute(late)]
        return sorted(found, key=lambda event: event.seq)

    @retried
    def last_event_seq(self) -> int:
        stmt = select(func.coalesce(func.max(job_events.c.seq), 0))
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    @retried
    def list_for_token(self, token_id: str, limit: int, before_seq: int | None) -> list[Job]:
        """The token's jobs, newest first, older than ``before_seq`` when given."""
        stmt = select(jobs).where(jobs.c.token_id == token_id)
        if before_seq is not None:
            stmt = stmt.where(jobs.c.seq < before_seq)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt.order_by(jobs.c.seq.desc()).limit(limit))
            return [_job(row) for row in rows]

    @retried
    def status_counts(self) -> dict[JobStatus, int]:
        stmt = select(jobs.c.status, func.count()).group_by(jobs.c.status)
        with self.engine.connect() as conn:
            counts = {JobStatus(status): int(count) for status, count in conn.execute(stmt)}
        return {status: counts.get(status, 0) for status in JobStatus}

    @retried
    def timings(self) -> list[tuple[JobStatus, datetime, datetime | None, datetime | None, int]]:
        """(status, created, started, finished, steps) of every job that has started."""
        stmt = select(
            jobs.c.status,
            jobs.c.created_at,
            jobs.c.started_at,
            jobs.c.finished_at,
            jobs.c.progress_total,
        ).where(jobs.c.started_at.is_not(None))
        with self.engine.connect() as conn:
            return [
                (JobStatus(row.status), row.created_at, row.started_at, row.finished_at,
                 row.progress_total)
                for row in conn.execute(stmt)
            ]  # fmt: skip

    @retried
    def count_queued(self, token_id: str | None = None) -> int:
        """Jobs waiting to run, in all or for one token."""
        stmt = select(func.count()).select_from(jobs).where(jobs.c.status == JobStatus.QUEUED)
        if token_id is not None:
            stmt = stmt.where(jobs.c.token_id == token_id)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    @retried
    def finished_before(self, cutoff: datetime, limit: int = 500) -> list[Job]:
        """Jobs that reached a final state before ``cutoff``, oldest first. Webhook messages
        they still owe do not keep them: retention is a promise about the data."""
        stmt = (
            select(jobs)
            .where(
                jobs.c.status.in_([JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]),
                jobs.c.finished_at < cutoff,
            )
            .order_by(jobs.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [_job(row) for row in conn.execute(stmt)]

    @retried
    def delete(self, request_ids: Sequence[str]) -> int:
        if not request_ids:
            return 0
        with self.engine.begin() as conn:
            conn.execute(delete(job_events).where(job_events.c.request_id.in_(request_ids)))
            conn.execute(
                delete(webhook_deliveries).where(webhook_deliveries.c.request_id.in_(request_ids))
            )
            return int(conn.execute(delete(jobs).where(jobs.c.id.in_(request_ids))).rowcount)

    @retried
    def request_cancel(self, request_id: str) -> tuple[Job, CancelOutcome] | None:
        """Cancel a queued job at once, or flag a running one for its worker; None if unknown."""
        with self.engine.connect() as conn:
            seen = conn.execute(select(jobs).where(jobs.c.id == request_id)).first()
        if seen is None:
            return None
        current = _job(seen)
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
                _record(conn, [row], now)
                return _job(row), CancelOutcome.CANCELLED
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == request_id, jobs.c.status == JobStatus.RUNNING)
                .values(cancel_requested=True)
                .returning(*jobs.c)
            ).first()
            if row is not None:
                return _job(row), CancelOutcome.REQUESTED
            row = conn.execute(select(jobs).where(jobs.c.id == request_id)).first()
        if row is None:
            return None
        job = _job(row)
        if job.status == JobStatus.CANCELLED:
            return job, CancelOutcome.CANCELLED
        return job, CancelOutcome.NOT_CANCELLABLE

    @retried
    def expire_deadlines(self) -> tuple[int, int]:
        """Act on the jobs whose deadline has passed: cancel the queued ones at once (they
        leave the queue) and flag the running ones, which their worker stops at the next
        step; both carry the reason as their error. Returns (cancelled, flagged).

        Rows another transaction holds are skipped, not waited for: the next pass (about a
        second later) takes them.
        """
        now = utcnow()
        reason = {"error_type": DEADLINE_EXCEEDED, "error_message": DEADLINE_MESSAGE}
        with self.engine.begin() as conn:
            queued = conn.execute(
                update(jobs)
                .where(jobs.c.seq == self._past_deadline(now, JobStatus.QUEUED).c.seq)
                .values(
                    status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now, **reason
                )
                .returning(*jobs.c)
            ).all()
            _record(conn, queued, now)
            running = conn.execute(
                update(jobs)
                .where(jobs.c.seq == self._past_deadline(now, JobStatus.RUNNING).c.seq)
                .values(cancel_requested=True, **reason)
                .returning(jobs.c.seq)
            ).all()
        return len(queued), len(running)

    @staticmethod
    def _past_deadline(now: datetime, status: JobStatus) -> Any:
        """The jobs in ``status`` whose deadline has passed (running ones not yet flagged),
        locked for the update that acts on them (PostgreSQL; SQLite ignores it)."""
        found = select(jobs.c.seq).where(jobs.c.status == status, jobs.c.deadline < now)
        if status == JobStatus.RUNNING:
            found = found.where(jobs.c.cancel_requested.is_(False))
        return (
            found.with_for_update(skip_locked=True)
            .cte(f"past_deadline_{status.value}")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )

    # --- the worker's side ----------------------------------------------------------

    @retried
    def set_warnings(self, request_id: str, warnings: Sequence[str]) -> None:
        """Keep notes for the job's client (shown in its status and result bodies)."""
        stmt = update(jobs).where(jobs.c.id == request_id).values(warnings=list(warnings))
        with self.engine.begin() as conn:
            conn.execute(stmt)

    @retried
    def _claim(
        self, worker_id: str, lease_seconds: float, limit: int, batch_key: str | None = None
    ) -> list[Job]:
        """Move up to ``limit`` of the oldest queued jobs (of one batch key, if given) to
        this worker under a lease, in one statement."""
        now = utcnow()
        # A job past its deadline is never started: expire_deadlines cancels it.
        candidates = select(jobs.c.seq).where(
            jobs.c.status == JobStatus.QUEUED,
            or_(jobs.c.deadline.is_(None), jobs.c.deadline > now),
        )
        if batch_key is not None:
            candidates = candidates.where(jobs.c.batch_key == batch_key)
        # PostgreSQL: concurrent workers skip rows another is claiming, and the picked rows
        # are materialised once (a plain IN (subquery) may be evaluated more than once and
        # claim more than the limit). SQLite has one writer at a time and ignores both.
        picked = (
            candidates.order_by(jobs.c.seq)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("picked")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
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
            _record(conn, rows, now)
            claimed = [_job(row) for row in rows]
        return sorted(claimed, key=lambda job: job.seq)

    def claim_next(self, worker_id: str, lease_seconds: float) -> Job | None:
        """Take the oldest queued job under a lease, or None when the queue is empty."""
        claimed = self._claim(worker_id, lease_seconds, 1)
        return claimed[0] if claimed else None

    def claim_batch(self, worker_id: str, lease_seconds: float, max_batch: int) -> list[Job]:
        """The oldest queued job and up to ``max_batch - 1`` more that share its batch key,
        all under one lease; an empty list when the queue is empty."""
        head = self.claim_next(worker_id, lease_seconds)
        if head is None:
            return []
        if max_batch <= 1:
            return [head]
        return [head, *self._claim(worker_id, lease_seconds, max_batch - 1, head.batch_key)]

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
            _record(conn, rows, now)
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
                _record(conn, [row], utcnow())
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
        return _job(
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
        return _job(
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
        return _job(
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
        return _job(
            self._update_owned(
                request_id,
                worker_id,
                status=JobStatus.QUEUED,
                worker_id=None,
                lease_expires_at=None,
                started_at=None,
                progress_step=0,
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
        with self.engine.begin() as conn:
            cancelled = conn.execute(
                update(jobs)
                .where(expired, jobs.c.cancel_requested.is_(True))
                .values(status=JobStatus.CANCELLED, finished_at=now, lease_expires_at=None)
                .returning(*jobs.c)
            ).all()
            failed = conn.execute(
                update(jobs)
                .where(expired, jobs.c.attempts >= max_attempts)
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
                update(jobs)
                .where(expired)
                .values(
                    status=JobStatus.QUEUED,
                    worker_id=None,
                    lease_expires_at=None,
                    started_at=None,
                    progress_step=0,
                )
                .returning(*jobs.c)
            ).all()
            changed = [*cancelled, *failed, *requeued]
            _record(conn, changed, now)
        return len(changed)
