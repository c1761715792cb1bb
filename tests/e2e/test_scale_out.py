"""Many machines: API replicas and standalone workers on one PostgreSQL, and S3 storage.

"Another host" here is another process with a data directory of its own: all they share
is the database (and, for files, the bucket or the shared directory).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from ovis_server.db.connect import connect
from ovis_server.db.schema import jobs as jobs_table

from .bodies import SLOW
from .conftest import fresh_postgres_database
from .helpers import (
    Cluster,
    MotoS3,
    create_token,
    download,
    http_get,
    start_server,
    status_of,
    submit,
    wait_for,
    wait_result,
)

FAST = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "guidance_scale": 1}


@pytest.fixture
def postgres(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh PostgreSQL database, which every process started here uses."""
    url, drop = fresh_postgres_database()
    monkeypatch.setenv("OVIS_SERVER_DATABASE_URL", url)
    yield url
    drop()


def test_two_apis_three_workers_200_jobs_one_worker_killed(
    tmp_path: Path, tiny_weights: Path, postgres: str, cluster: Cluster
) -> None:
    shared = tmp_path / "shared"  # the files directory the hosts share
    apis = [start_server(shared, tiny_weights, "--no-worker") for _ in range(2)]
    cluster.servers += apis
    token = create_token(shared, "scale")
    workers = [cluster.worker(shared, tiny_weights, "--lease-seconds", "2") for _ in range(3)]

    clients = [api.client(token) for api in apis]
    try:
        jobs = [submit(clients[n % 2], prompt=f"job {n}", **FAST) for n in range(200)]

        def done() -> int:
            return cluster.worker_logs().count(" succeeded in ")

        def victim_done() -> int:
            return cluster.workers[0][1].read_text().count(" succeeded in ")

        # The victim has made images too (the workers load at their own pace), so that
        # its kill lands among jobs it runs, and the count below sees its share.
        wait_for(lambda: done() >= 20 and victim_done() > 0, timeout=180)
        victim = workers[0]
        victim.kill()  # kill -9, most likely in the middle of a job
        victim.wait()

        results = [wait_result(clients[n % 2], rid, timeout=600) for n, rid in enumerate(jobs)]
        assert [r["status"] for r in results] == ["succeeded"] * 200
        assert_each_job_completed_once(postgres, jobs, [path for _, path in cluster.workers])
        # The replicas agree on every result.
        other = wait_result(clients[1], jobs[0])
        assert other["output"].keys() == results[0]["output"].keys()
    finally:
        for client in clients:
            client.close()


def assert_each_job_completed_once(db_url: str, jobs: list[str], worker_logs: list[Path]) -> None:
    """Every job ran to completion exactly once, each worker completed some, and each
    worker's log names the jobs the database says it completed.

    A worker commits a job's success, then logs "job ID succeeded". A ``kill -9`` can
    fall between the two, so the killed worker (the first log) may have completed one
    job whose line it never wrote: that one, and no other, may be missing.
    """
    engine = connect(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(jobs_table.c.id, jobs_table.c.worker_id)).all()
    finally:
        engine.dispose()
    completed_by = dict(rows)
    assert sorted(completed_by) == sorted(jobs)
    logs = [path.read_text(errors="replace") for path in worker_logs]
    workers = [ready.group(1) for log in logs if (ready := re.search(r"worker (\S+) ready", log))]
    assert len(workers) == len(logs), "every worker logged its id"
    for worker, log in zip(workers, logs, strict=True):
        mine = {rid for rid, by in completed_by.items() if by == worker}
        assert mine, f"worker {worker} completed no job"
        lines = {rid: log.count(f"job {rid} succeeded") for rid in jobs}
        assert {rid for rid, count in lines.items() if count} <= mine, "a line for another's job"
        assert all(count <= 1 for count in lines.values()), "a job completed twice"
        unlogged = {rid for rid in mine if not lines[rid]}
        allowed = 1 if worker == workers[0] else 0  # the killed one
        assert len(unlogged) <= allowed, (worker, sorted(unlogged))


def test_queue_positions_agree_across_replicas(
    tmp_path: Path, tiny_weights: Path, postgres: str, cluster: Cluster
) -> None:
    apis = [start_server(tmp_path / f"api-{n}", tiny_weights, "--no-worker") for n in range(2)]
    cluster.servers += apis
    token = create_token(tmp_path / "api-0", "positions")
    first, second = (api.client(token) for api in apis)
    with first, second:
        jobs = [submit((first, second)[n % 2], **FAST) for n in range(6)]
        for index, rid in enumerate(jobs):
            assert status_of(first, rid)["queue_position"] == index
            assert status_of(second, rid)["queue_position"] == index
        assert second.post(f"/v1/requests/{jobs[2]}/cancel").json()["outcome"] == "cancelled"
        later = [rid for index, rid in enumerate(jobs) if index != 2]
        assert [status_of(first, rid)["queue_position"] for rid in later] == [0, 1, 2, 3, 4]


def test_cancel_sent_to_one_replica_stops_a_job_running_on_another_host(
    tmp_path: Path, tiny_weights: Path, postgres: str, cluster: Cluster
) -> None:
    apis = [start_server(tmp_path / f"api-{n}", tiny_weights, "--no-worker") for n in range(2)]
    cluster.servers += apis
    cluster.worker(tmp_path / "gpu-host", tiny_weights)
    token = create_token(tmp_path / "api-0", "cancel")
    first, second = (api.client(token) for api in apis)
    with first, second:
        request_id = submit(first, **SLOW)
        wait_for(lambda: status_of(second, request_id)["status"] == "in_progress", timeout=120)
        answer = second.post(f"/v1/requests/{request_id}/cancel").json()
        assert answer["outcome"] == "cancellation_requested"  # answered at once
        wait_for(lambda: status_of(first, request_id)["status"] == "cancelled", timeout=60)
        assert re.search(rf"job {request_id} cancelled", cluster.worker_logs())


@pytest.mark.usefixtures("database_url")
def test_s3_storage_serves_presigned_urls_and_expires_objects(
    tmp_path: Path, tiny_weights: Path, s3: MotoS3, cluster: Cluster
) -> None:
    server = start_server(
        tmp_path,
        tiny_weights,
        *("--storage", f"s3://{s3.bucket}/results", "--s3-endpoint-url", s3.endpoint),
        *("--retention", "4s", "--cleanup-interval", "1s"),
    )
    cluster.servers.append(server)
    with server.client(create_token(tmp_path, "s3")) as client:
        request_id = submit(client, output_format="webp", **FAST)
        result = wait_result(client, request_id)
        url = result["output"]["image"]
        assert url.startswith(f"{s3.endpoint}/{s3.bucket}/results/{request_id}/0.webp?")
        assert "Signature" in url
        image = download(url)  # no Authorization header: the URL itself carries the right
        assert (image.size, image.format) == ((64, 64), "WEBP")
        assert s3.objects() == [f"results/{request_id}/0.webp"]
        assert not (tmp_path / "files").exists()

        wait_for(lambda: s3.objects() == [], timeout=60)
        assert client.get(f"/v1/requests/{request_id}/result").status_code == 404
    assert http_get(url).status_code == 404


def test_bad_storage_url_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ovis_server", "serve", "--storage", "gs://nope",
         "--data-dir", str(tmp_path), "--no-worker"],
        capture_output=True, text=True, timeout=120, env={**os.environ}, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "s3://BUCKET" in result.stderr
