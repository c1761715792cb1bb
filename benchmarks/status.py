"""Status benchmark: what a status call costs against a bare FastAPI route, in one run.

Starts ``ovis-server serve --no-worker`` (SQLite in a temporary folder, or the
PostgreSQL server ``--postgres-url`` names, on a database of its own) with one queued job,
and beside it a bare FastAPI app under uvicorn, as serve runs it (access log on), whose one
route returns a fixed body of the same shape: the cost of the framework alone. Then
``--rounds`` rounds, interleaved (status, bare, status, bare…, so that whatever else the
machine does falls on both alike), of ``--calls`` GETs each from ``--clients`` threads
over loopback, every thread with one kept-alive connection. Prints each round's calls per
second and median latency, the median and range of each, and the ratio of the medians:

    status / bare: R

    python benchmarks/status.py --clients 50 --calls 3000 --rounds 5
    python benchmarks/status.py --postgres-url postgresql://user:pass@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import sys

# Run as a script, this file's folder comes first on sys.path, where benchmarks/queue.py
# would hide the standard library's queue module from everything imported below: the
# repository's root takes its place (for benchmarks.common).
if sys.path and sys.path[0] == __file__.rsplit("/", 1)[0]:
    sys.path[0] = sys.path[0].rsplit("/", 1)[0]

import argparse
import http.client
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from benchmarks.common import TLS, create_token, free_port, stop

MODEL_PATH = "/v1/models/aidc-ai/ovis-image"
JOB_INPUT = {
    "prompt": "status benchmark",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 1,
}


def bare_app(log_level: str, port: int, asynchronous: bool) -> None:
    """The baseline: FastAPI, one route, the status body's shape, nothing else."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()
    body = {
        "request_id": "bare",
        "status": "in_queue",
        "status_url": "http://127.0.0.1/v1/requests/bare/status",
        "result_url": "http://127.0.0.1/v1/requests/bare/result",
        "queue_position": 0,
        "created_at": "2026-12-05T00:00:00.000Z",
    }
    if asynchronous:

        @app.get("/v1/requests/{request_id}/status")
        async def status_async(request_id: str) -> dict[str, Any]:
            return body

    else:

        @app.get("/v1/requests/{request_id}/status")
        def status(request_id: str) -> dict[str, Any]:
            return body

    uvicorn.run(app, host="127.0.0.1", port=port, log_level=log_level, proxy_headers=True)


def wait_healthy(base_url: str, process: subprocess.Popen[bytes], path: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base_url + path, timeout=2, verify=TLS).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"{base_url} did not start")
        time.sleep(0.2)


@contextmanager
def postgres_database(admin_url: str | None) -> Iterator[str | None]:
    """A new PostgreSQL database for the run (dropped after it), or None for SQLite."""
    if not admin_url:
        yield None
        return
    import psycopg

    name = "ovis_status_bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(admin_url)._replace(path="/" + name))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def expected(request_id: str) -> bytes:
    """What every answer's body holds: the request's id, and that it waits in the queue."""
    return f'"request_id":"{request_id}","status":"in_queue"'.encode()


def hammer(
    port: int, path: str, headers: dict[str, str], expect: bytes, clients: int, calls: int
) -> Round:
    """``calls`` GETs of ``path`` from ``clients`` threads, one connection each; every
    answer must be a 200 whose body holds ``expect``."""
    latencies: list[float] = []
    lock = threading.Lock()
    left = [calls]
    go = threading.Barrier(clients + 1)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine: list[float] = []
        go.wait()
        while True:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
            started = time.perf_counter()
            conn.request("GET", path, headers=headers)
            answer = conn.getresponse()
            body = answer.read()
            mine.append(time.perf_counter() - started)
            if answer.status != 200 or expect not in body:
                raise RuntimeError(f"GET {path} answered {answer.status}: {body[:200]!r}")
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    go.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if len(latencies) != calls:
        raise RuntimeError(f"{calls - len(latencies)} calls failed")
    return Round(calls / seconds, statistics.median(latencies) * 1000)


class Round:
    def __init__(self, per_second: float, p50_ms: float) -> None:
        self.per_second = per_second
        self.p50_ms = p50_ms


