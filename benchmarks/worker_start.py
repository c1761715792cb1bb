"""Worker start-up benchmark: the CPU a worker spends from its start to ready, and from
its stop to its exit.

Starts ``ovis-server serve`` on a fresh data directory, waits for /readyz, and reads the
worker process's CPU time (user + system, /proc, so Linux only), the part of it spent in
garbage collections (GC_PROBE below) and the wall time from serve's start to ready; then
stops serve (SIGTERM) and reads the worker's CPU and serve's until they exit (every 10 ms,
and once more as zombies). With ``--baseline SRC`` (the ``src`` folder of another
checkout) each round starts this checkout's server and the baseline's in turn, the same
model and settings, and the table shows both with the ratio of start-up CPU, per round and
its median: rounds interleave, as this machine's load drifts.

    python benchmarks/worker_start.py --model tiny --rounds 6 --baseline ../old/src

The model's weights are built once (``tiny``: the tiny checkpoint, written to a temporary
folder) or read from a local diffusers folder given as ``--model``.
"""

from __future__ import annotations

import sys

# Run as a script, this folder comes first on sys.path, and its queue.py would hide the
# standard library's queue module from httpx and everything else imported below.
if sys.path and sys.path[0] == __file__.rsplit("/", 1)[0]:
    sys.path[0] = __file__.rsplit("/", 2)[0]  # the repository: benchmarks.common

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import cpu_seconds, free_port, proc_stat, ready, stop

SRC = Path(__file__).resolve().parents[1] / "src"
WORKER_LINE = re.compile(r"started worker process (\d+)")


@dataclass
class Start:
    worker_cpu: float  # seconds of CPU, the worker's start to ready
    wall: float  # seconds, serve's start to /readyz ready
    gc_cpu: float = 0.0  # seconds of the worker's CPU in garbage collections, start to ready
    worker_stop_cpu: float = 0.0  # seconds of CPU, the worker's, from the stop to its exit
    serve_stop_cpu: float = 0.0  # the same, serve's own process


MEASURES = {  # a table row each: the field, and what it measures
    "worker_cpu": "worker CPU, start to ready",
    "gc_cpu": "worker CPU in garbage collection, start to ready",
    "wall": "serve, start to ready (wall)",
    "worker_stop_cpu": "worker CPU, stop to exit",
    "serve_stop_cpu": "serve CPU, stop to exit",
}


# Imported by every Python process started with its folder first on PYTHONPATH (site.py
# imports ``sitecustomize``): it times each garbage collection, and SIGUSR1 has the process
# write the total to GC_FILE.<pid>.
GC_PROBE = """
import gc, os, signal, time
_total, _began = [0.0], [0.0]
def _time(phase, info):
    if phase == "start":
        _began[0] = time.process_time()
    else:
        _total[0] += time.process_time() - _began[0]
def _write(signum, frame):
    with open(os.environ["GC_FILE"] + "." + str(os.getpid()), "w") as out:
        out.write(repr(_total[0]))
gc.callbacks.append(_time)
signal.signal(signal.SIGUSR1, _write)
"""


def gc_seconds(pid: int, gc_file: Path, timeout: float = 10.0) -> float:
    """The seconds of CPU process ``pid`` has spent in garbage collections (GC_PROBE)."""
    written = Path(f"{gc_file}.{pid}")
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return float(written.read_text())
        time.sleep(0.02)
    raise RuntimeError(f"process {pid} did not say its garbage collection time")


def exited(pid: int) -> bool:
    """Whether process ``pid`` has ended (gone, or a zombie not yet reaped)."""
    fields = proc_stat(pid)
    return fields is None or fields[0] == "Z"


def stop_and_watch(process: subprocess.Popen[bytes], worker: int) -> tuple[float, float]:
    """SIGTERM to serve; the CPU its worker ``worker`` and serve itself spend from then to
    their exits. Each is read every 10 ms and once more as a zombie (serve stays one until
    it is waited for; the worker until serve waits for it, if it is still one). After two
    minutes it stops watching: the caller's ``stop`` kills what is left."""
    before = {worker: cpu_seconds(worker), process.pid: cpu_seconds(process.pid)}
    last = dict(before)
    process.terminate()
    deadline = time.monotonic() + 120
    while not all(exited(pid) for pid in last) and time.monotonic() < deadline:
        for pid in last:
            last[pid] = max(last[pid], cpu_seconds(pid))  # 0 once it is gone
        time.sleep(0.01)
    for pid in last:
        last[pid] = max(last[pid], cpu_seconds(pid))
    return last[worker] - before[worker], last[process.pid] - before[process.pid]


def start_once(src: Path, model: str, scratch: Path, timeout: float) -> Start:
    data_dir = Path(tempfile.mkdtemp(dir=scratch))
    port = free_port()
    log = data_dir / "serve.log"
    probe = data_dir / "gc-probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(GC_PROBE)
    gc_file = data_dir / "gc"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(probe), str(src)]),
        "OMP_NUM_THREADS": "1",
        "GC_FILE": str(gc_file),
    }
    started = time.monotonic()
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "ovis_server", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--model", model, "--data-dir", str(data_dir), "--no-auth"],
            env=env, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        while not ready(base):
            if process.poll() is not None or time.monotonic() - started > timeout:
                raise RuntimeError(f"serve did not get ready:\n{log.read_text()}")
            time.sleep(0.05)
        wall = time.monotonic() - started
        found = WORKER_LINE.search(log.read_text())
        if found is None:
            raise RuntimeError(f"no worker in serve's log:\n{log.read_text()}")
        worker = int(found[1])
        start = Start(cpu_seconds(worker), wall)
        start.gc_cpu = gc_seconds(worker, gc_file)
        start.worker_stop_cpu, start.serve_stop_cpu = stop_and_watch(process, worker)
        return start
    finally:
        stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, or a local diffusers folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="the src folder of another checkout")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to ready")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    trees = {"this checkout": SRC}
    if args.baseline is not None:
        if not (args.baseline / "ovis_server").is_dir():
            parser.error(f"--baseline {args.baseline}: no ovis_server package there")
        trees = {"baseline": args.baseline.resolve(), **trees}
    with tempfile.TemporaryDirectory(prefix="ovis-worker-start-") as scratch:
        model = args.model
        if model == "tiny":
            model = str(Path(scratch, "tiny"))
            subprocess.run([sys.executable, "-m", "ovis_server", "tiny-model", model],
                           env={**os.environ, "PYTHONPATH": str(SRC)}, check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
        runs: dict[str, list[Start]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, src in trees.items():
                runs[name].append(start_once(src, model, Path(scratch), args.timeout))
    print(f"# worker start-up, {args.model}, {args.rounds} round(s), OMP_NUM_THREADS=1")
    print()
    print("| measure | " + " | ".join(f"{name} (median) | range" for name in runs) + " |")
    print("|---|" + "---:|---:|" * len(runs))
    for field, measure in MEASURES.items():
        cells = []
        for starts in runs.values():
            values = [getattr(start, field) for start in starts]
            cells.append(
                f"{statistics.median(values):.2f} s | {min(values):.2f}-{max(values):.2f} s"
            )
        print(f"| {measure} | {' | '.join(cells)} |")
    if args.baseline is not None:
        ratios = [
            new.worker_cpu / old.worker_cpu
            for old, new in zip(runs["baseline"], runs["this checkout"], strict=True)
        ]
        print()
        print(
            "worker CPU, start to ready, this checkout / baseline: median "
            f"{statistics.median(ratios):.2f} (rounds: {' '.join(f'{r:.2f}' for r in ratios)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
