"""The job store's read queries: a job, lists, queue positions, the event log, counts.

Reads change nothing; each is retried within the store's retry window when the database
is locked or unreachable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Select, bindparam, case, func, or_, select

from ovis_server.db.loop_reads import LoopReads, LoopStatement
from ovis_server.db.retry import DEFAULT_RETRY_SECONDS, retried
from ovis_server.db.schema import job_events, jobs
from ovis_server.jobs.events import utcnow
from ovis_server.jobs.job import Job, JobEvent, JobState, JobStatus
from ovis_server.jobs.rows import event_from_row, job_from_row, state_from_mapping


def _with_position() -> Select[Any]:
    ahead = jobs.alias("ahead")
    position = (
        select(func.count())
        .select_from(ahead)
        .where(
            ahead.c.status == JobStatus.QUEUED,
            ahead.c.model_id == jobs.c.model_id,  # workers claim by model
            ahead.c.seq < jobs.c.seq,
        )
        .scalar_subquery()
    )
    queued = case((jobs.c.status == JobStatus.QUEUED, position))
    state = [jobs.c[field.name] for field in fields(JobState)]
    return select(*state, queued.label("queue_position")).where(
        jobs.c.id == bindparam("request_id")
    )


# Built once: a status call is the API's most frequent, and building a statement (the
# alias above makes columns) costs more than running it.
_WITH_POSITION = _with_position()
_GET = select(jobs).where(jobs.c.id == bindparam("request_id"))


def _state_and_position(found: Mapping[Any, Any]) -> tuple[JobState, int | None]:
    queued_ahead = found["queue_position"]
    return state_from_mapping(found), None if queued_ahead is None else int(queued_ahead)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


class JobQueries:
    """Read jobs and their events (a part of ``JobStore``, which also changes them)."""

    def __init__(self, engine: Engine, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.engine = engine
        # How long a call retries a locked or unreachable database before it raises.
        self.retry_seconds = retry_seconds
        self._loop_with_position: LoopStatement | None = None

    def _one_statement(self) -> Connection:
        """A connection for a read that is one statement. On PostgreSQL, outside any
        transaction: one round trip, not BEGIN, the query, then ROLLBACK. (SQLite's driver
        begins none for a read: there, asking for it would cost a PRAGMA on each return.)"""
        conn = self.engine.connect()
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        return conn

    @retried
    def get(self, request_id: str) -> Job | None:
        with self._one_statement() as conn:
            row = conn.execute(_GET, {"request_id": request_id}).first()
        return None if row is None else job_from_row(row)

    @retried
    def get_with_position(self, request_id: str) -> tuple[JobState, int | None] | None:
        """Where the job stands and, if it is queued, its queue position, in one query (a
        status call's one read); None if there is no such job."""
        return self.get_with_position_once(request_id)

    def get_with_position_once(self, request_id: str) -> tuple[JobState, int | None] | None:
        """``get_with_position``, tried once: a transient error is raised, not retried."""
        with self._one_statement() as conn:
            row = conn.execute(_WITH_POSITION, {"request_id": request_id}).first()
        return None if row is None else _state_and_position(row._mapping)

    async def get_with_position_on_loop(
        self, reads: LoopReads, request_id: str
    ) -> tuple[JobState, int | None] | None:
        """``get_with_position`` through ``reads`` on the running event loop (PostgreSQL);
        ``LoopReadError`` if the read was not made."""
        if self._loop_with_position is None:
            self._loop_with_position = LoopStatement(_WITH_POSITION, self.engine)
        found = await reads.first(self._loop_with_position, request_id=request_id)
        return None if found is None else _state_and_position(found)

    @retried
    def queue_position(self, job: Job) -> int:
        """How many queued jobs of this job's model run before it: 0 means it is next.
        Workers claim by model, so another model's jobs do not stand in its way."""
        stmt = (
            select(func.count())
            .select_from(jobs)
            .where(
                jobs.c.status == JobStatus.QUEUED,
                jobs.c.model_id == job.model_id,
                jobs.c.seq < job.seq,
            )
        )
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    @retried
    def queue_positions(self, request_ids: Sequence[str]) -> dict[str, int]:
        """The queue position of each of these jobs that is queued (among its own model's
        jobs, as ``queue_position``), in one query."""
        if not request_ids:
            return {}
        place = func.row_number().over(partition_by=jobs.c.model_id, order_by=jobs.c.seq)
        ranked = (
            select(jobs.c.id, (place - 1).label("position"))
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
        return None if row is None else (job_from_row(row), int(row._mapping["latest_event"]))

    @retried
    def events_after(self, seq: int, limit: int = 1000, also: Sequence[int] = ()) -> list[JobEvent]:
        """Events of all jobs with a larger seq than ``seq`` (at most ``limit``), and those
        of the seqs in ``also`` that exist by now, oldest first."""
        newer = select(job_events).where(job_events.c.seq > seq).order_by(job_events.c.seq)
        with self.engine.connect() as conn:
            found = [event_from_row(row) for row in conn.execute(newer.limit(limit))]
            if also:
                late = select(job_events).where(job_events.c.seq.in_(list(also)))
                found += [event_from_row(row) for row in conn.execute(late)]
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
            return [job_from_row(row) for row in rows]

    @retried
    def count_queued(self, token_id: str | None = None) -> int:
        """Jobs waiting to run, in all or for one token."""
        stmt = select(func.count()).select_from(jobs).where(jobs.c.status == JobStatus.QUEUED)
        if token_id is not None:
            stmt = stmt.where(jobs.c.token_id == token_id)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    @retried
    def queued_by_model(self) -> dict[str, int]:
        """Jobs waiting to run, per model (models with none are absent)."""
        stmt = (
            select(jobs.c.model_id, func.count())
            .where(jobs.c.status == JobStatus.QUEUED)
            .group_by(jobs.c.model_id)
        )
        with self.engine.connect() as conn:
            return {str(model_id): int(count) for model_id, count in conn.execute(stmt)}

    @retried
    def queue_heads(self, model_ids: Sequence[str]) -> dict[str, float]:
        """When the oldest queued job of each of these models was submitted (Unix seconds);
        models with none queued are absent. Jobs past their deadline do not count: no worker
        starts them."""
        if not model_ids:
            return {}
        stmt = (
            select(jobs.c.model_id, func.min(jobs.c.created_at))
            .where(
                jobs.c.status == JobStatus.QUEUED,
                jobs.c.model_id.in_(list(model_ids)),
                or_(jobs.c.deadline.is_(None), jobs.c.deadline > utcnow()),
            )
            .group_by(jobs.c.model_id)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return {str(model_id): _utc(oldest).timestamp() for model_id, oldest in rows}

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
            return [job_from_row(row) for row in conn.execute(stmt)]
