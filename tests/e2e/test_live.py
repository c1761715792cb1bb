"""Live feedback: status streams (server-sent events) and signed webhooks, on real servers
(processes where a test stops or restarts them)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from ovis_server.client import WebhookVerificationError, verify_webhook
from ovis_server.webhooks.signing import sign

from .bodies import OVIS_PATH
from .helpers import (
    Cluster,
    ServerFactory,
    create_token,
    create_token_with_webhook_secret,
    download,
    http_get,
    run_cli,
    start_server,
    status_of,
    submit,
    wait_for,
    wait_result,
)

FAST = {"image_size": {"width": 64, "height": 64}, "guidance_scale": 1}


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """(event, data) pairs of a text/event-stream, and ("comment", text) for comments."""
    name, data = "message", []
    for line in lines:
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").strip())
        elif not line and data:
            yield name, json.loads("\n".join(data))
            name, data = "message", []


def unsigned(result: dict[str, Any]) -> dict[str, Any]:
    """A result body with its image URL's query left off: each rendering signs the URL
    afresh, with an expiry counted from then, so two renderings a second apart differ."""
    image = result["output"]["image"]
    return {**result, "output": {"image": image.split("?")[0]}}


def check_story(events: list[tuple[str, Any]], total: int) -> None:
    """One job's stream: queued (moving up), every step in order, completed, the result."""
    names = [name for name, _ in events]
    assert names[-1] == "result", names
    assert set(names[:-1]) == {"status"}, names
    statuses = [data for name, data in events if name == "status"]
    words = [status["status"] for status in statuses]
    assert words[0] == "in_queue"
    assert words[-1] == "completed"
    assert words == sorted(words, key=["in_queue", "in_progress", "completed"].index)
    positions = [s["queue_position"] for s in statuses if s["status"] == "in_queue"]
    assert positions == sorted(positions, reverse=True)
    assert len(set(positions)) == len(positions)
    steps = [s["progress"]["step"] for s in statuses if s["status"] == "in_progress"]
    assert steps == list(range(total + 1)), steps
    assert all(s["progress"]["total"] == total for s in statuses if "progress" in s)
    result = events[-1][1]
    assert result["status"] == "succeeded"
    assert result["output"]["image"].startswith("http")
    assert statuses[-1]["finished_at"] == result["finished_at"]


def test_stream_delivers_every_step_in_order_then_the_result(
    tmp_path: Path,
    tiny_weights: Path,
    database_url: str | None,
    cluster: Cluster,
    fresh_server: ServerFactory,
) -> None:
    server = fresh_server(no_worker=True)
    token = server.token("streams")
    with server.client(token) as client:
        ahead = submit(client, **FAST, num_inference_steps=3)
        watched = submit(client, **FAST, num_inference_steps=5)
        events: list[tuple[str, Any]] = []
        with client.stream("GET", f"/v1/requests/{watched}/stream") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for name, data in sse_events(response.iter_lines()):
                if name == "comment":
                    continue
                events.append((name, data))
                if len(events) == 1:
                    assert data["queue_position"] == 1
                    # Only now does a worker come: the stream sees the job from the queue on.
                    cluster.worker(tmp_path, tiny_weights)
        check_story(events, total=5)
        result = client.get(f"/v1/requests/{watched}/result").json()
        assert unsigned(events[-1][1]) == unsigned(result)
        assert wait_result(client, ahead)["status"] == "succeeded"

        # A stream opened on a finished job tells its end at once.
        with client.stream("GET", f"/v1/requests/{ahead}/stream") as response:
            ended = [name for name, _ in sse_events(response.iter_lines())]
        assert ended == ["status", "result"]
        assert client.get("/v1/requests/no-such-request/stream").json()["error_code"] == 404001
    other = server.token("other")
    with server.client(other) as stranger:
        assert stranger.get(f"/v1/requests/{ahead}/stream").status_code == 403
    assert http_get(f"{server.base_url}/v1/requests/{ahead}/stream").status_code == 401


async def follow(
    client: httpx.AsyncClient, request_id: str, opened: asyncio.Queue[str]
) -> tuple[list[tuple[str, Any]], int]:
    """One stream's events and how many keep-alive comments came."""
    events: list[tuple[str, Any]] = []
    keepalives = 0
    async with client.stream("GET", f"/v1/requests/{request_id}/stream") as response:
        assert response.status_code == 200

        buffered: list[str] = []
        async for line in response.aiter_lines():
            buffered.append(line)
            if line:
                continue
            for name, data in sse_events(iter(buffered)):
                if name == "comment":
                    keepalives += 1
                    await opened.put("keep-alive")
                    continue
                events.append((name, data))
                if len(events) == 1:
                    await opened.put("first")
            buffered = []
    return events, keepalives


