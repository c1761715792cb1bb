"""What a submit may not exceed (requests a minute, queued jobs per token and in all), and
the transaction in which a submit checks them and inserts its job.

The checks and the insert are one transaction that no other submit of this token (or, for
the queue-wide cap, no other submit) interleaves with: concurrent submits cannot all pass
a check that only one of them may pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, func, select, text

from ovis_server.db.schema import jobs
from ovis_server.jobs.job import JobStatus

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


@contextmanager
def submit_transaction(engine: Engine, token_id: str, limits: SubmitLimits) -> Iterator[Connection]:
    """A transaction holding the locks the limit checks need until it ends.

    SQLite: BEGIN IMMEDIATE takes the database's write lock before the counts are
    read. PostgreSQL: transaction-scoped advisory locks on the token and, with a
    queue-wide cap, on the queue (always in that order, so that no two submits
    deadlock); each count then sees every submit committed before it.
    """
    if not limits.any:
        with engine.begin() as conn:
            yield conn
        return
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
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


def check_limits(conn: Connection, token_id: str, limits: SubmitLimits, now: datetime) -> None:
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
