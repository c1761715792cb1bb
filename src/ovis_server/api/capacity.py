"""Refusing at submit an image too large for every worker's memory, instead of an
out-of-memory failure later.

Each worker puts in its state detail the most pixels one image may have under its memory
plan (``max_pixels``; absent where there is no limit, as on a CPU). A submit whose size is
larger than that of every alive, ready worker answers 422 naming the size and the largest
that fits. With no ready worker the submit is taken (it queues, as any submit does), and a
worker that says nothing of a limit counts as having none. The workers table is read at
most once per ``ttl`` seconds, not on every submit.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from ovis_server.api.errors import INVALID_INPUT, ApiError
from ovis_server.jobs.workers import WorkerInfo, WorkerRegistry

logger = logging.getLogger(__name__)

CACHE_SECONDS = 1.0


def worker_models(worker: WorkerInfo) -> list[str]:
    """The models a worker serves (its row keeps them comma-separated)."""
    return [model for model in worker.model.split(",") if model]


def worker_max_pixels(worker: WorkerInfo, model_id: str | None = None) -> int | None:
    """The most pixels ``worker`` says it fits (of ``model_id``, where it reports its models
    one by one), or None for no limit (or none readable)."""
    if model_id is not None and worker.detail.models is not None:
        for entry in worker.detail.models:
            if entry.model_id == model_id:
                return entry.max_pixels
    return worker.detail.max_pixels


def largest_fitting(workers: Sequence[WorkerInfo], model_id: str) -> int | None:
    """The most pixels some alive, ready worker of ``model_id`` fits; None when any has no
    limit, or when none is ready."""
    ready = [
        worker
        for worker in workers
        if worker.ready and worker.problem is None and model_id in worker_models(worker)
    ]
    limits = [worker_max_pixels(worker, model_id) for worker in ready]
    if not limits or any(limit is None for limit in limits):
        return None
    return max(limit for limit in limits if limit is not None)


def suggested_square(pixels: int, multiple: int = 1) -> int:
    """The side of the largest square, in multiples of ``multiple`` (the model's side
    multiple, ``ModelSpec.sizes``), within ``pixels``."""
    return (math.isqrt(pixels) // multiple) * multiple


def image_too_large(width: int, height: int, largest: int, multiple: int = 1) -> ApiError:
    side = suggested_square(largest, multiple)
    example = f", such as {side}x{side}" if side >= multiple else ""
    message = (
        f"image_size: {width}x{height} ({width * height:,} pixels) does not fit the GPU "
        f"memory of this server's workers: the largest image that fits has {largest:,} "
        f"pixels{example}; ask for a smaller image_size"
    )
    return ApiError(
        422,
        INVALID_INPUT,
        message,
        detail=[{"loc": ["body", "image_size"], "msg": message, "type": "image_too_large"}],
    )


@dataclass
class SizeCapacity:
    """What the alive workers fit, read from the workers table at most every ``ttl`` s."""

    registry: WorkerRegistry
    alive_within: float
    ttl: float = CACHE_SECONDS
    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _workers: list[WorkerInfo] = field(default_factory=list, init=False, repr=False)
    _read_at: float | None = field(default=None, init=False, repr=False)

    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            now = self.clock()
            if self._read_at is None or now - self._read_at >= self.ttl:
                try:
                    self._workers = self.registry.alive(within_seconds=self.alive_within)
                except SQLAlchemyError as exc:
                    # Not knowing the workers is no reason to refuse: the submit goes on
                    # (and meets the database itself).
                    logger.warning("could not read the workers' capacity: %s", exc)
                    self._workers = []
                self._read_at = now
            return self._workers

    def check(self, model_id: str, width: int, height: int, multiple: int = 1) -> None:
        """Raise a 422 if ``width`` x ``height`` is larger than every ready worker fits
        (suggesting a square whose side is a multiple of ``multiple``, the model's)."""
        largest = largest_fitting(self.workers(), model_id)
        if largest is not None and width * height > largest:
            raise image_too_large(width, height, largest, multiple)
