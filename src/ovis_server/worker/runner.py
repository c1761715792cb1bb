"""The worker loop: claim jobs, run them on the engine, store their images, finish them.

The worker claims the oldest queued job together with up to ``max_batch - 1`` queued jobs
that share its size, steps and guidance, and runs them in one batched engine call. Each
job keeps its own progress, cancel and outcome: a cancelled job leaves the batch at the
next step and the others go on; if a batch fails, its jobs run again one by one, so that
only the job that causes a failure fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from ovis_server.db.retry import is_transient
from ovis_server.engine.images import FILE_EXTENSIONS, MEDIA_TYPES, encode_image
from ovis_server.engine.request import GenerationRequest
from ovis_server.jobs.job import Job, StoredOutput
from ovis_server.jobs.store import JobStore, LeaseLostError
from ovis_server.storage.base import FileStore, output_key
from ovis_server.worker.hooks import StepHook

if TYPE_CHECKING:
    from PIL import Image

    from ovis_server.catalogue.spec import ModelSpec
    from ovis_server.engine.pipeline import Engine

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
# While the files store cannot take writes, the worker claims nothing and tries a test
# write this often.
WRITE_CHECK_SECONDS = 2.0
# The longest pause between tries to record a job's end while the database is out.
MAX_RECORD_DELAY_SECONDS = 5.0


def database_cause(exc: BaseException) -> str:
    """A database error in a few words for the log: the driver's, without SQL text."""
    return str(getattr(exc, "orig", None) or type(exc).__name__)


class _Stop(Enum):
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"


class InvalidJobError(ValueError):
    """A stored job whose input the model cannot take."""


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(error type, message) for a job the model could not run, as clients will read it."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return (
            "out_of_memory",
            "the GPU ran out of memory for this request; try a smaller image_size",
        )
    if isinstance(exc, InvalidJobError):
        return "invalid_input", str(exc)
    if isinstance(exc, SQLAlchemyError):
        # Its text holds SQL, parameters and worker ids: none of that reaches a client.
        return "internal_error", "the server could not record this job's progress; retry"
    return "generation_error", f"{type(exc).__name__}: {exc}"


