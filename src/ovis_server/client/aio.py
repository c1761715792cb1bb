"""The asynchronous client: Client's methods, awaited."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from ovis_server.client._base import (
    DEFAULT_MODEL,
    NO_STREAM,
    ClientSettings,
    KeepAlive,
    StatusStream,
    parse,
    retry_delay,
    should_retry,
    stream_timeout,
    submit_request,
)
from ovis_server.client.errors import ApiError, JobFailedError, WaitTimeoutError
from ovis_server.client.models import Cancellation, Result, Status, Submission

ProgressCallback = Callable[[Status], Awaitable[None] | None]


class AsyncClient:
    """The asyncio twin of :class:`ovis_server.client.Client`."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self.settings = ClientSettings.resolve(base_url, token, timeout, max_retries, backoff)
        self._http = httpx.AsyncClient(base_url=self.settings.base_url, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _b: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**self.settings.headers(), **kwargs.pop("headers", {})}
        attempt = 0
        while True:
            response: httpx.Response | None
            try:
                response = await self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError:
                response = None
                if not should_retry(None, attempt, self.settings):
                    raise
            if response is not None and not should_retry(response, attempt, self.settings):
                return parse(response)
            await asyncio.sleep(retry_delay(response, attempt, self.settings))
            attempt += 1

    async def submit(self, input: Mapping[str, Any], model_id: str = DEFAULT_MODEL) -> Submission:
        path, headers = submit_request(model_id)
        body = await self._call("POST", path, json=dict(input), headers=headers)
        return Submission.model_validate(body)

    async def status(self, request_id: str) -> Status:
        return Status.model_validate(await self._call("GET", f"/v1/requests/{request_id}/status"))

    async def result(self, request_id: str) -> Result:
        return Result.model_validate(await self._call("GET", f"/v1/requests/{request_id}/result"))

    async def cancel(self, request_id: str) -> Cancellation:
        body = await self._call("POST", f"/v1/requests/{request_id}/cancel")
        return Cancellation.model_validate(body)

    async def delete(self, request_id: str) -> None:
        """Remove the request and its output files; a running job stops."""
        await self._call("DELETE", f"/v1/requests/{request_id}")

    async def stream(self, request_id: str) -> AsyncIterator[Status | Result]:
        """The request's status stream: a Status on every change, then the Result."""
        async with contextlib.aclosing(self._stream(request_id)) as items:
            async for item in items:
                if not isinstance(item, KeepAlive):
                    yield item

    async def _stream(self, request_id: str) -> AsyncGenerator[Status | Result | KeepAlive, None]:
        """``stream``, with a KeepAlive for each keep-alive comment."""
        path = f"/v1/requests/{request_id}/stream"
        async with self._http.stream(
            "GET", path, headers=self.settings.headers(), timeout=stream_timeout(self.settings)
        ) as response:
            if response.status_code >= 400:
                await response.aread()
                parse(response)
            events = StatusStream()
            async for line in response.aiter_lines():
                item = events.feed(line)
                if item is not None:
                    yield item
                if isinstance(item, Result):
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
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Status | None = None
        if stream:
            try:
                async with contextlib.aclosing(self._stream(request_id)) as items:
                    async for item in items:
                        if isinstance(item, Result):
                            return item
                        if isinstance(item, Status):
                            if on_progress is not None:
                                outcome = on_progress(item)
                                if outcome is not None:
                                    await outcome
                            last = item
                        if deadline is not None and time.monotonic() > deadline:
                            raise WaitTimeoutError(
                                f"request {request_id} not finished after {timeout}s"
                            )
            except ApiError as exc:
                if exc.status_code not in NO_STREAM:
                    raise
            except httpx.TransportError:
                pass  # the stream broke off: polling takes over
        while True:
            current = await self.status(request_id)
            if on_progress is not None and current != last:
                outcome = on_progress(current)
                if outcome is not None:
                    await outcome
            last = current
            if current.is_final:
                return await self.result(request_id)
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeoutError(f"request {request_id} not finished after {timeout}s")
            await asyncio.sleep(poll_interval)

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
        result = await self.wait(
            submission.request_id,
            on_progress=on_progress,
            poll_interval=poll_interval,
            timeout=timeout,
        )
        if result.status != "succeeded":
            message = result.error.message if result.error and result.error.message else ""
            raise JobFailedError(result.request_id, result.status, message or result.status)
        return result

    async def download(self, url: str, path: str | Path) -> Path:
        target = Path(path)
        async with (
            httpx.AsyncClient(timeout=self.settings.timeout) as plain,
            plain.stream("GET", url) as response,
        ):
            if response.status_code >= 400:
                await response.aread()
                parse(response)
            with target.open("wb") as handle:
                async for chunk in response.aiter_bytes():
                    handle.write(chunk)
        return target
