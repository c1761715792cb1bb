"""/metrics benchmark: scrape time with many finished jobs kept, against a 50 ms target.

Fills a fresh database (SQLite, and PostgreSQL when --postgres-url or
OVIS_TEST_POSTGRES_URL names a server it may create a database on) with --jobs finished
jobs spread over the last six days (what --retention keeps), a queue, running jobs and
webhook messages, by bulk inserts. Then it builds the app, lets --recent jobs finish
after the app started (each scrape reads again the jobs of its last minute: this is the
worst of that) and scrapes /metrics --scrapes times in process (the ASGI app through
starlette's TestClient), with the metrics token, printing the median and p95 of a scrape.

    python benchmarks/metrics.py --jobs 300000
"""

from __future__ import annotations

import sys

# Run as a script, this file's folder comes first on sys.path, where queue.py would hide
# the standard library's queue module from everything imported below: put the repository
# root there instead, so that the benchmarks import each other as a package.
if sys.path and sys.path[0] == __file__.rsplit("/", 1)[0]:
    sys.path[0] = sys.path[0].rsplit("/", 1)[0]

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, insert, text

from benchmarks.queue import drop_postgres, fresh_postgres
from ovis_server.api.app import create_app
from ovis_server.config import Settings
from ovis_server.db.connect import connect, migrate, sqlite_url
from ovis_server.db.schema import jobs, webhook_deliveries

TARGET_MS = 50.0
TOKEN = "bench-metrics-token-" + "x" * 16
CHUNK = 5000
FINAL = ["succeeded"] * 8 + ["failed", "cancelled"]


def job_rows(
    count: int, now: datetime, recent: bool, status: str | None = None
) -> Iterator[dict[str, Any]]:
    for _ in range(count):
        state = status or random.choice(FINAL)
        age = 0.0 if recent else random.uniform(120, 6 * 86400)
        finished = now - timedelta(seconds=age)
        started = finished - timedelta(seconds=random.uniform(1, 30))
        created = started - timedelta(seconds=random.uniform(0, 60))
        final = state in ("succeeded", "failed", "cancelled")
        yield {
            "id": "sync_" + uuid.uuid4().hex,
            "token_id": "bench",
            "model_id": "aidc-ai/ovis-image",
            "input": {"prompt": "benchmark"},
            "seed": 1,
            "batch_key": "1024x768:28:5.0",
            "status": state,
            "cancel_requested": False,
            "progress_step": 28 if final else 0,
            "progress_total": 28,
            "attempts": 1,
            "created_at": created,
            "started_at": started if state != "queued" else None,
            "finished_at": finished if final else None,
        }


def message_rows(count: int, now: datetime, state: str) -> Iterator[dict[str, Any]]:
    for _ in range(count):
        at = now - timedelta(seconds=random.uniform(120, 6 * 86400))
        yield {
            "id": "msg_" + uuid.uuid4().hex,
            "request_id": "sync_" + uuid.uuid4().hex,
            "token_id": "bench",
            "url": "https://example.com/hook",
            "status": "succeeded",
            "step": 28,
            "total": 28,
            "state": state,
            "attempts": 1,
            "next_attempt_at": at,
            "created_at": at,
            "finished_at": at if state != "pending" else None,
        }


def bulk(engine: Engine, table: Any, rows: Iterator[dict[str, Any]]) -> None:
    batch: list[dict[str, Any]] = []
    with engine.begin() as conn:
        for row in rows:
            batch.append(row)
            if len(batch) == CHUNK:
                conn.execute(insert(table), batch)
                batch = []
        if batch:
            conn.execute(insert(table), batch)


def measure(label: str, url: str, data_dir: Path, args: argparse.Namespace) -> list[str]:
    engine = connect(url)
    migrate(engine)
    now = datetime.now(UTC)
    started = time.perf_counter()
    bulk(engine, jobs, job_rows(args.jobs, now, recent=False))
    bulk(engine, jobs, job_rows(args.queued, now, recent=False, status="queued"))
    bulk(engine, jobs, job_rows(8, now, recent=False, status="running"))
    bulk(engine, webhook_deliveries, message_rows(args.jobs // 3, now, "delivered"))
    bulk(engine, webhook_deliveries, message_rows(100, now, "failed"))
    bulk(engine, webhook_deliveries, message_rows(50, now, "pending"))
    if engine.dialect.name == "postgresql":
        # What autovacuum does after a bulk load; before it, the planner knows nothing of
        # the rows and reads the whole table where the finished_at index fits.
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    fill = time.perf_counter() - started
    engine.dispose()

    settings = Settings(data_dir=data_dir, database_url=url, metrics_token=TOKEN)
    app = create_app(settings)
    # Jobs that finish after the app started: the first scrape adds them, and each scrape
    # of the next minute reads them again (and skips them).
    bulk(app.state.db, jobs, job_rows(args.recent, datetime.now(UTC), recent=True))
    client = TestClient(app)  # no lifespan: the retention sweep stays off
    headers = {"Authorization": f"Bearer {TOKEN}"}
    first_started = time.perf_counter()
    response = client.get("/metrics", headers=headers)
    first = (time.perf_counter() - first_started) * 1000
    assert response.status_code == 200, response.text
    assert 'ovis_jobs_finished_total{status="succeeded"}' in response.text
    assert f"ovis_queue_depth {float(args.queued)}" in response.text, response.text
    times = []
    for _ in range(args.scrapes):
        scrape_started = time.perf_counter()
        assert client.get("/metrics", headers=headers).status_code == 200
        times.append((time.perf_counter() - scrape_started) * 1000)
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    median = statistics.median(times)
    verdict = "yes" if p95 <= TARGET_MS else "no"
    return [
        f"| {label} | {args.jobs:,} | {args.recent:,} | {first:.1f} | {median:.1f} | "
        f"{p95:.1f} | {TARGET_MS:.0f} | {verdict} |",
        f"(filled in {fill:.0f} s)",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres-url", default=os.environ.get("OVIS_TEST_POSTGRES_URL"))
    parser.add_argument("--jobs", type=int, default=300_000, help="finished jobs kept")
    parser.add_argument("--recent", type=int, default=1000, help="jobs finished in the last minute")
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--scrapes", type=int, default=50)
    args = parser.parse_args(argv)
    random.seed(7)

    header = [
        "| store | finished jobs kept | finished last minute | first scrape ms "
        "| median ms | p95 ms | target ms | within |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows: list[str] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_dir = Path(tmp) / "sqlite"
        sqlite_dir.mkdir()
        row, note = measure("SQLite", sqlite_url(sqlite_dir), sqlite_dir, args)
        rows.append(row)
        notes.append(f"SQLite {note}")
        if args.postgres_url:
            url, name = fresh_postgres(args.postgres_url)
            try:
                pg_dir = Path(tmp) / "postgres"
                pg_dir.mkdir()
                row, note = measure("PostgreSQL", url, pg_dir, args)
                rows.append(row)
                notes.append(f"PostgreSQL {note}")
            finally:
                drop_postgres(args.postgres_url, name)
    print("\n".join(header + rows))
    print("; ".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
