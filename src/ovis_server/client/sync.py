"""The synchronous client: the shared calls, retries and wait (see _base, _calls and
_waiting), sent and slept through httpx.Client."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from ovis_server.client import _calls as calls
from ovis_server.client._base import Attempts, BaseClient, verification
from ovis_server.client._calls import DEFAULT_MODEL, Call, Outcome, connection_errors, parse
from ovis_server.client._waiting import KeepAlive, StatusStream, StreamItem, Waiter, succeeded
from ovis_server.client.models import Cancellation, Result, Status, Submission

T = TypeVar("T")
ProgressCallback = Callable[[Status], None]


@contextlib.contextmanager
def _opened(http: httpx.Client, request: httpx.Request) -> Iterator[httpx.Response]:
    """The response, its body still to read; the ApiError where the server refused."""
    response = http.send(request, stream=True)
    try:
        if response.status_code >= 400:
            response.read()
            parse(response)
        yield response
    finally:
        response.close()


def _report(on_progress: ProgressCallback | None, status: Status | None) -> None:
    if on_progress is not None and status is not None:
        on_progress(status)


class Client(BaseClient[httpx.Client]):
    """RunComfy's Model API, on ovis-server or on RunComfy itself (only the base URL differs).

    >>> with Client("http://127.0.0.1:8000", token="ovis_...") as client:
    ...     result = client.run({"prompt": "a neon sign that reads OVIS"})
    ...     client.download(result.image_url, "ovis.png")
    """

    _http_class = httpx.Client

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _b: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call[T]) -> T:
        attempts = Attempts(self.settings)
        while True:
            outcome = self._attempt(call)
            if (pause := attempts.pause_after(outcome)) is None:
                return call.answer(outcome, attempts.retries)
            time.sleep(pause)

    def _attempt(self, call: Call[Any]) -> Outcome:
        try:
            return self._http.send(self._request(call))
        except httpx.TransportError as error:
            return error

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Any call by method and path (``kwargs``: Call's fields); its answer's JSON body."""
        return self._send(Call(method, path, **kwargs))

    def submit(self, input: Mapping[str, Any], model_id: str = DEFAULT_MODEL) -> Submission:
        return self._send(calls.submit(input, model_id))

    def status(self, request_id: str) -> Status:
        return self._send(calls.status(request_id))

    def result(self, request_id: str) -> Result:
        return self._send(calls.result(request_id))

    def cancel(self, request_id: str) -> Cancellation:
        return self._send(calls.cancel(request_id))

    def delete(self, request_id: str) -> None:
        """Remove the request and its output files (their URLs stop working); a running
        job stops. Raises NotFoundError for an unknown request."""
        self._send(calls.delete(request_id))

    def stream(self, request_id: str) -> Iterator[Status | Result]:
        """The request's status stream: a Status on every change, then the Result once it
        is final. Raises ApiError like the other calls (NotFoundError, 404, also where a
        server has no streams)."""
        with connection_errors():
            for item in self._stream(request_id):
                if not isinstance(item, KeepAlive):
                    yield item

    def _stream(self, request_id: str) -> Iterator[StreamItem]:
        """``stream``, with a KeepAlive for each keep-alive comment."""
        with _opened(self._http, self._request(calls.stream(request_id))) as response:
            events = StatusStream()
            for line in response.iter_lines():
                if (item := events.feed(line)) is not None:
                    yield item
                if events.finished:
                    return

    def wait(
        self,
        request_id: str,
        *,
        on_progress: Callable[[Status], None] | None = None,
        poll_interval: float = 0.5,
        timeout: float | None = None,
        stream: bool = True,
    ) -> Result:
        """Wait until the request is final; ``on_progress`` sees every new status.

        Follows the status stream where the server has one (every step is seen), and
        polls every ``poll_interval`` seconds where it has not or the stream breaks off.
        ``timeout`` is checked on every event, and at least every 15 s (the keep-alive).
        """
        return self._wait(Waiter(request_id, poll_interval, timeout, stream=stream), on_progress)

    def _wait(self, waiter: Waiter, on_progress: ProgressCallback | None) -> Result:
        if waiter.streams:
            with waiter.polling_if_the_stream_fails():
                for item in self._stream(waiter.request_id):
                    if isinstance(item, Result):
                        return item
                    _report(on_progress, waiter.streamed(item))
                    waiter.check_deadline()
        while True:
            status = self.status(waiter.request_id)
            _report(on_progress, waiter.polled(status))
            if status.is_final:
                return self.result(waiter.request_id)
            waiter.check_deadline()
            time.sleep(waiter.poll_interval)

    def run(
        self,
        input: Mapping[str, Any],
        model_id: str = DEFAULT_MODEL,
        *,
        on_progress: Callable[[Status], None] | None = None,
        poll_interval: float = 0.5,
        timeout: float | None = None,
    ) -> Result:
        """Submit, wait, and return the result; raises JobFailedError unless it succeeded."""
        submission = self.submit(input, model_id)
        waiter = Waiter(submission.request_id, poll_interval, timeout)
        return succeeded(self._wait(waiter, on_progress))

    def download(self, url: str, path: str | Path) -> Path:
        """Save an output file: a plain GET, with no token (output URLs carry their own)."""
        target = Path(path)
        with (
            connection_errors(),
            httpx.Client(
                timeout=self.settings.timeout,
                transport=self._transport,  # type: ignore[arg-type]
                verify=verification(),
            ) as plain,
            _opened(plain, plain.build_request("GET", url)) as response,
            target.open("wb") as handle,
        ):
            for chunk in response.iter_bytes():
                handle.write(chunk)
        return target
