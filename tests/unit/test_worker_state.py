"""What a worker reports of itself while getting ready, and how /readyz shows it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from ovis_server.api.ops import worker_readiness
from ovis_server.db.connect import connect, migrate
from ovis_server.db.schema import workers
from ovis_server.engine.weights import Progress
from ovis_server.jobs import worker_detail
from ovis_server.jobs.worker_detail import MemoryPlanDetail, StartupDetail, WorkerDetail
from ovis_server.jobs.workers import WorkerRegistry, WorkerState
from ovis_server.worker.report import StateReport


def registry_at(tmp_path: Path) -> WorkerRegistry:
    db = connect(f"sqlite:///{tmp_path / 'state.db'}")
    migrate(db)
    registry = WorkerRegistry(db)
    registry.register("w1", "secret-host", 4242, "aidc-ai/ovis-image", "cuda:0")
    return registry


def test_phases_and_progress_reach_readyz(tmp_path: Path) -> None:
    registry = registry_at(tmp_path)
    report = StateReport(registry, "w1", min_interval=3600)
    report.phase("downloading")
    report.progress(Progress(10, 100, "bytes", rate=5.0), force=True)
    (worker,) = registry.alive(60)
    shown = worker_readiness(worker)
    assert shown.phase == "downloading"
    assert shown.progress is not None
    assert (shown.progress.done, shown.progress.total, shown.progress.eta_seconds) == (10, 100, 18)
    # Progress is throttled: a write within min_interval waits for the next heartbeat.
    report.progress(Progress(50, 100, "bytes", rate=5.0))
    assert worker_readiness(registry.alive(60)[0]).progress.done == 10  # type: ignore[union-attr]
    # A new phase starts without the old phase's progress.
    report.phase("warming", MemoryPlanDetail(memory_profile="full"))
    shown = worker_readiness(registry.alive(60)[0])
    assert (shown.phase, shown.progress, shown.memory_profile) == ("warming", None, "full")
    registry.heartbeat("w1", WorkerState(ready=True))
    shown = worker_readiness(registry.alive(60)[0])
    assert shown.phase == "ready"
    assert shown.model == "aidc-ai/ovis-image"
    assert "secret-host" not in shown.model_dump_json()
    assert "4242" not in shown.model_dump_json()


def write_row(registry: WorkerRegistry, **values: object) -> None:
    """Write the worker's row as another version of the worker (or a damaged one) might."""
    with registry.engine.begin() as conn:
        conn.execute(update(workers).where(workers.c.id == "w1").values(**values))


def test_unreadable_details_are_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_detail, "_unreadable_seen", set())  # each is logged once
    registry = registry_at(tmp_path)
    write_row(registry, phase="bogus", detail={"progress": "nonsense", "memory_profile": 7})
    shown = worker_readiness(registry.alive(60)[0])
    assert (shown.phase, shown.progress, shown.memory_profile) == ("loading", None, None)
    # A field that does not read leaves the others: each is left out on its own, logged.
    write_row(registry, detail={"memory_profile": "full", "batch_limit": True, "swaps": "2"})
    (worker,) = registry.alive(60)
    assert worker.detail == WorkerDetail(memory_profile="full")
    assert "unreadable batch_limit" in caplog.text
    # A detail that is not an object at all reads as none.
    write_row(registry, detail=["not", "an", "object"])
    assert registry.alive(60)[0].detail == WorkerDetail()
    assert "unreadable detail of type list" in caplog.text


# What a ready worker of two models wrote before the detail was typed (its dict, as stored):
# workers of that version may still be running beside an API of this one.
EARLIER_DETAIL = {
    "memory_profile": "full",
    "memory_budget_bytes": 80 * 2**30,
    "memory_reason": "everything fits",
    "batch_limit": 4,
    "max_pixels": 4194304,
    "models": [
        {
            "model_id": "aidc-ai/ovis-image",
            "resident": True,
            "where": "device",
            "batch_limit": 4,
            "max_pixels": 4194304,
        },
        {"model_id": "other/model", "resident": False, "where": "host", "batch_limit": 2},
    ],
    "resident_models": 1,
    "swaps": 3,
    "swap_seconds_total": 1.25,
    "last_swap_seconds": 0.5,
    "startup_seconds": 12.5,
    "warmup_seconds": 4.0,
}


