"""The asynchronous client: Client's methods, awaited (the shared calls, retries and wait
of _base, _calls and _waiting, sent and slept through httpx.AsyncClient)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
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
ProgressCallback = Callable[[Status], Awaitable[None] | None]


@contextlib.asynccontextmanager
async def _opened(http: httpx.AsyncClient, request: httpx.Request) -> AsyncIterator[httpx.Response]:
    """The response, its body still to read; the ApiError where the server refused."""
    response = await http.send(request, stream=True)
    try:
        if response.status_code >= 400:
            await response.aread()
            parse(response)
        yield response
    finally:
        await response.aclose()


async def _report(on_progress: ProgressCallback | None, status: Status | None) -> None:
    """Tell ``on_progress`` of a status, awaiting it where it is a coroutine function."""
    if on_progress is not None and status is not None:
        outcome = on_progress(status)
        if outcome is not None:
            await outcome


class AsyncClient(BaseClient[httpx.AsyncClient]):
    """The asyncio twin of :class:`ovis_server.client.Client`."""

    _http_class = httpx.AsyncClient

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _b: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call[T]) -> T:
        attempts = Attempts(self.settings)
        while True:
            outcome = await self._attempt(call)
            if (pause := attempts.pause_after(outcome)) is None:
                return call.answer(outcome, attempts.retries)
            await asyncio.sleep(pause)

    async def _attempt(self, call: Call[Any]) -> Outcome:
        try:
            return await self._http.send(self._request(call))
        except httpx.TransportError as error:
            return error

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Any call by method and path (``kwargs``: Call's fields); its answer's JSON body."""
        return await self._send(Call(method, path, **kwargs))

    async def submit(self, input: Mapping[str, Any], model_id: str = DEFAULT_MODEL) -> Submission:
        return await self._send(calls.submit(input, model_id))

    async def status(self, request_id: str) -> Status:
        return await self._send(calls.status(request_id))

    async def result(self, request_id: str) -> Result:
        return await self._send(calls.result(request_id))

    async def cancel(self, request_id: str) -> Cancellation:
        return await self._send(calls.cancel(request_id))

    async def delete(self, request_id: str) -> None:
        """Remove the request and its output files; a running job stops."""
        await self._send(calls.delete(request_id))

    async def stream(self, request_id: str) -> AsyncIterator[Status | Result]:
        """The request's status stream: a Status on every change, then the Result."""
        with connection_errors():
            async with contextlib.aclosing(self._stream(request_id)) as items:
                async for item in items:
                    if not isinstance(item, KeepAlive):
                        yield item

    async def _stream(self, request_id: str) -> AsyncGenerator[StreamItem, None]:
        """``stream``, with a KeepAlive for each keep-alive comment."""
        async with _opened(self._http, self._request(calls.stream(request_id))) as response:
            events = StatusStream()
            async for line in response.aiter_lines():
                if (item := events.feed(line)) is not None:
                    yield item
                if events.finished:
                    return

    async def wait(
        self,
        request_id: str,
        *,
        on_progress: ProgressCallback | None = None,
        poll_interval: float = 0.5,
        timeout: float | None = None,
        stream: bool = True,
    ) -> Result:
        """Follow the status stream (or poll where there is none) until the request is final."""
        waiter = Waiter(request_id, poll_interval, timeout, stream=stream)
        return await self._wait(waiter, on_progress)

    async def _wait(self, waiter: Waiter, on_progress: ProgressCallback | None) -> Result:
        if waiter.streams:
            with waiter.polling_if_the_stream_fails():
                async with contextlib.aclosing(self._stream(waiter.request_id)) as items:
                    async for item in items:
                        if isinstance(item, Result):
                            return item
                        await _report(on_progress, waiter.streamed(item))
                        waiter.check_deadline()
        while True:
            status = await self.status(waiter.request_id)
            await _report(on_progress, waiter.polled(status))
            if status.is_final:
                return await self.result(waiter.request_id)
            waiter.check_deadline()
            await asyncio.sleep(waiter.poll_interval)

    async def run(
        self,
        input: Mapping[str, Any],
        model_id: str = DEFAULT_MODEL,
        *,
        on_progress: ProgressCallback | None = None,
        poll_interval: float = 0.5,
        timeout: float | None = None,
    ) -> Result:
        submission = await self.submit(input, model_id)
        waiter = Waiter(submission.request_id, poll_interval, timeout)
        return succeeded(await self._wait(waiter, on_progress))

    async def download(self, url: str, path: str | Path) -> Path:
        target = Path(path)
        with connection_errors():
            await self._download(url, target)
        return target

    async def _download(self, url: str, target: Path) -> None:
        async with (
            httpx.AsyncClient(
                timeout=self.settings.timeout,
                transport=self._transport,  # type: ignore[arg-type]
                verify=verification(),
            ) as plain,
            _opened(plain, plain.build_request("GET", url)) as response,
        ):
            with target.open("wb") as handle:
                async for chunk in response.aiter_bytes():
                    handle.write(chunk)
