"""The few figures /metrics reads from the shared database, each through an index.

Counts of states that stay small (jobs queued or running, webhook messages pending) are
index range counts; jobs and messages that finished are read only when they finished
after a given time (``finished_at`` is indexed), so a scrape costs the same however many
finished jobs retention keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, String, func, select, type_coerce

from ovis_server.db.schema import jobs, webhook_deliveries
from ovis_server.jobs.job import DeliveryState, JobStatus

# Keys per IN (…) list: well under SQLite's and PostgreSQL's limits on bound values.
CHUNK = 1000


# A finished job, as the index has it: (seq, finished_at as the database hands it back,
# unparsed). SQLite may give a deleted job's seq to a new one; with its end time the key
# stays unique.
JobKey = tuple[int, object]
_RAW_FINISHED = type_coerce(jobs.c.finished_at, String).label("raw_finished")


@dataclass(frozen=True)
class FinishedJob:
    key: JobKey
    status: JobStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime
    steps: int


@dataclass(frozen=True)
class FinishedMessage:
    key: str  # id
    state: DeliveryState
    finished_at: datetime


class StatsReader:
    """Aggregates and recently finished rows, for the metrics collector: each read on the
    connection a scrape holds."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def queued_by_model(self, conn: Connection) -> dict[str, int]:
        """Jobs queued per model (ix_jobs_status_model_id_seq: reads only those rows)."""
        stmt = (
            select(jobs.c.model_id, func.count())
            .where(jobs.c.status == JobStatus.QUEUED)
            .group_by(jobs.c.model_id)
        )
        return {str(model_id): int(count) for model_id, count in conn.execute(stmt)}

    def unfinished_counts(self, conn: Connection) -> dict[JobStatus, int]:
        """Jobs queued and jobs running (ix_jobs_status_seq: reads only those rows)."""
        wanted = [JobStatus.QUEUED, JobStatus.RUNNING]
        stmt = (
            select(jobs.c.status, func.count())
            .where(jobs.c.status.in_(wanted))
            .group_by(jobs.c.status)
        )
        found = {JobStatus(status): int(count) for status, count in conn.execute(stmt)}
        return {status: found.get(status, 0) for status in wanted}

    def pending_messages(self, conn: Connection) -> int:
        """Webhook messages not yet taken by their receiver."""
        stmt = (
            select(func.count())
            .select_from(webhook_deliveries)
            .where(webhook_deliveries.c.state == DeliveryState.PENDING)
        )
        return int(conn.execute(stmt).scalar_one())

    def jobs_finished_after(self, conn: Connection, since: datetime) -> list[JobKey]:
        """The keys of jobs that reached a final state after ``since``, read from
        ix_jobs_finished_at_seq alone."""
        stmt = select(jobs.c.seq, _RAW_FINISHED).where(jobs.c.finished_at > since)
        return [(int(seq), raw) for seq, raw in conn.execute(stmt)]

    def finished_jobs(self, conn: Connection, keys: Sequence[JobKey]) -> list[FinishedJob]:
        c = jobs.c
        columns = (c.seq, _RAW_FINISHED, c.status, c.created_at, c.started_at, c.finished_at)
        seqs = [seq for seq, _ in keys]
        found: list[FinishedJob] = []
        for start in range(0, len(seqs), CHUNK):
            stmt = select(*columns, c.progress_total).where(
                c.seq.in_(seqs[start : start + CHUNK]), c.finished_at.is_not(None)
            )
            found += [
                FinishedJob(
                    key=(row.seq, row.raw_finished),
                    status=JobStatus(row.status),
                    created_at=row.created_at,
                    started_at=row.started_at,
                    finished_at=row.finished_at,
                    steps=row.progress_total,
                )
                for row in conn.execute(stmt)
            ]
        return found

    def messages_finished_after(self, conn: Connection, since: datetime) -> list[str]:
        """The ids of webhook messages delivered or given up after ``since``."""
        c = webhook_deliveries.c
        stmt = select(c.id).where(c.finished_at > since)
        return [str(key) for key in conn.execute(stmt).scalars()]

    def finished_messages(self, conn: Connection, ids: Sequence[str]) -> list[FinishedMessage]:
        c = webhook_deliveries.c
        found: list[FinishedMessage] = []
        for start in range(0, len(ids), CHUNK):
            stmt = select(c.id, c.state, c.finished_at).where(
                c.id.in_(ids[start : start + CHUNK]), c.finished_at.is_not(None)
            )
            found += [
                FinishedMessage(
                    key=row.id, state=DeliveryState(row.state), finished_at=row.finished_at
                )
                for row in conn.execute(stmt)
            ]
        return found
