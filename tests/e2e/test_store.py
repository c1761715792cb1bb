"""The job store on a real SQLite file: ordering, leases, recovery, concurrent claims."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, text

from ovis_server.db.connect import (
    HEAD_REVISION,
    alembic_config,
    connect,
    current_revisions,
    migrate,
    sqlite_url,
)
from ovis_server.db.schema import metadata
from ovis_server.jobs.deletions import DeletionSweeper, FileDeletions
from ovis_server.jobs.job import CancelOutcome, JobStatus, NewJob, StoredOutput
from ovis_server.jobs.retention import RetentionSweeper
from ovis_server.jobs.store import JobStore, LeaseLostError, utcnow
from ovis_server.jobs.workers import WorkerRegistry
from ovis_server.storage.local import LocalFileStore
from ovis_server.storage.signing import UrlSigner
from ovis_server.webhooks.outbox import DeliveryStore

from .helpers import complete_with_file, wait_for


def add(store: JobStore, request_id: str, token: str = "tok_a", batch_key: str = "k") -> None:
    store.submit(
        NewJob(
            id=request_id,
            token_id=token,
            model_id="aidc-ai/ovis-image",
            input={"prompt": request_id},
            seed=1,
            progress_total=4,
            batch_key=batch_key,
        )
    )


def test_migrations_build_exactly_the_declared_schema(store: JobStore) -> None:
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_claims_oldest_first_and_none_when_empty(store: JobStore) -> None:
    for name in ("a", "b", "c"):
        add(store, name)
    claimed = [store.claim_next("w", 30) for _ in range(4)]
    assert [job.id if job else None for job in claimed] == ["a", "b", "c", None]
    first = claimed[0]
    assert first is not None
    assert first.status == JobStatus.RUNNING
    assert first.attempts == 1
    assert first.worker_id == "w"


def test_queue_position_is_a_count_of_jobs_ahead(store: JobStore) -> None:
    for name in ("a", "b", "c"):
        add(store, name)
    jobs = [store.get(name) for name in ("a", "b", "c")]
    assert [store.queue_position(job) for job in jobs if job] == [0, 1, 2]
    store.claim_next("w", 30)
    job_c = store.get("c")
    assert job_c is not None
    assert store.queue_position(job_c) == 1


def test_only_the_lease_holder_may_change_a_running_job(store: JobStore) -> None:
    add(store, "a")
    store.claim_next("w1", 30)
    with pytest.raises(LeaseLostError):
        store.report_progress("a", "w2", 1, 30)
    with pytest.raises(LeaseLostError):
        store.complete("a", "w2", [])
    assert store.report_progress("a", "w1", 1, 30) is False
    done = store.complete("a", "w1", [StoredOutput("a/0.png", "image/png", 64, 64)])
    assert done.status == JobStatus.SUCCEEDED
    assert done.outputs[0].width == 64
    with pytest.raises(LeaseLostError):
        store.fail("a", "w1", "x", "finished jobs stay finished")


def test_expired_lease_goes_back_to_the_front_then_fails_after_max_attempts(
    store: JobStore,
) -> None:
    add(store, "a")
    add(store, "b")
    for attempt in (1, 2):
        job = store.claim_next(f"dead-{attempt}", 0.05)
        assert job is not None
        assert (job.id, job.attempts) == ("a", attempt)
        time.sleep(0.1)
        assert store.recover_expired(max_attempts=2) == 1
    failed = store.get("a")
    assert failed is not None
    assert failed.status == JobStatus.FAILED
    assert failed.error_type == "worker_lost"
    next_job = store.claim_next("w", 30)
    assert next_job is not None
    assert next_job.id == "b"


def test_a_dead_worker_process_gives_its_jobs_back_at_once(store: JobStore) -> None:
    for name in ("a", "b", "c", "other"):
        add(store, name)
    # Worker ids are host:pid:random (worker/process.py); pid 12 is not pid 123.
    assert store.claim_next("host_1:12:aaaaaa", 30) is not None  # a: its first attempt
    assert store.claim_next("host_1:123:bbbbbb", 30) is not None  # b
    assert store.claim_next("host_1:12:cccccc", 30) is not None  # c
    assert store.claim_next("host%1:12:dddddd", 30) is not None  # other: no LIKE wildcards
    assert store.request_cancel("c") is not None  # c: cancel asked while its worker dies

    # Long before the 30 s leases run out.
    assert store.release_dead_worker("host_1", 12, max_attempts=3) == 2
    states = {name: store.get(name) for name in ("a", "b", "c", "other")}
    assert {name: job.status for name, job in states.items() if job} == {
        "a": JobStatus.QUEUED,
        "b": JobStatus.RUNNING,
        "c": JobStatus.CANCELLED,
        "other": JobStatus.RUNNING,
    }
    assert store.release_dead_worker("host_1", 12, max_attempts=3) == 0

    # At the attempt limit the job fails instead of looping.
    again = store.claim_next("host_1:77:eeeeee", 30)
    assert again is not None
    assert (again.id, again.attempts) == ("a", 2)
    assert store.release_dead_worker("host_1", 77, max_attempts=2) == 1
    failed = store.get("a")
    assert failed is not None
    assert (failed.status, failed.error_type) == (JobStatus.FAILED, "worker_lost")


def test_released_job_keeps_its_place_and_its_attempt(store: JobStore) -> None:
    add(store, "a")
    add(store, "b")
    store.claim_next("w", 30)
    released = store.release("a", "w")
    assert released.status == JobStatus.QUEUED
    assert released.attempts == 0
    again = store.claim_next("w2", 30)
    assert again is not None
    assert again.id == "a"


def test_cancel_queued_running_and_finished(store: JobStore) -> None:
    for name in ("queued", "running", "finished"):
        add(store, name)
    assert store.request_cancel("missing") is None
    store.claim_next("w", 30)  # "queued" is oldest: claim it, then requeue to shape the case
    store.release("queued", "w")
    job = store.claim_next("w", 30)
    assert job is not None
    assert job.id == "queued"
    store.release("queued", "w")

    answer = store.request_cancel("queued")
    assert answer is not None
    assert answer[1] is CancelOutcome.CANCELLED
    assert answer[0].status == JobStatus.CANCELLED

    running = store.claim_next("w", 30)
    assert running is not None
    assert running.id == "running"
    answer = store.request_cancel("running")
    assert answer is not None
    assert answer[1] is CancelOutcome.REQUESTED
    assert store.report_progress("running", "w", 1, 30) is True
    assert store.mark_cancelled("running", "w").status == JobStatus.CANCELLED

    finishing = store.claim_next("w", 30)
    assert finishing is not None
    store.complete("finished", "w", [])
    answer = store.request_cancel("finished")
    assert answer is not None
    assert answer[1] is CancelOutcome.NOT_CANCELLABLE
    again = store.request_cancel("queued")
    assert again is not None
    assert again[1] is CancelOutcome.CANCELLED  # cancelling twice is harmless


def test_concurrent_claims_take_each_job_once(store: JobStore) -> None:
    for index in range(60):
        add(store, f"job-{index}")
    taken: list[str] = []
    lock = threading.Lock()

    def work(worker: str) -> None:
        while (job := store.claim_next(worker, 30)) is not None:
            with lock:
                taken.append(job.id)
            store.complete(job.id, worker, [])

    threads = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == sorted(f"job-{index}" for index in range(60))


def test_claim_batch_takes_the_head_and_its_compatible_followers(store: JobStore) -> None:
    for name, key in [("a", "x"), ("b", "y"), ("c", "x"), ("d", "x"), ("e", "x")]:
        add(store, name, batch_key=key)
    first = store.claim_batch("w", 30, max_batch=3)
    assert [job.id for job in first] == ["a", "c", "d"]
    assert all(job.worker_id == "w" for job in first)
    second = store.claim_batch("w", 30, max_batch=3)
    assert [job.id for job in second] == ["b"]  # the head decides the batch
    cancel, lost = store.report_batch_progress(["a", "c", "b"], "w", 1, 30)
    assert (cancel, lost) == (set(), set())
    store.request_cancel("c")
    cancel, lost = store.report_batch_progress(["a", "c"], "w", 2, 30)
    assert cancel == {"c"}
    cancel, lost = store.report_batch_progress(["a"], "other-worker", 3, 30)
    assert lost == {"a"}
    assert [job.id for job in store.claim_batch("w", 30, max_batch=1)] == ["e"]
    assert store.claim_batch("w", 30, max_batch=4) == []


def test_idle_polls_only_read(store: JobStore) -> None:
    """The worker's claim, the outbox's and the deadline pass run several times a second;
    with nothing to do they only read, and take no write lock (SQLite) or row locks."""
    statements: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.lstrip().split()[0].upper())

    deliveries = DeliveryStore(store.engine)
    add(store, "running")
    assert store.claim_next("w", 30) is not None  # a running job, its deadline far off
    event.listen(store.engine, "before_cursor_execute", note)
    try:
        assert store.claim_batch("w", 30, max_batch=4) == []
        assert deliveries.claim_due(100, 60) == []
        assert store.expire_deadlines() == (0, 0)
    finally:
        event.remove(store.engine, "before_cursor_execute", note)
    assert set(statements) == {"SELECT"}, statements
    # With work to do, the same calls take it.
    add(store, "queued")
    assert [job.id for job in store.claim_batch("w", 30, max_batch=4)] == ["queued"]


def test_every_state_change_is_logged_and_owes_its_webhooks(store: JobStore) -> None:
    store.submit(NewJob(
        id="hooked", token_id="tok_a", model_id="m", input={}, seed=1, progress_total=2,
        batch_key="k", webhook_url="http://127.0.0.1:9/h", webhook_intermediate=True,
    ))  # fmt: skip
    add(store, "plain")
    add(store, "dropped")
    # Positions count the job's own model's queue ("hooked" is model "m", the others Ovis).
    assert store.queue_positions(["plain", "dropped", "unknown"]) == {"plain": 0, "dropped": 1}
    store.request_cancel("dropped")
    assert store.queue_positions(["plain"]) == {"plain": 0}
    claimed = store.claim_next("w", 30)
    assert claimed is not None
    assert claimed.id == "hooked"
    for step in (1, 2):
        store.report_batch_progress(["hooked"], "w", step, 30)
    store.complete("hooked", "w", [])
    store.claim_next("dead", 0.01)
    time.sleep(0.05)
    store.recover_expired(max_attempts=3)

    events = store.events_after(0)
    assert [event.seq for event in events] == sorted(event.seq for event in events)
    story = [(e.request_id, e.status.value, e.step) for e in events]
    assert story == [
        ("hooked", "queued", 0),
        ("plain", "queued", 0),
        ("dropped", "queued", 0),
        ("dropped", "cancelled", 0),
        ("hooked", "running", 0),
        ("hooked", "running", 1),
        ("hooked", "running", 2),
        ("hooked", "succeeded", 2),
        ("plain", "running", 0),
        ("plain", "queued", 0),  # its worker died: back in the queue
    ]
    assert store.last_event_seq() == events[-1].seq
    snapshot = store.snapshot("hooked")
    assert snapshot is not None
    assert snapshot[1] == max(e.seq for e in events if e.request_id == "hooked")

    # The submit owes no message; every later change of the hooked job owes one.
    deliveries = DeliveryStore(store.engine)
    owed = deliveries.claim_due(100, 60)
    assert sorted((m.status.value, m.step) for m in owed) == [
        ("running", 0), ("running", 1), ("running", 2), ("succeeded", 2)
    ]  # fmt: skip
    assert {m.request_id for m in owed} == {"hooked"}
    assert deliveries.claim_due(100, 60) == [], "held messages are not handed out twice"
    schedule = (0.0, 0.0)
    final = next(m for m in owed if m.status == JobStatus.SUCCEEDED)
    assert deliveries.record_attempt(final, "HTTP 500", schedule) == "pending"
    (again,) = deliveries.claim_due(100, 60)
    assert again.id == final.id
    assert deliveries.record_attempt(final, "HTTP 500", schedule) == "lost", "an old hold"
    assert deliveries.record_attempt(again, "HTTP 500", schedule) == "failed"
    first = next(m for m in owed if m.step == 0)
    assert deliveries.record_attempt(first, None, schedule) == "delivered"
    assert deliveries.counts() == {"pending": 2, "delivered": 1, "failed": 1}
    # Messages still owed do not keep a finished job past its retention.
    assert deliveries.counts()["pending"] == 2
    late = utcnow() + timedelta(days=1)
    assert [job.id for job in store.finished_before(late)] == ["hooked", "dropped"]
    FileDeletions(store.engine).delete_requests(["hooked"])
    assert deliveries.counts() == {"pending": 0, "delivered": 0, "failed": 0}
    assert all(event.request_id != "hooked" for event in store.events_after(0))


def test_an_up_to_date_database_is_not_handed_to_alembic(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every serve, worker and command migrates on start: at the head, that is one read."""
    assert current_revisions(store.engine) == [HEAD_REVISION]

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("alembic ran on an up-to-date database")

    monkeypatch.setattr(command, "upgrade", refuse)
    migrate(store.engine)


