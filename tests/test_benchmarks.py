"""The benchmark scripts run (a smoke run on the tiny model; timings are not asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from ovis_server.engine.random_full import build_full_size_pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_engine_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/engine.py", "--weights", "tiny", "--size", "square",
         "--steps", "4", "--repeats", "1", "--warmup", "1", "--concurrency", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert "| variant | s / image | images / min | peak memory | MFU | vs stock |" in lines
    rows = [line for line in lines if line.startswith("| ") and "variant" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| stock OvisImagePipeline",
        "| engine",
        "| engine, batch of 2",
    ]
    assert rows[0].endswith("| 1.00x |")
    assert "512x512, 4 steps" in result.stdout


def test_serve_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/serve.py", "--model", "tiny", "--size", "256x256",
         "--steps", "2", "--requests", "3", "--concurrency", "2", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert "| run | images | images / min | latency p50 | latency p95 | latency max |" in lines
    rows = [line for line in lines if line.startswith("| ") and "| run |" not in line]
    assert [row.split(" | ")[:2] for row in rows[:2]] == [
        ["| HTTP, 2 clients, polling", "3"],
        ["| engine alone, batches of 1", "3"],
    ]
    # CPU per image of each process: on Linux, the server's processes are found.
    processes = [row.split(" | ")[1] for row in rows[2:]]
    assert processes == ["clients (this process)", "API process", "worker processes", "engine"]
    assert all(re.search(r"\| \d+ ms \|$", row) for row in rows[2:])
    assert "256x256, 2 steps" in result.stdout
    assert re.fullmatch(r"end-to-end / engine: \d+\.\d\d", lines[-1])


def test_worker_loop_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/worker_loop.py", "--model", "tiny", "--size", "64x64",
         "--steps", "1", "--jobs", "3", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert "| jobs | batch | wall | engine busy | busy share | images / min |" in lines
    assert re.fullmatch(r"\| 3 \| 1 \| [\d.]+ s \| [\d.]+ s \| [\d.]+% \| [\d.]+ \|", lines[-3])
    # 3 jobs of 1 step: a progress write each, timed on the progress thread.
    assert re.fullmatch(r"step progress: 3 writes, mean [\d.]+ ms, p95 [\d.]+ ms, .*", lines[-1])


def test_random_full_has_the_real_sizes() -> None:
    pipeline = build_full_size_pipeline("meta", torch.bfloat16)
    billions = {
        name: sum(p.numel() for p in getattr(pipeline, name).parameters()) / 1e9
        for name in ("transformer", "text_encoder", "vae")
    }
    assert 7.3 < billions["transformer"] < 7.45
    assert 1.6 < billions["text_encoder"] < 1.8
    assert billions["vae"] < 0.1
    assert pipeline.vae_scale_factor == 8


def test_flop_count_matches_the_design_document() -> None:
    from benchmarks.flops import image_flops, transformer_forward_flops

    transformer = build_full_size_pipeline("meta", torch.bfloat16).transformer
    assert abs(transformer_forward_flops(transformer, 4096, 256) / 1e12 - 51) < 0.5
    assert abs(image_flops(transformer, 1024, 1024, 28, guidance=True) / 1e15 - 2.86) < 0.02


def test_queue_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/queue.py", "--jobs", "40", "--workers", "4",
         "--requests", "40", "--clients", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    assert "| store | claims / s | submits / s | status p50 | status p99 |" in result.stdout
    assert "| SQLite (WAL) |" in result.stdout


def test_metrics_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/metrics.py", "--postgres-url", "", "--jobs", "2000",
         "--recent", "50", "--queued", "10", "--scrapes", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| store | finished jobs kept | finished last minute |")
    assert lines[2].startswith("| SQLite | 2,000 | 50 |")


def test_memory_benchmark_prints_its_tables() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/memory.py", "--weights", "tiny", "--size", "128x128",
         "--steps", "2", "--repeats", "1", "--warmup", "0", "--caps", "24,8", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    start = lines.index(
        "| profile | s / image | time vs full | peak GPU memory | planned peak | note |"
    )
    profiles = [line.split(" | ")[0] for line in lines[start + 2 : start + 7]]
    assert profiles == ["| full", "| text-encoder-offload", "| 8bit", "| group-offload-block",
                        "| group-offload-leaf"]  # fmt: skip
    assert lines[start + 2].split(" | ")[2] == "1.00x"
    assert "| auto, --gpu-memory 24GiB | full |" in result.stdout  # on a CPU auto is full
    assert "| 24 GiB | full | 19.5 GiB | 2 |" in lines
    assert "| 8 GiB | group-offload-block | 2.6 GiB | 2 |" in lines


def test_cancel_load_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/cancel_load.py", "--cancels", "10", "--rounds", "1",
         "--pollers", "2", "--idle-seconds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert "| requests | count | p50 ms | p99 ms | max ms |" in lines
    assert any(line.startswith("| cancel of a running job (token A) | 10 |") for line in lines)


def test_status_benchmark_prints_its_ratio() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/status.py", "--clients", "4", "--calls", "40",
         "--rounds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert "| target | median calls / s | range | median p50 ms |" in lines
    assert sum(line.startswith("| 2 | ") for line in lines) == 2  # round 2: both targets
    ratio = [line for line in lines if line.startswith("status / bare: ")]
    assert len(ratio) == 1
    assert float(ratio[0].split(": ")[1]) > 0


def test_startup_benchmark_prints_its_tables() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/startup.py", "--model", "tiny", "--device", "cpu",
         "--compile", "off", "--warmup", "off", "--sizes", "square", "--steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| start", "| cold cache", "| warm cache", "| size", "| square"
    ]  # fmt: skip
    # The worker's own times come from its log: a changed log line would show as "?".
    assert "?" not in rows[1]
    assert rows[1].endswith("| off | - | - |")
    assert re.search(r"first / second, worst: \d+\.\d\d$", result.stdout)
