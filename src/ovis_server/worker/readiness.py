"""The worker between loading and ready: what it tells of its memory plan, and its warm-up.

The warm-up's shapes come from the model's spec (the default image size, steps and
guidance, and the preset sizes its input takes); engine/warmup.py runs them. /readyz
shows the phase ``warming`` with progress in shapes, and the log has the time of each
shape.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from ovis_server.engine.compile_cache import CompileCache, cache_counters
from ovis_server.engine.warmup import (
    WARMUP_PROMPT,
    WARMUP_STEPS,
    WarmupResult,
    WarmupShape,
    warm_up,
    warmup_shapes,
)
from ovis_server.engine.weights import Progress
from ovis_server.jobs.worker_detail import MemoryPlanDetail
from ovis_server.worker.report import StateReport

if TYPE_CHECKING:
    from ovis_server.catalogue.spec import ModelSpec
    from ovis_server.engine.pipeline import Engine

logger = logging.getLogger(__name__)


def memory_detail(engine: Engine, batch_limit: int) -> MemoryPlanDetail:
    """The memory plan as the worker reports it (/readyz, metrics, the submit check)."""
    plan = engine.memory
    return MemoryPlanDetail(
        memory_profile=str(plan.profile),
        memory_budget_bytes=plan.budget_bytes,
        memory_reason=plan.reason,
        batch_limit=batch_limit,
        max_pixels=engine.max_pixels,
    )


def default_shapes(
    spec: ModelSpec, batch_limit: int, max_pixels: int | None
) -> tuple[list[WarmupShape], float]:
    """The shapes to warm up and the guidance to run them at: the model's defaults (what a
    request with only a prompt gets), and the preset sizes."""
    defaults = spec.input_model.model_validate({"prompt": WARMUP_PROMPT})
    request = defaults.to_generation_request(0)
    presets = spec.sizes.presets.values() if spec.sizes else ()
    shapes = warmup_shapes((request.width, request.height), presets, batch_limit, max_pixels)
    return shapes, request.guidance_scale


def warm_up_worker(
    spec: ModelSpec,
    engine: Engine,
    report: StateReport,
    batch_limit: int,
    stop: threading.Event,
    cache: CompileCache | None,
) -> WarmupResult:
    """Run the warm-up in phase ``warming``, reporting each shape as it starts."""
    shapes, guidance = default_shapes(spec, batch_limit, engine.max_pixels)
    verb = "compiling" if engine.compiled else "running"
    report.phase("warming")
    total = len(shapes)

    def on_shape(index: int, shape: WarmupShape) -> None:
        report.progress(
            Progress(index, total, "shapes", text=f"{verb} {shape.describe()}"), force=True
        )

    if engine.compiled and cache is not None:
        logger.info(
            "warm-up: %d shapes; compile cache %s (%s, %d files)",
            total,
            cache.directory or "(torch's default)",
            cache.note,
            cache.files(),
        )
    result = warm_up(
        engine,
        shapes,
        guidance=guidance,
        steps=WARMUP_STEPS,
        cache=cache,
        on_shape=on_shape,
        should_stop=stop.is_set,
    )
    report.progress(Progress(len(result.timings), total, "shapes", text="done"), force=True)
    counts = ""
    if engine.compiled:
        found = cache_counters()
        counts = (
            f"; compiled graphs: {found['fx_graph_hits']} from the cache, "
            f"{found['fx_graph_misses']} compiled anew"
        )
    logger.info(
        "warm-up took %.1fs over %d shapes%s%s",
        result.seconds,
        len(result.timings),
        counts,
        f" ({result.error})" if result.error else "",
    )
    return result
