"""The status call's read on the event loop, on PostgreSQL (db/loop_reads.py): the same
answer as the engine's read, and, when it cannot be made, a quick LoopReadError that
sends the caller to the engine."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from datetime import UTC

import pytest
from sqlalchemy import func, select

from ovis_server.db.loop_reads import LoopReadError, LoopReads, LoopStatement
from ovis_server.jobs.job import JobState
from ovis_server.jobs.store import JobStore

from .helpers import queue_job

# The conftest's store, on PostgreSQL only (SQLite's reads on the loop go through the engine).
pytestmark = pytest.mark.parametrize("store", ["postgresql"], indirect=True)


def test_a_loop_read_is_the_engines_read(store: JobStore) -> None:
    for name in ("running", "failed", "second", "third"):
        queue_job(store, name)
    store.claim_next("w", 30)  # "running"
    store.report_progress("running", "w", 2, 30)
    store.set_warnings("running", ["seed was clamped"])
    store.claim_next("w", 30)
    store.fail("failed", "w", "ValueError", "a message with 'quotes' and ünïcode")
    reads = LoopReads.for_engine(store.engine, None, 5)

    async def on_loop() -> dict[str, tuple[JobState, int | None] | None]:
        try:
            return {
                name: await store.get_with_position_on_loop(reads, name)
                for name in ("running", "failed", "second", "third", "no-such-job")
            }
        finally:
            await reads.close()

    found = asyncio.run(on_loop())
    for name, loop_read in found.items():
        assert loop_read == store.get_with_position(name), name
    assert found["no-such-job"] is None
    positions = [(read or (None, None))[1] for read in (found["second"], found["third"])]
    assert positions == [0, 1]
    assert found["running"] is not None
    running, position = found["running"]
    assert (running.progress_step, running.warnings, position) == (2, ("seed was clamped",), None)
    assert running.created_at.tzinfo == UTC
    assert running.started_at is not None
    assert running.started_at.tzinfo == UTC


def test_a_database_that_hangs_up_fails_at_once_and_then_rests(store: JobStore) -> None:
    # A "database" that closes each connection as it comes, counting them.
    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[object] = []

    def hang_up() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # shut down: the test is over
                return
            connections.append(connection)  # before the close the client then sees
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    port = listener.getsockname()[1]
    url = store.engine.url.set(drivername="postgresql", host="127.0.0.1", port=port)
    reads = LoopReads(url.render_as_string(hide_password=False), None, 5)
    statement = LoopStatement(select(func.now().label("now")), store.engine)

    async def twice() -> tuple[float, int]:
        started = time.monotonic()
        with pytest.raises(LoopReadError):
            await reads.first(statement)
        took, tried = time.monotonic() - started, len(connections)
        with pytest.raises(LoopReadError, match="resting after a failure"):
            await reads.first(statement)
        return took, tried

    try:
        took, tried = asyncio.run(twice())
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone would not)
        listener.close()
    assert took < 2  # failed: no wait for the connect timeout (5 s)
    assert tried >= 1  # the first read did try
    assert len(connections) == tried  # resting: the second tried nothing


def test_a_slow_or_cancelled_read_closes_its_connection(store: JobStore) -> None:
    reads = LoopReads.for_engine(store.engine, None, 5)
    reads.timeout = 0.3  # a read slower than this fails
    sleep = LoopStatement(select(func.pg_sleep(2).label("slept")), store.engine)
    now = LoopStatement(select(func.now().label("now")), store.engine)

    async def scenario() -> None:
        assert (await reads.first(now)) is not None
        assert len(reads._idle) == 1  # kept for the next read
        started = time.monotonic()
        with pytest.raises(LoopReadError):
            await reads.first(sleep)
        assert time.monotonic() - started < 1.5
        assert reads._idle == []  # the connection that timed out is closed, not kept
        reads._resting_until = 0.0  # (a failure rests the reads; this test goes on)
        task = asyncio.create_task(reads.first(sleep))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert reads._idle == []
        found = await reads.first(now)  # a fresh connection serves the next read
        assert found is not None
        assert found["now"].tzinfo is not None
        await reads.close()

    asyncio.run(scenario())
