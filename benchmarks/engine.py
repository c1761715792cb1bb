"""Engine benchmark: the stock OvisImagePipeline call against ovis-server's engine.

Both run in one process on the same inputs and seeds, after warm-up, several repeats,
median. Prints a table per variant: seconds per image, images per minute, peak device
memory, MFU (the FLOP count of design.md over the device's measured bf16 peak) and the
ratio to stock.

    python benchmarks/engine.py --weights tiny --size square --steps 8        # CPU smoke run
    python benchmarks/engine.py --weights random-full --size square_hd --steps 28   # a GPU

--weights: tiny (random tiny checkpoint), random-full (the real 7B architecture with random
weights: no download), or a local diffusers directory or hub id (real weights).
"""

from __future__ import annotations

import sys

# Run as a script, this folder comes first on sys.path, and its queue.py would hide the
# standard library's queue module from torch and everything else imported below: the
# repository root takes its place, from which ``benchmarks.flops`` is imported.
if sys.path and sys.path[0] == __file__.rsplit("/", 1)[0]:
    sys.path[0] = sys.path[0].rsplit("/", 1)[0]

import argparse
import datetime as dt
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.flops import image_flops
from ovis_server.catalogue import IMAGE_SIZE_PRESETS
from ovis_server.engine.loading import pick_device, pick_dtype, silence_loading_progress
from ovis_server.engine.pipeline import Engine
from ovis_server.engine.request import GenerationRequest

PROMPTS = [
    'A neon sign that reads "OVIS" above a rainy street at night',
    "A chalkboard menu listing coffee prices in neat handwriting",
    "A vintage travel poster for the Alps with bold title lettering",
    "A birthday cake with 'HAPPY 30TH' piped in blue icing",
]


@dataclass
class Row:
    variant: str
    seconds_per_image: float
    peak_memory_gib: float | None
    mfu: float | None
    ratio: float


def parse_size(text: str) -> tuple[int, int]:
    if text in IMAGE_SIZE_PRESETS:
        return IMAGE_SIZE_PRESETS[text]
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_bf16_peak(device: torch.device) -> float | None:
    """FLOP/s of a large bf16 matmul on this device (design.md's yardstick), CUDA only."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    runs = 10
    started = time.perf_counter()
    for _ in range(runs):
        a @ b
    synchronize(device)
    return 2 * 8192**3 * runs / (time.perf_counter() - started)


def timed(
    run: Callable[[], int], device: torch.device, warmup: int, repeats: int
) -> tuple[float, float | None]:
    """Median seconds per image of ``run`` (which returns how many images it made), and
    the peak device memory while it ran."""
    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        images = run()
        synchronize(device)
        samples.append((time.perf_counter() - started) / images)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(samples), peak


def load_engine(args: argparse.Namespace, device: torch.device) -> Engine:
    dtype = pick_dtype(device, args.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    silence_loading_progress()
    if args.weights == "tiny":
        from ovis_server.engine.tiny import write_tiny_checkpoint

        directory = Path(tempfile.mkdtemp(prefix="ovis-bench-")) / "tiny"
        write_tiny_checkpoint(directory)
        return Engine.load(str(directory), device=str(device), dtype=dtype_name, compile=False)
    # random-full (the real architecture with random weights) is built by Engine.load.
    return Engine.load(args.weights, device=str(device), dtype=dtype_name, compile=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="tiny")
    parser.add_argument("--size", default="square_hd")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--fp8", action="store_true", help="also time FP8 matmuls (torchao)")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    width, height = parse_size(args.size)
    started = time.perf_counter()
    engine = load_engine(args, device)
    load_seconds = time.perf_counter() - started
    load_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    requests = [
        GenerationRequest(prompt, "", width, height, args.steps, args.guidance, seed)
        for seed, prompt in enumerate(PROMPTS * (args.concurrency // len(PROMPTS) + 1))
    ][: max(args.concurrency, 1)]
    first = requests[0]
    flops = image_flops(
        engine.pipeline.transformer,
        width,
        height,
        args.steps,
        args.guidance > 1,
        vae_scale_factor=engine.pipeline.vae_scale_factor,
    )
    peak = measured_bf16_peak(device)

    def row(name: str, seconds: float, memory: float | None, baseline: float) -> Row:
        mfu = flops / seconds / peak if peak else None
        return Row(name, seconds, memory, mfu, baseline / seconds)

    def stock_image() -> int:
        engine.generate_stock(first)
        return 1

    def engine_image() -> int:
        engine.generate(first)
        return 1

    def engine_batch() -> int:
        return len(engine.generate_batch(requests))

    def measure(run: Callable[[], int]) -> tuple[float, float | None]:
        return timed(run, device, args.warmup, args.repeats)

    # Stock first, before the engine's optimizations touch the shared modules.
    rows: list[Row] = []
    stock, memory = measure(stock_image)
    rows.append(row("stock OvisImagePipeline", stock, memory, stock))

    compile_on = device.type == "cuda" if args.compile == "auto" else args.compile == "on"
    engine.optimize(compile=compile_on, fp8=False)
    suffix = " + compile" if compile_on else ""
    single, memory = measure(engine_image)
    rows.append(row(f"engine{suffix}", single, memory, stock))
    if args.concurrency > 1:
        batched, memory = measure(engine_batch)
        rows.append(row(f"engine{suffix}, batch of {len(requests)}", batched, memory, stock))
    if args.fp8:
        engine.optimize(compile=False, fp8=True)
        fp8, memory = measure(engine_image)
        rows.append(row(f"engine{suffix} + FP8", fp8, memory, stock))

    print_report(args, device, width, height, flops, peak, load_seconds, load_rss_gib, rows)
    return 0


def print_report(
    args: argparse.Namespace,
    device: torch.device,
    width: int,
    height: int,
    flops: float,
    peak: float | None,
    load_seconds: float,
    load_rss_gib: float,
    rows: list[Row],
) -> None:
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    threads = torch.get_num_threads()
    print(f"# ovis-server engine benchmark, {dt.date.today().isoformat()}")
    print(
        f"device: {device} ({name or platform.machine()}, {threads} CPU threads); "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"python {sys.version.split()[0]}"
    )
    print(
        f"weights: {args.weights}; {width}x{height}, {args.steps} steps, guidance "
        f"{args.guidance}; median of {args.repeats} after {args.warmup} warm-up"
    )
    peak_text = f"{peak / 1e12:.0f} TFLOP/s measured bf16 matmul" if peak else "n/a (no CUDA)"
    work = f"{flops / 1e15:.2f} PFLOP" if flops >= 1e13 else f"{flops / 1e9:.1f} GFLOP"
    print(f"work per image: {work} (design.md's count); device peak: {peak_text}")
    print(f"load: {load_seconds:.1f} s to ready, peak host memory {load_rss_gib:.2f} GiB")
    print()
    header = "| variant | s / image | images / min | peak memory | MFU | vs stock |"
    print(header)
    print("|---|---:|---:|---:|---:|---:|")
    for item in rows:
        memory = f"{item.peak_memory_gib:.1f} GiB" if item.peak_memory_gib is not None else "n/a"
        mfu = f"{item.mfu:.0%}" if item.mfu is not None else "n/a"
        print(
            f"| {item.variant} | {item.seconds_per_image:.3f} | "
            f"{60 / item.seconds_per_image:.1f} | {memory} | {mfu} | {item.ratio:.2f}x |"
        )


if __name__ == "__main__":
    sys.exit(main())
