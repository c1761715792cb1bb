"""Server-sent status streams: one poller per API process, fanned out to every open stream.

Every state change of every job is appended to the event log in the transaction that
makes it (see ``JobStore``). The hub tails that log with one query per tick, however many
streams are open, and hands each event to the streams watching its job; for watched jobs
that wait in the queue it also works out their positions, again in one query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace

from fastapi.sse import format_sse_event
from pydantic import BaseModel

from ovis_server.api.runcomfy.rendering import BodyRenderer, wire_json
from ovis_server.jobs.job import Job, JobEvent, JobStatus
from ovis_server.jobs.store import JobStore
from ovis_server.tokens import TokenStore

logger = logging.getLogger(__name__)

# How often the hub reads the log while streams are open, and while none are; and how
# long it waits after the database failed before it tries again.
ACTIVE_INTERVAL = 0.05
IDLE_INTERVAL = 0.5
ERROR_INTERVAL = 2.0
# On PostgreSQL a seq can commit after a larger one; a hole in the log is looked for this
# long before it is taken for a rolled-back insert and skipped. (A stream that missed an
# event all the same catches up from the job's row at its next keep-alive.)
GAP_SECONDS = 5.0
MAX_HOLES = 1000
BATCH = 1000
# How often the tokens of open streams are checked for revocation (one query for all).
REVOCATION_INTERVAL = 2.0


@dataclass(frozen=True)
class QueueMove:
    """A watched job's new place in the queue."""

    request_id: str
    position: int


@dataclass(frozen=True)
class Closing:
    """The server is shutting down: streams end now rather than hold the shutdown up."""


Update = JobEvent | QueueMove | Closing


def _moves_the_queue(event: JobEvent) -> bool:
    """Whether this event can change other jobs' queue positions: a job was claimed, left
    the queue cancelled, or came back to it."""
    return event.status in (JobStatus.QUEUED, JobStatus.CANCELLED) or (
        event.status == JobStatus.RUNNING and event.step == 0
    )


