"""The queue across processes: positions count down, and a cancelled job never runs."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .bodies import SLOW
from .helpers import (
    ServerFactory,
    status_of,
    submit,
    wait_for,
    wait_result,
)

# Every test here runs on SQLite and on PostgreSQL.
pytestmark = pytest.mark.usefixtures("database_url")


@pytest.fixture
def standalone_worker(tiny_weights: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def test_queue_positions_count_down_and_a_cancelled_job_never_runs(
    tmp_path: Path,
    tiny_weights: Path,
    standalone_worker: list[subprocess.Popen[bytes]],
    fresh_server: ServerFactory,
) -> None:
    server = fresh_server(no_worker=True)
    with server.client(server.token("q")) as client:
        jobs = [submit(client, **{**SLOW, "num_inference_steps": 4}) for _ in range(5)]
        positions = [status_of(client, rid)["queue_position"] for rid in jobs]
        assert positions == [0, 1, 2, 3, 4]

        cancelled = client.post(f"/v1/requests/{jobs[1]}/cancel").json()
        assert cancelled == {
            "request_id": jobs[1],
            "status": "cancelled",
            "outcome": "cancelled",
        }
        remaining = [jobs[0], *jobs[2:]]
        assert [status_of(client, rid)["queue_position"] for rid in remaining] == [0, 1, 2, 3]
        assert "queue_position" not in status_of(client, jobs[1])

        worker_argv = [sys.executable, "-m", "ovis_server", "worker"]
        worker_argv += ["--model", str(tiny_weights), "--data-dir", str(tmp_path)]
        standalone_worker.append(
            subprocess.Popen(worker_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        seen: list[int] = []

        def last_job_done() -> bool:
            status = status_of(client, jobs[-1])
            if status["status"] == "in_queue":
                seen.append(status["queue_position"])
            return bool(status["status"] == "completed")

        wait_for(last_job_done, timeout=240, interval=0.05)
        assert seen == sorted(seen, reverse=True), "positions only ever go down"
        assert seen[0] == 3
        assert len(set(seen)) >= 3, f"saw the countdown: {sorted(set(seen), reverse=True)}"

        never_ran = client.get(f"/v1/requests/{jobs[1]}/result").json()
        assert never_ran["status"] == "cancelled"
        assert "started_at" not in never_ran
        assert "output" not in never_ran
        for rid in remaining:
            assert wait_result(client, rid)["status"] == "succeeded"
