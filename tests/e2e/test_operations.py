"""Operations: /metrics, /healthz, the request listing the gallery uses, progress and
warnings in status."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ovis_server.db.connect import SQLITE_FILE

from .bodies import ONE_STEP, SLOW
from .faults import SLOW_STEP_SECONDS
from .helpers import (
    InProcessServer,
    ServerFactory,
    http_get,
    status_of,
    submit,
    wait_for,
    wait_result,
)

METRICS_TOKEN = "prometheus-" + "0123456789abcdef" * 2
SCRAPER = {"Authorization": f"Bearer {METRICS_TOKEN}"}


@pytest.fixture(scope="module")
def server(shared_server: ServerFactory) -> InProcessServer:
    return shared_server(metrics_token=METRICS_TOKEN)


def scrape(server: InProcessServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = http_get(server.base_url + "/metrics", headers=SCRAPER)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_parse_and_move_with_jobs(server: InProcessServer) -> None:
    with server.client(server.token("metrics")) as client:
        wait_for(lambda: http_get(server.base_url + "/readyz").status_code == 200)
        before = scrape(server)
        done = wait_result(client, submit(client, **ONE_STEP))
        assert done["status"] == "succeeded"
        cancelled = submit(client, **SLOW)
        client.post(f"/v1/requests/{cancelled}/cancel")
        wait_for(lambda: status_of(client, cancelled)["status"] == "cancelled")
        after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("ovis_jobs_finished_total", status="succeeded") == 1
    assert delta("ovis_jobs_finished_total", status="cancelled") == 1
    assert delta("ovis_queue_wait_seconds_count") >= 1
    assert delta("ovis_run_seconds_count") == 1
    assert delta("ovis_step_seconds_count") == 1
    assert after[("ovis_run_seconds_bucket", (("le", "+Inf"),))] >= 1
    assert after[("ovis_images_per_minute", ())] >= 1
    assert after[("ovis_workers", (("state", "ready"),))] == 1
    assert after[("ovis_queue_depth", ())] == 0
    memory = [value for (name, _), value in after.items() if name == "ovis_device_memory_bytes"]
    assert memory
    assert memory[0] > 0


def test_list_my_requests_newest_first_with_a_cursor(server: InProcessServer) -> None:
    mine = server.token("lister")
    with (
        server.client(mine) as client,
        server.client(server.token("someone-else")) as other,
    ):
        submit(other, **ONE_STEP)
        ids = [submit(client, seed=n, **ONE_STEP) for n in range(5)]
        for rid in ids:
            wait_result(client, rid)
        first = client.get("/v1/requests", params={"limit": 3}).json()
        assert [r["request_id"] for r in first["requests"]] == ids[::-1][:3]
        assert first["requests"][0]["output"]["image"].startswith("http")
        second = client.get("/v1/requests", params={"limit": 3, "cursor": first["next_cursor"]})
        rest = second.json()
        assert [r["request_id"] for r in rest["requests"]] == ids[::-1][3:]
        assert "next_cursor" not in rest
        assert client.get("/v1/requests", params={"cursor": "nope"}).status_code == 422
        assert client.get("/v1/requests", params={"limit": 0}).status_code == 422
        assert http_get(server.base_url + "/v1/requests").status_code == 401


def test_status_reports_progress_while_running(server: InProcessServer) -> None:
    with server.client(server.token("progress")) as client:
        request_id = submit(client, **{**SLOW, "num_inference_steps": 20})
        seen: list[int] = []

        def finished() -> bool:
            status = status_of(client, request_id)
            if status["status"] == "in_progress":
                assert status["progress"]["total"] == 20
                seen.append(status["progress"]["step"])
            else:
                assert "progress" not in status
            return bool(status["status"] == "completed")

        wait_for(finished, interval=0.05)
        assert len(set(seen)) >= 3
        assert seen == sorted(seen)
        # Slow without a large image: the tests' hook (faults.py) waited at every step.
        result = client.get(f"/v1/requests/{request_id}/result").json()
        ran = datetime.fromisoformat(result["finished_at"]) - datetime.fromisoformat(
            result["started_at"]
        )
        assert ran.total_seconds() >= 20 * SLOW_STEP_SECONDS


def test_metrics_are_closed_to_anyone_without_the_metrics_token(server: InProcessServer) -> None:
    api_token = server.token("not-a-scraper")
    for headers in ({}, {"Authorization": f"Bearer {api_token}"}, {"Authorization": "Bearer x"}):
        response = http_get(server.base_url + "/metrics", headers=headers)
        assert response.status_code == 401
        assert response.json()["error_code"] == 400004
        assert "ovis_webhook" not in response.text
    assert http_get(server.base_url + "/metrics", headers=SCRAPER).status_code == 200


def test_a_prompt_longer_than_the_model_reads_completes_with_a_warning(
    server: InProcessServer,
) -> None:
    # The tiny checkpoint's tokenizer makes a token of every byte, and the pipeline reads
    # 256 text tokens after the template's opening: 2,000 characters are far beyond that.
    long_prompt = "a shop sign that reads OVIS, " * 70
    with server.client(server.token("long-prompt")) as client:
        long_id = submit(client, prompt=long_prompt, **ONE_STEP)
        short_id = submit(client, **ONE_STEP)
        long_result = wait_result(client, long_id)
        short_result = wait_result(client, short_id)
        long_status = status_of(client, long_id)
        short_status = status_of(client, short_id)
    assert long_result["status"] == "succeeded"
    assert long_result["output"]["image"]
    (warning,) = long_result["warnings"]
    assert warning.startswith("prompt truncated: the model reads 256 text tokens")
    assert long_status["status"] == "completed"
    assert long_status["warnings"] == [warning]
    assert short_result["status"] == "succeeded"
    assert "warnings" not in short_result
    assert "warnings" not in short_status


def test_healthz_answers_on_the_event_loop_while_the_database_is_locked(
    tmp_path: Path, fresh_server: ServerFactory
) -> None:
    """Submits that wait for a locked database fill the API's thread pool; /healthz still
    answers at once, because it needs neither (it waited behind them when it did)."""
    server = fresh_server(no_worker=True)
    token = server.token("blocked")
    lock = sqlite3.connect(tmp_path / SQLITE_FILE, timeout=30, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # no other writer until this ends

        async def scenario() -> tuple[float, int]:
            async with httpx.AsyncClient(
                base_url=server.base_url,
                headers={"Authorization": f"Bearer {token}"},
                limits=httpx.Limits(max_connections=200),
                timeout=120,
            ) as client:
                body = {"prompt": "waits for the lock", **ONE_STEP}
                submits = [
                    asyncio.create_task(client.post("/v1/models/aidc-ai/ovis-image", json=body))
                    for _ in range(120)
                ]
                try:
                    await asyncio.sleep(2)  # they reach the server and wait on the lock
                    started = time.monotonic()
                    try:
                        health = await client.get("/healthz", timeout=20)
                        assert health.status_code == 200
                        assert health.json() == {"status": "ok"}
                        took = time.monotonic() - started
                    except httpx.TimeoutException:
                        took = float("inf")
                    pending = sum(1 for task in submits if not task.done())
                finally:
                    lock.execute("ROLLBACK")
                    await asyncio.gather(*submits, return_exceptions=True)
                return took, pending

        took, pending = asyncio.run(scenario())
        assert pending > 40, "the submits should still wait for the lock"
        assert took < 5, f"/healthz took {took:.1f}s behind the busy thread pool"
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
