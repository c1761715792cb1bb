"""serve's workers, one per device (``--devices``)."""

from __future__ import annotations

import functools
import os
import re
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from ovis_server.config import Settings, parse_devices
from ovis_server.db.connect import connect, sqlite_url
from ovis_server.db.schema import jobs
from ovis_server.jobs.workers import WorkerInfo, WorkerRegistry
from ovis_server.worker.supervisor import (
    DevicesError,
    WorkerSlot,
    plan_workers,
    worker_command,
    worker_environment,
)

from .helpers import run_cli, start_server, wait_for

# -- which workers ------------------------------------------------------------------------


def test_devices_entries_are_normalized_and_checked() -> None:
    assert parse_devices("all") == ("all",)
    assert parse_devices(" cuda:0, 2 ") == ("0", "2")
    assert parse_devices("cpu,CPU") == ("cpu", "cpu")
    assert Settings(devices="cuda:1,cpu").devices == "1,cpu"
    for bad, words in [
        ("0,cuda:0", "GPU 0 is listed twice"),
        ("gpu0", "comma-separated list"),
        ("", "comma-separated list"),
        ("all,0", "comma-separated list"),
        ("-1", "comma-separated list"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_devices(bad)


def gpus(*entries: str) -> Any:
    """What serve would have found on a machine with these GPUs."""
    return lambda: list(entries)


def test_all_is_one_worker_per_gpu_each_pinned_to_its_own(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    slots = plan_workers(settings, gpus("0", "1", "2"))
    assert [(s.device, s.label, s.env) for s in slots] == [
        ("cuda:0", f"cuda:{n}", {"CUDA_VISIBLE_DEVICES": str(n)}) for n in range(3)
    ]
    # Where serve itself sees only some GPUs (its CUDA_VISIBLE_DEVICES), a worker gets the
    # entry serve's GPU N stands for.
    (slot,) = plan_workers(Settings(data_dir=tmp_path, devices="1"), gpus("GPU-aaa", "GPU-bbb"))
    assert (slot.label, slot.env) == ("cuda:1", {"CUDA_VISIBLE_DEVICES": "GPU-bbb"})
    # No GPU: a single worker on --device, as before.
    assert plan_workers(settings, gpus()) == [WorkerSlot(0, "auto")]


def test_device_picks_one_worker_and_devices_many(tmp_path: Path) -> None:
    (slot,) = plan_workers(Settings(data_dir=tmp_path, device="cuda:1"), gpus("0", "1"))
    assert (slot.device, slot.label, slot.env) == (
        "cuda:0",
        "cuda:1",
        {"CUDA_VISIBLE_DEVICES": "1"},
    )
    (slot,) = plan_workers(Settings(data_dir=tmp_path, device="cpu"), gpus("0"))
    assert (slot.device, slot.label) == ("cpu", "cpu")
    (slot,) = plan_workers(Settings(data_dir=tmp_path, device="mps"), gpus())
    assert (slot.device, slot.label, slot.env) == ("mps", None, {})
    two = plan_workers(Settings(data_dir=tmp_path, devices="cpu,cpu"), gpus())
    assert [(s.number, s.device, s.name) for s in two] == [
        (0, "cpu", "worker 0 (cpu)"),
        (1, "cpu", "worker 1 (cpu)"),
    ]
    if "OMP_NUM_THREADS" not in os.environ:  # the cores are shared out between them
        expected = str(max(1, (os.cpu_count() or 1) // 2))
        assert all(s.env == {"OMP_NUM_THREADS": expected} for s in two)


def test_contradictions_and_missing_gpus_are_refused(tmp_path: Path) -> None:
    refused = [
        (Settings(data_dir=tmp_path, devices="0,1", device="cuda:1"), "give one of them"),
        (Settings(data_dir=tmp_path, devices="cpu", device="cpu"), "give one of them"),
        (Settings(data_dir=tmp_path, devices="cpu", no_worker=True), "--no-worker starts none"),
        (Settings(data_dir=tmp_path, devices="0,2"), r"GPU 2 asked for, but .* cuda:0 to cuda:1"),
        (Settings(data_dir=tmp_path, devices="0"), "no CUDA GPU"),
    ]
    for settings, words in refused:
        with pytest.raises(DevicesError, match=words):
            plan_workers(settings, gpus("0", "1") if "2" in str(settings.devices) else gpus())
    assert plan_workers(Settings(data_dir=tmp_path, no_worker=True), gpus("0")) == []


def test_serve_says_what_is_contradictory_before_starting(tmp_path: Path) -> None:
    data = str(tmp_path)
    both = run_cli("serve", "--devices", "cpu", "--device", "cpu", "--data-dir", data, check=False)
    assert both.returncode == 2
    assert "--devices cpu and --device cpu both say where serve's workers run" in both.stderr
    assert "Traceback" not in both.stderr
    twice = run_cli("serve", "--devices", "0,0", "--data-dir", data, check=False)
    assert twice.returncode == 2
    assert "GPU 0 is listed twice" in twice.stderr
    if not Path("/dev/nvidiactl").exists():
        none = run_cli("serve", "--devices", "0", "--data-dir", data, check=False)
        assert none.returncode == 2
        assert "GPU 0 asked for, but this machine shows no CUDA GPU" in none.stderr


def test_each_worker_gets_its_device_and_a_name() -> None:
    settings = Settings(data_dir=Path("/tmp/x"), devices="1,cpu", metrics_token="m" * 20)
    slot = WorkerSlot(0, "cuda:0", "cuda:1", {"CUDA_VISIBLE_DEVICES": "1"})
    env = worker_environment(settings, slot)
    passed = Settings.model_validate_json(env["OVIS_SERVER_SETTINGS_JSON"])
    assert (passed.device, passed.devices, passed.metrics_token) == ("cuda:0", None, None)
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    command = worker_command(slot, named=True)
    assert command[command.index("--device-label") + 1] == "cuda:1"
    assert command[command.index("--log-name") + 1] == "worker 0 (cuda:1)"
    assert "--log-name" not in worker_command(slot)


# -- several workers under one serve ------------------------------------------------------


def alive_workers(data_dir: Path) -> list[WorkerInfo]:
    return WorkerRegistry(connect(sqlite_url(data_dir))).alive(60)


def workers_of(data_dir: Path, request_ids: list[str]) -> list[str]:
    with connect(sqlite_url(data_dir)).connect() as conn:
        rows = conn.execute(select(jobs.c.worker_id).where(jobs.c.id.in_(request_ids)))
        return [row.worker_id for row in rows]


def final_result(client: httpx.Client, request_id: str) -> dict[str, Any] | None:
    result: dict[str, Any] = client.get(f"/v1/requests/{request_id}/result").json()
    return result if result["status"] in ("succeeded", "failed", "cancelled") else None


def run_jobs(client: httpx.Client, count: int) -> list[str]:
    body = {"prompt": "a shop sign that reads OVIS", "num_inference_steps": 4,
            "image_size": "square"}  # fmt: skip
    ids = []
    for _ in range(count):
        response = client.post("/v1/models/aidc-ai/ovis-image", json=body)
        assert response.status_code == 200, response.text
        ids.append(response.json()["request_id"])

    for request_id in ids:
        result = wait_for(functools.partial(final_result, client, request_id), timeout=300)
        assert result["status"] == "succeeded", result
    return ids


def test_serve_runs_one_worker_per_device_and_restarts_each_on_its_own(
    tmp_path: Path, tiny_weights: Path
) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir, tiny_weights, "--devices", "cpu,cpu", "--no-auth",
                          "--metrics-public", timeout=120)  # fmt: skip
    try:
        with server.client() as client:

            def ready_workers(count: int) -> dict[str, Any] | None:
                body: dict[str, Any] = client.get("/readyz").json()
                return body if body["workers_ready"] == count == len(body["workers"]) else None

            readiness = wait_for(lambda: ready_workers(2), timeout=300, interval=0.5)
            assert [(w["device"], w["phase"]) for w in readiness["workers"]] == [
                ("cpu", "ready"),
                ("cpu", "ready"),
            ]
            metrics = client.get("/metrics").text
            ready_lines = re.findall(r"^ovis_worker_ready\{(.*)\} 1\.0$", metrics, re.MULTILINE)
            assert len(set(ready_lines)) == 2
            assert all('device="cpu"' in labels and 'worker="' in labels for labels in ready_lines)
            phases = re.findall(r"^ovis_worker_phase\{(.*)\} 1\.0$", metrics, re.MULTILINE)
            assert len(phases) == 2
            assert all('phase="ready"' in labels for labels in phases)

            # Both claim from the one queue.
            first = run_jobs(client, 8)
            assert len(set(workers_of(data_dir, first))) == 2

            # One dies (kill -9): serve starts it again; the other goes on serving meanwhile.
            victim, survivor = alive_workers(data_dir)
            os.kill(victim.pid, signal.SIGKILL)
            meanwhile = run_jobs(client, 3)
            assert survivor.id in workers_of(data_dir, meanwhile)
            wait_for(lambda: ready_workers(2), timeout=300, interval=0.5)
            now = alive_workers(data_dir)
            assert survivor.id in {w.id for w in now}
            assert victim.pid not in {w.pid for w in now}
            log = server.log()
            assert re.search(rf"worker [01] \(cpu\) process {victim.pid} exited with code -9", log)
            assert re.search(r"\[worker [01] \(cpu\)\] ", log)  # each worker's lines say whose
            pids = [w.pid for w in now]
        assert server.stop() == 0
        for pid in pids:  # serve's shutdown stopped every worker
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        server.kill()
