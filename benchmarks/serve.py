"""Serving benchmark: images per minute through the HTTP API, against the engine alone.

Starts ``ovis-server serve`` on a free loopback port with a fresh data directory and token
(or targets ``--url`` with ``--token``), loads the same model in this process with the
worker's settings (its memory profile and batch limit as /readyz reports them, its compile
cache, torch's threads as the worker has them) and warms both up on the timed shape. Then
it alternates ``--rounds`` pairs of rounds, engine alone then HTTP (A B A B ...), each of
``--requests`` images of the same model, size and steps, so that both sides meet the same
machine load:

- engine alone: the images in batches of the worker's size (``Engine.generate_pixels``:
  the pixels the worker hands its finisher thread), one call after another;
- HTTP: ``--concurrency`` clients send the requests as RunComfy's clients do: POST the
  input, GET its status until completed, failed or cancelled, GET the result, download the
  image (with ``--wait N``, the submit carries ``Prefer: wait=N``).

Prints each round, the latencies (HTTP: submit to downloaded file; engine: one call), the
CPU time per image by process, what the worker's extra CPU per image goes to, and last
``end-to-end / engine: median R (range LOW to HIGH over N rounds)``: the median of the
rounds' ratios of images per minute. The worker cannot make images faster than the engine
alone with the same batches, so a median above 1.05 is a fault of the measurement, and the
line before says so.

    python benchmarks/serve.py --model tiny --size 512x512 --steps 8 --requests 8 --concurrency 4
    python benchmarks/serve.py --model random-full --size square_hd --concurrency 4

``--model-id`` picks the catalogue entry (default Ovis-Image); ``--steps`` defaults to the
model's own default. With ``--url`` the engine rounds run on this machine (``--device``):
compare like with like.
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
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from benchmarks.common import (
    PROMPTS,
    cpu_seconds,
    create_token,
    default_steps,
    free_port,
    model_input,
    model_spec,
    ready,
    stop,
)
from ovis_server.catalogue import DEFAULT_MODEL_ID, ModelInput, ModelSpec
from ovis_server.cli import parse_image_size
from ovis_server.config import Settings
from ovis_server.engine.request import GenerationRequest

if TYPE_CHECKING:
    from ovis_server.engine.pipeline import Engine

FINAL_STATUSES = {"completed", "failed", "cancelled"}
# The most end-to-end may exceed the engine alone by noise: beyond it the benchmark is wrong.
RATIO_CEILING = 1.05


@dataclass
class Run:
    label: str
    seconds: float
    latencies: list[float]
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by process

    @property
    def per_minute(self) -> float:
        return len(self.latencies) * 60 / self.seconds


@dataclass
class Baseline:
    """The engine in this process, set up as the server's worker is."""

    engine: Engine
    limit: int  # the worker's batch limit
    about: str


def percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: the smallest value with ``fraction`` of them at or below it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


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
    (the clients, or the engine alone) between ``start`` and ``stop``."""

    server_pid: int | None
    own_label: str = "clients (this process)"
    spent: dict[str, float] = field(default_factory=dict)

    def sample(self) -> dict[str, float]:
        own = os.times()
        sample = {self.own_label: own.user + own.system}
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
    token = create_token(data_dir)
    port = free_port()
    command = [sys.executable, "-m", "ovis_server", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--data-dir", str(data_dir), "--model", args.model]
    command += ["--model-id", args.model_id, "--device", args.device, "--log-level", "warning"]
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
        yield base, token, process.pid
    finally:
        stop(process)


def worker_report(base: str, model_id: str) -> dict[str, Any]:
    """The ready worker of ``model_id`` as /readyz shows it (profile, batch limit)."""
    workers = httpx.get(f"{base}/readyz", timeout=10).json().get("workers", [])
    for worker in workers:
        if worker.get("model") == model_id and worker.get("phase") == "ready":
            return dict(worker)
    return {}


def one_request(
    api: httpx.Client,
    files: httpx.Client,
    body: dict[str, Any],
    args: argparse.Namespace,
) -> float:
    """Seconds from submit to the image downloaded, as RunComfy's clients do it."""
    started = time.perf_counter()
    headers = {"Prefer": f"wait={args.wait}"} if args.wait else {}
    response = api.post(f"/v1/models/{args.model_id}", json=body, headers=headers)
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
    clients = f"{args.concurrency} client{'s' if args.concurrency > 1 else ''}"
    return Run(f"HTTP, {clients}, {mode}", seconds, latencies)


