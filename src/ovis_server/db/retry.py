"""Transient database errors, retried with backoff around whole transactions.

A locked SQLite database, a PostgreSQL connection lost to a restart or failover, a
serialization failure or deadlock: each is over in moments, and the transaction that met
it changed nothing, so the store runs it again rather than failing the request or the
job. What outlasts the retries reaches the API as a 503 (see api/errors.py) and the
worker keeps retrying its own writes (see worker/runner.py).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

logger = logging.getLogger(__name__)

# How long a store call keeps retrying before it gives up (the API then answers 503).
DEFAULT_RETRY_SECONDS = 6.0
FIRST_DELAY_SECONDS = 0.05
MAX_DELAY_SECONDS = 1.0

# PostgreSQL: serialization failure, deadlock, lock not available, the server shutting
# down or starting, and the whole connection-exception class (08…).
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "57P02", "57P03"})

T = TypeVar("T")
P = ParamSpec("P")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a database error that goes away by itself: worth retrying."""
    if isinstance(exc, PoolTimeoutError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if isinstance(sqlstate, str) and (sqlstate in _TRANSIENT_SQLSTATES or sqlstate[:2] == "08"):
        return True
    # SQLite's "database is locked/busy", psycopg's lost or refused connections.
    return isinstance(exc, OperationalError)


def retry_transient(operation: Callable[[], T], within: float, what: str = "a query") -> T:
    """Run ``operation`` (one whole transaction), again after a transient database error,
    with exponential backoff and jitter, until it succeeds or ``within`` seconds pass;
    then the last error is raised."""
    deadline = time.monotonic() + within
    delay = FIRST_DELAY_SECONDS
    tries = 0
    while True:
        tries += 1
        try:
            return operation()
        except SQLAlchemyError as exc:
            pause = delay * random.uniform(0.5, 1.0)  # noqa: S311 (jitter, not a secret)
            if not is_transient(exc) or time.monotonic() + pause > deadline:
                if tries > 1:
                    logger.warning("%s failed after %d tries: %s", what, tries, type(exc).__name__)
                raise
            logger.debug("%s met a transient database error; retrying: %s", what, exc)
            time.sleep(pause)
            delay = min(delay * 2, MAX_DELAY_SECONDS)


class HasRetryWindow(Protocol):
    retry_seconds: float


S = TypeVar("S", bound=HasRetryWindow)


def retried(method: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
    """A store method (one transaction, or reads) retried within ``self.retry_seconds``."""

    @functools.wraps(method)
    def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return retry_transient(
            lambda: method(self, *args, **kwargs),
            self.retry_seconds,
            f"{type(self).__name__}.{method.__name__}",
        )

    return wrapper