def test_upgrading_a_0001_database_keeps_its_jobs(tmp_path: Path) -> None:
    db = connect(sqlite_url(tmp_path))
    command.upgrade(alembic_config(db), "0001")
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, token_id, model_id, input, seed, batch_key, status, "
                "cancel_requested, progress_step, progress_total, attempts, created_at) VALUES "
                "('old', 'tok_a', 'm', '{}', 1, 'k', 'queued', 0, 0, 4, 0, '2026-11-01 10:00:00')"
            )
        )
    migrate(db)
    store = JobStore(db)
    old = store.get("old")
    assert old is not None
    assert (old.webhook_url, old.webhook_intermediate) == (None, False)
    assert store.queue_positions(["old"]) == {"old": 0}
    db.dispose()


class WatchedRemovals(LocalFileStore):
    """A real file store that notes, at each removal, whether the request's row was still
    there, and refuses the removals of ``refused`` (a disk gone read-only)."""

    def __init__(self, root: Path, store: JobStore) -> None:
        super().__init__(root, UrlSigner("retention"))
        self.store = store
        self.refused: set[str] = set()
        self.row_there: dict[str, bool] = {}

    def delete_request(self, request_id: str) -> int:
        self.row_there[request_id] = self.store.get(request_id) is not None
        if request_id in self.refused:
            raise OSError(30, "Read-only file system")
        return super().delete_request(request_id)


