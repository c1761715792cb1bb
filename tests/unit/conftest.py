"""The quick tier's fixtures: no server, no subprocess, no socket.

``fake_api`` is RunComfy's Model API as /work's contract describes it (submit, status, result,
cancel, delete), answered in memory through an ``httpx.MockTransport`` that the SDK's clients
take as ``transport=``; ``clock`` is a fake clock the clients sleep and time out on.
"""

from __future__ import annotations

import json
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from ovis_server.client import AsyncClient, Client

BASE = "http://api.test"
TOKEN = "ovis_unit_token"
Respond = Callable[[httpx.Request], httpx.Response | None]


@dataclass
class FakeJob:
    request_id: str
    model_id: str
    input: dict[str, Any]
    # The statuses /status answers in turn (the last one repeats).
    statuses: list[str] = field(default_factory=lambda: ["in_queue", "in_progress", "completed"])
    failure: str | None = None
    polled: int = 0
    cancelled: bool = False

    @property
    def status(self) -> str:
        if self.cancelled:
            return "cancelled"
        return self.statuses[min(self.polled, len(self.statuses) - 1)]


def _error(status: int, code: int, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error_code": code, "error_message": message}, headers=headers
    )


class FakeApi:
    """The API in memory. ``requests`` holds every request seen; ``before`` holds one-shot
    answers (e.g. a 429) given, in order, before the real answer; ``statuses`` are what a
    new job's status runs through."""

    def __init__(self) -> None:
        self.jobs: dict[str, FakeJob] = {}
        self.requests: list[httpx.Request] = []
        self.before: list[httpx.Response | Exception] = []
        self.statuses = ["in_queue", "in_progress", "completed"]
        self.failure: str | None = None
        self.no_stream = True
        self.keys: dict[str, str] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.before:
            queued = self.before.pop(0)
            if isinstance(queued, Exception):
                raise queued
            return queued
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return _error(401, 400004, "missing or unknown token")
        return self._route(request)

    def _route(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path.startswith("/v1/models/"):
            return self._submit(request, path.removeprefix("/v1/models/"))
        parts = path.removeprefix("/v1/requests/").split("/")
        job = self.jobs.get(parts[0])
        if job is None:
            return _error(404, 404001, f"unknown request {parts[0]}")
        action = parts[1] if len(parts) > 1 else ""
        if request.method == "GET" and action == "status":
            body = self._status(job)
            job.polled += 1
            return httpx.Response(200, json=body)
        if request.method == "GET" and action == "result":
            return httpx.Response(200, json=self._result(job))
        if request.method == "GET" and action == "stream":
            return _error(404, 404001, "no streams here")
        if request.method == "POST" and action == "cancel":
            final = job.status in ("completed", "failed", "cancelled")
            job.cancelled = job.cancelled or not final
            outcome = "not_cancellable" if final else "cancelled"
            return httpx.Response(
                202, json={"request_id": job.request_id, "status": job.status, "outcome": outcome}
            )
        if request.method == "DELETE" and action == "":
            del self.jobs[job.request_id]
            return httpx.Response(204)
        return _error(405, 0, "no such route")

    def _submit(self, request: httpx.Request, model_id: str) -> httpx.Response:
        key = request.headers.get("idempotency-key", "")
        if key and key in self.keys:
            request_id = self.keys[key]
        else:
            body = json.loads(request.content)
            if not isinstance(body.get("prompt"), str):
                return httpx.Response(
                    422,
                    json={
                        "error_code": 422001,
                        "error_message": "prompt: field required",
                        "detail": [{"loc": ["body", "prompt"], "msg": "Field required"}],
                    },
                )
            request_id = uuid.uuid4().hex
            self.jobs[request_id] = FakeJob(
                request_id, model_id, body, list(self.statuses), self.failure
            )
            if key:
                self.keys[key] = request_id
        urls = {
            f"{name}_url": f"{BASE}/v1/requests/{request_id}/{name}"
            for name in ("status", "result", "cancel")
        }
        return httpx.Response(200, json={"request_id": request_id, **urls})

    def _status(self, job: FakeJob) -> dict[str, Any]:
        body: dict[str, Any] = {"request_id": job.request_id, "status": job.status}
        if job.status == "in_queue":
            body["queue_position"] = 0
        if job.status == "in_progress":
            body["progress"] = {"step": 1, "total": 2}
        return body

    def _result(self, job: FakeJob) -> dict[str, Any]:
        status = {"completed": "succeeded"}.get(job.status, job.status)
        if status == "succeeded" and job.failure:
            status = "failed"
        body: dict[str, Any] = {"request_id": job.request_id, "status": status}
        if status == "succeeded":
            body["output"] = {"image": f"{BASE}/files/{job.request_id}.png?sig=s3cret"}
        if status == "failed":
            body["error"] = {"type": "engine", "message": job.failure}
        return body

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]


class FakeClock:
    """``time.sleep``, ``time.monotonic`` and ``asyncio.sleep`` for the clients: sleeping
    only moves the clock on, and each sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class _AsyncSleep:
    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock

    async def sleep(self, seconds: float) -> None:
        self._clock.sleep(seconds)


@pytest.fixture(autouse=True)
def _no_sockets_or_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick tier's rule, enforced: a test here that connects a socket or starts a
    process fails (it belongs with the server tests)."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("tests/unit opens no socket and starts no process")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    from ovis_server.client import _waiting, aio, sync

    fake = FakeClock()
    monkeypatch.setattr(sync, "time", fake)
    monkeypatch.setattr(_waiting, "time", fake)
    monkeypatch.setattr(aio, "asyncio", _AsyncSleep(fake))
    return fake


@pytest.fixture
def fake_api() -> FakeApi:
    return FakeApi()


@pytest.fixture
def client(fake_api: FakeApi, clock: FakeClock) -> Iterator[Client]:
    with Client(BASE, TOKEN, transport=httpx.MockTransport(fake_api)) as sdk:
        yield sdk


@pytest.fixture
def async_client(fake_api: FakeApi, clock: FakeClock) -> AsyncClient:
    return AsyncClient(BASE, TOKEN, transport=httpx.MockTransport(fake_api))
