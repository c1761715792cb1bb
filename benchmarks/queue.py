"""Queue benchmark: how fast the job store hands out jobs, and how the API holds up.

For SQLite, and for PostgreSQL when --postgres-url names a server it may create a
database on, prints a table of:

- claim throughput: jobs per second that 8 worker processes move through the store
  (claim a queued 64x64 1-step job, then complete it), without a model, so that the
  queue itself is measured;
- API load: submits per second, then status latency p50/p99, from 50 concurrent clients
  over loopback against ``ovis-server serve --no-worker``.

    python benchmarks/queue.py --postgres-url postgresql://user:pass@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import sys

# Run as a script, this file's folder comes first on sys.path, where this file's name
# would hide the standard library's queue module from everything imported below: the
# repository's root takes its place (for benchmarks.common).
if sys.path and sys.path[0] == __file__.rsplit("/", 1)[0]:
    sys.path[0] = sys.path[0].rsplit("/", 1)[0]

import argparse
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from benchmarks.common import TLS, create_token, free_port
from ovis_server.db.connect import connect, migrate, sqlite_url
from ovis_server.jobs.job import NewJob
from ovis_server.jobs.store import JobStore

JOB_INPUT = {
    "prompt": "queue benchmark",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 1,
}


def drain(url: str, worker: int, counts: multiprocessing.Queue[int]) -> None:
    """One worker process: claim and complete until the queue is empty."""
    store = JobStore(connect(url))
    done = 0
    while (job := store.claim_next(f"bench-{worker}", 30)) is not None:
        store.complete(job.id, f"bench-{worker}", [])
        done += 1
    counts.put(done)


def claim_throughput(url: str, jobs: int, workers: int) -> float:
    engine = connect(url)
    migrate(engine)
    store = JobStore(engine)
    for index in range(jobs):
        store.submit(
            NewJob(
                id=f"bench-{index}-{uuid.uuid4().hex[:8]}",
                token_id="bench",
                model_id="aidc-ai/ovis-image",
                input=JOB_INPUT,
                seed=index,
                progress_total=1,
                batch_key="aidc-ai/ovis-image:64x64:1:5.0",
            )
        )
    engine.dispose()
    context = multiprocessing.get_context("spawn")
    counts: multiprocessing.Queue[int] = context.Queue()
    processes = [context.Process(target=drain, args=(url, n, counts)) for n in range(workers)]
    started = time.perf_counter()
    for process in processes:
        process.start()
    total = sum(counts.get() for _ in processes)
    elapsed = time.perf_counter() - started
    for process in processes:
        process.join()
    assert total == jobs, f"{total} of {jobs} jobs claimed"
    return jobs / elapsed


def api_load(
    data_dir: Path, database_url: str | None, clients: int, requests: int
) -> tuple[float, float, float]:
    """(submits per second, status p50 ms, status p99 ms)."""
    port = free_port()
    env = {**os.environ}
    env.pop("OVIS_SERVER_DATABASE_URL", None)
    if database_url:
        env["OVIS_SERVER_DATABASE_URL"] = database_url
    token = create_token(data_dir, env)
    command = [sys.executable, "-m", "ovis_server", "serve", "--no-worker", "--model", "tiny"]
    command += ["--data-dir", str(data_dir), "--port", str(port), "--log-level", "warning"]
    command += ["--rate-limit", "0", "--max-queued", "0", "--max-queued-per-token", "0"]
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (data_dir / "serve.log").open("wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited ({server.returncode}); see {log.name}")
            try:
                if httpx.get(base + "/healthz", verify=TLS).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        headers = {"Authorization": f"Bearer {token}"}
        local = threading.local()

        def client() -> httpx.Client:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=base, headers=headers, timeout=60)
            return local.client  # type: ignore[no-any-return]

        def submit(_: int) -> str:
            response = client().post("/v1/models/aidc-ai/ovis-image", json=JOB_INPUT)
            response.raise_for_status()
            return str(response.json()["request_id"])

        def status(request_id: str) -> float:
            started = time.perf_counter()
            client().get(f"/v1/requests/{request_id}/status").raise_for_status()
            return time.perf_counter() - started

        with ThreadPoolExecutor(clients) as pool:
            started = time.perf_counter()
            ids = list(pool.map(submit, range(requests)))
            submits_per_second = requests / (time.perf_counter() - started)
            latencies = sorted(pool.map(status, ids))
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
        return submits_per_second, p50, p99
    finally:
        server.terminate()
        server.wait(60)
        log.close()


def fresh_postgres(admin_url: str) -> tuple[str, str]:
    import psycopg

    name = "ovis_bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(admin_url)._replace(path="/" + name)), name


def drop_postgres(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres-url", default=os.environ.get("OVIS_TEST_POSTGRES_URL"))
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        claims = claim_throughput(sqlite_url(root / "claims"), args.jobs, args.workers)
        load = api_load(root / "api", None, args.clients, args.requests)
        rows.append(("SQLite (WAL)", claims, *load))
        if args.postgres_url:
            url, name = fresh_postgres(args.postgres_url)
            try:
                claims = claim_throughput(url, args.jobs, args.workers)
            finally:
                drop_postgres(args.postgres_url, name)
            url, name = fresh_postgres(args.postgres_url)
            try:
                load = api_load(root / "api-pg", url, args.clients, args.requests)
            finally:
                drop_postgres(args.postgres_url, name)
            rows.append(("PostgreSQL", claims, *load))

    print(f"# ovis-server queue benchmark ({os.cpu_count()} CPUs)")
    print(
        f"claims: {args.jobs} jobs, {args.workers} worker processes; API: {args.requests} "
        f"submits then {args.requests} status calls, {args.clients} concurrent clients"
    )
    print()
    print("| store | claims / s | submits / s | status p50 | status p99 |")
    print("|---|---:|---:|---:|---:|")
    for store, claims, submits, p50, p99 in rows:
        print(f"| {store} | {claims:.0f} | {submits:.0f} | {p50:.1f} ms | {p99:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
