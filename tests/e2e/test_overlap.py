"""The worker's device thread never waits for storing, within a bound; and an out-of-memory
error is retried smaller instead of failing the job.

Most tests run the real worker loop in this process (its own thread, as ``ovis-server
worker`` runs it) on the tiny engine, a real job store (SQLite and PostgreSQL) and a real
local files store; the worker's test-only hooks (worker/hooks.py) slow or stall the store
step and raise out-of-memory errors inside the pipeline. The SIGTERM test runs real server
processes with tests/e2e/faults.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from ovis_server.catalogue import OVIS_IMAGE
from ovis_server.engine.pipeline import Engine
from ovis_server.engine.request import GenerationRequest
from ovis_server.jobs.job import Job, JobStatus, NewJob
from ovis_server.jobs.store import JobStore
from ovis_server.storage.local import LocalFileStore
from ovis_server.storage.signing import UrlSigner
from ovis_server.worker.hooks import Hooks, StepHook
from ovis_server.worker.runner import Worker

from .bodies import OVIS_ID
from .faults import use_faults
from .helpers import create_token, http_get, start_server, submit, wait_for

# Long enough for a loaded 2-core machine; a wait that runs out is a failure, not a race.
PATIENCE = 120.0


def queue_jobs(store: JobStore, ids: list[str], size: int = 64, steps: int = 2) -> None:
    """Queue a small job per id, all of one batch key, oldest first."""
    for n, request_id in enumerate(ids):
        store.submit(
            NewJob(
                id=request_id,
                token_id="tok_overlap",
                model_id=OVIS_ID,
                input={
                    "prompt": f"a lighthouse, number {n}",
                    "image_size": {"width": size, "height": size},
                    "num_inference_steps": steps,
                    "guidance_scale": 1,
                },
                seed=n,
                progress_total=steps,
                batch_key=f"{size}x{size}:{steps}",
            )
        )


def make_worker(
    store: JobStore,
    engine: Engine,
    tmp_path: Path,
    hook: StepHook | None = None,
    *,
    lease_seconds: float = 30.0,
    max_batch: int = 1,
) -> Worker:
    return Worker(
        store=store,
        files=LocalFileStore(tmp_path / "files", UrlSigner("overlap-secret")),
        engine=engine,
        model=OVIS_IMAGE,
        worker_id="w-overlap",
        step_hook=hook,
        lease_seconds=lease_seconds,
        poll_seconds=0.05,
        max_batch=max_batch,
    )


@contextmanager
def working(worker: Worker) -> Iterator[threading.Event]:
    """The worker's loop on a thread of its own; stopped (and drained) on the way out."""
    stop = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            worker.run(stop)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, name="worker-under-test")
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(PATIENCE)
    assert not thread.is_alive(), "the worker did not stop"
    assert not failed, failed


def statuses(store: JobStore, ids: list[str]) -> list[JobStatus]:
    jobs = [store.get(request_id) for request_id in ids]
    return [job.status for job in jobs if job is not None]


def all_final(store: JobStore, ids: list[str]) -> Callable[[], bool]:
    return lambda: all(status.is_final for status in statuses(store, ids))


def job(store: JobStore, request_id: str) -> Job:
    found = store.get(request_id)
    assert found is not None
    return found


# --- the device's thread does not wait for storing ----------------------------------------------


def test_the_next_job_runs_while_the_last_image_is_stored(
    store: JobStore, engine: Engine, tmp_path: Path
) -> None:
    ids = ["first", "second"]
    queue_jobs(store, ids)
    second_running = threading.Event()
    overlapped: list[bool] = []

    def step(job: Job, step: int) -> None:
        if job.id == "second":
            second_running.set()

    def before_store(job: Job) -> None:
        # Storing the first image lasts until the second job denoises: a worker that
        # stores on the thread that denoises never gets there, and this times out.
        if job.id == "first":
            overlapped.append(second_running.wait(60))

    worker = make_worker(store, engine, tmp_path, Hooks(step, before_store))
    with working(worker):
        wait_for(all_final(store, ids), timeout=PATIENCE)
    assert overlapped == [True]
    assert statuses(store, ids) == [JobStatus.SUCCEEDED] * 2
    assert [job(store, request_id).attempts for request_id in ids] == [1, 1]
    for request_id in ids:
        assert (tmp_path / "files" / request_id / "0.png").is_file()


