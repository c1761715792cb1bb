"""Outages of what the API stands on: the object store, the files disk, the database.

A DELETE while the store is away answers at once and loses nothing (the removal is on
record and finished once the store is back, through a restart too); no public answer
shows a host, URL, path, bucket or exception text meanwhile; a PostgreSQL lock held by
someone else gets an API call its 503 within seconds; a revoked token stops working
within 2 s although verified tokens are cached.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from ovis_server.db.connect import connect, migrate, sqlite_url
from ovis_server.jobs.deletions import FileDeletions
from ovis_server.tokens import TokenStore

from .bodies import ONE_STEP, OVIS_PATH
from .conftest import fresh_postgres_database
from .helpers import (
    Cluster,
    InProcessServer,
    MotoS3,
    ServerFactory,
    complete_with_file,
    create_token,
    http_get,
    start_server,
    status_of,
    submit,
    wait_for,
    wait_result,
)


def assert_nothing_internal(text: str, *secrets: str) -> None:
    """No host, URL, path, bucket or exception text in a public answer."""
    lowered = text.lower()
    for word in (*secrets, "127.0.0.1", "http://", "https://", "errno", "traceback"):
        assert word.lower() not in lowered, text
    # Exception class names (EndpointConnectionError, OperationalError, ...).
    assert not re.search(r"[A-Z][a-z]+(Error|Exception)\b", text), text
    assert not re.search(r"(^|[\s'\"(])/[a-z]+/", text), text  # an absolute path


def public_answers(client: httpx.Client, *paths: str) -> list[str]:
    """The bodies of /healthz, /readyz and of the calls in ``paths`` (error bodies)."""
    bodies = [client.get("/healthz").text, client.get("/readyz").text]
    for path in paths:
        answer = client.get(path)
        assert answer.status_code >= 400, (path, answer.text)
        bodies.append(answer.text)
    return bodies


# --- the object store away -----------------------------------------------------------------


def test_a_delete_while_the_bucket_is_down_loses_nothing_through_a_restart(
    tmp_path: Path,
    tiny_weights: Path,
    s3: MotoS3,
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OVIS_SERVER_DATABASE_URL", raising=False)
    storage = ("--storage", f"s3://{s3.bucket}/results", "--s3-endpoint-url", s3.endpoint)
    server = start_server(tmp_path, tiny_weights, *storage)
    cluster.servers.append(server)
    token = create_token(tmp_path, "outage")
    with server.client(token) as client:
        request_id = submit(client, **ONE_STEP)
        url = wait_result(client, request_id)["output"]["image"]
        kept = submit(client, **ONE_STEP)  # another request, which stays
        wait_result(client, kept)
        assert http_get(url).status_code == 200
        assert f"results/{request_id}/0.png" in s3.objects()

        s3.stop()  # the bucket cannot be reached
        answer = client.delete(f"/v1/requests/{request_id}")
        assert answer.status_code == 204, answer.text
        gone = client.get(f"/v1/requests/{request_id}/status")
        assert (gone.status_code, gone.json()["error_code"]) == (404, 404001)
        assert client.delete(f"/v1/requests/{request_id}").status_code == 404
        assert status_of(client, kept)["status"] == "completed"

        # A job now cannot store its image: the worker says so on /readyz, in words.
        waiting = submit(client, **ONE_STEP)
        not_ready = wait_for(
            lambda: r if (r := client.get("/readyz")).status_code == 503 else None, timeout=120
        )
        assert not_ready.json()["reason"].startswith("the worker cannot write outputs")
        bodies = public_answers(
            client, f"/v1/requests/{request_id}/status", "/v1/requests/no-such/result"
        )
        for body in bodies:
            assert_nothing_internal(body, s3.bucket, str(s3.port), str(tmp_path), "results/")
        # Back in the queue: the worker reports the problem (readyz), then puts the job back.
        wait_for(lambda: status_of(client, waiting)["status"] == "in_queue", timeout=30)
    log = server.log()
    assert "could not be removed" in log
    assert str(s3.port) in log, "the details go to the log"

    server.stop()  # a restart in the middle: the removal owed is on record
    deletions = FileDeletions(connect(sqlite_url(tmp_path)))
    assert deletions.owed() == [request_id]
    restarted = start_server(tmp_path, tiny_weights, *storage)
    cluster.servers.append(restarted)
    time.sleep(3)  # a few of the sweeper's passes, against a bucket still away
    assert deletions.owed() == [request_id]

    s3.start()  # the bucket is back: the object goes, then the record
    prefix = f"results/{request_id}/"
    wait_for(lambda: not any(key.startswith(prefix) for key in s3.objects()), timeout=120)
    assert http_get(url).status_code == 404, "the presigned URL stops once the object is gone"
    wait_for(lambda: deletions.owed() == [], timeout=30)
    with restarted.client(token) as client:
        assert client.get(f"/v1/requests/{request_id}/status").status_code == 404
        assert wait_result(client, waiting)["status"] == "succeeded"
        assert status_of(client, kept)["status"] == "completed"
    assert any(key.startswith(f"results/{kept}/") for key in s3.objects())


class FailingRemovals:
    """The local store's removals fail (as on a disk gone read-only) until ``heal``."""

    def __init__(self, server: InProcessServer) -> None:
        self.files = server.app.state.files
        self.real = self.files.delete_request
        self.tries = 0
        self.files.delete_request = self.delete_request

    def delete_request(self, request_id: str) -> int:
        self.tries += 1
        raise OSError(30, "Read-only file system", str(self.files.root / request_id))

    def heal(self) -> None:
        self.files.delete_request = self.real


