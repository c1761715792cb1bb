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
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING

from pydantic import ValidationError

from ovis_server.catalogue import find_model
from ovis_server.engine.images import FILE_EXTENSIONS, MEDIA_TYPES, encode_image
from ovis_server.engine.request import GenerationRequest
from ovis_server.jobs.job import Job, StoredOutput
from ovis_server.jobs.store import JobStore, LeaseLostError
from ovis_server.storage.base import FileStore, output_key
from ovis_server.worker.faults import FaultPlan

if TYPE_CHECKING:
    from PIL import Image

    from ovis_server.engine.pipeline import Engine

logger = logging.getLogger(__name__)


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
    return "generation_error", f"{type(exc).__name__}: {exc}"


class Worker:
    """Runs jobs from the store on one engine, oldest first, in batches of compatible jobs."""

    def __init__(
        self,
        *,
        store: JobStore,
        files: FileStore,
        engine: Engine,
        worker_id: str,
        lease_seconds: float = 30.0,
        poll_seconds: float = 0.2,
        max_attempts: int = 3,
        max_batch: int = 1,
        faults: FaultPlan | None = None,
    ) -> None:
        self.store = store
        self.files = files
        self.engine = engine
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.max_attempts = max_attempts
        self.max_batch = max(1, max_batch)
        self.faults = faults or FaultPlan({})
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
        while not stop.is_set():
            if time.monotonic() >= next_recovery:
                recovered = self.store.recover_expired(self.max_attempts)
                if recovered:
                    logger.warning("recovered %d job(s) whose worker stopped", recovered)
                next_recovery = time.monotonic() + max(self.lease_seconds / 3, 0.5)
            batch = self.store.claim_batch(self.worker_id, self.lease_seconds, self.max_batch)
            if not batch:
                stop.wait(self.poll_seconds)
                continue
            self.run_jobs(batch, stop)
        logger.info("worker %s stopped", self.worker_id)

    def generation_request(self, job: Job) -> GenerationRequest:
        spec = find_model(job.model_id)
        if spec is None:
            raise InvalidJobError(f"this worker does not serve model {job.model_id!r}")
        try:
            validated = spec.input_model.model_validate(job.input)
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
            if step == 1:
                for index in active:
                    self.faults.strike(str(jobs[index].input.get("prompt", "")))
            ids = [jobs[index].id for index in active]
            cancel, lost = self.store.report_batch_progress(
                ids, self.worker_id, step, self.lease_seconds
            )
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
                    self._store_image(job, image)
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
                    self.store.release(job.id, self.worker_id)
                    logger.info("job %s put back in the queue: the worker is stopping", job.id)
                elif why.get(index) is _Stop.CANCEL:
                    self.store.mark_cancelled(job.id, self.worker_id)
                    logger.info("job %s cancelled", job.id)
                else:
                    logger.warning("job %s: lease lost to another worker; dropping it", job.id)
            except LeaseLostError:
                logger.warning("job %s: lease lost before its end was recorded", job.id)
            except Exception as exc:
                self._fail(job, exc)

    def _store_image(self, job: Job, image: Image.Image) -> None:
        output_format = job.input.get("output_format", "png")
        media_type = MEDIA_TYPES[output_format]
        key = output_key(job.id, 0, FILE_EXTENSIONS[output_format])
        self.files.put(key, encode_image(image, output_format), media_type)
        try:
            self.store.complete(
                job.id, self.worker_id, [StoredOutput(key, media_type, image.width, image.height)]
            )
        except LeaseLostError:
            # Deleted while it ran: leave no file behind. (Taken over by another worker
            # instead, the file under this key is that worker's too, and stays.)
            if self.store.get(job.id) is None:
                self.files.delete_request(job.id)
                logger.info("job %s was deleted while it ran; its file is removed", job.id)
            raise

    def _fail(self, job: Job, exc: BaseException) -> None:
        error_type, message = describe_failure(exc)
        logger.error("job %s failed: %s", job.id, message, exc_info=exc)
        try:
            self.store.fail(job.id, self.worker_id, error_type, message)
        except LeaseLostError:
            logger.warning("job %s: lease lost before its failure was recorded", job.id)

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
