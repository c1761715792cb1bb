"""The API's calls, described once for both clients (sans I/O): what each sends, and what
its answer's body becomes."""

from __future__ import annotations

import base64
import contextlib
import mimetypes
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx

from ovis_server.client.errors import ApiConnectionError, error_for
from ovis_server.client.models import Cancellation, Result, Status, Submission

DEFAULT_MODEL = "aidc-ai/ovis-image"

T = TypeVar("T")

# How an attempt went: the server's response, or the transport error in its place.
Outcome = httpx.Response | httpx.TransportError


def parse(response: httpx.Response) -> Any:
    """The response's JSON body; the typed ApiError where the server answered with an error."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        raise error_for(response.status_code, body)
    return body


def connection_error(error: httpx.TransportError, retries: int = 0) -> ApiConnectionError:
    """The transport error as one readable line: which URL, and what happened."""
    text = str(error)
    if isinstance(error, httpx.TimeoutException):
        reason = "timed out"
    elif "refused" in text.lower():
        reason = "connection refused (is the server running there? OVIS_SERVER_URL says where)"
    elif isinstance(error, httpx.ConnectError) and (
        "name or service not known" in text.lower() or "nodename nor servname" in text.lower()
    ):
        reason = "host name not found"
    else:
        reason = text or type(error).__name__
    try:
        url = error.request.url.copy_with(query=None, fragment=None)
    except RuntimeError:  # an error raised outside a request
        return ApiConnectionError("the server", reason, retries)
    return ApiConnectionError(str(url), reason, retries)


@contextlib.contextmanager
def connection_errors() -> Iterator[None]:
    """Around a call that is not retried (a stream, a download): transport errors as
    ApiConnectionError."""
    try:
        yield
    except httpx.TransportError as error:
        raise connection_error(error) from None


def _as_is(body: Any) -> Any:
    return body


def _nothing(_body: Any) -> None:
    return None


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: method, path (below the base URL), the headers of its own (the token is
    the client's), its JSON body or query, whether it opens a status stream, and ``read``,
    which turns the answer's body into what the caller gets."""

    method: str
    path: str
    read: Callable[[Any], T] = _as_is
    headers: Mapping[str, str] = field(default_factory=dict)
    json: Any = None
    params: Any = None
    streams: bool = False

    def answer(self, outcome: Outcome, retries: int = 0) -> T:
        """The last attempt's outcome as the caller gets it: the body read, or the error
        (a transport error as one ApiConnectionError naming the URL)."""
        if isinstance(outcome, httpx.TransportError):
            raise connection_error(outcome, retries) from None
        return self.read(parse(outcome))


# Fields that name an input image: a local file given there is sent as a data URI.
IMAGE_FIELDS = ("image_url",)
_REMOTE = ("https://", "http://", "data:")


def image_field(value: object) -> object:
    """A local file (a ``Path``, or a string naming an existing file that is not a URL) as
    a ``data:`` URI of its bytes (the server judges the content); anything else as it is."""
    if isinstance(value, str) and value[:8].lower().startswith(_REMOTE):
        return value
    if not isinstance(value, str | os.PathLike):
        return value
    path = Path(value)
    if not path.is_file():
        return value
    kind = mimetypes.guess_type(path.name)[0] or "image/png"
    if not kind.startswith("image/"):
        kind = "image/png"
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def submit(input: Mapping[str, Any], model_id: str) -> Call[Submission]:
    """A fresh Idempotency-Key makes the submit's retries safe: the server queues one job.
    An image field naming a local file sends the file (a data URI)."""
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    path = f"/v1/models/{model_id}"
    body = {key: image_field(v) if key in IMAGE_FIELDS else v for key, v in input.items()}
    return Call("POST", path, Submission.model_validate, headers, json=body)


def status(request_id: str) -> Call[Status]:
    return Call("GET", f"/v1/requests/{request_id}/status", Status.model_validate)


def result(request_id: str) -> Call[Result]:
    return Call("GET", f"/v1/requests/{request_id}/result", Result.model_validate)


def cancel(request_id: str) -> Call[Cancellation]:
    return Call("POST", f"/v1/requests/{request_id}/cancel", Cancellation.model_validate)


def delete(request_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/requests/{request_id}", _nothing)


def stream(request_id: str) -> Call[None]:
    """The status stream: read a line at a time (see StatusStream), not through ``read``."""
    return Call("GET", f"/v1/requests/{request_id}/stream", _nothing, streams=True)
