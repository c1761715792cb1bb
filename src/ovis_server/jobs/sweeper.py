"""The API process's background passes over the store (deadlines, retention)."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from typing import ClassVar

logger = logging.getLogger(__name__)


class Sweeper(ABC):
    """Runs ``sweep`` on a daemon thread every ``interval`` seconds, from ``start`` until
    ``stop``. A pass that fails is logged, and the next one runs on time."""

    name: ClassVar[str]  # the thread's, and the log's
    # How long ``stop`` waits for a pass under way to end.
    stop_timeout: ClassVar[float] = 10.0

    def __init__(self, interval_seconds: float) -> None:
        self.interval = interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)

    @abstractmethod
    def sweep(self) -> object:
        """One pass."""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.stop_timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:
                logger.exception("%s sweep failed; trying again in %gs", self.name, self.interval)
            self._stop.wait(self.interval)
