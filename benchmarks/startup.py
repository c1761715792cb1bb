"""Start-up benchmark: time to ready with a cold and a warm compile cache, and the first
request at each preset size after ready.

Starts ``ovis-server serve`` twice on one fresh data directory (so the second start finds
the first one's compile cache in ``<data-dir>/compile-cache``), reads from the worker's log
the time from its start to ready, its loading and warm-up time and how many compiled graphs
came from the cache, and after the second start sends, for each size, a first and then a
second request (submit to result, the same steps and seed): a first request much slower
than the second one still waited for compilation after ready.

    python benchmarks/startup.py --model random-full --steps 28
    python benchmarks/startup.py --model random-full --steps 28 --fp8
    python benchmarks/startup.py --model tiny --compile on --steps 8     # a CPU: minutes

``--model-id`` picks the catalogue entry (default Ovis-Image); ``--steps`` defaults to the
model's own default. With ``TORCHINDUCTOR_CACHE_DIR`` set, both starts use that folder as
their compile cache (it should start empty for the cold start to be cold).
"""

from __future__ import annotations

import sys

# Run as a script, this folder comes first on sys.path, and its queue.py would hide the
# standard library's queue module from httpx and everything else imported below.
if sys.path and sys.path[0] == __file__.rsplit("/", 1)[0]:
    sys.path[0] = __file__.rsplit("/", 2)[0]  # the repository: benchmarks.common

import argparse
import contextlib
import datetime as dt
import platform
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.common import default_steps, free_port, model_input, model_spec, ready, stop
from ovis_server.catalogue import DEFAULT_MODEL_ID, IMAGE_SIZE_PRESETS, ModelSpec

READY_LINE = re.compile(
    r"ready ([0-9.]+)s after the worker started \(loading ([0-9.]+)s, warm-up ([0-9.]+s|off)\)"
)
CACHE_LINE = re.compile(r"compiled graphs: ([0-9]+) from the cache, ([0-9]+) compiled anew")
FINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Start:
    label: str
    wall_seconds: float  # serve's start to /readyz ready, as a client sees it
    worker_seconds: str  # the worker's own start to ready, from its log
    loading: str
    warmup: str
    from_cache: str
    compiled: str


@contextlib.contextmanager
def server(args: argparse.Namespace, data_dir: Path, label: str) -> Iterator[tuple[str, Start]]:
    port = free_port()
    command = [sys.executable, "-m", "ovis_server", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--data-dir", str(data_dir), "--model", args.model]
    command += ["--model-id", args.model_id]
    command += ["--device", args.device, "--compile", args.compile, "--warmup", args.warmup]
    command += ["--no-auth", "--log-level", "info"]
    command += ["--fp8"] if args.fp8 else []
    command += ["--compile-dynamic"] if args.compile_dynamic else []
    command += ["--memory", args.memory] if args.memory else []
    log_path = data_dir / f"serve-{label}.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        while not ready(base):
            if process.poll() is not None or time.monotonic() - started > args.ready_timeout:
                raise RuntimeError(f"the server did not get ready:\n{log_path.read_text()}")
            time.sleep(0.2)
        wall = time.monotonic() - started
        time.sleep(0.5)  # the log line follows the ready report
        text = log_path.read_text(errors="replace")
        ready_match = READY_LINE.search(text)
        cache_match = CACHE_LINE.search(text)
        worker, loading, warmup = ready_match.groups() if ready_match else ("?", "?", "?")
        hits, misses = cache_match.groups() if cache_match else ("-", "-")
        yield base, Start(label, wall, worker, loading, warmup, hits, misses)
    finally:
        stop(process)


def one_request(client: httpx.Client, spec: ModelSpec, size: str, steps: int, number: int) -> float:
    """Seconds from submit to the final result (a prompt of its own: each request
    encodes one, as a new client's does)."""
    prompt = f"A neon sign that reads OVIS {number}"
    body = model_input(spec, prompt, size, steps, 7).model_dump(mode="json")
    started = time.monotonic()
    answer = client.post(f"/v1/models/{spec.model_id}", json=body)
    answer.raise_for_status()
    request_id = answer.json()["request_id"]
    while True:
        result = client.get(f"/v1/requests/{request_id}/result").json()
        if result["status"] in FINAL:
            if result["status"] != "succeeded":
                raise RuntimeError(f"{size}: {result}")
            return time.monotonic() - started
        time.sleep(0.05)


def print_start(start: Start) -> None:
    print(
        f"| {start.label} cache | {start.wall_seconds:.1f} s | {start.worker_seconds} s "
        f"| {start.loading} s | {start.warmup} | {start.from_cache} | {start.compiled} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random-full", help="tiny, random-full or a path")
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="the catalogue entry")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--compile-dynamic", action="store_true")
    parser.add_argument("--warmup", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--memory", default=None)
    parser.add_argument("--steps", type=int, help="default: the model's own default")
    parser.add_argument(
        "--sizes", default=",".join(IMAGE_SIZE_PRESETS), help="presets, comma-separated"
    )
    parser.add_argument("--ready-timeout", type=float, default=3600)
    args = parser.parse_args()
    spec = model_spec(args.model_id)
    if args.steps is None:
        args.steps = default_steps(spec)
    sizes = [size.strip() for size in args.sizes.split(",") if size.strip()]

    machine = f"{platform.node()} {platform.machine()}, python {platform.python_version()}"
    print(f"# {dt.date.today()} {machine}")
    print(
        f"# --model-id {args.model_id} --model {args.model} --device {args.device} "
        f"--compile {args.compile} "
        f"--warmup {args.warmup}{' --compile-dynamic' if args.compile_dynamic else ''}"
        f"{' --fp8' if args.fp8 else ''}, {args.steps} steps"
    )
    print()
    print(
        "| start | to ready (client) | worker start to ready | loading | warm-up "
        "| graphs from cache | compiled anew |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    # Each row as soon as it is measured: a run stopped part-way still shows what it got.
    latencies: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="ovis-startup-") as folder:
        data_dir = Path(folder)
        with server(args, data_dir, "cold") as (_base, start):
            print_start(start)
        with server(args, data_dir, "warm") as (base, start):
            print_start(start)
            print()
            print("| size | first request after ready | second request | first / second |")
            print("|---|---:|---:|---:|", flush=True)
            with httpx.Client(base_url=base, timeout=3600) as client:
                for number, size in enumerate(sizes):
                    first = one_request(client, spec, size, args.steps, 2 * number)
                    second = one_request(client, spec, size, args.steps, 2 * number + 1)
                    latencies.append((size, first, second))
                    print(
                        f"| {size} | {first:.2f} s | {second:.2f} s | {first / second:.2f} |",
                        flush=True,
                    )
    worst = max((first / second for _, first, second in latencies), default=0.0)
    print()
    print(f"first / second, worst: {worst:.2f}")


if __name__ == "__main__":
    main()
