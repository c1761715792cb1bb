"""The HTTP edge of a real server on a real port: body size, JSON depth, Prefer, per-token
and server-wide caps, revoked tokens' streams, the Host header and the access log."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ovis_server.api.middleware.access_log import redact_query
from ovis_server.api.request_body import json_depth
from ovis_server.units import parse_size

from .bodies import OVIS_PATH
from .helpers import InProcessServer, ServerFactory, create_token, start_server, submit, wait_for

FAST = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(shared_server: ServerFactory) -> InProcessServer:
    """No worker: submitted jobs stay queued, so their streams stay open."""
    return shared_server(
        no_worker=True, max_streams_per_token=2, allowed_hosts="127.0.0.1,localhost"
    )


def queued(client: httpx.Client) -> int:
    response = client.get("/v1/requests", params={"limit": 100})
    assert response.status_code == 200, response.text
    return len(response.json()["requests"])


def assert_error(response: httpx.Response, status: int, code: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error_code"] == code
    assert body["error_message"]
    return body


def server_rss() -> int:
    """The resident memory of this process, where the server runs, in bytes."""
    status = Path("/proc/self/status").read_text()
    line = next(row for row in status.splitlines() if row.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


# --- body size ---------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_before_it_is_read(server: InProcessServer) -> None:
    token = server.token("big-body")
    with server.client(token) as client:
        prompt = "x" * (2 * 1024 * 1024)
        response = client.post(OVIS_PATH, json={"prompt": prompt})
        assert_error(response, 413, 413001)
        assert queued(client) == 0
        assert client.post(OVIS_PATH, json=FAST).status_code == 200


def chunked_upload(server: InProcessServer, token: str, total: int) -> tuple[bytes, int]:
    """POST a chunked JSON body of ``total`` bytes over a raw socket, stopping as soon as
    the server answers; returns its answer and how many body bytes were sent."""
    port = int(server.base_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (
        f"POST {OVIS_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    sent = 0
    with sock:
        sock.sendall(head.encode())
        piece = b'{"prompt": "' + b"x" * (64 * 1024 - 12)
        try:
            while sent < total:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered early
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
                piece = b"x" * (64 * 1024)
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
    return answer, sent


def test_a_chunked_body_is_cut_off_at_the_limit_and_memory_stays_flat(
    server: InProcessServer,
) -> None:
    token = server.token("chunked")
    before = server_rss()
    answer, _ = chunked_upload(server, token, 5 * 1024 * 1024)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert json.loads(body)["error_code"] == 413001

    # Four 32 MB uploads at once: each is cut off after about 1 MiB.
    results: list[tuple[bytes, int]] = []
    uploads = [
        threading.Thread(
            target=lambda: results.append(chunked_upload(server, token, 32 * 1024 * 1024))
        )
        for _ in range(4)
    ]
    for upload in uploads:
        upload.start()
    for upload in uploads:
        upload.join(120)
    assert [answer[:12] for answer, _ in results] == [b"HTTP/1.1 413"] * 4
    assert server_rss() - before < 40 * 1024 * 1024
    with server.client(token) as client:
        assert queued(client) == 0


# --- JSON nesting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        '{"prompt": "deep", "extra": ' + "[" * 10000 + "]" * 10000 + "}",
        '{"prompt": "deep", "webhook": ' + "[" * 10000 + "]" * 10000 + "}",
        '{"prompt": "deep", "webhook": "https://hooks.example.com/in", "extra": '
        + '{"a": ' * 10000
        + "1"
        + "}" * 10000
        + "}",
        '{"webhook_intermediate_status": true, "x": ' + "[" * 10000,  # unterminated
    ],
    ids=["in-body", "in-webhook", "beside-webhook", "unterminated"],
)
def test_deeply_nested_json_is_a_422_never_a_500(server: InProcessServer, body: str) -> None:
    token = server.token("nested")
    with server.client(token) as client:
        response = client.post(
            OVIS_PATH, content=body, headers={"Content-Type": "application/json"}
        )
        assert_error(response, 422, 422001)
        assert queued(client) == 0


def test_json_depth_skips_strings() -> None:
    assert json_depth(b'{"a": "[[[{{\\"[[", "b": [[1]]}') == 3
    assert json_depth(b"[" * 10000) == 10000
    assert json_depth(b'"\\' * 100_000) == 0  # an unterminated string: one pass, no blowup
    assert json_depth(b"") == 0


# --- Prefer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefer",
    [b"wait=\xb2", b"wait=" + b"9" * 5000, b"wait=-1", b"wait=1e3", b'wait="x"'],
    ids=["superscript", "5000-digits", "negative", "exponent", "quoted-word"],
)
def test_a_prefer_wait_it_cannot_read_is_ignored_and_queues_once(
    server: InProcessServer, prefer: bytes
) -> None:
    token = server.token("prefer")
    with server.client(token) as client:
        response = client.post(OVIS_PATH, json=FAST, headers={b"Prefer": prefer})
        assert response.status_code == 200, response.text
        assert "Preference-Applied" not in response.headers
        assert queued(client) == 1


def test_prefer_wait_is_still_honoured(server: InProcessServer) -> None:
    token = server.token("prefer-ok")
    with server.client(token) as client:
        started = time.monotonic()
        response = client.post(OVIS_PATH, json=FAST, headers={"Prefer": 'respond-async, wait="1"'})
        assert response.status_code == 200, response.text
        assert time.monotonic() - started >= 0.9  # it waited, and the job is still queued
        assert queued(client) == 1


# --- per-token slots and revocation ---------------------------------------------------------


def test_a_token_holds_at_most_its_streams_and_waits_open(server: InProcessServer) -> None:
    token = server.token("streams")
    other = server.token("streams-other")
    with server.client(token) as client, server.client(other) as other_client:
        request_id = submit(client, **FAST)
        path = f"/v1/requests/{request_id}/stream"
        with client.stream("GET", path) as first, client.stream("GET", path) as second:
            assert first.status_code == second.status_code == 200
            refused = client.get(path)
            assert_error(refused, 429, 429001)
            assert int(refused.headers["Retry-After"]) >= 1
            # A waiting submit holds a slot too: refused before anything is queued.
            waiting = client.post(OVIS_PATH, json=FAST, headers={"Prefer": "wait=5"})
            assert_error(waiting, 429, 429001)
            assert queued(client) == 1
            # Another token is not held back.
            other_id = submit(other_client, **FAST)
            with other_client.stream("GET", f"/v1/requests/{other_id}/stream") as theirs:
                assert theirs.status_code == 200
        # Closing a stream gives its slot back.

        def reopened() -> bool:
            with client.stream("GET", path) as again:
                return again.status_code == 200

        wait_for(reopened, timeout=15, interval=0.5)


def test_a_revoked_tokens_stream_ends_within_seconds(server: InProcessServer) -> None:
    token = server.token("revoked")
    headers = {"Authorization": f"Bearer {token}"}
    timeout = httpx.Timeout(10, read=20)
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=timeout) as client:
        request_id = submit(client, **FAST)
        with client.stream("GET", f"/v1/requests/{request_id}/stream") as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert next(lines).startswith("event: status")
            server.cli("token", "revoke", "revoked")
            revoked_at = time.monotonic()
            for _ in lines:
                pass  # until the server ends the stream (a ReadTimeout if it never does)
            assert time.monotonic() - revoked_at < 10
        assert_error(client.get(f"/v1/requests/{request_id}/status"), 401, 400004)


# --- Host -----------------------------------------------------------------------------------


def test_a_host_not_allowed_gets_400(server: InProcessServer) -> None:
    with server.client() as client:
        refused = client.get("/v1/models", headers={"Host": "evil.example.com"})
        body = assert_error(refused, 400, 400000)
        assert "evil.example.com" in body["error_message"]
        assert client.get("/healthz", headers={"Host": "localhost:1"}).status_code == 200
        assert client.get("/healthz").status_code == 200


# --- the access log -------------------------------------------------------------------------


def test_the_access_log_carries_no_signatures_or_webhook_urls(server: InProcessServer) -> None:
    token = server.token("logs")
    with server.client(token) as client:
        client.get("/files/abc/out.png", params={"expires": "1", "signature": "sekrit-sig"})
        client.post(
            OVIS_PATH,
            params={"webhook": "https://hooks.example.com/sekrit-hook?key=1"},
            json=FAST,
        )

    def logged() -> str | None:
        log = server.log()
        return log if "/files/abc/out.png" in log and OVIS_PATH + "?" in log else None

    log = wait_for(logged, timeout=10)
    assert "sekrit" not in log
    assert "signature=REDACTED" in log
    assert "webhook=REDACTED" in log


def test_redact_query_keeps_what_is_not_secret() -> None:
    assert redact_query("/v1/requests?limit=5") == "/v1/requests?limit=5"
    assert redact_query("/f/a.png?expires=9&sig=x&X-Amz-Signature=y") == (
        "/f/a.png?expires=9&sig=REDACTED&X-Amz-Signature=REDACTED"
    )


def test_sizes_read_with_units() -> None:
    assert parse_size("1MiB") == 1024 * 1024
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("2048") == 2048
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


# --- the server-wide cap --------------------------------------------------------------------


def test_requests_beyond_the_server_cap_get_503_and_probes_still_answer(
    tmp_path: Path, tiny_weights: Path
) -> None:
    server = start_server(
        tmp_path,
        tiny_weights,
        "--no-worker",
        "--host", "0.0.0.0",  # noqa: S104 (for the warning it logs)
        "--max-connections", "2",
        "--max-streams-per-token", "0",
    )  # fmt: skip
    try:
        assert "absolute URLs in answers" in server.log()
        token = create_token(tmp_path, "crowd")
        with server.client(token) as client, server.client(token) as second:
            request_id = submit(client, **FAST)
            path = f"/v1/requests/{request_id}/stream"
            with client.stream("GET", path) as one, second.stream("GET", path) as two:
                assert one.status_code == two.status_code == 200
                with server.client(token) as third:
                    busy = third.get("/v1/models")
                    assert_error(busy, 503, 503002)
                    assert int(busy.headers["Retry-After"]) >= 1
                    assert third.get("/healthz").status_code == 200
                    assert "error_code" not in third.get("/readyz").json()
            wait_for(lambda: client.get("/v1/models").status_code == 200, timeout=15)
    finally:
        server.stop()
