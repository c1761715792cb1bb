"""The worker loop: claim jobs, run them on the engine, store their images, finish them.

The worker claims the oldest queued job together with up to ``max_batch - 1`` queued jobs
that share its size, steps and guidance (fewer where the memory plan has no room for that
many images of its size), and runs them in one batched engine call. Each job keeps its
own progress, cancel and outcome: a cancelled job leaves the batch at the next step and
the others go on; if a batch fails, its jobs run again one by one, so that only the job
that causes a failure fails. A job that runs out of device memory alone is retried once
in the engine's light setting before it fails.

The thread that drives the device never waits for the CPU's share of a job: when the
engine hands back a batch's pixels, the thread passes them to a finisher thread, which
makes the files, stores them and records each job's end, and claims the next batch at
once. The hand-off is bounded (``finish_queue`` batches, the one being finished
included): when storing falls behind, the device's thread waits before it claims, so
finished images never pile up in memory. A lease keeper renews the lease of every job
from its claim until the finisher has recorded its end, and a stop drains the finisher
first: an image that was made is recorded before the worker returns.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from ovis_server.db.retry import is_transient
from ovis_server.engine.images import FILE_EXTENSIONS, MEDIA_TYPES, encode_image, to_image
from ovis_server.engine.request import GenerationRequest
from ovis_server.jobs.job import Job, StoredOutput
from ovis_server.jobs.store import JobStore, LeaseLostError
from ovis_server.storage.base import FileStore, output_key
from ovis_server.worker.hooks import StepHook, store_hook

if TYPE_CHECKING:
    import numpy as np

    from ovis_server.catalogue.spec import ModelSpec
    from ovis_server.engine.memory import MemoryPlan
    from ovis_server.engine.pipeline import Engine

    Pixels = np.ndarray[Any, np.dtype[np.uint8]]

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
# While the files store cannot take writes, the worker claims nothing and tries a test
# write this often.
WRITE_CHECK_SECONDS = 2.0
# The longest pause between tries to record a job's end while the database is out.
MAX_RECORD_DELAY_SECONDS = 5.0
# Batches handed to the finisher and not yet recorded, the one it works on included, at
# which the device's thread stops claiming until one is recorded.
FINISH_QUEUE_BATCHES = 2

OUT_OF_MEMORY_MESSAGE = (
    "the GPU ran out of memory for this request, also when retried with a lighter "
    "setting; try a smaller image_size"
)


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

    if isinstance(exc, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is this class
        return "out_of_memory", OUT_OF_MEMORY_MESSAGE
    if isinstance(exc, InvalidJobError):
        return "invalid_input", str(exc)
    if isinstance(exc, SQLAlchemyError):
        # Its text holds SQL, parameters and worker ids: none of that reaches a client.
        return "internal_error", "the server could not record this job's progress; retry"
    return "generation_error", f"{type(exc).__name__}: {exc}"


@dataclass
class _Outcome:
    """How one claimed job's run ended, handed from the device's thread to the finisher:
    pixels to store, or why there are none. Never an exception: its traceback would keep
    the failed run's device memory alive."""

    job: Job
    started: float  # time.perf_counter() at the start of the run
    batch_size: int = 1
    steps: int = 0
    pixels: Pixels | None = None
    stop: _Stop | None = None
    failure: tuple[str, str] | None = None  # (error type, message)