def test_retention_deletes_rows_before_files_and_keeps_the_removals_refused(
    store: JobStore, tmp_path: Path
) -> None:
    files = WatchedRemovals(tmp_path / "files", store)
    for name in ("old-1", "old-2", "queued"):
        add(store, name)
    for name in ("old-1", "old-2"):
        complete_with_file(store, files, name)
    files.refused.add("old-2")
    deletions = FileDeletions(store.engine)
    sweeper = RetentionSweeper(
        store, deletions, files, WorkerRegistry(store.engine), 0, interval_seconds=1
    )

    assert sweeper.sweep() == (2, 1)
    # A reader never sees a request whose files are gone: the row went first.
    assert files.row_there == {"old-1": False, "old-2": False}
    assert not (files.root / "old-1").exists()
    assert (files.root / "old-2").is_dir()
    assert deletions.owed() == ["old-2"], "the refused removal is on record"
    assert [store.get(name) is not None for name in ("old-1", "old-2", "queued")] == [
        False,
        False,
        True,
    ]

    files.refused.clear()  # the disk is back: the deletion sweeper finishes the job
    remover = DeletionSweeper(deletions, files)
    # The record's next attempt is a second away.
    wait_for(lambda: remover.sweep() == 1, timeout=10, interval=0.2)
    assert deletions.owed() == []
    assert not (files.root / "old-2").exists()
    assert sweeper.sweep() == (0, 0)