def test_a_stalled_store_bounds_the_images_held_and_the_worker_claims_no_more(
    store: JobStore, engine: Engine, tmp_path: Path
) -> None:
    ids = [f"job{n}" for n in range(6)]
    queue_jobs(store, ids)
    storing = threading.Event()
    unstall = threading.Event()

    def before_store(job: Job) -> None:
        storing.set()
        unstall.wait(PATIENCE)

    # Leases of 2 s: the wait below outlasts a lease several times over.
    worker = make_worker(store, engine, tmp_path, Hooks(before_store=before_store), lease_seconds=2)
    with working(worker):
        assert storing.wait(PATIENCE)
        # One image in the finisher's hands, one more made and handed over; then the
        # device's thread waits before it claims again.
        wait_for(lambda: worker.images_unstored == 2, timeout=PATIENCE)
        held = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            held.append(worker.images_unstored)
            time.sleep(0.1)
        assert max(held) == 2
        assert statuses(store, ids).count(JobStatus.RUNNING) == 2  # claimed: only those
        assert statuses(store, ids).count(JobStatus.QUEUED) == 4
        # The two waiting jobs kept their leases all along: nothing to recover.
        assert store.recover_expired(3) == 0
        unstall.set()
        wait_for(all_final(store, ids), timeout=PATIENCE)
    assert statuses(store, ids) == [JobStatus.SUCCEEDED] * 6
    assert [job(store, request_id).attempts for request_id in ids] == [1] * 6


