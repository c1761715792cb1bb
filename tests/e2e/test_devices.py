"""serve's workers, one per device (``--devices``), and the first start's download of the
weights (``ovis-server download``, and phase ``downloading`` in /readyz), against a stand-in
for the Hugging Face hub on 127.0.0.1 (tests/e2e/fake_hub.py)."""

from __future__ import annotations

import functools
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from ovis_server.config import Settings
from ovis_server.db.connect import connect, sqlite_url
from ovis_server.db.schema import jobs
from ovis_server.engine.download import fetch_weights, select_files
from ovis_server.jobs.workers import WorkerInfo, WorkerRegistry
from ovis_server.units import parse_devices
from ovis_server.worker.supervisor import (
    DevicesError,
    WorkerSlot,
    plan_workers,
    worker_command,
    worker_environment,
)

from .fake_hub import FakeHub
from .helpers import free_port, run_cli, start_server, wait_for

REPO = "test-org/ovis-tiny"


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


def test_device_picks_one_worker_and_devices_many(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # (the suite sets it: conftest.py)
    two = plan_workers(Settings(data_dir=tmp_path, devices="cpu,cpu"), gpus())
    assert [(s.number, s.device, s.name) for s in two] == [
        (0, "cpu", "worker 0 (cpu)"),
        (1, "cpu", "worker 1 (cpu)"),
    ]
    expected = str(max(1, (os.cpu_count() or 1) // 2))  # the cores are shared out
    assert all(s.env == {"OMP_NUM_THREADS": expected} for s in two)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an operator's choice stands
    assert all(
        s.env == {} for s in plan_workers(Settings(data_dir=tmp_path, devices="cpu,cpu"), gpus())
    )


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


# -- the download -------------------------------------------------------------------------


def test_the_files_the_pipeline_loads_are_chosen() -> None:
    sizes = {
        "model_index.json": 1,
        "README.md": 2,
        "ovis_image_comfyui.safetensors": 100,  # a single-file checkpoint: not the pipeline's
        "assets/example.png": 3,
        "scheduler/scheduler_config.json": 4,
        "transformer/config.json": 5,
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": 10,
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors": 10,
        "transformer/diffusion_pytorch_model.safetensors.index.json": 6,
        "transformer/diffusion_pytorch_model.fp16.safetensors": 10,
        "transformer/diffusion_pytorch_model.bin": 20,
        "transformer/diffusion_pytorch_model.bin.index.json": 7,
        "text_encoder/model.safetensors": 30,
        "text_encoder/flax_model.msgpack": 30,
        "vae/diffusion_pytorch_model.bin": 8,  # only pickles: those are what loads
    }
    model_index = {
        "_class_name": "OvisImagePipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "OvisImageTransformer2DModel"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
    }
    assert sorted(select_files(sizes, model_index)) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/model.safetensors",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "vae/diffusion_pytorch_model.bin",
    ]


@pytest.fixture
def hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face home of the test's own, and no offline switch from outside."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return home


def test_download_progress_in_bytes_rate_and_time_left(tmp_path: Path, tiny_weights: Path) -> None:
    with FakeHub(REPO, tiny_weights) as sizing:
        total = sizing.total_bytes
    with FakeHub(REPO, tiny_weights, bytes_per_second=total / 4) as hub:
        lines: list[str] = []
        redrawn: list[str] = []
        fetched = fetch_weights(
            REPO,
            log=lines.append,
            status_line=redrawn.append,
            interval=0.25,
            cache_dir=str(tmp_path / "cache"),
            endpoint=hub.url,
        )
    index_size = len(hub.files["model_index.json"])  # fetched first, to plan the rest
    assert (fetched.total, fetched.downloaded, fetched.files) == (
        total,
        total - index_size,
        len(hub.files),
    )
    assert lines[0].startswith(f"downloading {REPO}: ")
    assert lines[0].endswith(f"in {len(hub.files) - 1} of {len(hub.files)} files, into "
                             f"{tmp_path / 'cache' / 'models--test-org--ovis-tiny'}")  # fmt: skip
    assert lines[-1].startswith(f"downloaded {REPO}: ")
    line = re.compile(rf"downloading {REPO}: ([0-9.]+) (B|kB) of ([0-9.]+) kB \(([0-9.]+)%\)(.*)")
    shown = [line.fullmatch(text) for text in redrawn]
    assert all(shown), redrawn
    matches = [match for match in shown if match]
    done = [float(m.group(1)) * (1000 if m.group(2) == "kB" else 1) for m in matches]
    assert done == sorted(done)
    assert len(set(done)) >= 3  # it moved while it ran
    assert all(m.group(3) == f"{total / 1e3:.1f}" for m in matches)
    assert any("kB/s" in m.group(5) and "s left" in m.group(5) for m in matches)
    assert redrawn[-1].startswith(f"downloading {REPO}: {total / 1e3:.1f} kB of")
    snapshot = Path(fetched.folder)
    for name, data in hub.files.items():
        assert (snapshot / name).read_bytes() == data


def test_download_command_fetches_once_then_finds_the_weights(
    tmp_path: Path, tiny_weights: Path, hub_home: Path
) -> None:
    with FakeHub(REPO, tiny_weights) as sizing:
        total = sizing.total_bytes
    with FakeHub(REPO, tiny_weights, bytes_per_second=total / 2) as hub:
        env = {"HF_ENDPOINT": hub.url}
        first = run_cli("download", "--model", REPO, "--data-dir", str(tmp_path), env=env)
        files = len(hub.files)
        into = re.escape(f"{hub_home}/hub/models--test-org--ovis-tiny")
        assert re.search(rf"^downloading {REPO}: [0-9.]+ kB in {files - 1} of {files} files, "
                         rf"into {into}$", first.stdout, re.M)  # fmt: skip
        assert re.search(
            rf"^downloaded {REPO}: [0-9.]+ kB in \d+s \([0-9.]+ kB/s\)$", first.stdout, re.M
        )
        folder = Path(first.stdout.strip().splitlines()[-1].split(" load it from ")[1])
        assert (folder / "model_index.json").read_bytes() == hub.files["model_index.json"]
        fetched = len(hub.file_downloads())

        again = run_cli("download", "--model", REPO, env=env)
        assert f"{REPO} is in the cache ({folder})" in again.stdout
        assert again.stdout.strip().endswith("nothing to download")
        assert len(hub.file_downloads()) == fetched

    # With the hub out of reach the cached copy serves; without one, a clear error.
    offline = run_cli("download", "--model", REPO, env={"HF_HUB_OFFLINE": "1"})
    assert f"{REPO} is in the cache ({folder}); the hub did not answer (HF_HUB_OFFLINE is set)" in (
        offline.stdout
    )
    closed = f"http://127.0.0.1:{free_port()}"
    unreachable = run_cli("download", "--model", "test-org/elsewhere", check=False,
                          env={"HF_ENDPOINT": closed})  # fmt: skip
    assert unreachable.returncode == 1
    assert "Traceback" not in unreachable.stderr
    assert (
        f"Error: cannot download test-org/elsewhere: the Hugging Face hub at {closed} did not "
        "answer (ConnectError"
    ) in unreachable.stderr
    assert "Run 'ovis-server download' where the hub can be reached" in unreachable.stderr


def test_download_of_a_model_the_hub_does_not_have(
    tmp_path: Path, tiny_weights: Path, hub_home: Path
) -> None:
    with FakeHub(REPO, tiny_weights) as hub:
        missing = run_cli("download", "--model", "test-org/nothing", check=False,
                          env={"HF_ENDPOINT": hub.url})  # fmt: skip
    assert missing.returncode == 1
    assert (
        f"there is no model test-org/nothing on the Hugging Face hub at {hub.url}" in missing.stderr
    )
    assert "Traceback" not in missing.stderr
    local = run_cli("download", "--model", str(tiny_weights))
    assert "is a local directory: nothing to download" in local.stdout


def test_two_processes_download_once(tmp_path: Path, tiny_weights: Path, hub_home: Path) -> None:
    """serve's workers (one per GPU) start together: one downloads, the others wait for it."""
    with FakeHub(REPO, tiny_weights) as sizing:
        total = sizing.total_bytes
    with FakeHub(REPO, tiny_weights, bytes_per_second=total / 3) as hub:
        env = {"HF_ENDPOINT": hub.url}
        outputs: list[str] = []

        def download() -> None:
            outputs.append(run_cli("download", "--model", REPO, env=env).stdout)

        threads = [threading.Thread(target=download) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        gets = hub.file_downloads()
    assert len(outputs) == 2
    assert len(gets) == len(set(gets)) == len(hub.files)  # each file once
    assert sorted(output.strip().splitlines()[-1].startswith("done:") for output in outputs) == [
        False,
        True,
    ]


def test_serve_shows_the_first_download_in_readyz(
    tmp_path: Path, tiny_weights: Path, hub_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeHub(REPO, tiny_weights) as sizing:
        total = sizing.total_bytes
    with FakeHub(REPO, tiny_weights, bytes_per_second=total / 8) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        server = start_server(tmp_path / "data", REPO, "--no-auth", timeout=120)
        try:
            seen: list[dict[str, Any]] = []
            with server.client() as client:

                def ready() -> bool:
                    body = client.get("/readyz").json()
                    seen.extend(w for w in body.get("workers", []) if w["phase"] == "downloading")
                    return bool(body["status"] == "ready")

                wait_for(ready, timeout=300, interval=0.2)
                run_jobs(client, 1)  # loaded from the downloaded snapshot
        finally:
            server.kill()
    assert seen, "no /readyz answer showed the download"
    progress = [w["progress"] for w in seen if "progress" in w]
    assert progress
    assert all(p["unit"] == "bytes" and p["total"] == total for p in progress)
    assert all(0 <= p["done"] <= total for p in progress)
    assert any(p.get("rate") and p.get("eta_seconds") is not None for p in progress)
    assert progress[-1]["text"] == f"{len(hub.files)} files from the Hugging Face hub"
    log = server.log()
    assert f"downloading {REPO}: " in log
    assert f"downloaded {REPO}: " in log
