"""The store under faults: a locked database, an unwritable files store, racing submits,
and the secrets it keeps at rest."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from ovis_server.db.connect import SQLITE_FILE
from ovis_server.worker.failures import describe_failure

from .bodies import ONE_STEP, OVIS_PATH, SLOW
from .helpers import (
    InProcessServer,
    Server,
    ServerFactory,
    create_token,
    http_get,
    run_cli,
    start_server,
    status_of,
    submit,
    wait_for,
    wait_result,
)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_data_dir_and_database_are_private_whatever_the_umask(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with umask(0o022):
        run_cli("token", "create", "--name", "a", "--data-dir", str(data_dir))
    database = data_dir / SQLITE_FILE
    assert mode(data_dir) == 0o700
    assert mode(database) == 0o600
    companions = [data_dir / (SQLITE_FILE + suffix) for suffix in ("-wal", "-shm")]
    for path in [*companions, *data_dir.glob("*.lock")]:
        if path.exists():
            assert mode(path) == 0o600, path

    # An existing deployment's looser modes are tightened on the next start.
    data_dir.chmod(0o755)
    database.chmod(0o644)
    with umask(0o022):
        run_cli("token", "list", "--data-dir", str(data_dir))
    assert mode(data_dir) == 0o700
    assert mode(database) == 0o600
    for path in companions:
        if path.exists():
            assert mode(path) == 0o600, path


# --- limits under concurrency -------------------------------------------------------------


def concurrent_submits(server: InProcessServer, token: str, count: int) -> list[httpx.Response]:
    """``count`` submits of one token, all in flight at once."""
    barrier = threading.Barrier(count)

    def one(_: int) -> httpx.Response:
        with server.client(token) as client:
            barrier.wait()
            return client.post(OVIS_PATH, json={"prompt": "x", **ONE_STEP})

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


@pytest.mark.usefixtures("database_url")
@pytest.mark.parametrize(
    "limit",
    [
        ("rate_limit_per_minute", "max_queued_per_token", "max_queued"),
        ("max_queued_per_token", "rate_limit_per_minute", "max_queued"),
        ("max_queued", "rate_limit_per_minute", "max_queued_per_token"),
    ],
    ids=["rate-limit", "max-queued-per-token", "max-queued"],
)
def test_twenty_concurrent_submits_at_a_limit_of_five_accept_exactly_five(
    fresh_server: ServerFactory, limit: tuple[str, str, str]
) -> None:
    tested, *others = limit
    server = fresh_server(no_worker=True, **{tested: 5}, **dict.fromkeys(others, 0))
    answers = concurrent_submits(server, server.token("burst"), 20)
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [200] * 5 + [429] * 15, [answer.text for answer in answers]
    for answer in answers:
        if answer.status_code == 429:
            assert answer.json()["error_code"] == 429001
            assert int(answer.headers["retry-after"]) > 0


# --- a locked database ---------------------------------------------------------------------

SQL_WORDS = ("select ", "insert ", "update ", "sqlite", "[sql", "parameters", "background on")


def assert_no_internals(text: str, worker_ids: list[str]) -> None:
    lowered = text.lower()
    for word in SQL_WORDS:
        assert word not in lowered, text
    for worker_id in worker_ids:
        assert worker_id not in text, text


def worker_ids(data_dir: Path) -> list[str]:
    with sqlite3.connect(data_dir / SQLITE_FILE) as db:
        return [row[0] for row in db.execute("SELECT id FROM workers")]


def job_row(data_dir: Path, request_id: str) -> tuple[str, int]:
    """(status, attempts) as the database holds them."""
    with sqlite3.connect(data_dir / SQLITE_FILE) as db:
        status, attempts = db.execute(
            "SELECT status, attempts FROM jobs WHERE id = ?", (request_id,)
        ).fetchone()
    return str(status), int(attempts)


LOCK_SECONDS = 35


def test_a_35_second_database_lock_fails_no_job_and_submits_answer_503(
    tmp_path: Path, tiny_weights: Path, servers: list[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OVIS_SERVER_DATABASE_URL", raising=False)
    server = start_server(tmp_path, tiny_weights)
    servers.append(server)
    with server.client(create_token(tmp_path, "lock")) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout=180)
        running = submit(client, **{**SLOW, "num_inference_steps": 20})
        wait_for(lambda: status_of(client, running)["status"] == "in_progress", interval=0.05)
        workers = worker_ids(tmp_path)

        # Another connection holds SQLite's write lock for 35 s, as a backup tool or a
        # long migration would.
        lock = sqlite3.connect(tmp_path / SQLITE_FILE, timeout=30, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        held_since = time.monotonic()
        refused: list[httpx.Response] = []
        try:
            # Submit until a few seconds before the end (a submit then still in its
            # retries may succeed once the lock is gone).
            while time.monotonic() - held_since < LOCK_SECONDS - 10:
                started = time.monotonic()
                refused.append(client.post(OVIS_PATH, json={"prompt": "locked", **ONE_STEP}))
                assert time.monotonic() - started < 20  # not the 30 s of the old busy wait
                assert status_of(client, running)["status"] in ("in_progress", "completed")
            time.sleep(max(0.0, LOCK_SECONDS - (time.monotonic() - held_since)))
        finally:
            lock.rollback()
            lock.close()

        assert refused
        for answer in refused:
            assert answer.status_code == 503, answer.text
            assert answer.json()["error_code"] == 503001
            assert int(answer.headers["retry-after"]) > 0
            assert_no_internals(answer.text, workers)

        # Submits work again, and the job that ran through the lock completes.
        after = submit(client, **ONE_STEP)
        assert wait_result(client, running)["status"] == "succeeded"
        assert wait_result(client, after)["status"] == "succeeded"
        listed = client.get("/v1/requests", params={"limit": 100}).json()["requests"]
        assert [job["status"] for job in listed] == ["succeeded", "succeeded"]
    assert f"job {running} failed" not in server.log()


# --- an unwritable files store ---------------------------------------------------------------


def test_an_unwritable_files_store_keeps_jobs_queued_until_it_is_fixed(
    tmp_path: Path, tiny_weights: Path, servers: list[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OVIS_SERVER_DATABASE_URL", raising=False)
    server = start_server(tmp_path, tiny_weights)
    servers.append(server)
    with server.client(create_token(tmp_path, "disk")) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout=180)
        # The files folder becomes a regular file: every write fails, as on a full disk
        # (and root ignores permissions). A job's file fails with ENOTDIR (its folder's
        # parent is a file), the worker's test write in the folder itself with EEXIST.
        files = tmp_path / "files"

        def files_made_a_file() -> bool:
            shutil.rmtree(files, ignore_errors=True)
            try:
                files.write_text("not a directory")
            except IsADirectoryError:  # the server made its folder again in between
                return False
            return True

        wait_for(files_made_a_file, timeout=10, interval=0.05)

        request_id = submit(client, **ONE_STEP)

        def refused() -> httpx.Response | None:
            answer = client.get("/readyz")
            return answer if answer.status_code == 503 else None

        not_ready = wait_for(refused, timeout=120)
        assert not_ready.json()["reason"].startswith("the worker cannot write outputs: ")
        # The system's words, from whichever of the two writes failed last.
        reason = not_ready.json()["reason"]
        assert "Not a directory" in reason or "File exists" in reason, reason
        # The job went back to the queue, its attempt not counted, and stays there.
        wait_for(lambda: job_row(tmp_path, request_id) == ("queued", 0), timeout=60)
        time.sleep(5)  # a few of the worker's test writes
        assert job_row(tmp_path, request_id) == ("queued", 0)
        assert status_of(client, request_id)["status"] == "in_queue"
        assert client.get("/readyz").status_code == 503

        files.unlink()  # fixed: the next test write succeeds
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout=60)
        result = wait_result(client, request_id)
        assert result["status"] == "succeeded"
        assert job_row(tmp_path, request_id) == ("succeeded", 1)
        url = result["output"]["image"]
        assert http_get(url).status_code == 200

        # A file gone from under a live link answers the contract's 404.
        for stored in (files / request_id).iterdir():
            stored.unlink()
        missing = http_get(url)
        assert missing.status_code == 404
        assert missing.json()["error_code"] == 404001


def test_a_database_error_never_puts_sql_in_a_job_error(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(SQLAlchemyError) as caught, engine.connect() as conn:
        conn.execute(text("UPDATE jobs SET worker_id = :w"), {"w": "host:1:abc"})
    error_type, message = describe_failure(caught.value)
    assert error_type == "internal_error"
    assert_no_internals(message, ["host:1:abc"])
    assert "jobs" not in message
