"""Which workers are alive: each one registers, beats while alive, and leaves on exit."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from types import EllipsisType

from sqlalchemy import Engine, delete, insert, select, update

from ovis_server.db.retry import DEFAULT_RETRY_SECONDS, retried
from ovis_server.db.schema import workers
from ovis_server.jobs.worker_detail import WorkerDetail


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    model: str
    device: str
    ready: bool
    memory_bytes: int | None
    started_at: datetime
    heartbeat_at: datetime
    problem: str | None = None
    phase: str | None = None
    detail: WorkerDetail = field(default_factory=WorkerDetail)


@dataclass(frozen=True)
class WorkerState:
    """What a heartbeat tells of the worker besides that it is alive: each field given
    replaces the row's, each left None keeps it. ``problem`` (a string, or None once it
    is over) says why the worker takes no jobs, and is kept when not given; ``phase`` and
    ``detail`` (jobs/worker_detail.py) are what /readyz and /metrics show of the worker;
    ``device`` is sent once ``auto`` is resolved."""

    ready: bool | None = None
    memory_bytes: int | None = None
    problem: str | EllipsisType | None = ...
    phase: str | None = None
    detail: WorkerDetail | None = None
    device: str | None = None

    def changes(self) -> dict[str, object]:
        """The worker row's columns this state changes, and their new values."""
        changed: dict[str, object] = {
            column.name: value
            for column in fields(self)
            if column.name not in ("problem", "detail")
            and (value := getattr(self, column.name)) is not None
        }
        if self.detail is not None:
            changed["detail"] = self.detail.stored()
        if not isinstance(self.problem, EllipsisType):
            changed["problem"] = self.problem[:500] if self.problem else None
        return changed


class WorkerRegistry:
    def __init__(self, engine: Engine, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.engine = engine
        self.retry_seconds = retry_seconds

    @retried
    def register(self, worker_id: str, host: str, pid: int, model: str, device: str) -> None:
        """Add the worker's row: alive since now, not ready yet."""
        now = datetime.now(UTC)
        identity = {"id": worker_id, "host": host, "pid": pid, "model": model, "device": device}
        fresh = {"ready": False, "started_at": now, "heartbeat_at": now}
        with self.engine.begin() as conn:
            conn.execute(insert(workers).values(identity | fresh))

    @retried
    def heartbeat(self, worker_id: str, state: WorkerState) -> None:
        """Mark the worker alive now, with what ``state`` changes."""
        values = {"heartbeat_at": datetime.now(UTC), **state.changes()}
        with self.engine.begin() as conn:
            conn.execute(update(workers).where(workers.c.id == worker_id).values(values))

    @retried
    def deregister(self, worker_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(workers).where(workers.c.id == worker_id))

    @retried
    def alive(self, within_seconds: float) -> list[WorkerInfo]:
        """Workers that beat in the last ``within_seconds``, loading or ready."""
        since = datetime.now(UTC) - timedelta(seconds=within_seconds)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(workers).where(workers.c.heartbeat_at >= since).order_by(workers.c.id)
            ).mappings()
            return [
                WorkerInfo(**{**row, "detail": WorkerDetail.read(row["detail"])}) for row in rows
            ]

    @retried
    def forget_process(self, host: str, pid: int) -> int:
        """Drop the rows of a worker process known to be gone (serve saw its child exit), so
        that /readyz stops counting it at once rather than when its heartbeat goes stale."""
        with self.engine.begin() as conn:
            gone = delete(workers).where(workers.c.host == host, workers.c.pid == pid)
            return int(conn.execute(gone).rowcount)

    @retried
    def forget_silent(self, silent_seconds: float) -> int:
        """Drop rows of workers silent this long (killed without a chance to deregister)."""
        since = datetime.now(UTC) - timedelta(seconds=silent_seconds)
        with self.engine.begin() as conn:
            return int(conn.execute(delete(workers).where(workers.c.heartbeat_at < since)).rowcount)
