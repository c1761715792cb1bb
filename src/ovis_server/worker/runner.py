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

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from ovis_server.engine.request import GenerationRequest
from ovis_server.jobs.job import Job
from ovis_server.jobs.store import JobStore
from ovis_server.storage.base import FileStore
from ovis_server.worker.failures import (
    OUT_OF_MEMORY_MESSAGE,
    DatabasePauses,
    InvalidJobError,
    describe_failure,
)
from ovis_server.worker.finisher import Finisher, LeaseKeeper, Outcome, Stop
from ovis_server.worker.hooks import StepHook, store_hook
from ovis_server.worker.host_copy import release_device_memory
from ovis_server.worker.inputs import job_request, with_lora_files
from ovis_server.worker.loras import LoraFiles
from ovis_server.worker.progress import ProgressWriter
from ovis_server.worker.recording import MAX_RECORD_DELAY_SECONDS, JobRecorder

if TYPE_CHECKING:
    import numpy as np

    from ovis_server.catalogue.spec import ModelSpec
    from ovis_server.engine.memory import MemoryPlan
    from ovis_server.engine.pipeline import Engine
    from ovis_server.worker.placement import Placement

    Pixels = np.ndarray[Any, np.dtype[np.uint8]]

logger = logging.getLogger(__name__)