class _LeaseKeeper:
    """Renews, from a thread of its own, the leases of the jobs the worker holds: from the
    claim until the finisher has recorded their end (prompt encoding, the VAE decode, a
    first compile and the wait for the finisher can each outlast a step's renewal)."""

    def __init__(self, store: JobStore, worker_id: str, lease_seconds: float) -> None:
        self.store = store
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, ids: Collection[str]) -> None:
        with self._lock:
            self._ids.update(ids)

    def drop(self, ids: Collection[str]) -> None:
        with self._lock:
            self._ids.difference_update(ids)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Renew while inside (nested uses share the one thread)."""
        if self._thread is not None:
            yield
            return
        self._done.clear()
        self._thread = threading.Thread(target=self._renew, name="lease-keeper", daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._done.set()
            self._thread.join()
            self._thread = None

    def _renew(self) -> None:
        interval = max(self.lease_seconds / 3, 0.05)
        while not self._done.wait(interval):
            with self._lock:
                ids = sorted(self._ids)
            if not ids:
                continue
            try:
                self.store.renew_leases(ids, self.worker_id, self.lease_seconds)
            except Exception:
                logger.exception("could not renew the leases of %s", ", ".join(ids))


class _Finisher:
    """One thread that finishes batches the device's thread hands over, in order."""

    def __init__(self, finish: Callable[[list[_Outcome]], None], capacity: int) -> None:
        self.finish = finish
        self.capacity = max(1, capacity)
        self._queue: deque[list[_Outcome]] = deque()
        self._cond = threading.Condition()
        self._batches = 0  # handed over and not yet finished, the one in hand included
        self._jobs = 0  # the same counted in jobs
        self._closed = False
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="finisher", daemon=True)
        self._thread.start()

    @property
    def jobs_pending(self) -> int:
        """Jobs handed over whose end is not recorded yet."""
        return self._jobs

    def has_room(self) -> bool:
        with self._cond:
            return self._batches < self.capacity

    def wait_for_room(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._batches < self.capacity, timeout)

    def put(self, outcomes: list[_Outcome]) -> None:
        if not outcomes:
            return
        with self._cond:
            self._queue.append(outcomes)
            self._batches += 1
            self._jobs += len(outcomes)
            self._cond.notify_all()

    def raise_failure(self) -> None:
        """Re-raise, on the caller's thread, what broke finishing (a database that refuses
        a job's end for good): the worker ends as it did when it recorded jobs itself."""
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        """Finish every batch handed over, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._closed)
                if not self._queue:
                    return
                outcomes = self._queue.popleft()
            try:
                self.finish(outcomes)
            except BaseException as exc:  # the device's thread re-raises it
                logger.exception("could not record the end of a batch")
                self.failure = exc
            finally:
                with self._cond:
                    self._batches -= 1
                    self._jobs -= len(outcomes)
                    self._cond.notify_all()


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
        finish_queue: int = FINISH_QUEUE_BATCHES,
        memory_plan: MemoryPlan | None = None,
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
        self.store_hook = store_hook(step_hook)
        self.write_check_seconds = write_check_seconds
        # Why the files store cannot take this worker's outputs; None while it can. The
        # heartbeat reports it, and /readyz answers 503 naming it.
        self.output_problem: str | None = None
        self.on_problem = on_problem
        self.finish_queue = max(1, finish_queue)
        # How many images of a size fit in one batch (default: the engine's plan).
        self.memory_plan = memory_plan if memory_plan is not None else engine.memory
        # When the jobs in the device's hands last moved (claimed, or a step done); None
        # when it holds none. Likewise for the finisher's batch in hand.
        self._last_progress: float | None = None
        self._finishing_since: float | None = None
        self._finishing_thread: int | None = None
        self._leases = _LeaseKeeper(store, worker_id, lease_seconds)
        self._finisher: _Finisher | None = None

    def stalled_for(self) -> float:
        """Seconds the jobs in hand, on the device or in the finisher, have gone without
        progress (0 when idle)."""
        now = time.monotonic()
        stamps = [s for s in (self._last_progress, self._finishing_since) if s is not None]
        return max((now - stamp for stamp in stamps), default=0.0)

    @property
    def images_unstored(self) -> int:
        """Jobs whose run has ended and whose end the finisher has not recorded yet."""
        return 0 if self._finisher is None else self._finisher.jobs_pending

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; jobs in hand when it is set go back to the queue,
        and images already made are stored and recorded before this returns."""
        logger.info("worker %s ready (batches of up to %d)", self.worker_id, self.max_batch)
        finisher = self._finisher = _Finisher(self._finish, self.finish_queue)
        try:
            with self._leases.running():
                try:
                    self._loop(stop, finisher)
                finally:
                    finisher.close()  # drain: every finished image is recorded
            finisher.raise_failure()
        finally:
            self._finisher = None
        logger.info("worker %s stopped", self.worker_id)

    def _loop(self, stop: threading.Event, finisher: _Finisher) -> None:
        next_recovery = 0.0
        self.check_output_writable()  # a store that refuses writes is known before a job runs
        next_write_check = time.monotonic() + self.write_check_seconds
        database_pause = self.poll_seconds
        while not stop.is_set():
            finisher.raise_failure()
            if self.output_problem is not None:
                if time.monotonic() >= next_write_check:
                    self.check_output_writable()
                    next_write_check = time.monotonic() + self.write_check_seconds
                if self.output_problem is not None:
                    stop.wait(min(self.poll_seconds, self.write_check_seconds))
                    continue
            if not finisher.has_room():
                # Storing is behind: claim nothing until a batch is recorded.
                finisher.wait_for_room(self.poll_seconds)
                continue
            try:
                if time.monotonic() >= next_recovery:
                    recovered = self.store.recover_expired(self.max_attempts)
                    if recovered:
                        logger.warning("recovered %d job(s) whose worker stopped", recovered)
                    next_recovery = time.monotonic() + max(self.lease_seconds / 3, 0.5)
                batch = self.claim()
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
            # The next claim comes right after: the finisher stores this batch meanwhile.
            finisher.put(self._run_claimed(batch, stop))

    def claim(self) -> list[Job]:
        """Claim the oldest queued job of this worker's model and as many of its batch key as
        ``batch_cap`` allows."""
        return self.store.claim_batch(
            self.worker_id, self.lease_seconds, self.batch_cap, [self.model.model_id]
        )

    def batch_cap(self, head: Job) -> int:
        """The largest batch to form behind ``head``: ``max_batch``, or fewer where the
        memory plan has no room for that many images of its size."""
        if self.max_batch <= 1:
            return 1
        try:
            request = self.generation_request(head)
        except InvalidJobError:
            return 1  # it fails alone
        fitting = self.memory_plan.batch_fitting(request.width, request.height, self.max_batch)
        cap = max(1, min(self.max_batch, fitting))
        if cap < self.max_batch:
            logger.debug(
                "batches of %dx%d capped at %d by the memory plan",
                request.width,
                request.height,
                cap,
            )
        return cap

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
        """Run claimed jobs to their final state (or back to the queue on shutdown), on
        this thread, their ends recorded before it returns."""
        with self._leases.running():
            self._finish(self._run_claimed(jobs, stop))

    # --- the device's thread ---------------------------------------------------------------

    def _run_claimed(self, jobs: Sequence[Job], stop: threading.Event) -> list[_Outcome]:
        """Run claimed jobs on the engine; how each ended, for the finisher to record."""
        self._leases.hold([job.id for job in jobs])
        self._last_progress = time.monotonic()
        started = time.perf_counter()
        try:
            outcomes: list[_Outcome] = []
            runnable: list[tuple[Job, GenerationRequest]] = []
            for job in jobs:
                try:
                    runnable.append((job, self.generation_request(job)))
                except InvalidJobError as exc:
                    outcomes.append(self._failed(job, exc, started))
                else:
                    self._record_warnings(job, runnable[-1][1])
            if runnable:
                outcomes += self._run_batch(runnable, stop)
            return outcomes
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

    def _failed(self, job: Job, exc: BaseException, started: float) -> _Outcome:
        error_type, message = describe_failure(exc)
        logger.error("job %s failed: %s", job.id, message, exc_info=exc)
        return _Outcome(job, started, failure=(error_type, message))

    def _run_batch(
        self,
        batch: list[tuple[Job, GenerationRequest]],
        stop: threading.Event,
        *,
        light: bool = False,
    ) -> list[_Outcome]:
        import torch

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

        requests = [request for _, request in batch]
        pixels: list[Pixels | None] | None = None
        out_of_memory = False
        failure: tuple[str, str] | None = None
        try:
            pixels = self.engine.generate_pixels(requests, on_step, light=light)
        except GenerationCancelled:
            pixels = [None] * len(batch)
        except torch.OutOfMemoryError:
            # Handled below, out of this block: the exception's traceback holds the frames
            # whose tensors are the memory to free.
            out_of_memory = True
        except Exception as exc:
            if len(batch) == 1:
                failure = describe_failure(exc)
                logger.error("job %s failed: %s", jobs[0].id, failure[1], exc_info=exc)
            else:
                logger.warning(
                    "a batch of %d failed (%s); running its jobs one by one", len(batch), exc
                )
        if pixels is not None:
            return [
                _Outcome(
                    job,
                    started,
                    batch_size=len(batch),
                    steps=request.num_inference_steps,
                    pixels=pixels[index],
                    stop=why.get(index),
                )
                for index, (job, request) in enumerate(batch)
            ]

        self._release_device_memory()
        if failure is not None:
            return [_Outcome(jobs[0], started, failure=failure)]
        if len(batch) > 1:  # a batch failed: each job alone, so only a faulty one fails
            if out_of_memory:
                logger.warning(
                    "a batch of %d ran out of memory; running its jobs one by one", len(batch)
                )
            return [outcome for one in batch for outcome in self._run_batch([one], stop)]
        if not light:
            # Not an attempt lost: the job keeps its claim and runs again at once.
            logger.warning(
                "job %s ran out of memory; retrying it once with a lighter setting (one "
                "guidance branch at a time, the VAE decoding in tiles)",
                jobs[0].id,
            )
            return self._run_batch(batch, stop, light=True)
        logger.error("job %s failed: %s", jobs[0].id, OUT_OF_MEMORY_MESSAGE)
        return [_Outcome(jobs[0], started, failure=("out_of_memory", OUT_OF_MEMORY_MESSAGE))]

    @staticmethod
    def _release_device_memory() -> None:
        """Free what a failed run left: its tensors (in reference cycles with frames of a
        traceback), then the allocator's cached blocks."""
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- the finisher ----------------------------------------------------------------------

    def _finish(self, outcomes: list[_Outcome]) -> None:
        """Store the images of a batch's run and record how each job ended."""
        self._finishing_thread = threading.get_ident()
        try:
            for outcome in outcomes:
                self._finishing_since = time.monotonic()
                try:
                    self._record(outcome)
                except LeaseLostError:
                    logger.warning("job %s: lease lost before its end was recorded", outcome.job.id)
                except Exception as exc:
                    error_type, message = describe_failure(exc)
                    logger.error("job %s failed: %s", outcome.job.id, message, exc_info=exc)
                    self._record_failure(outcome.job, error_type, message)
                finally:
                    self._leases.drop([outcome.job.id])
        finally:
            self._finishing_since = None

    def _record(self, outcome: _Outcome) -> None:
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
        elif outcome.stop is _Stop.SHUTDOWN:
            self._persist(self.store.release, job.id, self.worker_id)
            logger.info("job %s put back in the queue: the worker is stopping", job.id)
        elif outcome.stop is _Stop.CANCEL:
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
                self._touch()
                time.sleep(delay)
                delay = min(delay * 2, MAX_RECORD_DELAY_SECONDS)

    def _touch(self) -> None:
        """Progress for the stall watchdog, on behalf of the thread that calls."""
        now = time.monotonic()
        if self._finishing_since is not None and self._finishing_thread == threading.get_ident():
            self._finishing_since = now
        elif self._last_progress is not None:
            self._last_progress = now
