"""The API's calls, described once for both clients (sans I/O): what each sends, and what
its answer's body becomes."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx

from ovis_server.client.errors import error_for
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

    def answer(self, outcome: Outcome) -> T:
        """The last attempt's outcome as the caller gets it: the body read, or the error."""
        if isinstance(outcome, httpx.TransportError):
            raise outcome
        return self.read(parse(outcome))


def submit(input: Mapping[str, Any], model_id: str) -> Call[Submission]:
    """A fresh Idempotency-Key makes the submit's retries safe: the server queues one job."""
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    path = f"/v1/models/{model_id}"
    return Call("POST", path, Submission.model_validate, headers, json=dict(input))


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