def test_an_earlier_workers_detail_reads_back_and_a_typed_one_is_stored_the_same(
    tmp_path: Path,
) -> None:
    registry = registry_at(tmp_path)
    write_row(registry, ready=True, phase="ready", detail=EARLIER_DETAIL)
    (worker,) = registry.alive(60)
    detail = worker.detail
    assert (detail.memory_profile, detail.batch_limit, detail.max_pixels) == ("full", 4, 4194304)
    assert detail.models is not None
    assert [(m.model_id, m.where, m.max_pixels) for m in detail.models] == [
        ("aidc-ai/ovis-image", "device", 4194304),
        ("other/model", "host", None),
    ]
    shown = worker_readiness(worker)
    assert (shown.swaps, shown.swap_seconds_total, shown.last_swap_seconds) == (3, 1.25, 0.5)
    assert shown.models is not None
    assert [m.resident for m in shown.models] == [True, False]
    # What this version writes is that same flat object: earlier APIs read it too.
    assert detail.stored() == EARLIER_DETAIL
    registry.heartbeat("w1", WorkerState(detail=detail))
    with registry.engine.connect() as conn:
        stored = conn.execute(select(workers.c.detail).where(workers.c.id == "w1")).scalar_one()
    assert stored == EARLIER_DETAIL


def test_the_report_merges_the_parts_it_is_given(tmp_path: Path) -> None:
    registry = registry_at(tmp_path)
    report = StateReport(registry, "w1", min_interval=3600)
    report.phase("warming", MemoryPlanDetail(memory_profile="full", memory_budget_bytes=None))
    report.progress(Progress(1, 3, "shapes"), force=True)
    report.update(StartupDetail(startup_seconds=2.0))
    phase, detail = report.snapshot()
    assert phase == "warming"
    assert detail.stored() == {
        "memory_profile": "full",
        "startup_seconds": 2.0,
        "progress": {"done": 1, "total": 3, "unit": "shapes"},
    }
    # A part's field given as None drops it; a field not given is kept; a phase drops the
    # progress.
    report.phase("ready", MemoryPlanDetail(memory_profile=None, batch_limit=2))
    assert report.snapshot()[1].stored() == {"batch_limit": 2, "startup_seconds": 2.0}
    assert registry.alive(60)[0].detail == report.snapshot()[1]


class PausedRegistry(WorkerRegistry):
    """A registry whose heartbeats from one thread wait, between the snapshot they were
    given and the write, until the test lets them go on."""

    def __init__(self, registry: WorkerRegistry, paused_thread: str) -> None:
        super().__init__(registry.engine)
        self.paused_thread = paused_thread
        self.entered = threading.Event()
        self.go_on = threading.Event()

    def heartbeat(self, worker_id: str, state: WorkerState) -> None:
        if threading.current_thread().name == self.paused_thread:
            self.entered.set()
            self.go_on.wait(5)
        super().heartbeat(worker_id, state)


def test_a_heartbeat_never_writes_a_snapshot_older_than_the_row(tmp_path: Path) -> None:
    # The heartbeat thread took its snapshot while the worker loaded, and wrote it after
    # the worker had written "ready" with its memory plan: /readyz showed a ready worker
    # without its plan until the next beat (a CI failure on PostgreSQL).
    registry = PausedRegistry(registry_at(tmp_path), paused_thread="heartbeat")
    report = StateReport(registry, "w1", min_interval=3600)
    report.phase("loading")
    beat = threading.Thread(target=report.write, kwargs={"memory_bytes": 1}, name="heartbeat")
    beat.start()
    assert registry.entered.wait(5)  # the beat holds its (loading) snapshot
    ready = threading.Thread(
        target=report.phase, args=("ready", MemoryPlanDetail(memory_profile="full"))
    )
    ready.start()
    time.sleep(0.2)  # time for the ready write to overtake the beat, were it allowed to
    registry.go_on.set()
    beat.join(5)
    ready.join(5)
    (worker,) = registry.alive(60)
    assert (worker.phase, worker.detail.memory_profile) == ("ready", "full")