def test_200_concurrent_streams_on_one_process_stay_correct(
    tmp_path: Path, tiny_weights: Path, cluster: Cluster
) -> None:
    """200 streams on 20 queued jobs: each kept alive while they wait, each sees its job
    move up the queue, run every step and finish, and the server counts them open."""
    jobs, per_job, steps = 20, 10, 3
    # One token holds them all: past the default --max-streams-per-token (20).
    server = start_server(
        tmp_path, tiny_weights, "--no-worker", "--metrics-public", "--max-streams-per-token", "0"
    )
    cluster.servers.append(server)
    token = create_token(tmp_path, "crowd")
    with server.client(token) as client:
        ids = [submit(client, **FAST, num_inference_steps=steps) for _ in range(jobs)]

    def open_streams() -> float:
        metrics = http_get(f"{server.base_url}/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("ovis_status_streams_open"))
        return float(line.split()[1])

    async def scenario() -> list[tuple[list[tuple[str, Any]], int]]:
        opened: asyncio.Queue[str] = asyncio.Queue()
        limits = httpx.Limits(max_connections=jobs * per_job + 10)
        async with httpx.AsyncClient(
            base_url=server.base_url,
            headers={"Authorization": f"Bearer {token}"},
            limits=limits,
            timeout=httpx.Timeout(60, read=120),
        ) as client:
            followers = [
                asyncio.create_task(follow(client, request_id, opened))
                for request_id in ids
                for _ in range(per_job)
            ]
            seen = Counter[str]()
            # Every stream opens and, with nothing moving, gets a keep-alive comment.
            while seen["first"] < len(followers) or seen["keep-alive"] < len(followers):
                seen[await asyncio.wait_for(opened.get(), timeout=60)] += 1
            assert await asyncio.to_thread(open_streams) == len(followers)
            cluster.worker(tmp_path, tiny_weights)
            return await asyncio.wait_for(asyncio.gather(*followers), timeout=300)

    outcomes = asyncio.run(scenario())
    for index, (events, keepalives) in enumerate(outcomes):
        assert keepalives >= 1
        check_story(events, total=steps)
        assert events[0][1]["queue_position"] == index // per_job
        assert events[0][1]["request_id"] == ids[index // per_job]
    for start in range(0, len(outcomes), per_job):
        streams = outcomes[start : start + per_job]
        results = {json.dumps(unsigned(events[-1][1])) for events, _ in streams}
        assert len(results) == 1, "all streams of one job agree on its result"
    wait_for(lambda: open_streams() == 0, timeout=30)


@dataclass
class Receiver:
    """A webhook endpoint on loopback that answers 500 to its first ``failures`` calls."""

    failures: int
    calls: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            code = 500 if len(self.calls) < self.failures else 204
            self.calls.append((headers, body, code))
            return code

    def accepted(self) -> list[tuple[dict[str, str], Any]]:
        with self.lock:
            return [(h, json.loads(b)) for h, b, code in self.calls if code == 204]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    state = Receiver(failures=3)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            code = state.handle({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield state, f"http://127.0.0.1:{http.server_port}/hooks/ovis"
    http.shutdown()
    http.server_close()


def test_webhooks_are_signed_retried_through_a_restart_and_deduplicable(
    tmp_path: Path,
    tiny_weights: Path,
    database_url: str | None,
    receiver: tuple[Receiver, str],
) -> None:
    hooks, url = receiver
    # Attempts at once, 1 s later, 8 s later (the server restarts in that gap), 1 s later.
    options = ("--webhook-retry-schedule", "0,1s,8s,1s", "--allow-private-webhooks")
    server = start_server(tmp_path, tiny_weights, *options)
    port = int(server.base_url.rsplit(":", 1)[1])
    token, secret = create_token_with_webhook_secret(tmp_path, "hooks")
    shown = run_cli("token", "webhook-secret", "hooks", "--data-dir", str(tmp_path)).stdout
    assert shown.strip() == secret
    try:
        with server.client(token) as client:
            first = client.post(OVIS_PATH, params={"webhook": url}, json={
                "prompt": "hooked", "num_inference_steps": 2, **FAST})  # fmt: skip
            assert first.status_code == 200, first.text
            first_id = first.json()["request_id"]
            wait_for(lambda: len(hooks.calls) >= 2, timeout=120)
        assert server.stop() == 0
        time.sleep(1)
        assert len(hooks.calls) == 2, "nothing is sent while the server is down"
        server = start_server(tmp_path, tiny_weights, *options, port=port)
        wait_for(lambda: len(hooks.accepted()) == 1, timeout=60)
        with server.client(token) as client:
            # The body field form, with every status change too.
            chatty = submit(client, **FAST, num_inference_steps=4, webhook=url,
                            webhook_intermediate_status=True)  # fmt: skip
            quiet = submit(client, **FAST, num_inference_steps=2)
            finals = {first_id, chatty}
            wait_for(lambda: {b["request_id"] for _, b in hooks.accepted()
                              if "output" in b} >= finals, timeout=120)  # fmt: skip
            time.sleep(1.5)  # room for a duplicate, were the server to send one
            assert wait_result(client, quiet)["status"] == "succeeded"
            assert client.get(f"/v1/requests/{chatty}/status").json()["status"] == "completed"
        # The delivered body points at the image itself.
        taken = next(b for _, b in hooks.accepted() if b["request_id"] == first_id)
        assert download(taken["output"]["image"]).size == (64, 64)
    finally:
        server.stop()

    verifier = Webhook(secret)  # the Standard Webhooks reference implementation
    by_id: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for headers, body, code in hooks.calls:
        assert verifier.verify(body, headers) == json.loads(body)
        assert verify_webhook(body, headers, secret) == json.loads(body)
        by_id[headers["webhook-id"]].append((json.loads(body), code))

    # The first request's result: 3 refusals across the restart, taken on the 4th try.
    first_messages = [tries for tries in by_id.values() if tries[0][0]["request_id"] == first_id]
    assert len(first_messages) == 1
    (tries,) = first_messages
    assert [code for _, code in tries] == [500, 500, 500, 204]
    assert all(body["status"] == "succeeded" for body, _ in tries)

    # After deduplication by webhook-id each message counts once, and each request has
    # exactly one result message; the quiet request (no webhook) has none.
    assert all(sum(code == 204 for _, code in tries) == 1 for tries in by_id.values())
    results = Counter(t[0][0]["request_id"] for t in by_id.values() if "output" in t[0][0])
    assert results == Counter({first_id: 1, chatty: 1})
    progress = [t[0][0] for t in by_id.values() if t[0][0]["request_id"] == chatty]
    steps = sorted(b["progress"]["step"] for b in progress if b["status"] == "in_progress")
    assert steps == list(range(5)), "one message per status change, each step included"


def test_bad_webhooks_are_refused(tmp_path: Path, fresh_server: ServerFactory) -> None:
    server = fresh_server(no_worker=True)
    token = server.token("refused")
    with server.client(token) as client:
        cases: list[tuple[dict[str, str], dict[str, Any]]] = [
            ({"webhook": "ftp://example.com/x"}, {}),
            ({"webhook": "not a url"}, {}),
            ({}, {"webhook": 12}),
            ({}, {"webhook_intermediate_status": True}),
            ({"webhook": "http://127.0.0.1/x"}, {"webhook_intermediate_status": "yes"}),
        ]
        for params, extra in cases:
            body = {"prompt": "x", **extra}
            response = client.post(OVIS_PATH, params=params, json=body)
            assert response.status_code == 422, (params, extra)
            assert response.json()["error_code"] == 422001
            assert "webhook" in response.json()["error_message"]
        # Accepted ones are not mistaken for model input.
        ok = client.post(OVIS_PATH, json={"prompt": "x", "webhook": "https://example.com/h"})
        assert ok.status_code == 200, ok.text
        assert status_of(client, ok.json()["request_id"])["status"] == "in_queue"
    refused = run_cli("serve", "--webhook-retry-schedule", "5s,1m", "--data-dir",
                      str(tmp_path / "x"), check=False)  # fmt: skip
    assert refused.returncode == 2
    assert "start the schedule with 0" in refused.stderr


def test_signatures_match_the_reference_implementation() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"request_id":"r1","status":"succeeded"}'
    stamp = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(secret, "msg_1", stamp, body),
    }
    assert Webhook(secret).verify(body, headers) == json.loads(body)
    assert verify_webhook(body, headers, secret)["status"] == "succeeded"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body.replace(b"succeeded", b"failed"), headers, secret)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, headers, secret, now=stamp + 600)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, {**headers, "webhook-id": "msg_2"}, secret)


def test_shutdown_ends_open_streams(tmp_path: Path, tiny_weights: Path, cluster: Cluster) -> None:
    server = start_server(tmp_path, tiny_weights, "--no-worker")
    cluster.servers.append(server)
    token = create_token(tmp_path, "shutdown")
    names: list[str] = []
    with server.client(token) as client:
        waiting = submit(client, **FAST, num_inference_steps=2)

        def read() -> None:
            with client.stream("GET", f"/v1/requests/{waiting}/stream") as response:
                names.extend(name for name, _ in sse_events(response.iter_lines()))

        reader = threading.Thread(target=read)
        reader.start()
        wait_for(lambda: names == ["status"], timeout=30)
        began = time.monotonic()
        assert server.stop(timeout=20) == 0
        reader.join(timeout=10)
    assert not reader.is_alive()
    assert time.monotonic() - began < 10, "an open stream does not hold the shutdown up"
    assert names == ["status"], "no result: the job never ran"
