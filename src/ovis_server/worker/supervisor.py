"""``serve`` runs its workers as child processes, one per device, and restarts each one
whenever it exits.

Which workers: ``--devices`` (default ``all``: one per visible CUDA GPU, or a single worker
where there is none), or ``--device`` for one worker on one device. A worker on a GPU is
pinned to it with ``CUDA_VISIBLE_DEVICES``: it sees that GPU alone, as ``cuda:0``, so its
memory plan, its allocator cap (``--gpu-memory``), its CUDA context and whatever a library
puts on "the current device" all stay on its own GPU. It still names the GPU as serve
numbers it (``cuda:2``) in /readyz, /metrics and its log lines.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ovis_server.config import SETTINGS_JSON_ENV, Settings
from ovis_server.units import ALL_DEVICES, parse_devices

logger = logging.getLogger(__name__)

RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
# A worker that ran this long before dying starts the delays over.
STABLE_SECONDS = 60.0
# Files whose presence says an NVIDIA (or AMD ROCm, or WSL GPU) driver is there. Without any
# of them torch sees no CUDA device, and serve does not start a Python just to ask it.
GPU_DRIVER_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg", "/dev/kfd")
GPU_PROBE_SECONDS = 120.0


class DevicesError(ValueError):
    """``--devices`` / ``--device`` ask for workers this machine cannot have."""


@dataclass(frozen=True)
class WorkerSlot:
    """One worker serve keeps running."""

    number: int
    device: str  # the worker's --device
    label: str | None = None  # its device as serve numbers it; None: what the worker resolves
    env: dict[str, str] = field(default_factory=dict)  # CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS

    @property
    def name(self) -> str:
        return f"worker {self.number} ({self.label or self.device})"


def gpu_driver_present() -> bool:
    return any(Path(path).exists() for path in GPU_DRIVER_FILES)


def visible_gpus() -> list[str]:
    """The CUDA GPUs serve sees, in torch's order: for each, what a worker's
    ``CUDA_VISIBLE_DEVICES`` must say to see that one GPU (an entry of serve's own
    ``CUDA_VISIBLE_DEVICES``, which may be a UUID, or the index). torch counts them in a child
    process, so that the API process does not load torch and CUDA."""
    if not gpu_driver_present():
        return []
    probe = [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"]
    try:
        done = subprocess.run(
            probe, capture_output=True, text=True, timeout=GPU_PROBE_SECONDS, check=True
        )
        count = int(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        logger.warning("could not count the CUDA GPUs (%s); starting one worker", exc)
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(index) for index in range(count)]
    return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]


def plan_workers(
    settings: Settings, gpus: Callable[[], Sequence[str]] = visible_gpus
) -> list[WorkerSlot]:
    """The workers ``settings`` ask serve for (``--devices``, or ``--device`` for one;
    none with ``--no-worker``)."""
    if settings.devices is not None and settings.device != "auto":
        raise DevicesError(
            f"--devices {settings.devices} and --device {settings.device} both say where "
            "serve's workers run: give one of them (--device X starts one worker on X; "
            "--devices lists one entry per worker)"
        )
    if settings.no_worker:
        if settings.devices is not None:
            raise DevicesError("--devices picks serve's workers, and --no-worker starts none")
        return []
    if settings.devices is not None:
        entries = parse_devices(settings.devices)
    elif settings.device == "auto":
        entries = (ALL_DEVICES,)
    elif settings.device == "cpu":
        entries = ("cpu",)
    elif settings.device.split(":")[0] == "cuda":
        # As before, one worker; pinned like any GPU worker (bare "cuda" is cuda:0).
        entries = (settings.device.partition(":")[2] or "0",)
    else:  # mps, or any other torch device: one worker there, as given
        return [WorkerSlot(0, settings.device)]
    if entries == (ALL_DEVICES,):
        found = gpus()
        if not found:
            return [WorkerSlot(0, "auto")]  # where there is no CUDA GPU: one worker, as before
        entries = tuple(str(index) for index in range(len(found)))
    else:
        found = gpus() if any(entry != "cpu" for entry in entries) else []
    cpu_workers = entries.count("cpu")
    threads = {}
    if cpu_workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Several CPU workers share the cores instead of each starting a thread per core.
        threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // cpu_workers))}
    slots = []
    for number, entry in enumerate(entries):
        if entry == "cpu":
            slots.append(WorkerSlot(number, "cpu", "cpu", dict(threads)))
            continue
        index = int(entry)
        if index >= len(found):
            seen = (
                f"GPUs cuda:0 to cuda:{len(found) - 1}" if found else "no CUDA GPU (torch sees 0)"
            )
            raise DevicesError(f"GPU {index} asked for, but this machine shows {seen}")
        slots.append(
            WorkerSlot(number, "cuda:0", f"cuda:{index}", {"CUDA_VISIBLE_DEVICES": found[index]})
        )
    return slots


def worker_environment(settings: Settings, slot: WorkerSlot | None = None) -> dict[str, str]:
    """The worker's environment, with ``settings`` in it as JSON: the worker runs with the
    very settings ``serve`` has (less the /metrics token, which it has no use for; with its
    slot's device), and the database URL's password does not show in ``ps``."""
    if slot is not None:
        settings = settings.model_copy(update={"device": slot.device, "devices": None})
    serialized = settings.model_dump_json(exclude={"metrics_token"})
    return {**os.environ, **(slot.env if slot else {}), SETTINGS_JSON_ENV: serialized}


def worker_command(slot: WorkerSlot | None = None, named: bool = False) -> list[str]:
    """The ``ovis-server worker`` command line; its settings come in its environment. With
    a slot, the worker names its device as serve numbers it (``--device-label``), and with
    ``named`` its log lines say which worker they are from (``--log-name``)."""
    command = [sys.executable, "-m", "ovis_server", "worker", "--parent-pid", str(os.getpid())]
    if slot is not None and slot.label is not None:
        command += ["--device-label", slot.label]
    if slot is not None and named:
        command += ["--log-name", slot.name]
    return command


@dataclass(eq=False)
class WorkerSupervisor:
    """One worker process, started again whenever it exits (after a growing delay when it
    keeps dying young)."""

    command: list[str]
    env: dict[str, str] | None = None
    restart_delays: tuple[float, ...] = RESTART_DELAYS
    stop_timeout: float = 30.0
    name: str = "worker"
    on_exit: Callable[[int], None] | None = None
    restarts: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._supervise, name=f"supervisor {self.name}")

    @property
    def pid(self) -> int | None:
        with self._lock:
            return None if self._process is None else self._process.pid

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """SIGTERM the worker (it puts its job back), then SIGKILL if it takes too long."""
        self.begin_stop()
        self.finish_stop(time.monotonic() + self.stop_timeout)

    def begin_stop(self) -> None:
        """Stop restarting, and SIGTERM the worker."""
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()

    def finish_stop(self, deadline: float) -> None:
        """Wait for the worker until ``deadline`` (monotonic), then SIGKILL it."""
        with self._lock:
            process = self._process
        if process is not None:
            try:
                process.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                logger.error(
                    "%s did not stop within %.0fs; killing it", self.name, self.stop_timeout
                )
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
            logger.info("started %s process %d", self.name, process.pid)
            code = process.wait()
            if self._stopping.is_set():
                return
            if self.on_exit is not None:
                try:
                    self.on_exit(process.pid)
                except Exception:
                    logger.exception("could not forget %s's process %d", self.name, process.pid)
            lived = time.monotonic() - started
            failures = 0 if lived >= STABLE_SECONDS else failures + 1
            delay = self.restart_delays[min(max(failures - 1, 0), len(self.restart_delays) - 1)]
            logger.error(
                "%s process %d exited with code %s after %.1fs; restarting in %.0fs",
                self.name,
                process.pid,
                code,
                lived,
                delay,
            )
            self.restarts += 1
            self._stopping.wait(delay)


class WorkerPool:
    """serve's workers, one supervisor each: started together, each restarted on its own,
    stopped together (all told at once, so stopping takes one worker's time, not the sum)."""

    def __init__(self, supervisors: Sequence[WorkerSupervisor]) -> None:
        self.supervisors = list(supervisors)

    @classmethod
    def for_slots(
        cls,
        settings: Settings,
        slots: Sequence[WorkerSlot],
        on_exit: Callable[[int], None] | None = None,
    ) -> WorkerPool:
        named = len(slots) > 1
        return cls(
            [
                WorkerSupervisor(
                    worker_command(slot, named=named),
                    worker_environment(settings, slot),
                    name=slot.name if named else "worker",
                    on_exit=on_exit,
                )
                for slot in slots
            ]
        )

    def start(self) -> None:
        for supervisor in self.supervisors:
            supervisor.start()

    def stop(self) -> None:
        for supervisor in self.supervisors:
            supervisor.begin_stop()
        deadline = time.monotonic() + max((s.stop_timeout for s in self.supervisors), default=0)
        for supervisor in self.supervisors:
            supervisor.finish_stop(deadline)
