"""The finisher's side of the worker: store a finished job's image, record how each job
ended (for as long as the database takes), and keep track of whether the files store takes
writes. :class:`~ovis_server.worker.runner.Worker` holds a JobRecorder; the finisher thread
(finisher.py) hands it each batch's outcomes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from ovis_server.engine.images import FILE_EXTENSIONS, MEDIA_TYPES, encode_image, to_image
from ovis_server.jobs.job import Job, StoredOutput
from ovis_server.jobs.store import JobStore, LeaseLostError
from ovis_server.storage.base import FileStore, output_key
from ovis_server.worker.failures import DatabasePauses, describe_failure
from ovis_server.worker.finisher import LeaseKeeper, Outcome, Stop
from ovis_server.worker.hooks import StoreHook

if TYPE_CHECKING:
    import numpy as np

    Pixels = np.ndarray[Any, np.dtype[np.uint8]]

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
# The longest pause between tries to record a job's end while the database is out.
MAX_RECORD_DELAY_SECONDS = 5.0


class JobRecorder:
    """What the finisher does with each job's outcome: store its image, record its end in
    ``store`` under ``worker_id``'s lease, and drop the job from ``leases`` once recorded."""

    def __init__(
        self,
        *,
        store: JobStore,
        files: FileStore,
        worker_id: str,
        leases: LeaseKeeper,
        store_hook: StoreHook | None = None,
        on_problem: Callable[[str | None], None] | None = None,
    ) -> None:
        self.store = store
        self.files = files
        self.worker_id = worker_id
        self.leases = leases
        # Called with each job before its image is stored: tests only (worker/hooks.py).
        self.store_hook = store_hook
        # Why the files store cannot take this worker's outputs; None while it can. The
        # heartbeat reports it, and /readyz answers 503 naming it.
        self.output_problem: str | None = None
        self.on_problem = on_problem  # told of each change of ``output_problem``
        # When the job in hand last moved (its recording began, or a wait on the database);
        # None when it holds none: the stall watchdog reads it.
        self.finishing_since: float | None = None

    def check_output_writable(self) -> bool:
        """A test write to the files store; clears ``output_problem`` when it succeeds."""
        try:
            self.files.check_writable()
        except OSError as exc:
            self._output_unwritable(exc)
            return False
        if self.output_problem is not None:
            logger.warning("the files store takes writes again; claiming jobs again")
            self.output_problem = None
            if self.on_problem is not None:
                self.on_problem(None)
        return True

    def _output_unwritable(self, exc: OSError) -> None:
        problem = f"the worker cannot write outputs: {exc.strerror or exc}"
        if problem != self.output_problem:
            logger.error("%s; jobs wait in the queue until a test write succeeds", problem)
            self.output_problem = problem
            if self.on_problem is not None:
                self.on_problem(problem)

    def finish(self, outcomes: list[Outcome]) -> None:
        """Store the images of a batch's run and record how each job ended."""
        try:
            for outcome in outcomes:
                self.finishing_since = time.monotonic()
                try:
                    self._record(outcome)
                except LeaseLostError:
                    logger.warning("job %s: lease lost before its end was recorded", outcome.job.id)
                except Exception as exc:
                    error_type, message = describe_failure(exc)
                    logger.error("job %s failed: %s", outcome.job.id, message, exc_info=exc)
                    self._record_failure(outcome.job, error_type, message)
                finally:
                    self.leases.drop([outcome.job.id])
        finally:
            self.finishing_since = None

    def _record(self, outcome: Outcome) -> None:
        job = outcome.job
        if outcome.pixels is not None:
            stored = self._store_image(job, outcome.pixels)
            if stored is not None:
                logger.info(
                    "job %s succeeded in %.2fs (%d steps, %dx%d, batch of %d)",
                    job.id,
                    time.perf_counter() - outcome.started,
                    outcome.steps,
                    stored.width,
                    stored.height,
                    outcome.batch_size,
                )
        elif outcome.failure is not None:
            self._record_failure(job, *outcome.failure)
        elif outcome.stop is Stop.SHUTDOWN:
            self._persist(self.store.release, job.id, self.worker_id)
            logger.info("job %s put back in the queue: the worker is stopping", job.id)
        elif outcome.stop is Stop.CANCEL:
            self._persist(self.store.mark_cancelled, job.id, self.worker_id)
            logger.info("job %s cancelled", job.id)
        else:
            logger.warning("job %s: lease lost to another worker; dropping it", job.id)

    def _store_image(self, job: Job, pixels: Pixels) -> StoredOutput | None:
        """Store the image and complete the job; None if the files store could not take
        it: the job then goes back to its place in the queue, the attempt not counted
        (the job did nothing wrong), and the worker claims nothing until a test write
        succeeds."""
        if self.store_hook is not None:
            self.store_hook(job)
        output_format = job.input.get("output_format", "png")
        media_type = MEDIA_TYPES[output_format]
        key = output_key(job.id, 0, FILE_EXTENSIONS[output_format])
        image = to_image(pixels)
        try:
            self.files.put(key, encode_image(image, output_format), media_type)
        except OSError as exc:
            self._output_unwritable(exc)
            self._persist(self.store.release, job.id, self.worker_id)
            logger.warning("job %s put back in the queue: %s", job.id, self.output_problem)
            return None
        output = StoredOutput(key, media_type, image.width, image.height)
        try:
            self._persist(self.store.complete, job.id, self.worker_id, [output])
        except LeaseLostError:
            # Deleted while it ran: leave no file behind. (Taken over by another worker
            # instead, the file under this key is that worker's too, and stays.)
            if self.store.get(job.id) is None:
                self.files.delete_request(job.id)
                logger.info("job %s was deleted while it ran; its file is removed", job.id)
            raise
        return output

    def _record_failure(self, job: Job, error_type: str, message: str) -> None:
        try:
            self._persist(self.store.fail, job.id, self.worker_id, error_type, message)
        except LeaseLostError:
            logger.warning("job %s: lease lost before its failure was recorded", job.id)

    def _persist(self, record: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Record a job's end however long the database stays locked or unreachable: the
        store retries for a few seconds, this for as long as it takes (the job is done;
        losing that would waste it). LeaseLostError and other errors pass through."""
        pauses = DatabasePauses(0.5, MAX_RECORD_DELAY_SECONDS)
        while True:
            try:
                return record(*args, **kwargs)
            except SQLAlchemyError as exc:
                pause = pauses.after(exc, "could not record a job's end")
                # Waiting on the database, not stuck in model code: no stall watchdog.
                self.finishing_since = time.monotonic()
                time.sleep(pause)
