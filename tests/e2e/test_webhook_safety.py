"""What a webhook receiver, or a webhook URL, can do to the server: real servers (a process
where the test measures its memory), real receivers on loopback (reached with
--allow-private-webhooks where a test needs them)."""

from __future__ import annotations

import contextlib
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from .bodies import OVIS_PATH
from .helpers import (
    REFUSED_URLS,
    Cluster,
    InProcessServer,
    Server,
    ServerFactory,
    create_token,
    http_get,
    start_server,
    wait_for,
)

BOMB_BYTES = 1 << 30  # what the receiver's gzip answer inflates to: 1 GiB of zeros
MB = 1 << 20


@dataclass
class Receiver:
    """A webhook endpoint on 127.0.0.1; ``answer`` writes each response."""

    answer: Callable[[BaseHTTPRequestHandler], None]
    calls: list[tuple[float, str]] = field(default_factory=list)  # (arrival, path)
    released: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def count(self) -> int:
        return len(self.calls)


@contextlib.contextmanager
def receiving(answer: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[Receiver]:
    state = Receiver(answer)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            state.calls.append((time.monotonic(), self.path))
            with contextlib.suppress(OSError):  # the sender may hang up mid-answer
                state.answer(self)

        def log_message(self, *_: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    http.daemon_threads = True
    threading.Thread(target=http.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{http.server_port}/hooks"
    try:
        yield state
    finally:
        state.released.set()
        http.shutdown()
        http.server_close()


def answer_status(code: int) -> Callable[[BaseHTTPRequestHandler], None]:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(code)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


def gzip_bomb() -> bytes:
    """A gzip stream of BOMB_BYTES zeros, about 1 MB compressed. After a full flush the
    compressor starts afresh, so each further MiB of zeros compresses to the same bytes:
    those are repeated, and the trailer's checksum and length written for the whole."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MB)
    first = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    last_block = packer.flush()[:-8]  # less the trailer: CRC-32 and length, 4 bytes each
    crc = 0
    for _ in range(BOMB_BYTES // MB):
        crc = zlib.crc32(zeros, crc)
    trailer = struct.pack("<II", crc, BOMB_BYTES & 0xFFFFFFFF)
    return first + again * (BOMB_BYTES // MB - 1) + last_block + trailer


def hooked_and_cancelled(client: httpx.Client, url: str) -> str:
    """A job with ``url`` as its webhook, cancelled while queued: it owes one message."""
    response = client.post(OVIS_PATH, json={"prompt": "x", "webhook": url})
    assert response.status_code == 200, response.text
    request_id: str = response.json()["request_id"]
    cancelled = client.post(f"/v1/requests/{request_id}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    return request_id


def memory_kib(pid: int, field_name: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def delivered_messages(server: Server | InProcessServer) -> int:
    """``ovis_webhook_messages_finished_total{state="delivered"}`` from /metrics."""
    text = http_get(f"{server.base_url}/metrics", timeout=10).text
    pattern = r'^ovis_webhook_messages_finished_total{state="delivered"} (\S+)'
    match = re.search(pattern, text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def pending_messages(server: InProcessServer) -> int:
    """``ovis_webhook_messages_pending`` from /metrics (servers here run --metrics-public)."""
    text = http_get(f"{server.base_url}/metrics", timeout=10).text
    match = re.search(r"^ovis_webhook_messages_pending (\d+)", text, re.MULTILINE)
    assert match is not None, text
    return int(float(match.group(1)))


# --- submit: URLs refused by themselves ------------------------------------------------


@pytest.fixture(scope="module")
def guarded(shared_server: ServerFactory) -> InProcessServer:
    """A server with the default policy (no private destinations)."""
    return shared_server(no_worker=True)


@pytest.fixture(scope="module")
def guarded_client(guarded: InProcessServer) -> Iterator[httpx.Client]:
    with guarded.client(guarded.token("guarded")) as client:
        yield client


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_refused_webhook_urls_are_a_422_naming_the_field(
    guarded_client: httpx.Client, url: str
) -> None:
    for params, body in (({"webhook": url}, {}), ({}, {"webhook": url})):
        response = guarded_client.post(OVIS_PATH, params=params, json={"prompt": "x", **body})
        assert response.status_code == 422, (url, response.text)
        error = response.json()
        assert error["error_code"] == 422001
        assert error["error_message"].startswith("webhook:")


@pytest.mark.parametrize(
    "url",
    ["https://example.com/h?token=x", "http://93.184.216.34:8080/h", "http://[2606:4700::1]/"],
)
def test_public_webhook_urls_are_taken(guarded_client: httpx.Client, url: str) -> None:
    response = guarded_client.post(OVIS_PATH, json={"prompt": "x", "webhook": url})
    assert response.status_code == 200, response.text


# --- send time -------------------------------------------------------------------------


def test_a_name_that_resolves_to_loopback_is_refused_when_sending(
    fresh_server: ServerFactory,
) -> None:
    """The operator allowed private receivers, a job asked for one, then the operator
    turned that off: its message is refused at send time, after DNS, without connecting."""
    with receiving(answer_status(204)) as hooks:
        url = hooks.url.replace("127.0.0.1", "localhost") + "?token=SEKRET"
        first = fresh_server(no_worker=True, allow_private_webhooks=True, metrics_public=True)
        token = first.token("rebound")
        with first.client(token) as client:
            response = client.post(OVIS_PATH, json={"prompt": "x", "webhook": url})
            assert response.status_code == 200, response.text
            request_id = response.json()["request_id"]
        first.stop()
        server = fresh_server(no_worker=True, log_level="debug")
        with server.client(token) as client:
            assert client.post(f"/v1/requests/{request_id}/cancel").status_code == 202
        wait_for(lambda: "attempt 1: not sent" in server.log(), timeout=30)
        assert "not sent: localhost resolves to a loopback address" in server.log()
        time.sleep(0.5)
        assert hooks.count() == 0
        assert "SEKRET" not in server.log()


def test_a_gzip_bomb_answer_costs_the_api_no_memory(
    tmp_path: Path, tiny_weights: Path, cluster: Cluster
) -> None:
    bomb = gzip_bomb()
    assert len(bomb) < 2 * MB

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Encoding", "gzip")
        handler.send_header("Content-Length", str(len(bomb)))
        handler.end_headers()
        handler.wfile.write(bomb)

    server = start_server(
        tmp_path, tiny_weights, "--no-worker", "--allow-private-webhooks", "--metrics-public"
    )
    cluster.servers.append(server)
    pid = server.process.pid
    token = create_token(tmp_path, "bombed")
    with receiving(answer) as hooks, server.client(token) as client:
        # Loopback works with the flag; a user name in the URL is refused even so.
        with_user = hooks.url.replace("://", "://user:pw@")
        refused = client.post(OVIS_PATH, json={"prompt": "x", "webhook": with_user})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error_message"].startswith("webhook:")
        before = memory_kib(pid, "VmRSS")
        for _ in range(3):
            hooked_and_cancelled(client, hooks.url)
        slowest = 0.0
        deadline = time.monotonic() + 90
        while delivered_messages(server) < 3:
            started = time.monotonic()
            assert http_get(f"{server.base_url}/healthz", timeout=5).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            assert time.monotonic() < deadline, "the messages were not delivered in 90 s"
            time.sleep(0.1)
        assert hooks.count() == 3, "a 2xx answer, however large, delivers the message"
        peak = memory_kib(pid, "VmHWM")
    grown = (peak - before) * 1024
    assert grown < 200 * MB, f"the API grew by {grown / MB:.0f} MB"
    assert slowest < 1.0, f"/healthz took {slowest:.2f} s while the answers came in"


def test_a_hanging_receiver_does_not_delay_another_tokens_webhooks(
    fresh_server: ServerFactory,
) -> None:
    def hang(handler: BaseHTTPRequestHandler) -> None:
        hanging.released.wait(120)

    server = fresh_server(no_worker=True, allow_private_webhooks=True, metrics_public=True)
    token_a, token_b = server.token("a"), server.token("b")
    with (
        receiving(hang) as hanging,
        receiving(answer_status(204)) as prompt,
        server.client(token_a) as client_a,
        server.client(token_b) as client_b,
    ):
        for _ in range(40):
            hooked_and_cancelled(client_a, hanging.url)
        wait_for(lambda: hanging.count() >= 4, timeout=30)
        time.sleep(1)  # the dispatcher has had its pick of A's 40 messages
        started = time.monotonic()
        hooked_and_cancelled(client_b, prompt.url)
        wait_for(lambda: prompt.count() == 1, timeout=60)
        took = prompt.calls[0][0] - started
        assert took < 8, f"B's webhook waited {took:.1f} s behind A's hanging receiver"
        assert hanging.count() <= 4, "no more than 4 messages in flight to one destination"
        # A's first 4 attempts time out after 10 s, and 3 failures in a row pause its
        # destination for 30 s: its other messages wait instead of taking their turn (of
        # 4 more every 10 s). A free slot may let one or two go before the third failure.
        first = hanging.calls[0][0]
        time.sleep(max(0.0, first + 25 - time.monotonic()))
        assert hanging.count() <= 6, f"{hanging.count()} calls to a failing destination"
        assert "failed 3 times in a row: pausing them for 30 s" in server.log()
        assert pending_messages(server) == 40


def test_a_failing_message_does_not_keep_its_job_past_retention(
    fresh_server: ServerFactory,
) -> None:
    server = fresh_server(
        no_worker=True, allow_private_webhooks=True, metrics_public=True,
        retention_seconds="3s", cleanup_interval_seconds="1s",
        webhook_retry_schedule="0,1h", log_level="debug",
    )  # fmt: skip
    token = server.token("retained")
    with receiving(answer_status(500)) as hooks, server.client(token) as client:
        url = hooks.url + "?token=SEKRET"
        request_id = hooked_and_cancelled(client, url)
        wait_for(lambda: "attempt 1: HTTP 500" in server.log(), timeout=30)
        assert hooks.count() == 1
        assert pending_messages(server) == 1, "the next attempt is an hour away"

        def gone() -> bool:
            return client.get(f"/v1/requests/{request_id}/status").status_code == 404

        wait_for(gone, timeout=30)
        assert pending_messages(server) == 0
    # Logs show where a webhook went, never its query string.
    log = server.log()
    assert f"{hooks.url}, attempt 1: HTTP 500" in log
    assert "SEKRET" not in log
