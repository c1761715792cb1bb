"""The Python SDK, the CLI client, wait mode and status logs, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image

from ovis_server.client import (
    ApiConnectionError,
    AsyncClient,
    AuthenticationError,
    Client,
    InvalidInputError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    Status,
    WaitTimeoutError,
)

from .bodies import SLOW
from .helpers import (
    InProcessServer,
    free_port,
    run_cli,
    wait_for,
)

FAST = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def token(server: InProcessServer) -> str:
    return server.token("sdk")


def test_run_reports_progress_and_downloads(
    server: InProcessServer, token: str, tmp_path: Path
) -> None:
    seen: list[Status] = []
    with Client(server.base_url, token) as client:
        result = client.run(
            {"prompt": "a sign", "image_size": "square", "num_inference_steps": 12, "seed": 3},
            on_progress=seen.append,
            poll_interval=0.05,
        )
        assert result.status == "succeeded"
        assert result.seed == 3
        assert result.image_url is not None
        saved = client.download(result.image_url, tmp_path / "out.png")
    with Image.open(saved) as image:
        assert image.size == (512, 512)
    assert seen[-1].status == "completed"
    steps = [s.progress.step for s in seen if s.progress is not None]
    assert steps, "saw the job in progress"
    # run follows the status stream, which tells every step from the first it sees.
    assert steps == list(range(steps[0], 13))


def test_typed_errors_carry_error_codes(server: InProcessServer, token: str) -> None:
    with (
        Client(server.base_url, "ovis_wrong") as stranger,
        pytest.raises(AuthenticationError) as bad,
    ):
        stranger.status("x")
    assert bad.value.error_code == 400004
    with Client(server.base_url, token) as client:
        with pytest.raises(NotFoundError) as missing:
            client.result("no-such-request")
        assert missing.value.error_code == 404001
        with pytest.raises(InvalidInputError) as invalid:
            client.submit({"prompt": "x", "num_inference_steps": 99})
        assert invalid.value.error_code == 422001
        assert "num_inference_steps" in invalid.value.message
        mine = client.submit({"prompt": "mine", **FAST}).request_id
    with Client(server.base_url, server.token("other")) as other:
        with pytest.raises(PermissionDeniedError) as foreign:
            other.cancel(mine)
        assert foreign.value.error_code == 403001


def test_a_cancelled_run_raises_and_a_slow_wait_times_out(
    server: InProcessServer, token: str
) -> None:
    with Client(server.base_url, token) as client:
        cancelled: list[str] = []

        def cancel_once_running(status: Status) -> None:
            if status.status == "in_progress" and not cancelled:
                cancelled.append(client.cancel(status.request_id).outcome)

        with pytest.raises(JobFailedError) as failed:
            client.run(SLOW, on_progress=cancel_once_running)
        assert failed.value.status == "cancelled"
        assert cancelled in (["cancelled"], ["cancellation_requested"])

        submission = client.submit(SLOW)
        with pytest.raises(WaitTimeoutError):
            client.wait(submission.request_id, timeout=0.2, poll_interval=0.05)
        client.cancel(submission.request_id)


def test_async_client(server: InProcessServer, token: str, tmp_path: Path) -> None:
    async def scenario() -> tuple[str, tuple[int, int]]:
        async with AsyncClient(server.base_url, token) as client:
            seen: list[str] = []

            async def record(status: Status) -> None:
                seen.append(status.status)

            result = await client.run(
                {"prompt": "async", **FAST}, on_progress=record, poll_interval=0.05
            )
            assert result.image_url is not None
            path = await client.download(result.image_url, tmp_path / "async.png")
            with Image.open(path) as image:
                return seen[-1], image.size

    assert asyncio.run(scenario()) == ("completed", (64, 64))


class JsonHandler(BaseHTTPRequestHandler):
    """A stand-in API server's handler: JSON answers, no access log."""

    def _send(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: Any) -> None:
        pass


class FlakyHandler(JsonHandler):
    """Answers 503, then 429 with Retry-After, then a status body."""

    calls: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        FlakyHandler.calls.append(self.path)
        attempt = len(FlakyHandler.calls)
        if attempt == 1:
            self._send(503, {"error_code": 500000, "error_message": "busy"})
        elif attempt == 2:
            self._send(
                429, {"error_code": 429001, "error_message": "slow down"}, {"Retry-After": "0"}
            )
        else:
            self._send(200, {"request_id": "r1", "status": "in_queue", "queue_position": 2})