def load_baseline(
    args: argparse.Namespace, spec: ModelSpec, data_dir: Path, worker: dict[str, Any]
) -> Baseline:
    """The model loaded in this process as the server's worker loads it: the same settings,
    the worker's memory profile and the same compile cache."""
    import torch

    from ovis_server.engine.compile_cache import use_compile_cache

    settings = Settings(
        data_dir=data_dir,
        model=args.model,
        model_ids=(spec.model_id,),
        device=args.device,
        fp8=args.fp8,
        memory=worker.get("memory_profile") or "auto",
    )
    if settings.compile != "off":
        use_compile_cache(settings.compile_cache_dir)  # the worker's, warm by now
    engine = spec.load_engine(settings)
    limit = settings.batch_limit(engine.device.type, engine.memory.batch_limit)
    limit = min(limit, worker.get("batch_limit") or limit)
    device = engine.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    dtype = str(engine.dtype).removeprefix("torch.")
    about = (
        f"{device} ({name}), {dtype}, memory {engine.memory.profile}, compiled "
        f"{'yes' if engine.compiled else 'no'}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}"
    )
    return Baseline(engine, limit, about)


def engine_round(engine: Engine, batch: int, requests: Sequence[GenerationRequest]) -> Run:
    """The images of ``requests`` made by the engine alone, in batches of ``batch``."""
    groups = [requests[start : start + batch] for start in range(0, len(requests), batch)]
    latencies: list[float] = []
    meter = CpuMeter(None, own_label="engine (this process)")
    with meter.measuring():
        started = time.perf_counter()
        for group in groups:
            call = time.perf_counter()
            engine.generate_pixels(group)  # host pixels: the device has finished
            latencies += [time.perf_counter() - call] * len(group)
        seconds = time.perf_counter() - started
    return Run(f"engine alone, batches of {batch}", seconds, latencies, meter.spent)


def file_cost(engine: Engine, request: GenerationRequest, repeats: int = 3) -> dict[str, float]:
    """CPU seconds, per image, of what the worker's finisher does with the pixels that the
    engine alone stops at: make the PIL image, encode it as PNG (median of ``repeats``, on
    an image of the case's size made by the engine)."""
    from ovis_server.engine.images import encode_image, to_image

    (pixels,) = engine.generate_pixels([request])
    assert pixels is not None
    costs: dict[str, list[float]] = {"to PIL image": [], "PNG encode": []}
    for _ in range(repeats):
        started = time.process_time()
        image = to_image(pixels)
        middle = time.process_time()
        encode_image(image, "png")
        costs["to PIL image"].append(middle - started)
        costs["PNG encode"].append(time.process_time() - middle)
    return {name: statistics.median(values) for name, values in costs.items()}


@dataclass
class Case:
    """One size at one number of clients: its rounds, engine alone then HTTP."""

    size: str
    clients: int
    requests: int  # images per round
    width: int = 0
    height: int = 0
    batch: int = 1
    rounds: list[tuple[Run, Run]] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)
    skipped: str = ""

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}, {self.clients} client{'s' if self.clients > 1 else ''}"

    def ratios(self) -> list[float]:
        return [http.per_minute / engine.per_minute for engine, http in self.rounds]


