"""Cancel-load benchmark: does one token's burst of cancels slow another token down?

Starts ``ovis-server serve --no-worker`` on SQLite in a temporary folder, and plays the
worker itself: it claims token A's job and never finishes it, so every cancel finds the
job running (the case the server used to answer by sleeping until the worker stopped,
up to 2 s in a server thread). Then token A sends ``--cancels`` concurrent cancels,
``--rounds`` times, while token B polls the status of its own job from ``--pollers``
threads. Prints a table of latencies:

- token B's status calls with nothing else going on;
- token B's status calls during the cancel bursts;
- token A's cancels.

    python benchmarks/cancel_load.py --cancels 60 --rounds 3
"""

from __future__ import annotations

import sys

# Run as a script, this file's folder comes first on sys.path, where benchmarks/queue.py
# would hide the standard library's queue module from everything imported below.
if sys.path and sys.path[0] == __file__.rsplit("/", 1)[0]:
    del sys.path[0]

import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from ovis_server.db.connect import connect, sqlite_url
from ovis_server.jobs.store import JobStore

MODEL_PATH = "/v1/models/aidc-ai/ovis-image"
JOB_INPUT = {
    "prompt": "cancel benchmark",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 1,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cli(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "ovis_server", *args],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ.copy(),
    ).stdout


def token(data_dir: Path, name: str) -> str:
    printed = cli("token", "create", "--name", name, "--data-dir", str(data_dir))
    return printed.strip().splitlines()[-1]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def poll_status(
    base_url: str, secret: str, request_id: str, pollers: int, until: threading.Event
) -> list[float]:
    """Status latencies of ``pollers`` threads polling until ``until`` is set."""
    latencies: list[float] = []
    lock = threading.Lock()

    def poll() -> None:
        headers = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
            while not until.is_set():
                started = time.perf_counter()
                client.get(f"/v1/requests/{request_id}/status").raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - started)
                time.sleep(0.01)

    threads = [threading.Thread(target=poll) for _ in range(pollers)]
    for thread in threads:
        thread.start()
    until.wait()
    for thread in threads:
        thread.join()
    return latencies


def run(
    cancels: int, rounds: int, pollers: int, idle_seconds: float
) -> list[tuple[str, list[float]]]:
    with tempfile.TemporaryDirectory(prefix="ovis-cancel-bench-") as folder:
        data_dir = Path(folder)
        alice, bob = token(data_dir, "alice"), token(data_dir, "bob")
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        log = (data_dir / "serve.log").open("wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "ovis_server", "serve", "--no-worker",
             "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start")
                time.sleep(0.2)

            def submit(secret: str) -> str:
                headers = {"Authorization": f"Bearer {secret}"}
                answer = httpx.post(base_url + MODEL_PATH, json=JOB_INPUT, headers=headers)
                answer.raise_for_status()
                request_id: str = answer.json()["request_id"]
                return request_id

            mine, theirs = submit(alice), submit(bob)
            # Play a worker that took token A's job and is slow to stop it.
            store = JobStore(connect(sqlite_url(data_dir)))
            claimed = store.claim_next("bench-worker", lease_seconds=3600)
            if claimed is None or claimed.id != mine:
                raise RuntimeError("could not claim token A's job")

            idle_done = threading.Event()
            threading.Timer(idle_seconds, idle_done.set).start()
            idle = poll_status(base_url, bob, theirs, pollers, idle_done)

            cancel_latencies: list[float] = []
            busy_done = threading.Event()
            busy: list[float] = []
            watcher = threading.Thread(
                target=lambda: busy.extend(poll_status(base_url, bob, theirs, pollers, busy_done))
            )
            watcher.start()

            # One client, its connections kept: the cost measured is the server's.
            limits = httpx.Limits(max_connections=cancels, max_keepalive_connections=cancels)
            headers = {"Authorization": f"Bearer {alice}"}
            with (
                httpx.Client(base_url=base_url, headers=headers, limits=limits, timeout=60) as a,
                ThreadPoolExecutor(cancels) as pool,
            ):

                def cancel(_: int) -> float:
                    started = time.perf_counter()
                    a.post(f"/v1/requests/{mine}/cancel").raise_for_status()
                    return time.perf_counter() - started

                for _ in range(rounds):
                    cancel_latencies += pool.map(cancel, range(cancels))
            busy_done.set()
            watcher.join()
        finally:
            server.terminate()
            server.wait(30)
            log.close()
    return [
        ("status (token B), no cancels", idle),
        (f"status (token B), during {cancels} concurrent cancels x {rounds}", busy),
        ("cancel of a running job (token A)", cancel_latencies),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cancels", type=int, default=60, help="concurrent cancels per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pollers", type=int, default=4, help="token B's polling threads")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    rows = run(args.cancels, args.rounds, args.pollers, args.idle_seconds)
    print("| requests | count | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for name, values in rows:
        if not values:
            print(f"| {name} | 0 | n/a | n/a | n/a |")
            continue
        print(
            f"| {name} | {len(values)} | {statistics.median(values) * 1000:.1f} "
            f"| {percentile(values, 0.99) * 1000:.1f} | {max(values) * 1000:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
