"""What a worker reports of itself while getting ready, and how /readyz shows it."""

from __future__ import annotations

from pathlib import Path

from ovis_server.api.ops import worker_readiness
from ovis_server.db.connect import connect, migrate
from ovis_server.engine.weights import Progress
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
    report.phase("warming", memory_profile="full")
    shown = worker_readiness(registry.alive(60)[0])
    assert (shown.phase, shown.progress, shown.memory_profile) == ("warming", None, "full")
    registry.heartbeat("w1", WorkerState(ready=True))
    shown = worker_readiness(registry.alive(60)[0])
    assert shown.phase == "ready"
    assert shown.model == "aidc-ai/ovis-image"
    assert "secret-host" not in shown.model_dump_json()
    assert "4242" not in shown.model_dump_json()


def test_unreadable_details_are_left_out(tmp_path: Path) -> None:
    registry = registry_at(tmp_path)
    bogus = WorkerState(phase="bogus", detail={"progress": "nonsense", "memory_profile": 7})
    registry.heartbeat("w1", bogus)
    shown = worker_readiness(registry.alive(60)[0])
    assert (shown.phase, shown.progress, shown.memory_profile) == ("loading", None, None)
