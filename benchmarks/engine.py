"""Engine benchmark: the stock OvisImagePipeline call against ovis-server's engine.

Both run in one process on the same inputs and seeds, after warm-up, several repeats,
median. Prints a table per variant: seconds per image, images per minute, peak device
memory, MFU (the FLOP count of design.md over the device's measured bf16 peak) and the
ratio to stock.

    python benchmarks/engine.py --weights tiny --size square --steps 8        # CPU smoke run
    python benchmarks/engine.py --weights random-full --size square_hd --steps 28   # a GPU

--weights: tiny (random tiny checkpoint), random-full (the real architecture with random
weights: no download), or a local diffusers directory or hub id (real weights).
--model-id: the catalogue entry (default Ovis-Image), loaded as its worker loads it;
--steps defaults to the model's own default. MFU is given where the FLOP count knows the
model's transformer (Ovis-Image's, design.md).
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

from benchmarks.common import PROMPTS, default_steps, model_input, model_spec
from benchmarks.flops import image_flops
from ovis_server.catalogue import DEFAULT_MODEL_ID, IMAGE_SIZE_PRESETS, ModelSpec
from ovis_server.config import Settings
from ovis_server.engine.loading import pick_device, silence_loading_progress
from ovis_server.engine.pipeline import Engine


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


def load_engine(args: argparse.Namespace, spec: ModelSpec, device: torch.device) -> Engine:
    """The model as its worker loads it (``--weights`` as ``--model`` takes them: tiny is
    built into a temporary folder), uncompiled: the stock pipeline is timed first."""
    silence_loading_progress()
    # Removed when the process exits (the object's finalizer): tiny is built in it.
    args.scratch = tempfile.TemporaryDirectory(prefix="ovis-bench-")
    settings = Settings(
        data_dir=Path(args.scratch.name),
        model=args.weights,
        model_ids=(spec.model_id,),
        device=str(device),
        dtype=args.dtype,
        compile="off",
    )
    return spec.load_engine(settings)


def known_flops(
    engine: Engine, width: int, height: int, steps: int, guidance: bool
) -> float | None:
    """design.md's FLOP count of one image, where it knows the transformer; else None."""
    transformer = engine.pipeline.transformer
    if not hasattr(transformer, "single_transformer_blocks"):
        return None
    return image_flops(
        transformer,
        width,
        height,
        steps,
        guidance,
        vae_scale_factor=engine.pipeline.vae_scale_factor,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="tiny")
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="the catalogue entry")
    parser.add_argument("--size", default="square_hd")
    parser.add_argument("--steps", type=int, help="default: the model's own default")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--fp8", action="store_true", help="also time FP8 matmuls (torchao)")
    args = parser.parse_args(argv)

    spec = model_spec(args.model_id)
    if args.steps is None:
        args.steps = default_steps(spec)
    device = pick_device(args.device)
    width, height = parse_size(args.size)
    started = time.perf_counter()
    engine = load_engine(args, spec, device)
    load_seconds = time.perf_counter() - started
    load_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    size = {"width": width, "height": height}
    requests = [
        model_input(
            spec, PROMPTS[seed % len(PROMPTS)], size, args.steps, seed, args.guidance
        ).to_generation_request(seed)
        for seed in range(max(args.concurrency, 1))
    ]
    first = requests[0]
    flops = known_flops(engine, width, height, args.steps, first.guidance_scale > 1)
    peak = measured_bf16_peak(device)

    def row(name: str, seconds: float, memory: float | None, baseline: float) -> Row:
        mfu = flops / seconds / peak if peak and flops else None
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

    print_report(
        args, spec, device, (width, height, first.guidance_scale), flops, peak,
        (load_seconds, load_rss_gib), rows,
    )  # fmt: skip
    return 0


def print_report(
    args: argparse.Namespace,
    spec: ModelSpec,
    device: torch.device,
    shape: tuple[int, int, float],
    flops: float | None,
    peak: float | None,
    load: tuple[float, float],
    rows: list[Row],
) -> None:
    width, height, guidance = shape
    load_seconds, load_rss_gib = load
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
        f"model: {spec.model_id}, weights {args.weights}; {width}x{height}, {args.steps} "
        f"steps, guidance {guidance:g}; median of {args.repeats} after {args.warmup} warm-up"
    )
    peak_text = f"{peak / 1e12:.0f} TFLOP/s measured bf16 matmul" if peak else "n/a (no CUDA)"
    if flops is None:
        work = "not counted (design.md's count is Ovis-Image's)"
    elif flops >= 1e13:
        work = f"{flops / 1e15:.2f} PFLOP (design.md's count)"
    else:
        work = f"{flops / 1e9:.1f} GFLOP (design.md's count)"
    print(f"work per image: {work}; device peak: {peak_text}")
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
