"""``serve`` runs the worker as a child process and restarts it whenever it exits."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

from ovis_server.config import SETTINGS_JSON_ENV, Settings

logger = logging.getLogger(__name__)

RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
# A worker that ran this long before dying starts the delays over.
STABLE_SECONDS = 60.0


def worker_environment(settings: Settings) -> dict[str, str]:
    """The worker's environment, with ``settings`` in it as JSON: the worker runs with the
    very settings ``serve`` has (less the /metrics token, which it has no use for), and the
    database URL's password does not show in ``ps``."""
    return {**os.environ, SETTINGS_JSON_ENV: settings.model_dump_json(exclude={"metrics_token"})}


def worker_command() -> list[str]:
    """The ``ovis-server worker`` command line; its settings come in its environment."""
    return [sys.executable, "-m", "ovis_server", "worker", "--parent-pid", str(os.getpid())]


class WorkerSupervisor:
    def __init__(
        self,
        command: list[str],
        env: dict[str, str] | None = None,
        restart_delays: tuple[float, ...] = RESTART_DELAYS,
        stop_timeout: float = 30.0,
    ) -> None:
        self.command = command
        self.env = env
        self.restart_delays = restart_delays
        self.stop_timeout = stop_timeout
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor")

    @property
    def pid(self) -> int | None:
        with self._lock:
            return None if self._process is None else self._process.pid

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """SIGTERM the worker (it puts its job back), then SIGKILL if it takes too long."""
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                logger.error("worker did not stop within %.0fs; killing it", self.stop_timeout)
                process.kill()
                process.wait()
        if self._thread.is_alive():
            self._thread.join()

    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            with self._lock:
                if self._stopping.is_set():
                    return
                # A session of its own: a Ctrl-C in the terminal reaches serve alone, which
                # then stops the worker in order instead of racing it.
                self._process = subprocess.Popen(self.command, env=self.env, start_new_session=True)
                process = self._process
            logger.info("started worker process %d", process.pid)
            code = process.wait()
            if self._stopping.is_set():
                return
            lived = time.monotonic() - started
            failures = 0 if lived >= STABLE_SECONDS else failures + 1
            delay = self.restart_delays[min(max(failures - 1, 0), len(self.restart_delays) - 1)]
            logger.error(
                "worker process %d exited with code %s after %.1fs; restarting in %.0fs",
                process.pid,
                code,
                lived,
                delay,
            )
            self.restarts += 1
            self._stopping.wait(delay)
