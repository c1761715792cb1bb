"""Memory benchmark: seconds per image and peak GPU memory of each memory profile, then the
profile ``--memory auto`` picks under each ``--gpu-memory`` cap, run under that cap.

Each profile loads the engine afresh (offloading cannot be undone in place), times
``Engine.generate`` after warm-up (the prompt is encoded during warm-up; the peak counts
it), and reports the time as a multiple of ``full``'s. Then, for each cap in ``--caps``, the
engine is loaded with ``memory="auto"`` and that cap (the CUDA allocator is capped to it,
so one large GPU stands in for each smaller card) and timed the same way. Last, the
planner's choice for the real Ovis-Image-7B at 1024x1024 at each cap (arithmetic only).

    python benchmarks/memory.py --weights tiny --size 128x128 --steps 2            # CPU smoke
    python benchmarks/memory.py --weights random-full --size 1024x1024 --steps 28  # a GPU

On a CPU every profile either runs (offloading onto the CPU itself saves nothing) or is
refused, and the caps do not apply: ``auto`` is ``full`` there.
"""

from __future__ import annotations

import sys

# Run as a script, this folder comes first on sys.path, and its queue.py would hide the
# standard library's queue module from torch and everything else imported below.
if sys.path and sys.path[0] == __file__.rsplit("/", 1)[0]:
    del sys.path[0]

import argparse
import datetime as dt
import gc
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ovis_server.engine.loading import (
    EngineLoadError,
    pick_device,
    pick_dtype,
    silence_loading_progress,
)
from ovis_server.engine.memory import AUTO, GiB, MemoryProfile, model_sizes, plan
from ovis_server.engine.pipeline import Engine
from ovis_server.engine.random_full import build_full_size_pipeline
from ovis_server.engine.request import GenerationRequest

PROMPT = 'A neon sign that reads "OVIS" above a rainy street at night'


@dataclass
class Row:
    name: str
    profile: str
    seconds: float | None  # per image; None when refused
    peak_gib: float | None
    planned_gib: float
    note: str


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weights_path(weights: str) -> str:
    if weights != "tiny":
        return weights  # random-full, a local directory or a hub id
    from ovis_server.engine.tiny import write_tiny_checkpoint

    directory = Path(tempfile.mkdtemp(prefix="ovis-bench-")) / "tiny"
    write_tiny_checkpoint(directory)
    return str(directory)


def run_one(
    args: argparse.Namespace,
    device: torch.device,
    name: str,
    memory: str,
    gpu_memory: float | None,
    request: GenerationRequest,
) -> Row:
    """Load the engine with ``memory`` under ``gpu_memory``, then time it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dtype = str(pick_dtype(device, args.dtype)).removeprefix("torch.")
    compile_flag = {"auto": None, "on": True, "off": False}[args.compile]
    try:
        engine = Engine.load(
            args.path,
            device=str(device),
            dtype=dtype,
            compile=compile_flag,
            memory=memory,
            gpu_memory=gpu_memory,
        )
    except EngineLoadError as exc:
        return Row(name, memory, None, None, 0.0, f"refused: {exc}")
    chosen = engine.memory
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # from here: generation only
    for _ in range(args.warmup):
        engine.generate(request)
    samples = []
    for _ in range(args.repeats):
        synchronize(device)
        started = time.perf_counter()
        engine.generate(request)
        synchronize(device)
        samples.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
    note = "changes numerics" if not chosen.profile.keeps_image else ""
    if memory == AUTO:
        note = f"batch up to {chosen.batch_limit}; {chosen.reason}"
    del engine
    return Row(
        name, chosen.profile.value, statistics.median(samples), peak, chosen.peak_bytes / GiB, note
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="tiny", help="tiny, random-full, a dir or hub id")
    parser.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="off",
        help="off (default) times every profile on the same uncompiled model; auto lets "
        "each profile decide (compiled on CUDA unless it offloads groups)",
    )
    parser.add_argument("--caps", default="24,16,12,8", help="--gpu-memory caps, GiB")
    parser.add_argument(
        "--profiles", default=",".join(p.value for p in MemoryProfile), help="to time"
    )
    args = parser.parse_args(argv)

    silence_loading_progress()
    device = pick_device(args.device)
    width, height = parse_size(args.size)
    request = GenerationRequest(PROMPT, "", width, height, args.steps, args.guidance, 0)
    args.path = weights_path(args.weights)

    profiles = [MemoryProfile(name) for name in args.profiles.split(",") if name]
    rows = [run_one(args, device, p.value, p.value, None, request) for p in profiles]
    caps = [float(cap) for cap in args.caps.split(",") if cap]
    capped = [
        run_one(args, device, f"auto, --gpu-memory {cap:g}GiB", AUTO, cap * GiB, request)
        for cap in caps
    ]
    print_report(args, device, width, height, rows, capped, caps)
    return 0


def fmt_seconds(row: Row) -> str:
    return "refused" if row.seconds is None else f"{row.seconds:.3f}"


def fmt_ratio(row: Row, full: float | None) -> str:
    if row.seconds is None or not full:
        return "n/a"
    return f"{row.seconds / full:.2f}x"


def fmt_gib(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"


def fmt_peak(row: Row) -> str:
    return "n/a" if row.peak_gib is None else fmt_gib(row.peak_gib)


def print_report(
    args: argparse.Namespace,
    device: torch.device,
    width: int,
    height: int,
    rows: list[Row],
    capped: list[Row],
    caps: list[float],
) -> None:
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"# ovis-server memory benchmark, {dt.date.today().isoformat()}")
    print(
        f"device: {device} ({name or platform.machine()}, {torch.get_num_threads()} CPU "
        f"threads); torch {torch.__version__}, diffusers {diffusers.__version__}"
    )
    print(
        f"weights: {args.weights}; {width}x{height}, {args.steps} steps, guidance "
        f"{args.guidance}; compile {args.compile}; median of {args.repeats} after "
        f"{args.warmup} warm-up"
    )
    full = next((r.seconds for r in rows if r.profile == MemoryProfile.FULL.value), None)
    print()
    print("| profile | s / image | time vs full | peak GPU memory | planned peak | note |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        planned = fmt_gib(row.planned_gib) if row.seconds is not None else "n/a"
        print(
            f"| {row.name} | {fmt_seconds(row)} | {fmt_ratio(row, full)} | {fmt_peak(row)} "
            f"| {planned} | {row.note} |"
        )
    print()
    print("| cap | chosen profile | s / image | time vs full | peak GPU memory | why |")
    print("|---|---|---:|---:|---:|---|")
    for row in capped:
        print(
            f"| {row.name} | {row.profile} | {fmt_seconds(row)} | {fmt_ratio(row, full)} "
            f"| {fmt_peak(row)} | {row.note} |"
        )
    print()
    print("planned for Ovis-Image-7B (bf16, 1024x1024), whatever ran above:")
    sizes = model_sizes(build_full_size_pipeline("meta", torch.bfloat16))
    print("| cap | profile | planned peak | batch limit |")
    print("|---|---|---:|---:|")
    for cap in caps:
        chosen = plan(sizes, int(cap * GiB))
        print(
            f"| {cap:g} GiB | {chosen.profile} | {chosen.peak_bytes / GiB:.1f} GiB "
            f"| {chosen.batch_limit} |"
        )


if __name__ == "__main__":
    sys.exit(main())
