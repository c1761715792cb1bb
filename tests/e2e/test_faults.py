"""Fault tests: killed workers and servers, failing and hanging model code, load, limits.

The faults are real: signals (kill -9) to real server processes, or faults the worker
injects inside the pipeline through its test-only step hook (tests/e2e/faults.py). Tests of
what a running server answers (readiness, limits, retention, file routes) run its API in
this process.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from .bodies import ONE_STEP, SLOW
from .faults import use_faults
from .helpers import (
    InProcessServer,
    Server,
    ServerFactory,
    create_token,
    http_get,
    start_server,
    status_of,
    submit,
    wait_for,
    wait_result,
)

# Every test here runs on SQLite and on PostgreSQL.
pytestmark = pytest.mark.usefixtures("database_url")


def worker_pids(server: Server) -> list[int]:
    return [int(pid) for pid in re.findall(r"started worker process (\d+)", server.log())]


def succeeded_lines(server: Server, request_id: str) -> int:
    return server.log().count(f"job {request_id} succeeded")


def test_a_worker_killed_mid_job_gives_it_back_within_5_seconds_and_it_completes_once(
    tmp_path: Path, tiny_weights: Path, servers: list[Server]
) -> None:
    server = start_server(tmp_path, tiny_weights)  # the default lease: 30 s
    servers.append(server)
    with server.client(create_token(tmp_path, "released")) as client:
        request_id = submit(client, **{**SLOW, "num_inference_steps": 20})
        wait_for(lambda: status_of(client, request_id)["status"] == "in_progress", interval=0.05)
        (first_worker,) = worker_pids(server)
        os.kill(first_worker, signal.SIGKILL)
        killed = time.monotonic()
        # serve restarts the worker after a second and it loads the model before it
        # claims: the job waits in the queue meanwhile. Long before the lease would end,
        # serve has given it back.
        wait_for(
            lambda: status_of(client, request_id)["status"] == "in_queue",
            timeout=10,
            interval=0.05,
        )
        assert time.monotonic() - killed < 5
        # The API never went down.
        assert client.get("/v1/models").status_code == 200
        result = wait_result(client, request_id)
        assert result["status"] == "succeeded"
        assert len(worker_pids(server)) == 2  # serve restarted the worker
        assert succeeded_lines(server, request_id) == 1
    assert "released 1 job(s) of worker process" in server.log()


def test_server_killed_with_50_queued_all_complete_after_restart(
    tmp_path: Path, tiny_weights: Path, servers: list[Server]
) -> None:
    server = start_server(tmp_path, tiny_weights, "--lease-seconds", "2")
    servers.append(server)
    token = create_token(tmp_path, "fifty")
    with server.client(token) as client:
        jobs = [submit(client, **ONE_STEP) for _ in range(50)]
        pending = [rid for rid in jobs if status_of(client, rid)["status"] != "completed"]
    server.kill()
    assert len(pending) >= 40, "the kill came while most jobs were still queued"

    restarted = start_server(tmp_path, tiny_weights, "--lease-seconds", "2")
    servers.append(restarted)
    with restarted.client(token) as client:
        results = [wait_result(client, rid) for rid in jobs]
    assert [r["status"] for r in results] == ["succeeded"] * 50
    for rid in jobs:
        assert succeeded_lines(server, rid) + succeeded_lines(restarted, rid) == 1


def test_a_thousand_concurrent_submits_none_lost_none_duplicated(
    tmp_path: Path, tiny_weights: Path, servers: list[Server]
) -> None:
    # Batches of 16 (CPU's default is 1): the worker's part of it takes less time.
    server = start_server(tmp_path, tiny_weights, "--max-batch", "16")
    servers.append(server)
    tokens = [create_token(tmp_path, f"load-{n}") for n in range(5)]
    clients = [server.client(token, limits=httpx.Limits(max_connections=20)) for token in tokens]

    busy: list[int] = []  # submits answered 503001 (store busy), retried as the SDK does

    def one(index: int) -> tuple[int, str]:
        client = clients[index % len(clients)]
        for _ in range(10):
            response = client.post(
                "/v1/models/aidc-ai/ovis-image", json={"prompt": f"job {index}", **ONE_STEP}
            )
            if response.status_code != 503:
                break
            # The store was busy past its wait (a loaded machine): nothing was queued, and
            # the answer says when to come back.
            assert response.json()["error_code"] == 503001, response.text
            busy.append(index)
            time.sleep(float(response.headers["retry-after"]))
        assert response.status_code == 200, response.text
        return index % len(clients), response.json()["request_id"]

    try:
        with ThreadPoolExecutor(max_workers=64) as pool:
            submitted = list(pool.map(one, range(1000)))
        ids = [rid for _, rid in submitted]
        assert len(ids) == 1000
        assert len(set(ids)) == 1000
        for owner, rid in submitted:
            assert wait_result(clients[owner], rid, timeout=600)["status"] == "succeeded"
        # A retried submit queued nothing the first time: the server holds 1000 jobs, no more.
        assert len(busy) < 100, f"{len(busy)} submits found the store busy"
        held = []
        for client in clients:
            cursor: str | None = None
            while True:
                params = {"limit": 100} | ({"cursor": cursor} if cursor else {})
                page = client.get("/v1/requests", params=params).json()
                held += [body["request_id"] for body in page["requests"]]
                if not (cursor := page.get("next_cursor")):
                    break
        assert sorted(held) == sorted(ids)
    finally:
        for client in clients:
            client.close()


def test_model_failures_fail_only_their_job(
    tmp_path: Path, tiny_weights: Path, servers: list[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    use_faults(monkeypatch, "BOOM=error,VRAM=oom")
    server = start_server(tmp_path, tiny_weights)
    servers.append(server)
    with server.client(create_token(tmp_path, "f")) as client:
        prompts = ["fine one", "BOOM goes the model", "fine two", "VRAM exhausted", "fine three"]
        jobs = [submit(client, prompt=prompt, **ONE_STEP) for prompt in prompts]
        results = [wait_result(client, rid) for rid in jobs]
    assert [r["status"] for r in results] == [
        "succeeded",
        "failed",
        "succeeded",
        "failed",
        "succeeded",
    ]
    assert results[1]["error"]["type"] == "generation_error"
    assert "injected fault" in results[1]["error"]["message"]
    assert results[3]["error"]["type"] == "out_of_memory"
    assert "smaller image_size" in results[3]["error"]["message"]
    assert "output" not in results[1]
    assert len(worker_pids(server)) == 1  # the same worker went on


def test_a_hang_in_model_code_is_ended_and_the_job_fails_after_max_attempts(
    tmp_path: Path, tiny_weights: Path, servers: list[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    use_faults(monkeypatch, "FREEZE=hang")
    server = start_server(
        tmp_path,
        tiny_weights,
        *("--stall-timeout", "2", "--max-attempts", "2", "--lease-seconds", "2"),
    )
    servers.append(server)
    with server.client(create_token(tmp_path, "h")) as client:
        frozen = submit(client, prompt="FREEZE", **ONE_STEP)
        after = submit(client, prompt="fine", **ONE_STEP)
        while True:  # the API answers all along
            assert http_get(server.base_url + "/healthz", timeout=5).status_code == 200
            result = client.get(f"/v1/requests/{frozen}/result").json()
            if result["status"] in {"failed", "succeeded"}:
                break
            time.sleep(0.2)
        assert result["status"] == "failed"
        assert result["error"]["type"] == "worker_lost"
        assert wait_result(client, after)["status"] == "succeeded"
    assert server.log().count("--stall-timeout") >= 2
    assert len(worker_pids(server)) >= 3


def test_readyz_needs_a_worker_with_a_loaded_model(
    backend: str, fresh_server: ServerFactory, shared_server: ServerFactory
) -> None:
    api_only = fresh_server(no_worker=True)
    not_ready = http_get(api_only.base_url + "/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["workers_ready"] == 0
    api_only.stop()

    server = shared_server(backend=backend)

    def readiness() -> dict[str, Any] | None:
        response = http_get(server.base_url + "/readyz")
        return response.json() if response.status_code == 200 else None

    ready = wait_for(readiness)
    assert ready == {
        "status": "ready",
        "database": "ok",
        "workers_ready": 1,
        "workers_loading": 0,
        "workers": [
            {
                "model": "aidc-ai/ovis-image",
                "device": "cpu",
                "phase": "ready",
                "memory_profile": "full",
                "batch_limit": 1,
                "models": [{"model_id": "aidc-ai/ovis-image", "resident": True, "where": "device"}],
                "swaps": 0,
                "swap_seconds_total": 0.0,
            }
        ],
    }
    assert http_get(server.base_url + "/healthz").json() == {"status": "ok"}


def test_backpressure_answers_429_with_retry_after(fresh_server: ServerFactory) -> None:
    server = fresh_server(
        no_worker=True, max_queued=3, max_queued_per_token=2, rate_limit_per_minute=0
    )
    alice, bob = server.token("alice"), server.token("bob")
    body = {"prompt": "x", **ONE_STEP}
    path = "/v1/models/aidc-ai/ovis-image"
    with server.client(alice) as a, server.client(bob) as b:
        mine = [a.post(path, json=body).json()["request_id"] for _ in range(2)]
        per_token = a.post(path, json=body)
        assert per_token.status_code == 429
        assert per_token.json()["error_code"] == 429001
        assert "this token has 2 requests waiting" in per_token.json()["error_message"]
        assert int(per_token.headers["retry-after"]) > 0

        assert b.post(path, json=body).status_code == 200
        full = b.post(path, json=body)
        assert full.status_code == 429
        assert "queue is full" in full.json()["error_message"]
        assert int(full.headers["retry-after"]) > 0

        a.post(f"/v1/requests/{mine[0]}/cancel")  # a cancelled job frees its place
        assert b.post(path, json=body).status_code == 200


def test_rate_limit_per_token(fresh_server: ServerFactory) -> None:
    server = fresh_server(
        no_worker=True, rate_limit_per_minute=3, max_queued=0, max_queued_per_token=0
    )
    first, second = server.token("r"), server.token("other")
    with server.client(first) as client, server.client(second) as other:
        for _ in range(3):
            submit(client, **ONE_STEP)
        limited = client.post("/v1/models/aidc-ai/ovis-image", json={"prompt": "x", **ONE_STEP})
        assert limited.status_code == 429
        assert limited.json()["error_code"] == 429001
        assert 0 < int(limited.headers["retry-after"]) <= 60
        assert "rate limit" in limited.json()["error_message"]
        submit(other, **ONE_STEP)  # the limit is per token


def test_idempotency_key(fresh_server: ServerFactory) -> None:
    server = fresh_server(no_worker=True)
    alice, bob = server.token("a"), server.token("b")
    body: dict[str, Any] = {"prompt": "same", **ONE_STEP}
    key = {"Idempotency-Key": "order-1234"}
    path = "/v1/models/aidc-ai/ovis-image"
    with server.client(alice) as a, server.client(bob) as b:
        first = a.post(path, json=body, headers=key).json()
        again = a.post(path, json={**body}, headers=key).json()
        assert again == first
        reordered = a.post(
            path,
            content=b'{"num_inference_steps": 1, "guidance_scale": 1, '
            b'"image_size": {"height": 64, "width": 64}, "prompt": "same"}',
            headers=key,
        ).json()
        assert reordered["request_id"] == first["request_id"]
        different = a.post(path, json={**body, "prompt": "other"}, headers=key)
        assert different.status_code == 422
        assert different.json()["error_code"] == 422001
        assert first["request_id"] in different.json()["error_message"]
        assert b.post(path, json=body, headers=key).json()["request_id"] != first["request_id"]
        assert a.post(path, json=body).json()["request_id"] != first["request_id"]
        bad_key = a.post(path, json=body, headers={"Idempotency-Key": "has space"})
        assert bad_key.status_code == 422


def test_retention_deletes_results_and_files(tmp_path: Path, fresh_server: ServerFactory) -> None:
    server = fresh_server(retention_seconds="3s", cleanup_interval_seconds="1s")
    with server.client(server.token("t")) as client:
        request_id = submit(client, **ONE_STEP)
        url = wait_result(client, request_id)["output"]["image"]
        assert http_get(url).status_code == 200
        assert (tmp_path / "files" / request_id).is_dir()

        def expired() -> httpx.Response | None:
            response = client.get(f"/v1/requests/{request_id}/result")
            return response if response.status_code == 404 else None

        assert wait_for(expired, timeout=30).json()["error_code"] == 404001
        assert client.get(f"/v1/requests/{request_id}/status").status_code == 404
        assert http_get(url).status_code == 404
        # The rows go first, then the files, in the same pass.
        wait_for(lambda: not (tmp_path / "files" / request_id).exists(), timeout=10)
    wait_for(lambda: "retention: removed 1 job(s)" in server.log(), timeout=10)


def raw_get(server: InProcessServer, path: str) -> tuple[int, bytes]:
    """A GET with the path sent byte for byte, as no HTTP library would normalise it."""
    host, port = server.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_file_route_refuses_traversal_and_forged_ids(
    backend: str, shared_server: ServerFactory
) -> None:
    server = shared_server(backend=backend)
    token = server.token("files")
    with server.client(token) as client:
        url = wait_result(client, submit(client, **ONE_STEP))["output"]["image"]
    query = url.split("?", 1)[1]
    request_id = url.split("/files/")[1].split("/")[0]
    forged_id = request_id[:-1] + ("a" if request_id[-1] != "a" else "b")
    attacks = [
        f"/files/../ovis-server.db?{query}",
        f"/files/..%2Fovis-server.db/x?{query}",
        f"/files/{request_id}/..%2F..%2Fovis-server.db?{query}",
        f"/files/%2e%2e/%2e%2e?{query}",
        f"/files/{request_id}/0.png%00.txt?{query}",
        f"/files/{forged_id}/0.png?{query}",  # a forged id under another file's signature
        "/files/x/0.png?expires=99999999999&signature=AAAA",
    ]
    for path in attacks:
        status, body = raw_get(server, path)
        assert status in {403, 404}, (path, status)
        assert b"SQLite" not in body
    assert raw_get(server, url.removeprefix(server.base_url))[0] == 200
    # Tokens never reach the logs, whichever way they were sent.
    refused = '"GET /v1/models HTTP/1.1" 401'
    before = server.log().count(refused)
    http_get(server.base_url + "/v1/models", headers={"Authorization": "Bearer " + token + "x"})
    wait_for(lambda: server.log().count(refused) > before, timeout=10)  # logged by now
    assert token not in server.log()
    assert token[5:] not in server.log()


def test_sigterm_puts_the_running_job_back_and_every_queued_job_completes_after_restart(
    tmp_path: Path, tiny_weights: Path, servers: list[Server]
) -> None:
    server = start_server(tmp_path, tiny_weights)
    servers.append(server)
    token = create_token(tmp_path, "g")
    with server.client(token) as client:
        request_id = submit(client, **{**SLOW, "num_inference_steps": 20})
        queued = [submit(client, **{**SLOW, "num_inference_steps": 4}) for _ in range(5)]
        wait_for(lambda: status_of(client, request_id)["status"] == "in_progress", interval=0.05)
        states = [status_of(client, rid)["status"] for rid in queued]
    assert states.count("in_queue") >= 4
    assert server.stop() == 0
    assert f"job {request_id} put back in the queue" in server.log()
    jobs = [request_id, *queued]

    # Nothing is left in progress by the stop: the running job went back to the queue.
    paused = start_server(tmp_path, tiny_weights, "--no-worker")
    servers.append(paused)
    with paused.client(token) as client:
        states = [status_of(client, rid)["status"] for rid in jobs]
    paused.stop()
    assert "in_progress" not in states
    assert "in_queue" in states

    again = start_server(tmp_path, tiny_weights)
    servers.append(again)
    with again.client(token) as client:
        results = [wait_result(client, rid) for rid in jobs]
    assert [r["status"] for r in results] == ["succeeded"] * len(jobs)
