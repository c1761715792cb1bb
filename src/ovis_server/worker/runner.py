"""The worker loop: claim a job, run it on the engine, store its image, finish it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
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
    from ovis_server.engine.pipeline import Engine

logger = logging.getLogger(__name__)


class _Stop(Enum):
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"


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
    """Runs jobs from the store on one engine, one at a time, oldest first."""

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
        faults: FaultPlan | None = None,
    ) -> None:
        self.store = store
        self.files = files
        self.engine = engine
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.max_attempts = max_attempts
        self.faults = faults or FaultPlan({})
        # When the job in hand last moved (claimed, or a step done); None when idle.
        self._last_progress: float | None = None

    def stalled_for(self) -> float:
        """Seconds the job in hand has gone without progress (0 when idle)."""
        last = self._last_progress
        return 0.0 if last is None else time.monotonic() - last

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; a job in hand when it is set goes back to the queue."""
        logger.info("worker %s ready", self.worker_id)
        next_recovery = 0.0
        while not stop.is_set():
            if time.monotonic() >= next_recovery:
                recovered = self.store.recover_expired(self.max_attempts)
                if recovered:
                    logger.warning("recovered %d job(s) whose worker stopped", recovered)
                next_recovery = time.monotonic() + max(self.lease_seconds / 3, 0.5)
            job = self.store.claim_next(self.worker_id, self.lease_seconds)
            if job is None:
                stop.wait(self.poll_seconds)
                continue
            self.run_job(job, stop)
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

    def run_job(self, job: Job, stop: threading.Event) -> None:
        started = time.perf_counter()
        self._last_progress = time.monotonic()
        try:
            self._run_job(job, stop, started)
        finally:
            self._last_progress = None

    def _run_job(self, job: Job, stop: threading.Event, started: float) -> None:
        reason: list[_Stop] = []
        prompt = str(job.input.get("prompt", ""))

        def on_step(step: int, total: int) -> bool:
            self._last_progress = time.monotonic()
            if step == 1:
                self.faults.strike(prompt)
            if self.store.report_progress(job.id, self.worker_id, step, self.lease_seconds):
                reason.append(_Stop.CANCEL)
                return False
            if stop.is_set():
                reason.append(_Stop.SHUTDOWN)
                return False
            return True

        from ovis_server.engine.pipeline import GenerationCancelled

        try:
            with self._lease_kept(job):
                request = self.generation_request(job)
                image = self.engine.generate(request, on_step=on_step)
                output_format = job.input.get("output_format", "png")
                data = encode_image(image, output_format)
                key = output_key(job.id, 0, FILE_EXTENSIONS[output_format])
                self.files.put(key, data, MEDIA_TYPES[output_format])
            self.store.complete(
                job.id,
                self.worker_id,
                [StoredOutput(key, MEDIA_TYPES[output_format], image.width, image.height)],
            )
            logger.info(
                "job %s succeeded in %.2fs (%d steps, %dx%d)",
                job.id,
                time.perf_counter() - started,
                request.num_inference_steps,
                image.width,
                image.height,
            )
        except GenerationCancelled:
            if reason and reason[0] is _Stop.SHUTDOWN:
                self.store.release(job.id, self.worker_id)
                logger.info("job %s put back in the queue: the worker is stopping", job.id)
            else:
                self.store.mark_cancelled(job.id, self.worker_id)
                logger.info("job %s cancelled", job.id)
        except LeaseLostError:
            logger.warning("job %s: lease lost to another worker; dropping it", job.id)
        except Exception as exc:
            error_type, message = describe_failure(exc)
            logger.exception("job %s failed: %s", job.id, message)
            self._release_device_memory()
            try:
                self.store.fail(job.id, self.worker_id, error_type, message)
            except LeaseLostError:
                logger.warning("job %s: lease lost before its failure was recorded", job.id)

    @contextmanager
    def _lease_kept(self, job: Job) -> Iterator[None]:
        """Renew the lease from a side thread while the job runs, between steps too
        (prompt encoding, the VAE decode, a first compile can outlast a step)."""
        done = threading.Event()
        interval = max(self.lease_seconds / 3, 0.05)

        def renew() -> None:
            while not done.wait(interval):
                try:
                    self.store.renew_lease(job.id, self.worker_id, self.lease_seconds)
                except LeaseLostError:
                    return
                except Exception:
                    logger.exception("job %s: could not renew the lease", job.id)

        keeper = threading.Thread(target=renew, name=f"lease-{job.id}", daemon=True)
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
