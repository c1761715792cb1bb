"""What the synchronous and asynchronous clients share: settings, retries, parsing."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from ovis_server.client.errors import error_for
from ovis_server.client.models import Result, Status

DEFAULT_MODEL = "aidc-ai/ovis-image"
DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_DELAY = 30.0


@dataclass(frozen=True)
class ClientSettings:
    base_url: str
    token: str | None
    timeout: float
    max_retries: int
    backoff: float

    @classmethod
    def resolve(
        cls,
        base_url: str | None,
        token: str | None,
        timeout: float,
        max_retries: int,
        backoff: float,
    ) -> ClientSettings:
        """Arguments first, then OVIS_SERVER_URL / RUNCOMFY_MODEL_API_BASE and
        OVIS_SERVER_TOKEN from the environment."""
        url = (
            base_url
            or os.environ.get("OVIS_SERVER_URL")
            or os.environ.get("RUNCOMFY_MODEL_API_BASE")
            or DEFAULT_URL
        ).rstrip("/")
        # RunComfy's base includes /v1; paths here start with it.
        url = url.removesuffix("/v1")
        return cls(url, token or os.environ.get("OVIS_SERVER_TOKEN"), timeout, max_retries, backoff)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def submit_request(model_id: str) -> tuple[str, dict[str, str]]:
    """Path and headers of a submit: a fresh Idempotency-Key makes its retries safe."""
    return f"/v1/models/{model_id}", {"Idempotency-Key": uuid.uuid4().hex}


def should_retry(response: httpx.Response | None, attempt: int, settings: ClientSettings) -> bool:
    if attempt >= settings.max_retries:
        return False
    return response is None or response.status_code in RETRY_STATUSES


def retry_delay(response: httpx.Response | None, attempt: int, settings: ClientSettings) -> float:
    """Retry-After when the server gives one, else exponential backoff."""
    if response is not None and "retry-after" in response.headers:
        try:
            return min(float(response.headers["retry-after"]), MAX_DELAY)
        except ValueError:
            pass
    return float(min(settings.backoff * 2**attempt, MAX_DELAY))


# A server without status streams (RunComfy's hosted API) answers the stream route so, and
# a proxy in trouble with one of the others; the client then polls instead.
NO_STREAM = frozenset({404, 405, 501}) | RETRY_STATUSES
# Longer than the server's 15 s keep-alive, whatever the client's own timeout.
STREAM_READ_TIMEOUT = 45.0


def stream_timeout(settings: ClientSettings) -> httpx.Timeout:
    return httpx.Timeout(settings.timeout, read=max(settings.timeout, STREAM_READ_TIMEOUT))


class KeepAlive:
    """A keep-alive comment on a status stream: nothing changed, the stream is alive."""


KEEP_ALIVE = KeepAlive()
StreamItem = Status | Result | KeepAlive


class StatusStream:
    """Reads a status stream (``text/event-stream``) a line at a time: each line gives a
    Status, the Result (the stream's last item), a KeepAlive, or None while an event is
    still being read."""

    def __init__(self) -> None:
        self._name = "message"
        self._data: list[str] = []

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
            return Result.model_validate(body)
        return None  # an event this client does not know


def parse(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        raise error_for(response.status_code, body)
    return body
