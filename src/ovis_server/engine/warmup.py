"""Warm-up: run the shapes the worker will serve once before it reports ready.

torch.compile compiles on the first call of each new shape (25 s for the first bf16 image
on an H200, 39 s more when a batch of 4 first forms, 199 s with FP8): a client should not
wait for that. The warm-up runs the default size at every batch size the worker will form
(cancelling part of a batch makes it smaller, so each size from 1 up), then each other
preset size once, at a step count of its own: the transformer is called once per step, so
compilation does not depend on the number of steps.

With torch's automatic dynamic shapes (the default) the first shape compiles static
graphs; the second batch size recompiles them with the batch dynamic, and the second image
size with the image tokens dynamic, after which no batch or preset size compiles again.
``--compile-dynamic`` compiles dynamic graphs from the first call instead.

A failure that may come from the compile cache moves the cache aside and tries the shape
again; if compiling still fails, the worker runs eagerly (slower, and says so) rather than
failing every job. Out of memory at a batch size ends the warm-up there, and the worker
then forms no batch that large.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ovis_server.engine.compile_cache import CompileCache, reset_compiled
from ovis_server.engine.request import GenerationRequest

if TYPE_CHECKING:
    from ovis_server.engine.pipeline import Engine

logger = logging.getLogger(__name__)

# Two steps: the first call of a shape compiles it, the second shows that it does not
# compile again.
WARMUP_STEPS = 2
WARMUP_PROMPT = "warm-up"

OutOfMemory: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class WarmupShape:
    width: int
    height: int
    batch: int

    def describe(self) -> str:
        images = "1 image" if self.batch == 1 else f"a batch of {self.batch}"
        return f"{self.width}x{self.height}, {images}"


def warmup_shapes(
    default_size: tuple[int, int],
    other_sizes: Iterable[tuple[int, int]],
    batch_limit: int,
    max_pixels: int | None = None,
) -> list[WarmupShape]:
    """The default size at batches 1..``batch_limit``, then each other size at batch 1;
    sizes over ``max_pixels`` are left out (a submit of them is refused anyway)."""

    def fits(size: tuple[int, int]) -> bool:
        return max_pixels is None or size[0] * size[1] <= max_pixels

    shapes: list[WarmupShape] = []
    if fits(default_size):
        shapes += [WarmupShape(*default_size, batch) for batch in range(1, batch_limit + 1)]
    seen = {default_size}
    for size in other_sizes:
        if size not in seen and fits(size):
            seen.add(size)
            shapes.append(WarmupShape(*size, 1))
    return shapes


@dataclass
class WarmupResult:
    seconds: float = 0.0
    timings: list[tuple[WarmupShape, float]] = field(default_factory=list)
    # The largest batch that ran; None when no shape ran out of memory.
    batch_limit: int | None = None
    eager_fallback: bool = False
    error: str | None = None
    stopped: bool = False


def _requests(shape: WarmupShape, steps: int, guidance: float) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt=WARMUP_PROMPT,
            negative_prompt="",
            width=shape.width,
            height=shape.height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            seed=index,
        )
        for index in range(shape.batch)
    ]


def _free_memory(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()


def force_eager() -> bool:
    """Make every compiled region of this process run eagerly; False where torch cannot."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        return False
    reset_compiled()
    set_stance("force_eager")
    return True


def warm_up(
    engine: Engine,
    shapes: Sequence[WarmupShape],
    *,
    guidance: float,
    steps: int = WARMUP_STEPS,
    cache: CompileCache | None = None,
    on_shape: Callable[[int, WarmupShape], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> WarmupResult:
    """Run each of ``shapes`` once (``on_shape(index, shape)`` before each). See the module
    docstring for what happens on a failure."""
    result = WarmupResult()
    started = time.perf_counter()
    compiled = bool(getattr(engine, "compiled", False))
    retried_without_cache = False
    for index, shape in enumerate(shapes):
        if should_stop():
            result.stopped = True
            break
        if result.batch_limit is not None and shape.batch > result.batch_limit:
            continue  # a smaller batch ran out of memory already
        if on_shape is not None:
            on_shape(index, shape)
        shape_started = time.perf_counter()
        out_of_memory = False
        while True:
            try:
                engine.generate_batch(_requests(shape, steps, guidance))
                break
            except OutOfMemory:
                out_of_memory = True
                _free_memory(engine)
                result.batch_limit = max(1, shape.batch - 1)
                result.error = f"out of memory at {shape.describe()}"
                logger.warning("warm-up: out of memory at %s", shape.describe())
                break
            except Exception as exc:
                if not compiled or result.eager_fallback:
                    raise
                if not retried_without_cache:
                    retried_without_cache = True
                    logger.warning(
                        "warm-up: %s failed (%s: %s); moving the compile cache aside and "
                        "compiling afresh",
                        shape.describe(),
                        type(exc).__name__,
                        (str(exc).splitlines() or [""])[0][:300],
                    )
                    if cache is not None:
                        cache.discard()
                    else:
                        reset_compiled()
                    continue
                logger.exception(
                    "warm-up: compiling %s failed again; running without compilation (slower)",
                    shape.describe(),
                )
                if not force_eager():
                    raise
                result.eager_fallback = True
                result.error = f"compilation failed ({type(exc).__name__}): running eagerly"
        if out_of_memory:
            if shape.batch == 1:
                break  # not even one image of the default size: nothing more to learn
            continue
        seconds = time.perf_counter() - shape_started
        result.timings.append((shape, seconds))
        logger.info("warm-up %d/%d: %s in %.1fs", index + 1, len(shapes), shape.describe(), seconds)
    result.seconds = time.perf_counter() - started
    return result
