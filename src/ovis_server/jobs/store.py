"""The job store, which is also the queue: one interface over SQLite and PostgreSQL.

``JobStore`` is put together from the parts, one concern each:

- ``queries``: reads (a job, lists, queue positions, the event log, counts);
- ``queue``: the queue's state changes (submit, cancel, claim, progress, finish, release,
  recover), each one guarded statement;
- ``deadlines``: the Cancel-After pass;
- ``limits``: the submit's limits and the transaction that checks them;
- ``events``: the event log and webhook outbox, written with each change;
- ``rows``: rows to dataclasses.
"""

from __future__ import annotations

from ovis_server.jobs.deadlines import DEADLINE_EXCEEDED, DEADLINE_MESSAGE, DeadlineExpiry
from ovis_server.jobs.events import utcnow
from ovis_server.jobs.limits import RATE_WINDOW, LimitExceededError, SubmitLimits
from ovis_server.jobs.queue import (
    IDEMPOTENCY_WINDOW,
    IdempotencyConflictError,
    JobQueue,
    LeaseLostError,
)

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


class JobStore(JobQueue, DeadlineExpiry):
    """Submit, observe, claim, run and finish jobs."""
