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

``--model-id`` picks the catalogue entry (default Ovis-Image), loaded as its worker loads it;
``--steps`` defaults to the model's own default. The capped runs go first (they are what
the memory targets are about), then the profiles; with ``--budget`` a row not started
within that many seconds is left out and says so.

On a CPU every profile either runs (offloading onto the CPU itself saves nothing) or is
refused, and the caps do not apply: ``auto`` is ``full`` there.
"""

from __future__ import annotations

import sys

# Run as a script, this folder comes first on sys.path, and its queue.py would hide the
# standard library's queue module from torch and everything else imported below: the
# repository root takes its place, from which ``benchmarks.common`` is imported.
if sys.path and sys.path[0] == __file__.rsplit("/", 1)[0]:
    sys.path[0] = sys.path[0].rsplit("/", 1)[0]

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

from benchmarks.common import PROMPTS, default_steps, model_input, model_spec
from ovis_server.catalogue import DEFAULT_MODEL_ID, OVIS_IMAGE_MODEL_ID, ModelSpec
from ovis_server.config import Settings
from ovis_server.engine.loading import EngineLoadError, pick_device, silence_loading_progress
from ovis_server.engine.memory import AUTO, GiB, MemoryProfile, model_sizes, plan
from ovis_server.engine.random_full import build_full_size_pipeline
from ovis_server.engine.request import GenerationRequest


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


def run_one(
    args: argparse.Namespace,
    spec: ModelSpec,
    device: torch.device,
    name: str,
    memory: str,
    gpu_memory: str | None,
    request: GenerationRequest,
) -> Row:
    """Load the engine with ``memory`` under ``gpu_memory`` (as --gpu-memory takes it),
    then time it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        if gpu_memory is None:  # a capped row before this one capped the allocator
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    settings = Settings(
        data_dir=args.data_dir,
        model=args.weights,
        model_ids=(spec.model_id,),
        device=str(device),
        dtype=args.dtype,
        compile=args.compile,
        memory=memory,
        gpu_memory=gpu_memory,
    )
    try:
        engine = spec.load_engine(settings)
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
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="the catalogue entry")
    parser.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT")
    parser.add_argument("--steps", type=int, help="default: the model's own default")
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
    parser.add_argument("--budget", type=float, help="seconds: start no row after this")
    args = parser.parse_args(argv)
    started = time.monotonic()

    silence_loading_progress()
    spec = model_spec(args.model_id)
    if args.steps is None:
        args.steps = default_steps(spec)
    device = pick_device(args.device)
    width, height = parse_size(args.size)
    size = {"width": width, "height": height}
    request = model_input(spec, PROMPTS[0], size, args.steps, 0, args.guidance)
    # Where tiny is built; removed when the process exits (the object's finalizer).
    args.scratch = tempfile.TemporaryDirectory(prefix="ovis-bench-")
    args.data_dir = Path(args.scratch.name)

    def timed_row(name: str, memory: str, cap: float | None) -> Row:
        if args.budget is not None and time.monotonic() - started > args.budget:
            return Row(name, memory, None, None, 0.0, f"not run: the {args.budget:g} s budget")
        gpu_memory = None if cap is None else f"{cap:g}GiB"
        row = run_one(
            args, spec, device, name, memory, gpu_memory, request.to_generation_request(0)
        )
        print(f"{name}: {fmt_seconds(row)} s / image, peak {fmt_peak(row)}", file=sys.stderr)
        return row

    caps = [float(cap) for cap in args.caps.split(",") if cap]
    capped = [timed_row(f"auto, --gpu-memory {cap:g}GiB", AUTO, cap) for cap in caps]
    profiles = [MemoryProfile(name) for name in args.profiles.split(",") if name]
    rows = [timed_row(p.value, p.value, None) for p in profiles]
    print_report(args, spec, device, (width, height), rows, capped, caps)
    return 0


def fmt_seconds(row: Row) -> str:
    if row.seconds is None:
        return "not run" if row.note.startswith("not run") else "refused"
    return f"{row.seconds:.3f}"


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
    spec: ModelSpec,
    device: torch.device,
    shape: tuple[int, int],
    rows: list[Row],
    capped: list[Row],
    caps: list[float],
) -> None:
    import diffusers

    width, height = shape
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"# ovis-server memory benchmark, {dt.date.today().isoformat()}")
    print(
        f"device: {device} ({name or platform.machine()}, {torch.get_num_threads()} CPU "
        f"threads); torch {torch.__version__}, diffusers {diffusers.__version__}"
    )
    print(
        f"model: {spec.model_id}, weights {args.weights}; {width}x{height}, {args.steps} "
        f"steps, guidance "
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
    largest = capped[0] if capped else None
    first_cap = f"vs {largest.name.rsplit(' ', 1)[-1]}" if largest else "vs first cap"
    print(
        f"| cap | chosen profile | s / image | time vs full | {first_cap} | peak GPU memory | why |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for row in capped:
        versus = fmt_ratio(row, largest.seconds if largest else None)
        print(
            f"| {row.name} | {row.profile} | {fmt_seconds(row)} | {fmt_ratio(row, full)} "
            f"| {versus} | {fmt_peak(row)} | {row.note} |"
        )
    if spec.model_id != OVIS_IMAGE_MODEL_ID:
        return
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