class StatusHub:
    """Tails the job event log and fans events out to per-stream queues.

    Everything but the database reads runs on the event loop, so the hub's state needs no
    lock; ``open_streams`` is a plain counter that other threads may read.
    """

    def __init__(self, store: JobStore, tokens: TokenStore | None = None) -> None:
        self.store = store
        self.tokens = tokens
        self.open_streams = 0
        self._token_of: dict[asyncio.Queue[Update], str] = {}
        self._watchers: dict[str, set[asyncio.Queue[Update]]] = defaultdict(set)
        self._queued: set[str] = set()  # watched jobs that may be waiting in the queue
        self._positions: dict[str, int] = {}
        self._recount = False
        self._cursor = 0  # every seq up to here has been handed out (or given up on)
        self._seen: set[int] = set()  # seqs above the cursor already handed out
        self._holes: dict[int, float] = {}  # seqs above the cursor not seen yet, since when
        self._task: asyncio.Task[None] | None = None
        self._revocations: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._cursor = await asyncio.to_thread(self.store.last_event_seq)
        self._task = asyncio.create_task(self._run(), name="status-hub")
        if self.tokens is not None:
            self._revocations = asyncio.create_task(
                self._close_revoked(self.tokens), name="status-hub-revocations"
            )

    async def stop(self) -> None:
        self.close_streams()
        for task in (self._task, self._revocations):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def close_streams(self) -> None:
        """End every open stream (at shutdown)."""
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(Closing())

    def close_streams_soon(self) -> None:
        """``close_streams`` from a signal handler or another thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.close_streams)

    def subscribe(self, request_id: str, token_id: str | None = None) -> asyncio.Queue[Update]:
        """A queue that receives every later event of ``request_id``, and its moves in the
        queue while it waits there; closed soon after ``token_id`` is revoked."""
        queue: asyncio.Queue[Update] = asyncio.Queue()
        self._watchers[request_id].add(queue)
        if token_id is not None:
            self._token_of[queue] = token_id
        self.open_streams += 1
        # Until the next count says otherwise, the job may be waiting in the queue.
        self._queued.add(request_id)
        self._recount = True
        return queue

    def unsubscribe(self, request_id: str, queue: asyncio.Queue[Update]) -> None:
        queues = self._watchers.get(request_id)
        if queues is None or queue not in queues:
            return
        queues.discard(queue)
        self._token_of.pop(queue, None)
        self.open_streams -= 1
        if not queues:
            del self._watchers[request_id]
            self._queued.discard(request_id)
            self._positions.pop(request_id, None)

    async def _run(self) -> None:
        while True:
            try:
                busy = await self._tick()
            except Exception:
                logger.exception("status stream poller failed; trying again")
                await asyncio.sleep(ERROR_INTERVAL)
                continue
            if not busy:
                await asyncio.sleep(ACTIVE_INTERVAL if self._watchers else IDLE_INTERVAL)

    async def _close_revoked(self, tokens: TokenStore) -> None:
        """End the streams of tokens revoked since they opened (a revoked token must not
        keep listening), checking every few seconds."""
        while True:
            await asyncio.sleep(REVOCATION_INTERVAL)
            watching = set(self._token_of.values())
            if not watching:
                continue
            try:
                revoked = await asyncio.to_thread(tokens.revoked_among, watching)
            except Exception:
                logger.exception("checking the tokens of open streams failed; trying again")
                continue
            for queue, token_id in list(self._token_of.items()):
                if token_id in revoked:
                    del self._token_of[queue]
                    queue.put_nowait(Closing())

    async def _tick(self) -> bool:
        """Read and hand out new events; True if there may be more to read at once."""
        top = max(self._seen, default=self._cursor)
        holes = sorted(self._holes)[:MAX_HOLES]
        events = await asyncio.to_thread(self.store.events_after, top, BATCH, holes)
        fresh = [event for event in events if event.seq not in self._seen]
        for event in fresh:
            self._seen.add(event.seq)
            self._dispatch(event)
            self._recount = self._recount or _moves_the_queue(event)
        self._advance()
        if self._recount and self._queued:
            self._recount = False
            watched = list(self._queued)
            positions = await asyncio.to_thread(self.store.queue_positions, watched)
            self._queued.difference_update(set(watched) - positions.keys())
            for request_id, position in positions.items():
                if self._positions.get(request_id) != position:
                    self._positions[request_id] = position
                    self._send(QueueMove(request_id, position))
        return sum(event.seq > top for event in events) == BATCH

    def _dispatch(self, event: JobEvent) -> None:
        if event.request_id not in self._watchers:
            return
        if event.status == JobStatus.QUEUED:
            self._queued.add(event.request_id)
        else:
            self._queued.discard(event.request_id)
            self._positions.pop(event.request_id, None)
        self._send(event)

    def _send(self, update: QueueMove | JobEvent) -> None:
        for queue in self._watchers.get(update.request_id, ()):
            queue.put_nowait(update)

    def _advance(self) -> None:
        """Move the cursor over every seq handed out, and over holes looked for too long;
        note the holes still to look for."""
        now = time.monotonic()
        while self._seen:
            following = self._cursor + 1
            if following in self._seen:
                self._seen.discard(following)
                self._holes.pop(following, None)
                self._cursor = following
                continue
            first_missed = self._holes.setdefault(following, now)
            if now - first_missed < GAP_SECONDS:
                break
            del self._holes[following]
            self._cursor = following
        top = max(self._seen, default=self._cursor)
        for seq in range(self._cursor + 1, min(top, self._cursor + MAX_HOLES)):
            if seq not in self._seen:
                self._holes.setdefault(seq, now)


KEEPALIVE_SECONDS = 15.0
KEEP_ALIVE = format_sse_event(comment="keep-alive")


def _apply(job: Job, event: JobEvent) -> Job:
    """The job as it stands after ``event``."""
    started = job.started_at
    if event.status == JobStatus.RUNNING and job.status != JobStatus.RUNNING:
        started = event.at
    elif event.status == JobStatus.QUEUED:
        started = None
    return replace(
        job,
        status=event.status,
        progress_step=event.step,
        progress_total=event.total,
        started_at=started,
        finished_at=event.at if event.status.is_final else None,
    )


def _sse(event: str, body: BaseModel) -> bytes:
    return format_sse_event(event=event, data_str=wire_json(body))


async def follow(
    hub: StatusHub, store: JobStore, request_id: str, token_id: str | None = None
) -> AsyncGenerator[tuple[Job, int | None] | None, None]:
    """A job as it changes: (job, queue position) now and on every change, None after each
    quiet 15 s; ends after the final state (the job's whole row: outputs, error), when the
    job is gone, at shutdown, or once ``token_id`` is revoked."""
    queue = hub.subscribe(request_id, token_id)
    try:
        # Subscribed first, read second: no event falls between the two.
        snapshot = await asyncio.to_thread(store.snapshot, request_id)
        if snapshot is None:
            return
        job, known = snapshot
        position = None
        if job.status == JobStatus.QUEUED:
            position = await asyncio.to_thread(store.queue_position, job)
        yield job, position
        while not job.status.is_final:
            try:
                update = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                # Quiet for a while: the job's row says whether an event went astray.
                snapshot = await asyncio.to_thread(store.snapshot, request_id)
                if snapshot is None:
                    return
                if snapshot[1] <= known:
                    yield None
                    continue
                job, known = snapshot
            else:
                if isinstance(update, Closing):
                    return
                if isinstance(update, QueueMove):
                    position = update.position
                elif update.seq > known:
                    job, known = _apply(job, update), update.seq
                    if job.status.is_final:  # the event lacks the outputs and error
                        row = await asyncio.to_thread(store.get, request_id)
                        job = row or job
                else:
                    continue
            yield job, position
    finally:
        hub.unsubscribe(request_id, queue)


async def status_events(
    bodies: BodyRenderer,
    store: JobStore,
    hub: StatusHub,
    request_id: str,
    base_url: str,
    token_id: str | None = None,
) -> AsyncIterator[bytes]:
    """The server-sent events of one stream: a ``status`` event for the state the job is
    in and for every change after it, a keep-alive comment when nothing happened for 15 s,
    and once the job is final its ``result`` event, after which the stream ends."""
    sent = None
    async with contextlib.aclosing(follow(hub, store, request_id, token_id)) as changes:
        async for change in changes:
            if change is None:
                yield KEEP_ALIVE
                continue
            job, position = change
            if job.status.is_final:
                yield _sse("status", bodies.status_body(job, base_url, None))
                yield _sse("result", bodies.result_body(job, base_url))
                return
            current = _sse("status", bodies.status_body(job, base_url, position))
            if current != sent:
                sent = current
                yield current


async def wait_final(
    hub: StatusHub, store: JobStore, request_id: str, seconds: float, token_id: str | None = None
) -> Job | None:
    """The job once it is final, or None if it is not within ``seconds``."""
    with contextlib.suppress(TimeoutError):
        async with (
            asyncio.timeout(seconds),
            contextlib.aclosing(follow(hub, store, request_id, token_id)) as changes,
        ):
            async for change in changes:
                if change is not None and change[0].status.is_final:
                    return change[0]
    return None
