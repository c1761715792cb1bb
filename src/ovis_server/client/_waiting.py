"""Waiting for a request, decided once for both clients (sans I/O): reading the status
stream, which status to report, when to fall back to polling, the deadline, the outcome."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from ovis_server.client._base import RETRY_STATUSES
from ovis_server.client.errors import ApiError, JobFailedError, WaitTimeoutError
from ovis_server.client.models import Result, Status

# A server without status streams (RunComfy's hosted API) answers the stream route so, and
# a proxy in trouble with one of the others; the client then polls instead.
NO_STREAM = frozenset({404, 405, 501}) | RETRY_STATUSES


class KeepAlive:
    """A keep-alive comment on a status stream: nothing changed, the stream is alive."""


KEEP_ALIVE = KeepAlive()
StreamItem = Status | Result | KeepAlive


class StatusStream:
    """Reads a status stream (``text/event-stream``) a line at a time: each line gives a
    Status, the Result (the stream's last item: ``finished`` then), a KeepAlive, or None
    while an event is still being read."""

    def __init__(self) -> None:
        self._name = "message"
        self._data: list[str] = []
        self.finished = False

    def feed(self, line: str) -> StreamItem | None:
        if line.startswith(":"):  # a comment: the keep-alive
            return KEEP_ALIVE
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                self._name = value
            elif field == "data":
                self._data.append(value)
            return None
        # A blank line ends an event.
        name, data = self._name, self._data
        self._name, self._data = "message", []
        if not data:
            return None
        body = json.loads("\n".join(data))
        if name == "status":
            return Status.model_validate(body)
        if name == "result":
            self.finished = True
            return Result.model_validate(body)
        return None  # an event this client does not know


class Waiter:
    """One ``wait``: follows the stream (where asked) until it ends or fails, then polls
    every ``poll_interval`` s; says which statuses ``on_progress`` sees (every streamed
    one, each polled one that differs from the last) and raises WaitTimeoutError once
    ``timeout`` s have passed."""

    def __init__(
        self, request_id: str, poll_interval: float, timeout: float | None, *, stream: bool = True
    ) -> None:
        self.request_id = request_id
        self.poll_interval = poll_interval
        self.streams = stream
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._last: Status | None = None

    @contextmanager
    def polling_if_the_stream_fails(self) -> Iterator[None]:
        """Around following the stream: where the server has none, or it breaks off,
        polling takes over."""
        try:
            yield
        except ApiError as exc:
            if exc.status_code not in NO_STREAM:
                raise
        except httpx.TransportError:
            pass  # the stream broke off

    def streamed(self, item: Status | KeepAlive) -> Status | None:
        """The status to report for a streamed item: every one."""
        if isinstance(item, KeepAlive):
            return None
        self._last = item
        return item

    def polled(self, status: Status) -> Status | None:
        """The status to report for a polled one: where it changed."""
        last, self._last = self._last, status
        return None if status == last else status

    def check_deadline(self) -> None:
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise WaitTimeoutError(f"request {self.request_id} not finished after {self._timeout}s")


def succeeded(result: Result) -> Result:
    """``run``'s result; JobFailedError where the job did not succeed."""
    if result.status != "succeeded":
        message = result.error.message if result.error and result.error.message else ""
        raise JobFailedError(result.request_id, result.status, message or result.status)
    return result