@pytest.mark.usefixtures("database_url")
def test_a_delete_the_disk_refuses_answers_at_once_and_the_files_go_later(
    fresh_server: ServerFactory,
) -> None:
    server = fresh_server(no_worker=True)
    store, files = server.app.state.store, server.app.state.files
    with server.client(server.token("disk")) as client:
        request_id = submit(client, **ONE_STEP)
        key = complete_with_file(store, files, request_id)
        url = wait_result(client, request_id)["output"]["image"]
        assert http_get(url).status_code == 200

        failing = FailingRemovals(server)
        answer = client.delete(f"/v1/requests/{request_id}")
        assert answer.status_code == 204, answer.text
        assert failing.tries == 1
        assert files.path(key).exists(), "the disk kept it"
        refused = http_get(url)
        assert (refused.status_code, refused.json()["error_code"]) == (404, 404001)
        assert_nothing_internal(refused.text, str(files.root))
        deletions = FileDeletions(store.engine)
        assert deletions.owed() == [request_id]
        wait_for(lambda: failing.tries >= 2, timeout=30)  # retried, with backoff
        assert deletions.owed() == [request_id]

        failing.heal()
        wait_for(lambda: not files.path(key).exists(), timeout=60)
        wait_for(lambda: deletions.owed() == [], timeout=30)
        assert http_get(url).status_code == 404
    assert "could not be removed" in server.log()


# --- the database away ----------------------------------------------------------------------