def test_retries_on_5xx_429_and_connection_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    threading.Thread(target=flaky.serve_forever, daemon=True).start()
    try:
        # RunComfy-style base URL (with /v1) from the environment.
        monkeypatch.setenv("RUNCOMFY_MODEL_API_BASE", f"http://127.0.0.1:{flaky.server_port}/v1")
        with Client(token="t", backoff=0.01) as client:
            status = client.status("r1")
        assert (status.status, status.queue_position) == ("in_queue", 2)
        assert FlakyHandler.calls == ["/v1/requests/r1/status"] * 3
    finally:
        flaky.shutdown()
        flaky.server_close()
    dead = Client(f"http://127.0.0.1:{free_port()}", "t", backoff=0.01, max_retries=2)
    with dead, pytest.raises(ApiConnectionError):
        dead.status("r1")


def test_a_closed_port_is_one_readable_error_naming_the_url(tmp_path: Path) -> None:
    """Not httpx's ConnectError and its traceback: one line with the URL asked, after the
    retries; the same from the async client, a stream, a download and the CLI."""
    base = f"http://127.0.0.1:{free_port()}"
    with Client(base, "t", backoff=0.01, max_retries=2) as client:
        with pytest.raises(ApiConnectionError) as caught:
            client.status("r1")
        assert str(caught.value) == (
            f"cannot reach {base}/v1/requests/r1/status: connection refused (is the server "
            "running there? OVIS_SERVER_URL says where) (after 2 retries)"
        )
        assert caught.value.__cause__ is None
        assert caught.value.__suppress_context__
        with pytest.raises(ApiConnectionError, match=f"cannot reach {base}/v1/requests/r1/str"):
            list(client.stream("r1"))
        # A signed URL's query is not repeated in the message.
        with pytest.raises(ApiConnectionError) as caught:
            client.download(f"{base}/files/x/y.png?signature=secret", tmp_path / "y.png")
        assert "secret" not in str(caught.value)
        assert f"{base}/files/x/y.png" in str(caught.value)

    async def from_async() -> str:
        async with AsyncClient(base, "t", backoff=0.01, max_retries=1) as client:
            with pytest.raises(ApiConnectionError) as caught:
                await client.submit({"prompt": "x"})
            return str(caught.value)

    assert asyncio.run(from_async()).startswith(f"cannot reach {base}/v1/models/aidc-ai/ovis-image")
    cli = subprocess.run(
        [sys.executable, "-m", "ovis_server", "status", "r1"],
        env={**os.environ, "OVIS_SERVER_URL": base, "OVIS_SERVER_TOKEN": "t"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 1
    assert cli.stderr.strip().splitlines() == [
        f"Error: cannot reach {base}/v1/requests/r1/status: connection refused (is the server "
        "running there? OVIS_SERVER_URL says where) (after 3 retries)"
    ]


class NoStreamHandler(JsonHandler):
    """A server without status streams, as RunComfy's hosted API: 404 on /stream."""

    def do_GET(self) -> None:
        if self.path.endswith("/stream"):
            self._send(404, {"detail": "Not Found"})
        elif self.path.endswith("/status"):
            self._send(200, {"request_id": "r1", "status": "completed"})
        else:
            self._send(200, {"request_id": "r1", "status": "succeeded", "output": {"image": "u"}})


def test_wait_polls_where_the_server_has_no_stream() -> None:
    plain = ThreadingHTTPServer(("127.0.0.1", 0), NoStreamHandler)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        with Client(f"http://127.0.0.1:{plain.server_port}/v1", "t") as client:
            seen: list[Status] = []
            result = client.wait("r1", on_progress=seen.append, poll_interval=0.01)
        assert result.image_url == "u"
        assert [status.status for status in seen] == ["completed"]
    finally:
        plain.shutdown()
        plain.server_close()


def test_async_client_retries_and_polls_where_the_server_has_no_stream() -> None:
    """AsyncClient shares Client's retries and wait: the same answers, awaited."""
    flaky = ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    plain = ThreadingHTTPServer(("127.0.0.1", 0), NoStreamHandler)
    for stand_in in (flaky, plain):
        threading.Thread(target=stand_in.serve_forever, daemon=True).start()

    async def scenario() -> tuple[str, str | None, list[str]]:
        async with AsyncClient(f"http://127.0.0.1:{flaky.server_port}", "t", backoff=0.01) as a:
            status = await a.status("r1")
        seen: list[str] = []

        async def record(update: Status) -> None:
            seen.append(update.status)

        async with AsyncClient(f"http://127.0.0.1:{plain.server_port}/v1", "t") as b:
            result = await b.wait("r1", on_progress=record, poll_interval=0.01)
        return status.status, result.image_url, seen

    FlakyHandler.calls.clear()
    try:
        assert asyncio.run(scenario()) == ("in_queue", "u", ["completed"])
        assert FlakyHandler.calls == ["/v1/requests/r1/status"] * 3
    finally:
        FlakyHandler.calls.clear()
        for stand_in in (flaky, plain):
            stand_in.shutdown()
            stand_in.server_close()


def test_cli_run_status_result_cancel(server: InProcessServer, token: str, tmp_path: Path) -> None:
    env = {"OVIS_SERVER_URL": server.base_url, "OVIS_SERVER_TOKEN": token}
    out = tmp_path / "cli.webp"
    done = run_cli("run", "a red door", "-o", str(out), "--image-size", "128x64", "--steps", "3",
                   "--seed", "5", env=env)  # fmt: skip
    assert "seed 5" in done.stderr
    with Image.open(out) as image:
        assert (image.size, image.format) == ((128, 64), "WEBP")
    request_id = done.stderr.split("request ")[1].split()[0]
    status = json.loads(run_cli("status", request_id, env=env).stdout)
    assert status["status"] == "completed"
    result = json.loads(run_cli("result", request_id, env=env).stdout)
    assert result["seed"] == 5
    cancel = json.loads(run_cli("cancel", request_id, env=env).stdout)
    assert cancel["outcome"] == "not_cancellable"
    missing = run_cli("status", "nope", env=env, check=False)
    assert missing.returncode == 1
    assert "404001" in missing.stderr


def test_ctrl_c_cancels_the_remote_job(server: InProcessServer, token: str, tmp_path: Path) -> None:
    env = {"OVIS_SERVER_URL": server.base_url, "OVIS_SERVER_TOKEN": token}
    process = subprocess.Popen(
        [sys.executable, "-m", "ovis_server", "run", SLOW["prompt"], "-o", str(tmp_path / "x.png"),
         "--image-size", "64x64", "--steps", "50"],
        env={**os.environ, **env}, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as a terminal sends it: a process started with SIGINT ignored (as this
        # test process may have it, from whatever ran in it before) keeps it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    with Client(server.base_url, token) as client:

        def running() -> str | None:
            for item in client._call("GET", "/v1/requests", params={"limit": 1})["requests"]:
                if item["status"] == "in_progress":
                    return str(item["request_id"])
            return None

        request_id = wait_for(running, timeout=120)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, stderr
        assert "cancel: cancelled" in stderr or "cancel: cancellation_requested" in stderr
        assert client.wait(request_id).status == "cancelled"


def test_wait_mode(server: InProcessServer, token: str) -> None:
    path = "/v1/models/aidc-ai/ovis-image"
    with server.client(token) as client:
        fast = client.post(path, json={"prompt": "quick", **FAST}, headers={"Prefer": "wait=30"})
        assert fast.status_code == 200
        assert fast.headers["preference-applied"] == "wait=30"
        assert fast.json()["status"] == "succeeded"
        assert fast.json()["output"]["image"].startswith("http")
        slow = client.post(
            path,
            json=SLOW,
            headers={"Prefer": "wait=1"},
        )
        assert set(slow.json()) == {"request_id", "status_url", "result_url", "cancel_url"}
        assert "preference-applied" not in slow.headers
        client.post(f"/v1/requests/{slow.json()['request_id']}/cancel")


def test_status_timestamps_and_logs(server: InProcessServer, token: str) -> None:
    with Client(server.base_url, token) as client:
        result = client.run({"prompt": "logged", **FAST}, poll_interval=0.05)
    with server.client(token) as http:
        plain = http.get(f"/v1/requests/{result.request_id}/status").json()
        assert plain["created_at"].endswith("Z")
        assert plain["finished_at"] >= plain["started_at"] >= plain["created_at"]
        assert "logs" not in plain
        logged = http.get(f"/v1/requests/{result.request_id}/status", params={"logs": 1}).json()
    assert [line["message"] for line in logged["logs"]] == ["queued", "started", "succeeded"]
    assert all(line["timestamp"].endswith("Z") for line in logged["logs"])
