"""The benchmark scripts run (a smoke run on the tiny model; timings are not asserted)."""

from __future__ import annotations

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
    from ovis_server.engine.flops import image_flops, transformer_forward_flops

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


def test_cancel_load_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/cancel_load.py", "--cancels", "10", "--rounds", "1",
         "--pollers", "2", "--idle-seconds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert "| requests | count | p50 ms | p99 ms | max ms |" in lines
    assert any(line.startswith("| cancel of a running job (token A) | 10 |") for line in lines)
