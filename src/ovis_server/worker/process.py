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
import uuid
from types import FrameType

from ovis_server.config import Settings
from ovis_server.db.connect import connect, migrate
from ovis_server.jobs.store import JobStore
from ovis_server.storage.local import LocalFileStore
from ovis_server.storage.signing import signer_for

logger = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    """Stop when the process that started us is gone (``kill -9`` of ``serve``)."""
    while not stop.wait(0.5):
        if os.getppid() != parent_pid:
            logger.warning("the serve process %d is gone; stopping", parent_pid)
            stop.set()


def run_worker(settings: Settings, parent_pid: int | None = None) -> None:
    """Load the model, then take jobs until SIGTERM or SIGINT; the job in hand is put back."""
    from ovis_server.engine.pipeline import Engine
    from ovis_server.engine.weights import resolve_weights
    from ovis_server.worker.runner import Worker

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

    db = connect(settings.db_url)
    migrate(db)
    store = JobStore(db)
    files = LocalFileStore(settings.files_dir, signer_for(db))
    engine = Engine.load(
        resolve_weights(settings.model, settings.data_dir),
        device=settings.device,
        dtype=settings.dtype,
    )
    if stop.is_set():
        return
    Worker(
        store=store,
        files=files,
        engine=engine,
        worker_id=new_worker_id(),
        lease_seconds=settings.lease_seconds,
        max_attempts=settings.max_attempts,
    ).run(stop)