# While the files store cannot take writes, the worker claims nothing and tries a test
# write this often.
WRITE_CHECK_SECONDS = 2.0
# Batches handed to the finisher and not yet recorded, the one it works on included, at
# which the device's thread stops claiming until one is recorded.
FINISH_QUEUE_BATCHES = 2


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
        placement: Placement | None = None,
        on_swap: Callable[[], None] | None = None,
        loras: LoraFiles | None = None,
    ) -> None:
        self.store = store
        self.files = files
        self.engine = engine
        # ``engine``'s model; a worker of several models has them all in ``placement``
        # (worker/placement.py) and claims only the jobs of those on the device.
        self.model = model
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.max_attempts = max_attempts
        self.max_batch = max(1, max_batch)
        # Called with each job in hand after each step: tests only (worker/hooks.py).
        self.step_hook = step_hook
        self.write_check_seconds = write_check_seconds
        self.finish_queue = max(1, finish_queue)
        # How many images of a size fit in one batch (default: the engine's plan).
        self.memory_plan = memory_plan if memory_plan is not None else engine.memory
        if placement is None:
            from ovis_server.worker.placement import Placement

            placement = Placement.single(model, engine, self.max_batch)
            placement.models[model.model_id].plan = self.memory_plan
        self.placement = placement
        self.on_swap = on_swap  # told after each swap (the worker's report)
        self.loras = loras  # where jobs' LoRA files come from (worker/loras.py); None: none
        # When the jobs in the device's hands last moved (claimed, or a step done); None
        # when it holds none. The recorder keeps the same for the finisher's job in hand.
        self._last_progress: float | None = None
        self._leases = LeaseKeeper(store, worker_id, lease_seconds)
        # Stores each finished job's image and records its end (on the finisher's thread).
        self.recorder = JobRecorder(
            store=store,
            files=files,
            worker_id=worker_id,
            leases=self._leases,
            store_hook=store_hook(step_hook),
            on_problem=on_problem,
        )
        self._finisher: Finisher | None = None
        self._progress: ProgressWriter | None = None
        # Where given (a list), how long each step's write took: benchmarks only.
        self.step_write_seconds: list[float] | None = None

    @property
    def output_problem(self) -> str | None:
        """Why the files store takes no outputs (the heartbeat reports it), or None."""
        return self.recorder.output_problem

    def stalled_for(self) -> float:
        """Seconds the jobs in hand, on the device or in the finisher, have gone without
        progress (0 when idle)."""
        now = time.monotonic()
        stamps = (self._last_progress, self.recorder.finishing_since)
        return max((now - stamp for stamp in stamps if stamp is not None), default=0.0)

    @property
    def images_unstored(self) -> int:
        """Jobs whose run has ended and whose end the finisher has not recorded yet."""
        return 0 if self._finisher is None else self._finisher.jobs_pending

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; jobs in hand when it is set go back to the queue,
        and images already made are stored and recorded before this returns."""
        logger.info("worker %s ready (batches of up to %d)", self.worker_id, self.max_batch)
        finisher = self._finisher = Finisher(self._finish, self.finish_queue)
        try:
            with self._leases.running(), self._writing_progress():
                try:
                    self._loop(stop, finisher)
                finally:
                    finisher.close()  # drain: every finished image is recorded
            finisher.raise_failure()
        finally:
            self._finisher = None
        logger.info("worker %s stopped", self.worker_id)

    def _loop(self, stop: threading.Event, finisher: Finisher) -> None:
        next_recovery = 0.0
        # A store that refuses writes is known before a job runs.
        self.recorder.check_output_writable()
        next_write_check = time.monotonic() + self.write_check_seconds
        database_pauses = DatabasePauses(self.poll_seconds, MAX_RECORD_DELAY_SECONDS)
        while not stop.is_set():
            finisher.raise_failure()
            if self.output_problem is not None:
                if time.monotonic() >= next_write_check:
                    self.recorder.check_output_writable()
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
                stop.wait(database_pauses.after(exc, "the database is unavailable"))
                continue
            database_pauses.reset()
            if not batch:
                stop.wait(self.poll_seconds)
                continue
            # The next claim comes right after: the finisher stores this batch meanwhile.
            finisher.put(self._run_claimed(batch, stop))

    def claim(self) -> list[Job]:
        """Claim the oldest queued job of this worker's models on the device and as many of
        its batch key as ``batch_cap`` allows; first, where some served models wait off the
        device, swap one in if the placement's policy says so."""
        placement = self.placement
        waiting = placement.waiting_models()
        if waiting:
            heads = placement.heads_by_model(self.store.queue_heads(placement.queue_ids()))
            if placement.consider(heads) is not None and self.on_swap is not None:
                self.on_swap()
        return self.store.claim_batch(
            self.worker_id, self.lease_seconds, self.batch_cap, placement.claimable()
        )

    def batch_cap(self, head: Job) -> int:
        """The largest batch to form behind ``head``: ``max_batch`` (its model's), or fewer
        where the memory plan has no room for that many images of its size."""
        placed = self.placement.get(head.model_id)
        limit = self.max_batch if placed is None else min(self.max_batch, placed.batch_limit)
        if limit <= 1:
            return 1
        try:
            request = self.generation_request(head)
        except InvalidJobError:
            return 1  # it fails alone
        plan = self.memory_plan if placed is None else placed.plan
        fitting = plan.batch_fitting(request.width, request.height, limit)
        cap = max(1, min(limit, fitting))
        if cap < limit:
            logger.debug(
                "batches of %dx%d capped at %d by the memory plan",
                request.width,
                request.height,
                cap,
            )
        return cap

    def generation_request(self, job: Job) -> GenerationRequest:
        return job_request(job, self.placement, self.files)

    def run_jobs(self, jobs: Sequence[Job], stop: threading.Event) -> None:
        """Run claimed jobs to their final state (or back to the queue on shutdown), on
        this thread, their ends recorded before it returns."""
        with self._leases.running(), self._writing_progress():
            self._finish(self._run_claimed(jobs, stop))

    def _finish(self, outcomes: list[Outcome]) -> None:
        """Record how each job of a batch ended, once its steps are all written."""
        if self._progress is not None:
            self._progress.finished([outcome.job.id for outcome in outcomes])
        self.recorder.finish(outcomes)

    @contextmanager
    def _writing_progress(self) -> Iterator[None]:
        """Step progress written from its own thread while inside (nested uses share it)."""
        if self._progress is not None:
            yield
            return
        self._progress = ProgressWriter(
            self.store, self.worker_id, self.lease_seconds, self.step_write_seconds
        )
        try:
            yield
        finally:
            self._progress.close()
            self._progress = None

    # --- the device's thread ---------------------------------------------------------------

    def _run_claimed(self, jobs: Sequence[Job], stop: threading.Event) -> list[Outcome]:
        """Run claimed jobs on the engine; how each ended, for the finisher to record."""
        self._leases.hold([job.id for job in jobs])
        self._last_progress = time.monotonic()
        started = time.perf_counter()
        try:
            outcomes: list[Outcome] = []
            runnable: list[tuple[Job, GenerationRequest]] = []
            for job in jobs:
                try:
                    request = self.generation_request(job)
                    runnable.append((job, with_lora_files(job, request, self.loras)))
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
            warnings = self.placement.engine_of(job.model_id).prompt_warnings(request)
            if warnings:
                self.store.set_warnings(job.id, warnings)
        except Exception:  # a note for the client must never stop the job
            logger.exception("job %s: could not record its warnings", job.id)

    def _failed(self, job: Job, exc: BaseException, started: float) -> Outcome:
        error_type, message = describe_failure(exc)
        logger.error("job %s failed: %s", job.id, message, exc_info=exc)
        return Outcome(job, started, failure=(error_type, message))

    def _run_batch(
        self,
        batch: list[tuple[Job, GenerationRequest]],
        stop: threading.Event,
        *,
        light: bool = False,
    ) -> list[Outcome]:
        import torch

        from ovis_server.engine.pipeline import GenerationCancelled

        started = time.perf_counter()
        jobs = [job for job, _ in batch]
        why: dict[int, Stop] = {}

        def on_step(step: int, total: int, active: Sequence[int]) -> Collection[int]:
            self._last_progress = time.monotonic()
            if self.step_hook is not None:
                for index in active:
                    self.step_hook(jobs[index], step)
            # Written on the progress thread; the answers are those of earlier steps.
            assert self._progress is not None
            cancel, lost = self._progress.post([jobs[index].id for index in active], step)
            for index in active:
                if jobs[index].id in lost:
                    why[index] = Stop.LEASE_LOST
                elif jobs[index].id in cancel:
                    why[index] = Stop.CANCEL
                elif stop.is_set():
                    why[index] = Stop.SHUTDOWN
            return [index for index in active if index in why]

        requests = [request for _, request in batch]
        pixels: list[Pixels | None] | None = None
        out_of_memory = False
        failure: tuple[str, str] | None = None
        try:
            engine = self.placement.engine_of(jobs[0].model_id)
            pixels = engine.generate_pixels(requests, on_step, light=light)
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
                Outcome(
                    job,
                    started,
                    batch_size=len(batch),
                    steps=request.steps_run,
                    pixels=pixels[index],
                    stop=why.get(index),
                )
                for index, (job, request) in enumerate(batch)
            ]

        release_device_memory()
        if failure is not None:
            return [Outcome(jobs[0], started, failure=failure)]
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
        return [Outcome(jobs[0], started, failure=("out_of_memory", OUT_OF_MEMORY_MESSAGE))]