def run_case(
    case: Case,
    args: argparse.Namespace,
    spec: ModelSpec,
    base: str,
    token: str,
    pid: int | None,
    baseline: Baseline,
    seeds: Iterator[int],
    warm_http: bool,
) -> None:
    """Warm both sides up on the case's shape, then its rounds, A B A B."""
    size = parse_image_size(case.size)

    def inputs(count: int) -> list[ModelInput]:
        return [
            model_input(spec, PROMPTS[n % len(PROMPTS)], size, args.steps, next(seeds))
            for n in range(count)
        ]

    warm = inputs(case.clients)
    first = warm[0].to_generation_request(0)
    case.width, case.height = first.width, first.height
    fitting = baseline.engine.memory.batch_fitting(first.width, first.height, baseline.limit)
    case.batch = max(min(case.clients, fitting), 1)
    engine = baseline.engine
    # The first calls of this shape (compiled, or loaded from the worker's cache) and the
    # prompts' encodings, on both sides.
    engine.generate_pixels([item.to_generation_request(0) for item in warm[: case.batch]])
    if warm_http:
        case_args = argparse.Namespace(**{**vars(args), "concurrency": case.clients})
        drive(base, token, [item.model_dump(mode="json") for item in warm], case_args)
    case_args = argparse.Namespace(**{**vars(args), "concurrency": case.clients})
    for number in range(args.rounds):
        items = inputs(case.requests)
        requests = [item.to_generation_request(item_seed(item)) for item in items]
        alone = engine_round(engine, case.batch, requests)
        meter = CpuMeter(pid)
        with meter.measuring():
            http = drive(base, token, [item.model_dump(mode="json") for item in items], case_args)
        http.cpu = meter.spent
        case.rounds.append((alone, http))
        print(
            f"{case.label}, round {number + 1}: engine {alone.seconds:.2f} s, HTTP "
            f"{http.seconds:.2f} s, ratio {alone.seconds / http.seconds:.2f}",
            file=sys.stderr,
            flush=True,
        )
    case.costs = file_cost(engine, first)


def item_seed(item: ModelInput) -> int:
    seed = getattr(item, "seed", None)
    return int(seed) if seed is not None else 0


def parse_list(text: str, kind: type[int] | type[str]) -> list[Any]:
    return [kind(part.strip()) for part in text.split(",") if part.strip()]


def own_session() -> int | None:
    """Run in a session of our own, as the worker runs in one (serve starts it so): Linux's
    autogroup scheduling shares the CPU between sessions first, so an engine left in the
    caller's session would share one slice with whatever else that session runs (a test
    suite, a build) while the worker has a slice to itself. A process-group leader cannot
    start a session: this one runs itself again in a new one, and returns its exit code."""
    if os.getsid(0) == os.getpid():
        return None  # a session leader already (benchmarks/gpu/suite.py starts it so)
    try:
        os.setsid()
    except PermissionError:
        child = subprocess.Popen([sys.executable, *sys.argv], start_new_session=True)
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)  # the terminal's Ctrl-C does not reach it
            return child.wait()
    return None


def main(argv: list[str] | None = None) -> int:
    if argv is None and (code := own_session()) is not None:
        return code
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, random-full, or a PATH/hub id")
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="the catalogue entry")
    parser.add_argument("--size", default="square_hd", help="presets or WxH, comma-separated")
    parser.add_argument("--steps", type=int, help="default: the model's own default")
    parser.add_argument("--requests", type=int, help="images per round (default: one per client)")
    parser.add_argument("--rounds", type=int, default=3, help="engine-alone and HTTP pairs")
    parser.add_argument("--concurrency", default="4", help="clients, comma-separated: 4,1")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fp8", action="store_true", help="FP8 matmuls, server and engine")
    parser.add_argument("--url", help="a running server to drive instead of starting one")
    parser.add_argument("--token", help="its API token (with --url)")
    parser.add_argument("--wait", type=int, default=0, help="send Prefer: wait=N on submits")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between status GETs")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument(
        "--budget", type=float, help="seconds: start no case after this (the rest: skipped)"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.url and not args.token:
        parser.error("--url needs --token")
    clients = parse_list(args.concurrency, int)
    sizes = parse_list(args.size, str)
    if not clients or min(clients) < 1 or args.rounds < 1 or (args.requests or 1) < 1:
        parser.error("--requests, --rounds and --concurrency must be at least 1")
    spec = model_spec(args.model_id)
    if args.steps is None:
        args.steps = default_steps(spec)
    cases = [Case(size, count, args.requests or count) for count in clients for size in sizes]
    seeds = iter(range(10**9))
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
            worker = worker_report(base, spec.model_id)
            baseline = load_baseline(args, spec, data_dir, worker)
            print_header(args, spec, worker, baseline)
            for number, case in enumerate(cases):
                if args.budget is not None and time.monotonic() - started > args.budget:
                    case.skipped = f"not run: the {args.budget:.0f} s budget was spent"
                else:
                    run_case(case, args, spec, base, token, pid, baseline, seeds, number == 0)
                print_case(args, case)
    print()
    for case in cases:
        print(summary(case))
    return 0


