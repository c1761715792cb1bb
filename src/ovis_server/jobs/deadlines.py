"""Deadlines: a job not finished by its submit's Cancel-After ends cancelled.

Each API process sweeps about once a second: one statement cancels the queued jobs past
their deadline (so they leave the queue even while every worker is busy), another flags
the running ones, which their worker stops at its next denoising step.
"""

from __future__ import annotations

import logging
import threading

from ovis_server.jobs.store import JobStore

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 1.0


class DeadlineSweeper:
    def __init__(self, store: JobStore, interval_seconds: float = SWEEP_SECONDS) -> None:
        self.store = store
        self.interval = interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="deadlines", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                cancelled, flagged = self.store.expire_deadlines()
                if cancelled or flagged:
                    logger.info(
                        "deadlines: cancelled %d queued job(s), stopping %d running",
                        cancelled,
                        flagged,
                    )
            except Exception:
                logger.exception("deadline sweep failed; trying again shortly")
            self._stop.wait(self.interval)
