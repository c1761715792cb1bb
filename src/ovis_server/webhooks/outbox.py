"""The webhook outbox: messages waiting to be delivered, claimed under a hold, retried on
a schedule.

``record_changes`` (jobs/events.py) writes a message in the same transaction as the
state change it announces, so none is lost to a crash. Any API process may send it: it
claims the message for a while (on PostgreSQL skipping those another process is
claiming), POSTs it, and records the attempt. A process that dies mid-send leaves a hold
that runs out, and the message is sent again: delivery is at least once, and receivers
deduplicate on ``webhook-id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select, update

from ovis_server.db.schema import webhook_deliveries as deliveries
from ovis_server.db.skip_locked import any_row, locked_pick
from ovis_server.jobs.events import utcnow
from ovis_server.jobs.job import DeliveryState, JobStatus
from ovis_server.jobs.rows import from_row


@dataclass(frozen=True)
class Delivery:
    id: str
    request_id: str
    token_id: str
    url: str
    status: JobStatus
    step: int
    total: int
    attempts: int
    created_at: datetime
    # The hold this process was given: only its holder may record an attempt.
    claimed_until: datetime | None


class DeliveryStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def claim_due(self, limit: int, hold_seconds: float) -> list[Delivery]:
        """Up to ``limit`` messages whose time has come, held for this process."""
        if limit <= 0:
            return []
        now = utcnow()
        due_now = select(deliveries.c.id).where(
            deliveries.c.state == DeliveryState.PENDING,
            deliveries.c.next_attempt_at <= now,
            or_(deliveries.c.claimed_until.is_(None), deliveries.c.claimed_until < now),
        )
        if not any_row(self.engine, due_now):  # the sender's idle poll ends here
            return []
        due = locked_pick(due_now.order_by(deliveries.c.next_attempt_at).limit(limit), "due")
        stmt = (
            update(deliveries)
            .where(deliveries.c.id == due.c.id, deliveries.c.state == DeliveryState.PENDING)
            .values(claimed_until=now + timedelta(seconds=hold_seconds))
            .returning(*deliveries.c)
        )
        with self.engine.begin() as conn:
            return [from_row(Delivery, row, status=JobStatus) for row in conn.execute(stmt)]

    def record_attempt(
        self, message: Delivery, error: str | None, schedule: Sequence[float]
    ) -> str:
        """Record one attempt (``error`` None: the receiver took it); returns the state the
        message is in now: delivered, pending (retried later) or failed (out of tries), or
        "lost" if this process's hold ran out and another took the message over."""
        now = utcnow()
        held = and_(
            deliveries.c.id == message.id,
            deliveries.c.state == DeliveryState.PENDING,
            deliveries.c.claimed_until == message.claimed_until,
        )
        with self.engine.begin() as conn:
            attempts = conn.execute(
                select(deliveries.c.attempts).where(held).with_for_update()
            ).scalar_one_or_none()
            if attempts is None:
                return "lost"
            attempts += 1
            values: dict[str, Any] = {"attempts": attempts, "claimed_until": None}
            if error is None:
                values.update(state=DeliveryState.DELIVERED, finished_at=now, last_error=None)
            elif attempts >= len(schedule):
                values.update(state=DeliveryState.FAILED, finished_at=now, last_error=error)
            else:
                values.update(
                    last_error=error, next_attempt_at=now + timedelta(seconds=schedule[attempts])
                )
            conn.execute(update(deliveries).where(held).values(**values))
        return str(values.get("state", DeliveryState.PENDING))

    def postpone(self, waiting: Sequence[tuple[Delivery, datetime]]) -> None:
        """Put claimed messages back unsent, each due again at the time given; no attempt
        is counted (their destination or token was busy, or the destination failing)."""
        with self.engine.begin() as conn:
            for message, until in waiting:
                conn.execute(
                    update(deliveries)
                    .where(
                        deliveries.c.id == message.id,
                        deliveries.c.state == DeliveryState.PENDING,
                        deliveries.c.claimed_until == message.claimed_until,
                    )
                    .values(next_attempt_at=until, claimed_until=None)
                )

    def give_up(self, message_id: str, reason: str) -> None:
        """End a message that can never be sent (its request is gone)."""
        stmt = (
            update(deliveries)
            .where(deliveries.c.id == message_id)
            .values(
                state=DeliveryState.FAILED,
                finished_at=utcnow(),
                last_error=reason,
                claimed_until=None,
            )
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def release(self, message_ids: Sequence[str]) -> None:
        """Drop this process's hold on messages it did not get to send (at shutdown)."""
        if not message_ids:
            return
        stmt = (
            update(deliveries)
            .where(deliveries.c.id.in_(message_ids), deliveries.c.state == DeliveryState.PENDING)
            .values(claimed_until=None)
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def counts(self) -> dict[str, int]:
        """Messages by state: pending, delivered, failed."""
        stmt = select(deliveries.c.state, func.count()).group_by(deliveries.c.state)
        with self.engine.connect() as conn:
            found = {state: int(count) for state, count in conn.execute(stmt)}
        return {state.value: found.get(state, 0) for state in DeliveryState}
