"""What a worker tells /readyz about itself while it gets ready: its phase and details.

The phase (downloading, loading, warming, ready) and details such as progress or the memory
profile (a WorkerDetail, jobs/worker_detail.py) live in the worker's row of the workers
table. A change of phase is written at once; progress at most once a second (a download
reports many times a second); every heartbeat writes the latest again, so a write lost to
a database blip is repaired by the next beat.
"""

from __future__ import annotations

import logging
import threading
import time
from types import EllipsisType
from typing import Literal

from ovis_server.engine.weights import Progress
from ovis_server.jobs.worker_detail import DetailPart, ProgressDetail, WorkerDetail
from ovis_server.jobs.workers import WorkerRegistry, WorkerState

logger = logging.getLogger(__name__)

Phase = Literal["downloading", "loading", "warming", "ready"]


class StateReport:
    def __init__(self, registry: WorkerRegistry, worker_id: str, min_interval: float = 1.0) -> None:
        self.registry = registry
        self.worker_id = worker_id
        self.min_interval = min_interval
        self._lock = threading.Lock()
        # Held from a snapshot until it is written, so that a snapshot taken before a
        # change cannot be written after it (the heartbeat thread once wrote the loading
        # detail over the ready one, and /readyz showed a ready worker without its plan).
        self._writing = threading.Lock()
        self._phase: Phase = "loading"
        self._detail = WorkerDetail()
        self._written_at = 0.0

    def snapshot(self) -> tuple[Phase, WorkerDetail]:
        with self._lock:
            return self._phase, self._detail

    def phase(self, phase: Phase, *parts: DetailPart) -> None:
        """Enter ``phase``: its progress starts anew; the fields given in ``parts`` replace
        the detail's (None drops one)."""
        with self._lock:
            self._phase = phase
            self._detail = self._detail.with_progress(None).merged(*parts)
        self._write()

    def progress(self, progress: Progress, *, force: bool = False) -> None:
        """Progress of the current phase, written at most every ``min_interval`` seconds
        unless ``force``."""
        with self._lock:
            self._detail = self._detail.with_progress(
                ProgressDetail.model_validate(progress.detail())
            )
            due = force or time.monotonic() - self._written_at >= self.min_interval
        if due:
            self._write()

    def update(self, *parts: DetailPart) -> None:
        """Let the fields given in ``parts`` replace the detail's (None drops one), without
        changing the phase."""
        with self._lock:
            self._detail = self._detail.merged(*parts)
        self._write()

    def write(
        self, memory_bytes: int | None = None, problem: str | EllipsisType | None = ...
    ) -> None:
        """Write the phase and detail as they are now into the worker's row, with the
        heartbeat's other fields; raises what the database raises."""
        with self._writing:
            phase, detail = self.snapshot()
            state = WorkerState(
                memory_bytes=memory_bytes, problem=problem, phase=phase, detail=detail
            )
            self.registry.heartbeat(self.worker_id, state)

    def _write(self) -> None:
        try:
            self.write()
        except Exception:  # the heartbeat writes it again
            logger.exception("could not report the worker's state")
        with self._lock:
            self._written_at = time.monotonic()
