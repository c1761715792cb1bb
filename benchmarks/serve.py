"""Serving benchmark: images per minute through the HTTP API, against the engine alone.

Starts ``ovis-server serve`` on a free loopback port with a fresh data directory and token
(or targets ``--url`` with ``--token``) and drives it with ``--concurrency`` clients that
send ``--requests`` requests in all, as RunComfy's clients do: POST the input, GET its
status until completed, failed or cancelled, GET the result, download the image (with
``--wait N``, the submit carries ``Prefer: wait=N`` and polling takes over only if the
answer is not the result). Then, with the server stopped, the engine alone makes as many
images of the same model, size and steps in this process, in the batches the worker would
use. Prints images per minute and latency p50/p95/max (HTTP: submit to downloaded file;
engine: one call), and last ``end-to-end / engine: R``, the ratio of images per minute.

    python benchmarks/serve.py --model tiny --size 512x512 --steps 8 --requests 16 --concurrency 4
    python benchmarks/serve.py --model random-full --size square_hd --steps 28 --concurrency 4

With ``--url`` the engine row runs on this machine (``--device``): compare like with like.
"""

from __future__ import annotations

import sys

# Run as a script, this folder comes first on sys.path, and its queue.py would hide the
# standard library's queue module from httpx, torch and everything else imported below.
if sys.path and sys.path[0] == __file__.rsplit("/", 1)[0]:
    sys.path[0] = __file__.rsplit("/", 2)[0]  # the repository: benchmarks.common

import argparse
import contextlib
import datetime as dt
import math
import os
import platform
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import PROMPTS, free_port, ready, stop
from ovis_server.catalogue import OVIS_IMAGE, OvisImageInput
from ovis_server.cli import parse_image_size
from ovis_server.config import Settings
from ovis_server.engine.request import GenerationRequest

FINAL_STATUSES = {"completed", "failed", "cancelled"}


@dataclass
class Run:
    label: str
    seconds: float
    latencies: list[float]
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by process

    @property
    def per_minute(self) -> float:
        return len(self.latencies) * 60 / self.seconds


def percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: the smallest value with ``fraction`` of them at or below it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def ovis_server(*args: str) -> str:
    command = [sys.executable, "-m", "ovis_server", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (Linux's /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The child processes of ``pid``, whichever of its threads started them."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


@dataclass
class CpuMeter:
    """CPU seconds spent by the server's API process, its worker processes and this process
    (the clients) between ``start`` and ``stop``."""

    server_pid: int | None
    spent: dict[str, float] = field(default_factory=dict)

    def sample(self) -> dict[str, float]:
        own = os.times()
        sample = {"clients (this process)": own.user + own.system}
        if self.server_pid is not None:
            sample["API process"] = cpu_seconds(self.server_pid)
            sample["worker processes"] = sum(cpu_seconds(c) for c in children(self.server_pid))
        return sample

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        before = self.sample()
        yield
        after = self.sample()
        self.spent = {name: after[name] - before.get(name, 0.0) for name in after}


@contextlib.contextmanager
def local_server(args: argparse.Namespace, data_dir: Path) -> Iterator[tuple[str, str, int | None]]:
    """``ovis-server serve`` on a free loopback port; yields (base URL, token, its pid) once
    ready."""
    token = ovis_server("token", "create", "--name", "bench", "--data-dir", str(data_dir))
    port = free_port()
    command = [sys.executable, "-m", "ovis_server", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--data-dir", str(data_dir), "--model", args.model]
    command += ["--device", args.device, "--log-level", "warning"]
    command += ["--fp8"] if args.fp8 else []
    log_path = data_dir / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.ready_timeout
        while not ready(base):  # /readyz: the worker has loaded the model
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not get ready:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield base, token.strip().splitlines()[-1], process.pid
    finally:
        stop(process)


def one_request(
    api: httpx.Client, files: httpx.Client, body: dict[str, Any], args: argparse.Namespace
) -> float:
    """Seconds from submit to the image downloaded, as RunComfy's clients do it."""
    started = time.perf_counter()
    headers = {"Prefer": f"wait={args.wait}"} if args.wait else {}
    response = api.post(f"/v1/models/{OVIS_IMAGE.model_id}", json=body, headers=headers)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    if "status" not in answer:  # the submit body, not the result: poll
        while api.get(answer["status_url"]).json()["status"] not in FINAL_STATUSES:
            time.sleep(args.poll)
        answer = api.get(answer["result_url"]).json()
    if answer["status"] != "succeeded":
        raise RuntimeError(f"request {answer['request_id']} {answer['status']}: {answer}")
    image = files.get(answer["output"]["image"])  # a plain GET, no Authorization
    image.raise_for_status()
    Path(args.out_dir, f"{answer['request_id']}.png").write_bytes(image.content)
    return time.perf_counter() - started


def drive(base: str, token: str, bodies: list[dict[str, Any]], args: argparse.Namespace) -> Run:
    """``--concurrency`` clients take the requests one after another until none are left."""
    pending = iter(bodies)
    lock = threading.Lock()
    latencies: list[float] = []
    timeout = httpx.Timeout(60.0 + (args.wait or 0))

    def client() -> None:
        auth = {"Authorization": f"Bearer {token}"}
        with (
            httpx.Client(base_url=base, headers=auth, timeout=timeout) as api,
            httpx.Client(timeout=timeout) as files,
        ):
            while True:
                with lock:
                    body = next(pending, None)
                if body is None:
                    return
                latencies.append(one_request(api, files, body, args))

    mode = f"Prefer: wait={args.wait}" if args.wait else "polling"
    with ThreadPoolExecutor(args.concurrency) as pool:
        started = time.perf_counter()
        for future in [pool.submit(client) for _ in range(args.concurrency)]:
            future.result()
        seconds = time.perf_counter() - started
    return Run(f"HTTP, {args.concurrency} clients, {mode}", seconds, latencies)


def engine_alone(
    args: argparse.Namespace, data_dir: Path, requests: list[GenerationRequest]
) -> tuple[Run, str]:
    """The same images made by the engine in this process, in the worker's batches."""
    import torch

    from ovis_server.engine.pipeline import Engine
    from ovis_server.engine.weights import resolve_weights

    engine = Engine.load(resolve_weights(args.model, data_dir), device=args.device, fp8=args.fp8)
    limit = Settings(data_dir=data_dir).batch_limit(engine.device.type)
    batch = max(min(args.concurrency, limit), 1)
    groups = [requests[start : start + batch] for start in range(0, len(requests), batch)]
    engine.generate_batch(groups[0])  # warm-up (and compile, on CUDA)
    latencies: list[float] = []
    started, cpu = time.perf_counter(), os.times()
    for group in groups:
        call = time.perf_counter()
        engine.generate_batch(group)  # PIL images: the device has finished
        latencies += [time.perf_counter() - call] * len(group)
    seconds = time.perf_counter() - started
    after = os.times()
    engine_cpu = after.user + after.system - cpu.user - cpu.system
    device = engine.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    dtype = str(engine.dtype).removeprefix("torch.")
    about = f"{device} ({name}), {dtype}; torch {torch.__version__}"
    run = Run(f"engine alone, batches of {batch}", seconds, latencies, {"engine": engine_cpu})
    return run, about


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, random-full, or a PATH/hub id")
    parser.add_argument("--size", default="square_hd", help="a preset name, or WxH")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fp8", action="store_true", help="FP8 matmuls, server and engine")
    parser.add_argument("--url", help="a running server to drive instead of starting one")
    parser.add_argument("--token", help="its API token (with --url)")
    parser.add_argument("--wait", type=int, default=0, help="send Prefer: wait=N on submits")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between status GETs")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    if args.url and not args.token:
        parser.error("--url needs --token")
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")

    inputs = [
        OvisImageInput.model_validate(
            {
                "prompt": PROMPTS[index % len(PROMPTS)],
                "image_size": parse_image_size(args.size),
                "num_inference_steps": args.steps,
                "seed": index,
            }
        )
        for index in range(args.concurrency + args.requests)
    ]
    bodies = [item.model_dump(mode="json") for item in inputs]
    warmup, timed = bodies[: args.concurrency], bodies[args.concurrency :]
    with tempfile.TemporaryDirectory(prefix="ovis-serve-bench-") as scratch:
        data_dir = Path(scratch, "data")
        data_dir.mkdir()
        args.out_dir = Path(scratch, "downloads")
        args.out_dir.mkdir()
        with (
            contextlib.nullcontext((args.url.rstrip("/"), args.token, None))
            if args.url
            else local_server(args, data_dir)
        ) as (base, token, pid):
            drive(base, token, warmup, args)  # warm-up: the first calls, the prompt cache
            meter = CpuMeter(pid)
            with meter.measuring():
                http = drive(base, token, timed, args)
            http.cpu = meter.spent
        requests = [item.to_generation_request(index) for index, item in enumerate(inputs)]
        engine, about = engine_alone(args, data_dir, requests[args.concurrency :])

    width, height = inputs[0].dimensions()
    print(f"# ovis-server serving benchmark, {dt.date.today().isoformat()}")
    print(f"server: {args.url or 'ovis-server serve, started here on loopback'}")
    print(f"model: {args.model}; {width}x{height}, {args.steps} steps; engine on {about}")
    print(
        f"{args.requests} requests from {args.concurrency} clients after {args.concurrency} "
        "warm-up requests; latency: HTTP from submit to downloaded file, engine one call"
    )
    print()
    print("| run | images | images / min | latency p50 | latency p95 | latency max |")
    print("|---|---:|---:|---:|---:|---:|")
    for run in (http, engine):
        p50, p95 = percentile(run.latencies, 0.5), percentile(run.latencies, 0.95)
        print(
            f"| {run.label} | {len(run.latencies)} | {run.per_minute:.1f} | {p50:.2f} s | "
            f"{p95:.2f} s | {max(run.latencies):.2f} s |"
        )
    print()
    print("CPU time per image, by process (user + system; the server's only when started here):")
    print()
    print("| run | process | CPU per image |")
    print("|---|---|---:|")
    for run in (http, engine):
        for name, seconds in run.cpu.items():
            print(f"| {run.label} | {name} | {1000 * seconds / len(run.latencies):.0f} ms |")
    print()
    print(f"end-to-end / engine: {http.per_minute / engine.per_minute:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