class Worker:
    """Runs jobs from the store on one engine, oldest first, in batches of compatible jobs."""

    def __init__(
        self,
        *,
        store: JobStore,
        files: FileStore,
        engine: Engine,
        model: ModelSpec,
        worker_id: str,
        lease_seconds: float = 30.0,
        poll_seconds: float = 0.2,
        max_attempts: int = 3,
        max_batch: int = 1,
        step_hook: StepHook | None = None,
        write_check_seconds: float = WRITE_CHECK_SECONDS,
        on_problem: Callable[[str | None], None] | None = None,
    ) -> None:
        self.store = store
        self.files = files
        self.engine = engine
        self.model = model  # the model of ``engine``: the worker claims only its jobs
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.max_attempts = max_attempts
        self.max_batch = max(1, max_batch)
        # Called with each job in hand after each step: tests only (worker/hooks.py).
        self.step_hook = step_hook
        self.write_check_seconds = write_check_seconds
        # Why the files store cannot take this worker's outputs; None while it can. The
        # heartbeat reports it, and /readyz answers 503 naming it.
        self.output_problem: str | None = None
        self.on_problem = on_problem
        # When the jobs in hand last moved (claimed, or a step done); None when idle.
        self._last_progress: float | None = None

    def stalled_for(self) -> float:
        """Seconds the jobs in hand have gone without progress (0 when idle)."""
        last = self._last_progress
        return 0.0 if last is None else time.monotonic() - last

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; jobs in hand when it is set go back to the queue."""
        logger.info("worker %s ready (batches of up to %d)", self.worker_id, self.max_batch)
        next_recovery = 0.0
        self.check_output_writable()  # a store that refuses writes is known before a job runs
        next_write_check = time.monotonic() + self.write_check_seconds
        database_pause = self.poll_seconds
        while not stop.is_set():
            if self.output_problem is not None:
                if time.monotonic() >= next_write_check:
                    self.check_output_writable()
                    next_write_check = time.monotonic() + self.write_check_seconds
                if self.output_problem is not None:
                    stop.wait(min(self.poll_seconds, self.write_check_seconds))
                    continue
            try:
                if time.monotonic() >= next_recovery:
                    recovered = self.store.recover_expired(self.max_attempts)
                    if recovered:
                        logger.warning("recovered %d job(s) whose worker stopped", recovered)
                    next_recovery = time.monotonic() + max(self.lease_seconds / 3, 0.5)
                batch = self.store.claim_batch(
                    self.worker_id, self.lease_seconds, self.max_batch, [self.model.model_id]
                )
            except SQLAlchemyError as exc:
                if not is_transient(exc):
                    raise
                logger.warning(
                    "the database is unavailable (%s); trying again in %.1fs",
                    database_cause(exc),
                    database_pause,
                )
                stop.wait(database_pause)
                database_pause = min(database_pause * 2, MAX_RECORD_DELAY_SECONDS)
                continue
            database_pause = self.poll_seconds
            if not batch:
                stop.wait(self.poll_seconds)
                continue
            self.run_jobs(batch, stop)
        logger.info("worker %s stopped", self.worker_id)

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

    def generation_request(self, job: Job) -> GenerationRequest:
        if job.model_id != self.model.model_id:
            raise InvalidJobError(f"this worker does not serve model {job.model_id!r}")
        try:
            validated = self.model.input_model.model_validate(job.input)
        except ValidationError as exc:
            raise InvalidJobError(f"stored input no longer validates: {exc}") from exc
        return validated.to_generation_request(job.seed)

    def run_jobs(self, jobs: Sequence[Job], stop: threading.Event) -> None:
        """Run claimed jobs to their final state (or back to the queue on shutdown)."""
        self._last_progress = time.monotonic()
        try:
            runnable: list[tuple[Job, GenerationRequest]] = []
            for job in jobs:
                try:
                    runnable.append((job, self.generation_request(job)))
                except InvalidJobError as exc:
                    self._fail(job, exc)
                else:
                    self._record_warnings(job, runnable[-1][1])
            if runnable:
                self._run_batch(runnable, stop)
        finally:
            self._last_progress = None

    def _record_warnings(self, job: Job, request: GenerationRequest) -> None:
        """Tell the client, in its status and result, what the model will not read."""
        try:
            warnings = self.engine.prompt_warnings(request)
            if warnings:
                self.store.set_warnings(job.id, warnings)
        except Exception:  # a note for the client must never stop the job
            logger.exception("job %s: could not record its warnings", job.id)

    def _run_batch(self, batch: list[tuple[Job, GenerationRequest]], stop: threading.Event) -> None:
        from ovis_server.engine.pipeline import GenerationCancelled

        started = time.perf_counter()
        jobs = [job for job, _ in batch]
        why: dict[int, _Stop] = {}

        def on_step(step: int, total: int, active: Sequence[int]) -> Collection[int]:
            self._last_progress = time.monotonic()
            if self.step_hook is not None:
                for index in active:
                    self.step_hook(jobs[index], step)
            ids = [jobs[index].id for index in active]
            try:
                cancel, lost = self.store.report_batch_progress(
                    ids, self.worker_id, step, self.lease_seconds
                )
            except SQLAlchemyError as exc:
                if not is_transient(exc):
                    raise
                # The database is out: go on computing; the end is recorded once it is back.
                logger.warning("step %d not recorded: %s", step, database_cause(exc))
                cancel, lost = set(), set()
            for index in active:
                if jobs[index].id in lost:
                    why[index] = _Stop.LEASE_LOST
                elif jobs[index].id in cancel:
                    why[index] = _Stop.CANCEL
                elif stop.is_set():
                    why[index] = _Stop.SHUTDOWN
            return [index for index in active if index in why]

        images: list[Image.Image | None]
        try:
            with self._leases_kept(jobs):
                images = self.engine.generate_batch([request for _, request in batch], on_step)
        except GenerationCancelled:
            images = [None] * len(batch)
        except Exception as exc:
            if len(batch) > 1:
                logger.warning(
                    "a batch of %d failed (%s); running its jobs one by one", len(batch), exc
                )
                self._release_device_memory()
                for job, request in batch:
                    self._run_batch([(job, request)], stop)
                return
            self._release_device_memory()
            self._fail(jobs[0], exc)
            return

        for index, (job, request) in enumerate(batch):
            image = images[index]
            try:
                if image is not None:
                    if not self._store_image(job, image):
                        continue
                    logger.info(
                        "job %s succeeded in %.2fs (%d steps, %dx%d, batch of %d)",
                        job.id,
                        time.perf_counter() - started,
                        request.num_inference_steps,
                        image.width,
                        image.height,
                        len(batch),
                    )
                elif why.get(index) is _Stop.SHUTDOWN:
                    self._persist(self.store.release, job.id, self.worker_id)
                    logger.info("job %s put back in the queue: the worker is stopping", job.id)
                elif why.get(index) is _Stop.CANCEL:
                    self._persist(self.store.mark_cancelled, job.id, self.worker_id)
                    logger.info("job %s cancelled", job.id)
                else:
                    logger.warning("job %s: lease lost to another worker; dropping it", job.id)
            except LeaseLostError:
                logger.warning("job %s: lease lost before its end was recorded", job.id)
            except Exception as exc:
                self._fail(job, exc)

    def _store_image(self, job: Job, image: Image.Image) -> bool:
        """Store the image and complete the job; False if the files store could not take
        it: the job then goes back to its place in the queue, the attempt not counted
        (the job did nothing wrong), and the worker claims nothing until a test write
        succeeds."""
        output_format = job.input.get("output_format", "png")
        media_type = MEDIA_TYPES[output_format]
        key = output_key(job.id, 0, FILE_EXTENSIONS[output_format])
        try:
            self.files.put(key, encode_image(image, output_format), media_type)
        except OSError as exc:
            self._output_unwritable(exc)
            self._persist(self.store.release, job.id, self.worker_id)
            logger.warning("job %s put back in the queue: %s", job.id, self.output_problem)
            return False
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
        return True

    def _fail(self, job: Job, exc: BaseException) -> None:
        error_type, message = describe_failure(exc)
        logger.error("job %s failed: %s", job.id, message, exc_info=exc)
        try:
            self._persist(self.store.fail, job.id, self.worker_id, error_type, message)
        except LeaseLostError:
            logger.warning("job %s: lease lost before its failure was recorded", job.id)

    def _persist(self, record: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Record a job's end however long the database stays locked or unreachable: the
        store retries for a few seconds, this for as long as it takes (the job is done;
        losing that would waste it). LeaseLostError and other errors pass through."""
        delay = 0.5
        while True:
            try:
                return record(*args, **kwargs)
            except SQLAlchemyError as exc:
                if not is_transient(exc):
                    raise
                logger.warning(
                    "could not record a job's end (%s); trying again in %.1fs",
                    database_cause(exc),
                    delay,
                )
                # Waiting on the database, not stuck in model code: no stall watchdog.
                self._last_progress = time.monotonic()
                time.sleep(delay)
                delay = min(delay * 2, MAX_RECORD_DELAY_SECONDS)

    @contextmanager
    def _leases_kept(self, jobs: Sequence[Job]) -> Iterator[None]:
        """Renew the leases from a side thread while the jobs run, between steps too
        (prompt encoding, the VAE decode, a first compile can outlast a step)."""
        done = threading.Event()
        interval = max(self.lease_seconds / 3, 0.05)
        ids = [job.id for job in jobs]

        def renew() -> None:
            while not done.wait(interval):
                try:
                    self.store.renew_leases(ids, self.worker_id, self.lease_seconds)
                except Exception:
                    logger.exception("could not renew the leases of %s", ", ".join(ids))

        keeper = threading.Thread(target=renew, name="lease-keeper", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            done.set()
            keeper.join()

    @staticmethod
    def _release_device_memory() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
