"""Deadlines (``Cancel-After``): a job not finished in time ends cancelled, with the reason,
whether it waits in a busy queue or runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ovis_server.jobs.job import JobStatus
from ovis_server.jobs.store import DEADLINE_EXCEEDED, JobStore

from .bodies import SLOW
from .helpers import (
    InProcessServer,
    queue_job,
    status_of,
    submit,
    wait_for,
    wait_result,
)

# A job the tiny model takes many seconds over on a CPU (quadratic attention at this size);
# the tests cancel or expire them after a few.
DEADLINE_ERROR = "deadline_exceeded"


# --- the store ----------------------------------------------------------------------------


def test_store_cancels_queued_jobs_past_their_deadline_and_flags_running_ones(
    store: JobStore,
) -> None:
    queue_job(store, "late", deadline_in=-1)
    queue_job(store, "soon", deadline_in=0.5)
    queue_job(store, "patient", deadline_in=3600)
    queue_job(store, "forever")
    # A job past its deadline is never started, even before a sweep.
    running = store.claim_next("w1", lease_seconds=30)
    assert running is not None
    assert running.id == "soon"
    assert store.expire_deadlines() == (1, 0)
    late = store.get("late")
    assert late is not None
    assert late.status == JobStatus.CANCELLED
    assert (late.error_type, late.finished_at is not None) == (DEADLINE_EXCEEDED, True)
    assert store.queue_positions(["patient", "forever"]) == {"patient": 0, "forever": 1}
    assert [event.status for event in store.events_after(0) if event.request_id == "late"] == [
        JobStatus.QUEUED,
        JobStatus.CANCELLED,
    ]

    time.sleep(0.6)
    assert store.expire_deadlines() == (0, 1)
    assert store.expire_deadlines() == (0, 0), "a flagged job is flagged once"
    cancel, lost = store.report_batch_progress(["soon"], "w1", 1, lease_seconds=30)
    assert (cancel, lost) == ({"soon"}, set())
    stopped = store.mark_cancelled("soon", "w1")
    assert (stopped.status, stopped.error_type) == (JobStatus.CANCELLED, DEADLINE_EXCEEDED)
    for request_id in ("patient", "forever"):
        job = store.get(request_id)
        assert job is not None
        assert job.status == JobStatus.QUEUED


def test_store_cancels_a_flagged_job_its_worker_put_back_in_the_queue(store: JobStore) -> None:
    """A worker shutting down puts its job back, deadline flag and all: it ends there."""
    queue_job(store, "interrupted", deadline_in=0.3)
    assert store.claim_next("w2", lease_seconds=30).id == "interrupted"  # type: ignore[union-attr]
    time.sleep(0.4)
    assert store.expire_deadlines() == (0, 1)
    store.release("interrupted", "w2")
    assert store.expire_deadlines() == (1, 0)
    interrupted = store.get("interrupted")
    assert interrupted is not None
    assert (interrupted.status, interrupted.error_type) == (JobStatus.CANCELLED, DEADLINE_EXCEEDED)


# --- the server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server: InProcessServer) -> Iterator[httpx.Client]:
    with server.client(server.token("deadlines")) as opened:
        yield opened


def submit_with_deadline(client: httpx.Client, cancel_after: str, **fields: Any) -> str:
    body = {"prompt": "a shop sign that reads OVIS", **fields}
    response = client.post(
        "/v1/models/aidc-ai/ovis-image", json=body, headers={"Cancel-After": cancel_after}
    )
    assert response.status_code == 200, response.text
    request_id: str = response.json()["request_id"]
    return request_id


def test_a_queued_job_past_its_deadline_is_cancelled_behind_a_busy_worker(
    client: httpx.Client,
) -> None:
    busy = [submit(client, **SLOW), submit(client, **SLOW)]
    wait_for(lambda: status_of(client, busy[0])["status"] == "in_progress", interval=0.05)
    hurried = submit_with_deadline(client, "2s", num_inference_steps=1)
    after = submit(client, num_inference_steps=1)
    assert status_of(client, hurried)["queue_position"] == 1
    assert status_of(client, after)["queue_position"] == 2
    submitted = time.monotonic()
    try:
        result = wait_result(client, hurried, timeout=30)
        waited = time.monotonic() - submitted
        assert result["status"] == "cancelled"
        assert result["error"]["type"] == DEADLINE_ERROR
        assert "Cancel-After" in result["error"]["message"]
        assert "started_at" not in result
        assert "output" not in result
        assert 1.5 < waited < 20, waited
        # It left the queue at once, while the worker was still busy with the first job.
        assert status_of(client, busy[0])["status"] == "in_progress"
        assert status_of(client, after)["queue_position"] == 1
        assert status_of(client, hurried)["status"] == "cancelled"
        logs = client.get(f"/v1/requests/{hurried}/status", params={"logs": "true"}).json()
        assert DEADLINE_ERROR in logs["logs"][-1]["message"]
    finally:
        for request_id in reversed(busy):
            client.post(f"/v1/requests/{request_id}/cancel")
    assert wait_result(client, after)["status"] == "succeeded"


def test_a_running_job_past_its_deadline_stops_at_its_next_step(client: httpx.Client) -> None:
    request_id = submit_with_deadline(client, "2", **SLOW)
    wait_for(lambda: status_of(client, request_id)["status"] == "in_progress", interval=0.05)
    result = wait_result(client, request_id, timeout=60)
    assert result["status"] == "cancelled", result
    assert result["error"]["type"] == DEADLINE_ERROR
    assert "output" not in result
    assert "started_at" in result
    final = status_of(client, request_id)
    assert final["status"] == "cancelled"
    # The stream tells the same end.
    with client.stream("GET", f"/v1/requests/{request_id}/stream") as stream:
        text = "".join(stream.iter_text())
    assert "event: result" in text
    assert DEADLINE_ERROR in text
    # And the worker goes on to the next job.
    assert wait_result(client, submit(client, num_inference_steps=1))["status"] == "succeeded"


def test_a_job_done_in_time_keeps_its_result(client: httpx.Client) -> None:
    request_id = submit_with_deadline(client, "1h30m", num_inference_steps=1)
    result = wait_result(client, request_id)
    assert result["status"] == "succeeded"
    assert "error" not in result


@pytest.mark.parametrize("value", ["", "soon", "0", "0.5s", "-5", "8d", "1e9", "5 m", "1x", "nan"])
def test_a_malformed_cancel_after_is_422_naming_it(client: httpx.Client, value: str) -> None:
    response = client.post(
        "/v1/models/aidc-ai/ovis-image",
        json={"prompt": "x", "num_inference_steps": 1},
        headers={"Cancel-After": value},
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error_code"] == 422001
    assert "Cancel-After" in body["error_message"]