def test_a_locked_sqlite_database_shows_nothing_internal(fresh_server: ServerFactory) -> None:
    import sqlite3

    server = fresh_server(no_worker=True, database_url=None)
    with server.client(server.token("locked")) as client:
        request_id = submit(client, **ONE_STEP)
        lock = sqlite3.connect(server.data_dir / "ovis-server.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            refused = client.post(OVIS_PATH, json={"prompt": "locked", **ONE_STEP})
            assert refused.status_code == 503, refused.text
            bodies = [refused.text, client.delete(f"/v1/requests/{request_id}").text]
            bodies += public_answers(client)
        finally:
            lock.rollback()
            lock.close()
    for body in bodies:
        assert_nothing_internal(body, str(server.data_dir), "sqlite", "jobs")


@pytest.fixture
def postgres_server(fresh_server: ServerFactory) -> Iterator[tuple[InProcessServer, str]]:
    url, drop = fresh_postgres_database()
    server = fresh_server(no_worker=True, database_url=url)
    yield server, url
    server.stop()
    drop()


@pytest.mark.postgres
def test_a_postgresql_lock_held_elsewhere_gets_a_503_within_10_seconds(
    postgres_server: tuple[InProcessServer, str],
) -> None:
    server, url = postgres_server
    with server.client(server.token("blocked")) as client:
        request_id = submit(client, **ONE_STEP)
        assert status_of(client, request_id)["status"] == "in_queue"
        holder = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        held = threading.Event()
        release = threading.Event()

        def hold_the_lock() -> None:
            with holder.begin() as conn:  # as a migration or an operator's LOCK TABLE would
                conn.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
                held.set()
                release.wait(60)

        thread = threading.Thread(target=hold_the_lock)
        thread.start()
        try:
            assert held.wait(30)
            answers = []
            calls: list[tuple[str, str, dict[str, Any] | None]] = [
                ("GET", f"/v1/requests/{request_id}/status", None),
                ("POST", OVIS_PATH, {"prompt": "blocked", **ONE_STEP}),
            ]
            for method, path, sent in calls:
                started = time.monotonic()
                answer = client.request(method, path, json=sent)
                assert time.monotonic() - started < 10, "answered within 10 s"
                assert answer.status_code == 503, answer.text
                assert answer.json()["error_code"] == 503001
                assert int(answer.headers["retry-after"]) > 0
                answers.append(answer.text)
            answers += public_answers(client)
        finally:
            release.set()
            thread.join(60)
            holder.dispose()
        for body in answers:
            assert_nothing_internal(
                body, url.rsplit("/", 1)[-1], "postgres", "jobs", "lock timeout"
            )
        assert status_of(client, request_id)["status"] == "in_queue"  # fine again


# --- tokens -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("database_url")
def test_a_revoked_token_stops_working_within_2_seconds(fresh_server: ServerFactory) -> None:
    server = fresh_server(no_worker=True)
    secret = server.token("soon-revoked")
    with server.client(secret) as client:
        request_id = submit(client, **ONE_STEP)
        for _ in range(5):  # verified, and trusted for a moment without a query
            assert client.get(f"/v1/requests/{request_id}/status").status_code == 200
        # Revoked by another process (`ovis-server token revoke`): its own engine.
        other = connect(server.settings.db_url)
        TokenStore(other).revoke("soon-revoked")
        other.dispose()
        revoked_at = time.monotonic()
        path = f"/v1/requests/{request_id}/status"
        refused = wait_for(
            lambda: r if (r := client.get(path)).status_code == 401 else None,
            timeout=10,
            interval=0.05,
        )
        assert time.monotonic() - revoked_at < 2.0
        assert refused.json()["error_code"] == 400004
        for _ in range(5):
            assert client.get(f"/v1/requests/{request_id}/status").status_code == 401


def test_token_verification_is_cached_for_at_most_its_window(tmp_path: Path) -> None:
    db = connect(sqlite_url(tmp_path))
    migrate(db)
    tokens = TokenStore(db, verified_for=0.5)
    info, secret = tokens.create("cached")
    assert tokens.verified(secret) is None  # never asked yet
    assert tokens.authenticate(secret) == info
    assert tokens.verified(secret) == info
    time.sleep(0.6)
    assert tokens.verified(secret) is None  # its window passed: the database is asked again
    assert tokens.authenticate("ovis_not-a-token") is None
    assert tokens.verified("ovis_not-a-token") is None  # unknown ones are not kept
    tokens.authenticate(secret)
    tokens.revoke(info.id)
    assert tokens.verified(secret) is None, "this process forgets a token it revokes at once"
    assert tokens.authenticate(secret) is None
    db.dispose()


def test_readyz_shows_a_workers_problem_only_in_plain_words() -> None:
    from ovis_server.api.ops import public_problem

    plain = "the worker cannot write outputs: No space left on device"
    assert public_problem(plain) == plain
    # As a worker of an earlier version reported an unreachable bucket.
    leaky = (
        "the worker cannot write outputs: the bucket 'ovis' refused the write: Could not "
        'connect to the endpoint URL: "http://10.0.0.5:9000/ovis/results/.write-check"'
    )
    assert public_problem(leaky) == "the worker cannot write outputs: see the worker's log"
    assert public_problem("/srv/data/files: Permission denied") == (
        "the worker reports a problem: see its log"
    )
