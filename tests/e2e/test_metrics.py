"""/metrics: closed without the metrics token, counters kept from aggregates (never a scan
of the jobs), figures read back with prometheus_client's own parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from click.testing import CliRunner
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, event, text, update

from ovis_server.api.app import create_app
from ovis_server.api.metrics import Metrics, OvisCollector
from ovis_server.cli import main
from ovis_server.config import Settings
from ovis_server.db.connect import connect, migrate, sqlite_url
from ovis_server.db.schema import jobs
from ovis_server.jobs.deletions import FileDeletions
from ovis_server.jobs.stats import StatsReader
from ovis_server.jobs.store import JobStore, utcnow
from ovis_server.jobs.workers import WorkerRegistry

from .helpers import queue_job

METRICS_TOKEN = "scrape-" + "s3cret" * 4
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(exposition: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def finish(store: JobStore, request_id: str) -> None:
    queue_job(store, request_id)
    job = store.claim_next("w", 30)
    assert job is not None
    assert job.id == request_id
    store.complete(job.id, "w", [])


def collector_for(engine: Engine) -> Metrics:
    return Metrics(OvisCollector(StatsReader(engine), WorkerRegistry(engine), 20, lambda: 0))


def scrape(metrics: Metrics) -> Samples:
    body, content_type = metrics.render(None)
    assert content_type.startswith("text/plain; version=0.0.4")
    return parse(body.decode())


def test_counters_count_each_job_once_and_survive_retention(store: JobStore) -> None:
    finish(store, "before-start")  # finished before the process started: not counted
    metrics = collector_for(store.engine)
    finish(store, "a")
    finish(store, "b")
    queue_job(store, "queued")
    queue_job(store, "cancelled")
    store.request_cancel("cancelled")

    first = scrape(metrics)
    assert first[("ovis_jobs_finished_total", (("status", "succeeded"),))] == 2
    assert first[("ovis_jobs_finished_total", (("status", "cancelled"),))] == 1
    assert first[("ovis_run_seconds_count", ())] == 2
    assert first[("ovis_step_seconds_count", ())] == 2
    assert first[("ovis_queue_wait_seconds_count", ())] == 2
    assert first[("ovis_queue_depth", ())] == 1
    assert first[("ovis_images_per_minute", ())] == 2

    # Scraped again, the same jobs are not counted twice.
    assert scrape(metrics) == first

    # The retention sweep deletes finished jobs: the counters do not go down.
    FileDeletions(store.engine).delete_requests(["a", "b", "cancelled", "before-start"])
    before_last_scrape = utcnow()
    assert scrape(metrics)[("ovis_jobs_finished_total", (("status", "succeeded"),))] == 2

    # A job whose end was committed late (finished_at before the last scrape, within the
    # overlap) is still counted, once.
    store.request_cancel("queued")
    finish(store, "late")
    with store.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == "late").values(finished_at=before_last_scrape))
    after = scrape(metrics)
    assert after[("ovis_jobs_finished_total", (("status", "succeeded"),))] == 3
    assert after[("ovis_jobs_finished_total", (("status", "cancelled"),))] == 2
    assert after[("ovis_queue_depth", ())] == 0
    assert scrape(metrics)[("ovis_run_seconds_count", ())] == 3


def test_a_scrape_reads_through_indexes_only(tmp_path: Path) -> None:
    """Every query a scrape sends searches an index: none scans the jobs or the webhook
    messages (the full scans took 4 s at 300k retained jobs)."""
    engine = connect(sqlite_url(tmp_path))
    migrate(engine)
    store = JobStore(engine)
    metrics = collector_for(engine)
    for n in range(5):
        finish(store, f"job-{n}")
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    scrape(metrics)
    scrape(metrics)
    event.remove(engine, "before_cursor_execute", record)
    plans = []
    with engine.connect() as conn:
        for statement, parameters in statements:
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
            plans += [str(row[-1]) for row in plan]
    reads = [line for line in plans if " jobs" in line or "webhook_deliveries" in line]
    assert reads
    assert all(line.startswith("SEARCH") for line in reads), plans


def test_metrics_answer_401_without_a_metrics_token(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path))
    client = TestClient(app)
    for headers in ({}, {"Authorization": f"Bearer {METRICS_TOKEN}"}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert response.json()["error_code"] == 400004
        assert "--metrics-token" in response.json()["error_message"]
        assert response.headers["www-authenticate"] == "Bearer"


def test_metrics_need_the_metrics_token_not_an_api_token(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, metrics_token=METRICS_TOKEN))
    _, api_token = app.state.tokens.create("holder")
    client = TestClient(app)
    for header in (None, f"Bearer {api_token}", "Bearer wrong", f"Basic {METRICS_TOKEN}"):
        headers = {"Authorization": header} if header else {}
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401, header
        assert "ovis_" not in response.text
    response = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200
    samples = parse(response.text)
    assert samples[("ovis_queue_depth", ())] == 0
    assert ("ovis_webhook_messages_pending", ()) in samples


def test_metrics_public_opts_out_of_the_token(tmp_path: Path) -> None:
    client = TestClient(create_app(Settings(data_dir=tmp_path, metrics_public=True)))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert ("ovis_status_streams_open", ()) in parse(response.text)
    # OpenMetrics, when the scraper asks for it.
    openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


def test_metrics_options_are_checked(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["serve", "--data-dir", str(tmp_path), "--no-worker"]
    short = runner.invoke(main, [*base, "--metrics-token", "short"])
    assert short.exit_code == 2
    assert "at least 16 characters" in short.output
    both = runner.invoke(main, [*base, "--metrics-token", METRICS_TOKEN, "--metrics-public"])
    assert both.exit_code == 2
    assert "not both" in both.output


def test_the_migration_adds_the_indexes(tmp_path: Path) -> None:
    engine = connect(sqlite_url(tmp_path))
    migrate(engine)
    with engine.connect() as conn:
        names = {row[0] for row in conn.execute(text("SELECT name FROM sqlite_master"))}
    assert {"ix_jobs_finished_at_seq", "ix_webhook_deliveries_finished_at_id"} <= names