@contextmanager
def jobs_table_locked(store: JobStore) -> Iterator[None]:
    """Another connection holds a write lock on the jobs table while inside: writes wait
    (SQLite answers "database is locked" after its busy timeout; PostgreSQL blocks)."""
    with store.engine.connect() as conn:
        if store.engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")
            conn.exec_driver_sql("LOCK TABLE jobs IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.exec_driver_sql("ROLLBACK")


def test_steps_go_on_while_the_database_is_locked_and_each_is_recorded_in_order(
    store: JobStore, engine: Engine, tmp_path: Path
) -> None:
    steps = 6
    queue_jobs(store, ["locked"], steps=steps)
    done: list[int] = []
    first_step = threading.Event()
    locked = threading.Event()

    def step(job: Job, n: int) -> None:
        done.append(n)
        if n == 1:
            first_step.set()
            assert locked.wait(PATIENCE)

    worker = make_worker(store, engine, tmp_path, Hooks(step))
    with working(worker):
        assert first_step.wait(PATIENCE)
        with jobs_table_locked(store):
            locked.set()
            # Every step runs with its progress write stuck behind the lock: a worker that
            # writes on the device's thread waits at the second step (on PostgreSQL until
            # the lock goes; on SQLite seconds per step), and this times out.
            wait_for(lambda: len(done) == steps, timeout=20)
            assert job(store, "locked").status == JobStatus.RUNNING  # its end waits too
        wait_for(all_final(store, ["locked"]), timeout=PATIENCE)
    finished = job(store, "locked")
    assert finished.status == JobStatus.SUCCEEDED
    assert finished.progress_step == steps
    assert done == list(range(1, steps + 1))


def test_sigterm_during_a_slow_store_still_records_the_job_completed(
    tmp_path: Path,
    tiny_weights: Path,
    database_url: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_faults(monkeypatch, "SLOWSTORE=slow_store")
    monkeypatch.setenv("OVIS_SERVER_FAULT_SECONDS", "5")
    server = start_server(tmp_path, tiny_weights)
    token = create_token(tmp_path, "slow")
    try:
        with server.client(token) as client:
            fast = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}
            request_id = submit(client, prompt="SLOWSTORE", **fast)
            wait_for(lambda: f"slow store: job {request_id}" in server.log(), timeout=PATIENCE)
        assert server.stop() == 0  # SIGTERM while the image waits to be stored
    finally:
        server.kill()
    log = server.log()
    assert f"job {request_id} succeeded" in log
    assert f"job {request_id} put back" not in log

    again = start_server(tmp_path, tiny_weights, "--no-worker")
    try:
        with again.client(token) as client:
            result = client.get(f"/v1/requests/{request_id}/result").json()
            assert result["status"] == "succeeded", result
            assert http_get(result["output"]["image"]).status_code == 200
    finally:
        again.kill()


# --- out of memory at run time ------------------------------------------------------------------


def out_of_memory_at_first_step(times: int) -> tuple[StepHook, list[str]]:
    """A step hook that raises the CUDA out-of-memory error the first ``times`` times a
    run reaches its first step; and the ids of the jobs it struck."""
    struck: list[str] = []

    def hook(job: Job, step: int) -> None:
        if step == 1 and len(struck) < times:
            struck.append(job.id)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")

    return hook, struck


def test_an_out_of_memory_error_is_retried_lighter_and_the_job_completes(
    store: JobStore, engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ovis_server.worker.runner")
    queue_jobs(store, ["big"])
    hook, struck = out_of_memory_at_first_step(1)
    with working(make_worker(store, engine, tmp_path, hook)):
        wait_for(all_final(store, ["big"]), timeout=PATIENCE)
    assert struck == ["big"]
    done = job(store, "big")
    assert done.status is JobStatus.SUCCEEDED
    assert done.attempts == 1  # the out-of-memory run cost no attempt
    assert "job big ran out of memory; retrying it once with a lighter setting" in caplog.text
    assert (tmp_path / "files" / "big" / "0.png").is_file()


def test_a_batch_that_runs_out_of_memory_completes_as_single_runs(
    store: JobStore, engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ovis_server.worker")  # runner and recording
    ids = ["left", "right"]
    queue_jobs(store, ids)
    hook, struck = out_of_memory_at_first_step(1)
    worker = make_worker(store, engine, tmp_path, hook, max_batch=2)
    # Both claimed as one batch before the loop starts, so the batch is certain.
    batch = worker.claim()
    assert [claimed.id for claimed in batch] == ids
    worker.run_jobs(batch, threading.Event())
    assert len(struck) == 1
    assert statuses(store, ids) == [JobStatus.SUCCEEDED] * 2
    assert [job(store, request_id).attempts for request_id in ids] == [1, 1]
    assert "a batch of 2 ran out of memory; running its jobs one by one" in caplog.text
    for request_id in ids:
        assert f"job {request_id} succeeded" in caplog.text
    assert caplog.text.count("batch of 1)") == 2
    assert "lighter setting" not in caplog.text  # alone, each fitted


def test_out_of_memory_again_on_the_lighter_retry_fails_the_job_clearly(
    store: JobStore, engine: Engine, tmp_path: Path
) -> None:
    queue_jobs(store, ["huge", "after"])
    struck: list[str] = []

    def always(job: Job, step: int) -> None:
        if job.id == "huge" and step == 1:
            struck.append(job.id)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 60.00 GiB")

    with working(make_worker(store, engine, tmp_path, always)):
        wait_for(all_final(store, ["huge", "after"]), timeout=PATIENCE)
    assert struck == ["huge", "huge"]  # the run, then one lighter retry
    failed = job(store, "huge")
    assert failed.status is JobStatus.FAILED
    assert failed.error_type == "out_of_memory"
    assert failed.error_message is not None
    assert "also when retried with a lighter setting" in failed.error_message
    assert "smaller image_size" in failed.error_message
    assert failed.attempts == 1
    assert job(store, "after").status is JobStatus.SUCCEEDED  # the worker went on


def test_the_light_setting_keeps_the_image_of_a_one_tile_request(engine: Engine) -> None:
    request = GenerationRequest("a red door", "blurry", 128, 128, 3, 5.0, seed=5)
    stock = np.asarray(engine.generate_stock(request), dtype=np.int16)
    (light,) = engine.generate_pixels([request], light=True)
    assert light is not None
    # The guidance branches run one after the other, as the stock pipeline runs them.
    assert int(np.abs(light.astype(np.int16) - stock).max()) <= 2
