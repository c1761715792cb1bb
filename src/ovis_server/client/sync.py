"""The synchronous client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
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


class Client:
    """RunComfy's Model API, on ovis-server or on RunComfy itself (only the base URL differs).

    >>> with Client("http://127.0.0.1:8000", token="ovis_...") as client:
    ...     result = client.run({"prompt": "a neon sign that reads OVIS"})
    ...     client.download(result.image_url, "ovis.png")
    """

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
        self._http = httpx.Client(base_url=self.settings.base_url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _b: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**self.settings.headers(), **kwargs.pop("headers", {})}
        attempt = 0
        while True:
            response: httpx.Response | None
            try:
                response = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError:
                response = None
                if not should_retry(None, attempt, self.settings):
                    raise
            if response is not None and not should_retry(response, attempt, self.settings):
                return parse(response)
            time.sleep(retry_delay(response, attempt, self.settings))
            attempt += 1

    def submit(self, input: Mapping[str, Any], model_id: str = DEFAULT_MODEL) -> Submission:
        path, headers = submit_request(model_id)
        return Submission.model_validate(
            self._call("POST", path, json=dict(input), headers=headers)
        )

    def status(self, request_id: str) -> Status:
        return Status.model_validate(self._call("GET", f"/v1/requests/{request_id}/status"))

    def result(self, request_id: str) -> Result:
        return Result.model_validate(self._call("GET", f"/v1/requests/{request_id}/result"))

    def cancel(self, request_id: str) -> Cancellation:
        return Cancellation.model_validate(self._call("POST", f"/v1/requests/{request_id}/cancel"))

    def delete(self, request_id: str) -> None:
        """Remove the request and its output files (their URLs stop working); a running
        job stops. Raises NotFoundError for an unknown request."""
        self._call("DELETE", f"/v1/requests/{request_id}")

    def stream(self, request_id: str) -> Iterator[Status | Result]:
        """The request's status stream: a Status on every change, then the Result once it
        is final. Raises ApiError like the other calls (NotFoundError, 404, also where a
        server has no streams)."""
        for item in self._stream(request_id):
            if not isinstance(item, KeepAlive):
                yield item

    def _stream(self, request_id: str) -> Iterator[Status | Result | KeepAlive]:
        """``stream``, with a KeepAlive for each keep-alive comment."""
        path = f"/v1/requests/{request_id}/stream"
        with self._http.stream(
            "GET", path, headers=self.settings.headers(), timeout=stream_timeout(self.settings)
        ) as response:
            if response.status_code >= 400:
                response.read()
                parse(response)
            events = StatusStream()
            for line in response.iter_lines():
                item = events.feed(line)
                if item is not None:
                    yield item
                if isinstance(item, Result):
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
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Status | None = None
        if stream:
            try:
                for item in self._stream(request_id):
                    if isinstance(item, Result):
                        return item
                    if isinstance(item, Status):
                        if on_progress is not None:
                            on_progress(item)
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
            current = self.status(request_id)
            if on_progress is not None and current != last:
                on_progress(current)
            last = current
            if current.is_final:
                return self.result(request_id)
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeoutError(f"request {request_id} not finished after {timeout}s")
            time.sleep(poll_interval)

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
        result = self.wait(
            submission.request_id,
            on_progress=on_progress,
            poll_interval=poll_interval,
            timeout=timeout,
        )
        if result.status != "succeeded":
            message = result.error.message if result.error and result.error.message else ""
            raise JobFailedError(result.request_id, result.status, message or result.status)
        return result

    def download(self, url: str, path: str | Path) -> Path:
        """Save an output file: a plain GET, with no token (output URLs carry their own)."""
        target = Path(path)
        with httpx.stream("GET", url, timeout=self.settings.timeout) as response:
            if response.status_code >= 400:
                response.read()
                parse(response)
            with target.open("wb") as handle:
                for chunk in response.iter_bytes():
                    handle.write(chunk)
        return target
