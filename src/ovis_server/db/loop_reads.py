"""One-statement reads on the event loop, for PostgreSQL: the API's status call.

A status call is what clients do most (they poll it until the job ends). Through the
engine, its one read went to a thread: the hop, SQLAlchemy's execution and, with 50
clients, 40 threads taking turns at the GIL cost more than the rest of the call
(benchmarks/status.py: 0.52 of a bare FastAPI route). Here the read is a round trip
on a few psycopg ``AsyncConnection``s of the API's event loop, the statement prepared on
each connection, with the session settings the API's engine has (lock and statement
timeouts).

It is tried once and never waits long: any error, a timeout (``TIMEOUT_SECONDS``, from
asking for a connection to the row) or a cancelled call closes the connection it used and
raises ``LoopReadError``, and after a failure the reads rest ``REST_SECONDS``, failing at
once. The caller then reads as before, in a thread, with the store's retries and the 503
that ends them. SQLite needs none of this: its reads are made on the loop through the
engine (``JobStore.reads_at_once``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Engine, Select

logger = logging.getLogger(__name__)

# Connections the reads keep open on each API process: a round trip takes about 0.1 ms, so
# a few serve thousands of calls a second, and each is one of the server's max_connections.
CONNECTIONS = 4
TIMEOUT_SECONDS = 2.0
REST_SECONDS = 5.0


class LoopReadError(Exception):
    """The read was not made: read another way (the engine, in a thread)."""


class LoopStatement:
    """A SELECT compiled once for PostgreSQL, its rows turned into what the engine would
    give (each column's type processes its value: aware UTC datetimes, for example)."""

    def __init__(self, statement: Select[Any], engine: Engine) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        self.sql = str(compiled)
        self.defaults = dict(compiled.params)
        self.columns: list[tuple[str, Callable[[Any], Any] | None]] = [
            (name, column.type.result_processor(engine.dialect, None))
            for name, column in statement.selected_columns.items()
        ]

    def params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.defaults, **given}

    def mapping(self, row: tuple[Any, ...]) -> dict[str, Any]:
        return {
            name: value if process is None else process(value)
            for (name, process), value in zip(self.columns, row, strict=True)
        }


class LoopReads:
    """A few PostgreSQL connections of the running event loop, for one-statement reads."""

    def __init__(
        self,
        conninfo: str,
        options: str | None,
        connect_timeout: int,
        connections: int = CONNECTIONS,
    ) -> None:
        self.conninfo = conninfo
        self.options = options
        self.connect_timeout = connect_timeout
        self.connections = connections
        self.timeout = TIMEOUT_SECONDS
        self._idle: list[Any] = []  # psycopg.AsyncConnection, imported with psycopg
        self._slots: asyncio.Semaphore | None = None
        self._resting_until = 0.0

    @classmethod
    def for_engine(cls, engine: Engine, options: str | None, connect_timeout: int) -> LoopReads:
        url = engine.url.set(drivername="postgresql")
        return cls(url.render_as_string(hide_password=False), options, connect_timeout)

    async def first(self, statement: LoopStatement, **params: Any) -> dict[str, Any] | None:
        """The statement's first row, or None if it has none; ``LoopReadError`` if the
        read was not made."""
        if time.monotonic() < self._resting_until:
            raise LoopReadError("resting after a failure")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.connections)
        connection = None
        try:
            async with asyncio.timeout(self.timeout), self._slots:
                connection = self._idle.pop() if self._idle else await self._open()
                cursor = await connection.execute(statement.sql, statement.params(params))
                row = await cursor.fetchone()
        except BaseException as exc:
            if connection is not None:
                _close_now(connection)
            if not isinstance(exc, Exception):
                raise  # cancelled: the client went away
            self._resting_until = time.monotonic() + REST_SECONDS
            logger.warning(
                "a read on the event loop failed (%s: %s); reading in threads for %.0fs",
                type(exc).__name__,
                exc,
                REST_SECONDS,
            )
            raise LoopReadError(type(exc).__name__) from exc
        self._idle.append(connection)
        return None if row is None else statement.mapping(row)

    async def _open(self) -> Any:
        import psycopg

        settings: dict[str, Any] = {"connect_timeout": self.connect_timeout}
        if self.options:
            settings["options"] = self.options
        return await psycopg.AsyncConnection.connect(
            self.conninfo,
            autocommit=True,  # one statement: no BEGIN and ROLLBACK around it
            prepare_threshold=0,  # prepared on each connection at its first use
            **settings,
        )

    async def close(self) -> None:
        while self._idle:
            _close_now(self._idle.pop())


def _close_now(connection: Any) -> None:
    """Close without waiting on the server (a cancelled read may have left it mid-query)."""
    try:
        connection.pgconn.finish()
    except Exception:  # already closed
        logger.debug("closing a loop connection", exc_info=True)
