"""The event log and the webhook outbox, written in the transaction of the change.

Every state change of a job appends its new state to the event log (what status streams
read) and, where its submitter asked for webhooks, queues the message it is owed in the
outbox (what the webhook sender delivers): in the same transaction, so that neither is
lost to a crash between the change and its record.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, insert

from ovis_server.db.schema import job_events, webhook_deliveries
from ovis_server.jobs.job import DeliveryState, JobStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


def record_changes(
    conn: Connection, rows: Iterable[Row[Any]], at: datetime, notify: bool = True
) -> None:
    """Append the new state of each changed job (a row of ``jobs``) to the event log and
    queue the webhook messages it owes, in the caller's transaction.

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