def run(
    clients: int,
    calls: int,
    rounds: int,
    postgres_url: str | None,
    bare_async: bool,
    log_level: str,
    report: Callable[[str], None] = print,
) -> float:
    """Runs the rounds, prints them, returns status / bare (calls per second, medians)."""
    with (
        tempfile.TemporaryDirectory(prefix="ovis-status-bench-") as folder,
        postgres_database(postgres_url) as database_url,
    ):
        data_dir = Path(folder)
        env = os.environ.copy()
        env.pop("OVIS_SERVER_DATABASE_URL", None)
        if database_url:
            env["OVIS_SERVER_DATABASE_URL"] = database_url
        secret = create_token(data_dir, env)
        api_port, bare_port = free_port(), free_port()
        logs = [(data_dir / name).open("wb") for name in ("serve.log", "bare.log")]
        api = subprocess.Popen(
            [sys.executable, "-m", "ovis_server", "serve", "--no-worker", "--host", "127.0.0.1",
             "--port", str(api_port), "--data-dir", str(data_dir), "--log-level", log_level],
            stdout=logs[0], stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        bare = subprocess.Popen(
            [sys.executable, __file__, "--serve-bare", str(bare_port), "--log-level", log_level]
            + (["--bare-async"] if bare_async else []),
            stdout=logs[1], stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            api_url, bare_url = (f"http://127.0.0.1:{port}" for port in (api_port, bare_port))
            wait_healthy(api_url, api, "/healthz")
            wait_healthy(bare_url, bare, "/v1/requests/bare/status")
            headers = {"Authorization": f"Bearer {secret}"}
            answer = httpx.post(api_url + MODEL_PATH, json=JOB_INPUT, headers=headers)
            answer.raise_for_status()
            request_id = answer.json()["request_id"]
            status_path = f"/v1/requests/{request_id}/status"
            shown = httpx.get(api_url + status_path, headers=headers).json()
            if shown.get("status") != "in_queue":
                raise RuntimeError(f"unexpected status body: {json.dumps(shown)}")
            targets = {
                "status": (api_port, status_path, headers, expected(request_id)),
                "bare": (bare_port, "/v1/requests/bare/status", {}, expected("bare")),
            }
            for port, path, sent, expect in targets.values():  # warm both up
                hammer(port, path, sent, expect, clients, min(calls, 500))
            results: dict[str, list[Round]] = {"status": [], "bare": []}
            report("| round | target | calls / s | p50 ms |")
            report("|---:|---|---:|---:|")
            for number in range(1, rounds + 1):
                order = ["status", "bare"] if number % 2 else ["bare", "status"]
                for name in order:
                    done = hammer(*targets[name], clients, calls)
                    results[name].append(done)
                    report(f"| {number} | {name} | {done.per_second:.0f} | {done.p50_ms:.1f} |")
        finally:
            for process in (api, bare):
                stop(process)
            for log in logs:
                log.close()
    report("")
    report("| target | median calls / s | range | median p50 ms |")
    report("|---|---:|---:|---:|")
    medians: dict[str, float] = {}
    for name, measured in results.items():
        rates = [item.per_second for item in measured]
        medians[name] = statistics.median(rates)
        p50 = statistics.median(item.p50_ms for item in measured)
        report(f"| {name} | {medians[name]:.0f} | {min(rates):.0f}-{max(rates):.0f} | {p50:.1f} |")
    ratio = medians["status"] / medians["bare"]
    report("")
    report(f"status / bare: {ratio:.2f}")
    return float(ratio)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50, help="client threads")
    parser.add_argument("--calls", type=int, default=3000, help="calls per round and target")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--postgres-url", default=None, help="a PostgreSQL server to make a database on"
    )
    parser.add_argument(
        "--bare-async", action="store_true", help="the bare route as 'async def' (default: def)"
    )
    parser.add_argument("--log-level", default="info", help="both servers' (info: access log)")
    parser.add_argument("--serve-bare", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare is not None:
        bare_app(args.log_level, args.serve_bare, args.bare_async)
        return 0
    run(args.clients, args.calls, args.rounds, args.postgres_url, args.bare_async, args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
