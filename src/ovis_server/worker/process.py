"""The worker as a process of its own: ``ovis-server worker``, or the child ``serve`` starts.

A crash, an out-of-memory kill or a hang here never takes the API down: the API process
only reads and writes job rows.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from ovis_server.catalogue.registry import ModelRegistry
from ovis_server.config import Settings
from ovis_server.db.connect import connect, migrate
from ovis_server.engine.compile_cache import use_compile_cache
from ovis_server.jobs.store import JobStore
from ovis_server.jobs.worker_detail import StartupDetail
from ovis_server.jobs.workers import WorkerRegistry, WorkerState
from ovis_server.storage import open_file_store
from ovis_server.worker.loras import LoraFiles
from ovis_server.worker.placement import Placement
from ovis_server.worker.report import StateReport
from ovis_server.worker.runner import Worker

if TYPE_CHECKING:
    from ovis_server.catalogue.spec import ModelSpec
    from ovis_server.engine.pipeline import Engine

logger = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    """Stop when the process that started us is gone (``kill -9`` of ``serve``)."""
    while not stop.wait(0.5):
        if os.getppid() != parent_pid:
            logger.warning("the serve process %d is gone; stopping", parent_pid)
            stop.set()


STALLED_EXIT_CODE = 70


def memory_in_use() -> int:
    """CUDA memory allocated by this process, or its resident set size without CUDA."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.memory_allocated())
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _beat(
    interval: float,
    stop: threading.Event,
    runner: list[Worker],
    stall_timeout: float,
    report: StateReport,
) -> None:
    """Keep the worker's row fresh; end the process if its job stops making progress."""
    while not stop.wait(interval):
        try:
            problem = runner[0].output_problem if runner else None
            report.write(memory_bytes=memory_in_use(), problem=problem)
        except Exception:
            logger.exception("heartbeat failed")
        if runner and runner[0].stalled_for() > stall_timeout:
            # The model code is stuck (a hang, a deadlock): nothing but the end of the
            # process frees the device. The lease lapses, the job goes back to the queue
            # (or fails after --max-attempts), and serve starts a fresh worker.
            logger.critical(
                "no denoising step in %.0fs (--stall-timeout); ending the worker",
                runner[0].stalled_for(),
            )
            logging.shutdown()
            os._exit(STALLED_EXIT_CODE)


def _report_problem(registry: WorkerRegistry, worker_id: str, problem: str | None) -> None:
    """Tell /readyz at once (the heartbeat repeats it) why this worker takes no jobs."""
    try:
        registry.heartbeat(worker_id, WorkerState(problem=problem))
    except Exception:
        logger.exception("could not report the worker's problem")


def run_worker(
    settings: Settings,
    parent_pid: int | None = None,
    device_label: str | None = None,
    models: ModelRegistry | None = None,
    started: float | None = None,
) -> None:
    """Load the models ``--model-id`` names (``models``, by default the settings'), warm each
    up, place them on the device (worker/placement.py), then take their jobs until SIGTERM or
    SIGINT; the jobs in hand are put back. ``device_label``: the device as serve numbers it
    (its GPU worker sees one GPU, cuda:0). ``started``: when the worker started, on
    ``time.perf_counter``'s clock (by default now), for the time to ready it reports."""
    from ovis_server.worker.hooks import load_step_hook

    started = time.perf_counter() if started is None else started
    served_specs = list(models or ModelRegistry.from_settings(settings))
    # Variants (image-to-image...) run on their model's engine: loaded once, for the model.
    specs = [spec for spec in served_specs if spec.variant_of is None]
    variants = [spec for spec in served_specs if spec.variant_of is not None]

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info(
            "received %s: finishing the current step, then stopping", signal.Signals(signum).name
        )
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if parent_pid is not None:
        threading.Thread(
            target=_watch_parent, args=(parent_pid, stop), name="parent-watch", daemon=True
        ).start()

    step_hook = load_step_hook()
    db = connect(settings.db_url)
    migrate(db)
    store = JobStore(db)
    files = open_file_store(settings, db)
    registry = WorkerRegistry(db)
    worker_id = new_worker_id()
    device = device_label or settings.device
    served = ",".join(spec.model_id for spec in served_specs)
    registry.register(worker_id, socket.gethostname(), os.getpid(), served, device)
    report = StateReport(registry, worker_id)
    report.phase("loading")
    runner: list[Worker] = []
    threading.Thread(
        target=_beat,
        args=(
            settings.heartbeat_seconds,
            stop,
            runner,
            settings.stall_timeout_seconds,
            report,
        ),
        name="heartbeat",
        daemon=True,
    ).start()
    try:
        # Before anything compiles: torch reads where its caches are when it first needs them.
        cache = use_compile_cache(settings.compile_cache_dir) if settings.compile != "off" else None
        from ovis_server.worker.readiness import memory_detail, warm_up_worker

        def load(spec: ModelSpec) -> Engine:
            return spec.load_engine(settings.for_model(spec.names), report, stop)

        placement = Placement(
            load,
            resident_limit=settings.resident_models,
            swap_after=settings.swap_after_seconds,
        )
        warmup_seconds = None
        for spec in specs:
            placement.make_room()  # each model plans its memory as if alone on the device
            engine = load(spec)
            engine.loras.capacity = settings.max_loaded_loras
            if stop.is_set():
                return
            batch = settings.batch_limit(engine.device.type, engine.memory.batch_limit)
            if settings.warms_up(engine.compiled):
                report.update(memory_detail(engine, batch))
                warmed = warm_up_worker(spec, engine, report, batch, stop, cache)
                if warmed.stopped or stop.is_set():
                    return
                batch = min(batch, warmed.batch_limit or batch)
                warmup_seconds = round((warmup_seconds or 0.0) + warmed.seconds, 1)
            placement.add(spec, engine, batch)
        for variant in variants:
            if variant.variant_of in placement.models:
                placement.add_variant(variant)
        placement.settle()
        first = placement.models[specs[0].model_id]
        engine = placement.engine_of(first.spec.model_id)  # settle keeps the first resident
        max_batch = max(placed.batch_limit for placed in placement.models.values())
        runner.append(
            Worker(
                store=store,
                files=files,
                engine=engine,
                model=first.spec,
                worker_id=worker_id,
                lease_seconds=settings.lease_seconds,
                max_attempts=settings.max_attempts,
                max_batch=max_batch,
                step_hook=step_hook,
                on_problem=lambda problem: _report_problem(registry, worker_id, problem),
                placement=placement,
                on_swap=lambda: report.update(placement.detail()),
                loras=LoraFiles.from_settings(settings, store),
            )
        )
        startup_seconds = round(time.perf_counter() - started, 1)
        report.phase(
            "ready",
            memory_detail(engine, first.batch_limit),
            placement.detail(),
            StartupDetail(startup_seconds=startup_seconds, warmup_seconds=warmup_seconds),
        )
        logger.info(
            "ready %.1fs after the worker started (loading %.1fs, warm-up %s)",
            startup_seconds,
            engine.load_seconds,
            "off" if warmup_seconds is None else f"{warmup_seconds:.1f}s",
        )
        ready = WorkerState(
            ready=True, memory_bytes=memory_in_use(), device=device_label or str(engine.device)
        )
        registry.heartbeat(worker_id, ready)
        runner[0].run(stop)
    finally:
        registry.deregister(worker_id)
        db.dispose()  # the pool's connections end as a client should end them