def print_header(
    args: argparse.Namespace, spec: ModelSpec, worker: dict[str, Any], baseline: Baseline
) -> None:
    print(f"# ovis-server serving benchmark, {dt.date.today().isoformat()}")
    print(f"server: {args.url or 'ovis-server serve, started here on loopback'}")
    print(f"model: {spec.model_id} ({args.model}), {args.steps} steps; engine on {baseline.about}")
    try:
        autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        autogroup = False
    print(
        f"this process: session {os.getsid(0)} of its own, as the worker's "
        f"(autogroup scheduling {'on' if autogroup else 'off'})"
    )
    mode = f"Prefer: wait={args.wait}" if args.wait else f"polling every {args.poll} s"
    print(
        f"worker: memory {worker.get('memory_profile', '?')}, batches of up to "
        f"{worker.get('batch_limit', '?')}; per case {args.rounds} rounds, each the engine "
        f"alone then HTTP ({mode}); latency: HTTP from submit to downloaded file, engine "
        "one call",
        flush=True,
    )


def print_case(args: argparse.Namespace, case: Case) -> None:
    print()
    if case.skipped:
        print(f"## {case.size}, {case.clients} client(s): {case.skipped}", flush=True)
        return
    print(f"## {case.label}: rounds of {case.requests} images, engine batches of {case.batch}")
    print()
    print("| round | engine alone | HTTP | engine images / min | HTTP images / min | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for number, ((engine, http), ratio) in enumerate(
        zip(case.rounds, case.ratios(), strict=True), 1
    ):
        print(
            f"| {number} | {engine.seconds:.2f} s | {http.seconds:.2f} s | "
            f"{engine.per_minute:.1f} | {http.per_minute:.1f} | {ratio:.2f} |"
        )
    print()
    print("| run | images | images / min | latency p50 | latency p95 | latency max |")
    print("|---|---:|---:|---:|---:|---:|")
    for side in (1, 0):
        runs = [pair[side] for pair in case.rounds]
        latencies = [value for run in runs for value in run.latencies]
        per_minute = len(latencies) * 60 / sum(run.seconds for run in runs)
        print(
            f"| {runs[0].label} | {len(latencies)} | {per_minute:.1f} | "
            f"{percentile(latencies, 0.5):.2f} s | {percentile(latencies, 0.95):.2f} s | "
            f"{max(latencies):.2f} s |"
        )
    print()
    print("CPU time per image, by process (user + system; the server's only when started here):")
    print()
    print("| run | process | CPU per image |")
    print("|---|---|---:|")
    images = len(case.rounds) * case.requests
    per_image: dict[tuple[str, str], float] = {}
    for side in (1, 0):
        for run in (pair[side] for pair in case.rounds):
            for name, seconds in run.cpu.items():
                key = (run.label, name)
                per_image[key] = per_image.get(key, 0.0) + seconds / images
    for (label, name), seconds in per_image.items():
        print(f"| {label} | {name} | {1000 * seconds:.0f} ms |")
    worker_cpu = next((s for (_, n), s in per_image.items() if n == "worker processes"), None)
    engine_cpu = next((s for (_, n), s in per_image.items() if n.startswith("engine")), None)
    print()
    made = ", ".join(f"{name} {1000 * seconds:.0f} ms" for name, seconds in case.costs.items())
    if worker_cpu is not None and engine_cpu is not None:
        extra = 1000 * (worker_cpu - engine_cpu)
        print(
            f"worker CPU per image beyond the engine alone: {extra:.0f} ms; of it, measured "
            f"here on one {case.width}x{case.height} image: {made}"
        )
    else:
        print(f"the finisher's work per image, measured here: {made}")
    middle = statistics.median(case.ratios())
    if middle > RATIO_CEILING:
        print()
        print(
            f"warning: the median ratio {middle:.2f} is above {RATIO_CEILING}: the server "
            "cannot beat the engine alone with the same batches, so the measurement is wrong"
        )
    sys.stdout.flush()


def summary(case: Case) -> str:
    if case.skipped:
        return f"end-to-end / engine, {case.size}, {case.clients} client(s): {case.skipped}"
    ratios = case.ratios()
    return (
        f"end-to-end / engine, {case.label}: median {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f} to {max(ratios):.2f} over {len(ratios)} rounds)"
    )


if __name__ == "__main__":
    sys.exit(main())
