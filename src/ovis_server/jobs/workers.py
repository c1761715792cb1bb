"""Which workers are alive: each one registers, beats while alive, and leaves on exit."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import EllipsisType
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from ovis_server.db.retry import DEFAULT_RETRY_SECONDS, retried
from ovis_server.db.schema import workers


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
    detail: dict[str, Any] | None = None


class WorkerRegistry:
    def __init__(self, engine: Engine, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.engine = engine
        self.retry_seconds = retry_seconds

    @retried
    def register(self, worker_id: str, host: str, pid: int, model: str, device: str) -> None:
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(
                insert(workers).values(
                    id=worker_id,
                    host=host,
                    pid=pid,
                    model=model,
                    device=device,
                    ready=False,
                    started_at=now,
                    heartbeat_at=now,
                )
            )

    @retried
    def heartbeat(
        self,
        worker_id: str,
        *,
        ready: bool | None = None,
        memory_bytes: int | None = None,
        problem: str | EllipsisType | None = ...,
        phase: str | None = None,
        detail: dict[str, Any] | None = None,
        device: str | None = None,
    ) -> None:
        """Mark the worker alive now; ``problem`` (a string, or None once it is over)
        says why it takes no jobs, and is left as it was when not given. ``phase`` and
        ``detail`` (what /readyz shows of the worker) and ``device`` (once ``auto`` is
        resolved) replace theirs when given."""
        values: dict[str, object] = {"heartbeat_at": datetime.now(UTC)}
        if phase is not None:
            values["phase"] = phase
        if device is not None:
            values["device"] = device
        if detail is not None:
            values["detail"] = detail
        if not isinstance(problem, EllipsisType):
            values["problem"] = problem[:500] if problem else None
        if ready is not None:
            values["ready"] = ready
        if memory_bytes is not None:
            values["memory_bytes"] = memory_bytes
        with self.engine.begin() as conn:
            conn.execute(update(workers).where(workers.c.id == worker_id).values(**values))

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
            return [WorkerInfo(**row) for row in rows]

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
