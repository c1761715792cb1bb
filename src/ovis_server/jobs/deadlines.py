"""Deadlines: a job not finished by its submit's Cancel-After ends cancelled.

Each API process sweeps about once a second: one statement cancels the queued jobs past
their deadline (so they leave the queue even while every worker is busy), another flags
the running ones, which their worker stops at its next denoising step.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Engine, Select, select, union_all, update

from ovis_server.db.retry import DEFAULT_RETRY_SECONDS, retried
from ovis_server.db.schema import jobs
from ovis_server.db.skip_locked import any_row, locked_pick
from ovis_server.jobs.events import record_changes, utcnow
from ovis_server.jobs.job import JobStatus
from ovis_server.jobs.sweeper import Sweeper

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 1.0
# The error a job carries when its deadline (the submit's Cancel-After) cancels it.
DEADLINE_EXCEEDED = "deadline_exceeded"
DEADLINE_MESSAGE = "the request did not complete before its Cancel-After deadline; it was cancelled"


class DeadlineExpiry:
    """The store's deadline pass (a part of ``JobStore``)."""

    def __init__(self, engine: Engine, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.engine = engine
        # How long a call retries a locked or unreachable database before it raises.
        self.retry_seconds = retry_seconds

    @retried
    def expire_deadlines(self) -> tuple[int, int]:
        """Act on the jobs whose deadline has passed: cancel the queued ones at once (they
        leave the queue) and flag the running ones, which their worker stops at the next
        step; both carry the reason as their error. Returns (cancelled, flagged).

        Rows another transaction holds are skipped, not waited for: the next pass (about a
        second later) takes them.
        """
        now = utcnow()
        queued = self._past_deadline(now, JobStatus.QUEUED)  # to cancel
        running = self._past_deadline(now, JobStatus.RUNNING)  # to flag
        if not any_row(self.engine, union_all(queued, running)):  # most passes end here
            return 0, 0
        reason = {"error_type": DEADLINE_EXCEEDED, "error_message": DEADLINE_MESSAGE}
        with self.engine.begin() as conn:
            cancelled = conn.execute(
                update(jobs)
                .where(jobs.c.seq == locked_pick(queued, "past_deadline_queued").c.seq)
                .values(
                    status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now, **reason
                )
                .returning(*jobs.c)
            ).all()
            record_changes(conn, cancelled, now)
            flagged = conn.execute(
                update(jobs)
                .where(jobs.c.seq == locked_pick(running, "past_deadline_running").c.seq)
                .values(cancel_requested=True, **reason)
                .returning(jobs.c.seq)
            ).all()
        return len(cancelled), len(flagged)

    @staticmethod
    def _past_deadline(now: datetime, status: JobStatus) -> Select[Any]:
        """The jobs in ``status`` whose deadline has passed (running ones not yet flagged);
        the update that acts on them locks them (``locked_pick``: PostgreSQL; SQLite
        ignores it)."""
        found = select(jobs.c.seq).where(jobs.c.status == status, jobs.c.deadline < now)
        if status == JobStatus.RUNNING:
            found = found.where(jobs.c.cancel_requested.is_(False))
        return found


class ExpiresDeadlines(Protocol):
    """What the sweeper runs: ``JobStore``, or its ``DeadlineExpiry`` alone."""

    def expire_deadlines(self) -> tuple[int, int]: ...


class DeadlineSweeper(Sweeper):
    """Runs the deadline pass about once a second."""

    name = "deadlines"

    def __init__(self, store: ExpiresDeadlines, interval_seconds: float = SWEEP_SECONDS) -> None:
        super().__init__(interval_seconds)
        self.store = store

    def sweep(self) -> None:
        cancelled, flagged = self.store.expire_deadlines()
        if cancelled or flagged:
            logger.info(
                "deadlines: cancelled %d queued job(s), stopping %d running", cancelled, flagged
            )
