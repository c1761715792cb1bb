"""Which of its models a worker keeps on its device, and swapping the others in.

A worker serves every model it was given (``--model-id``, repeated). Each is loaded and
planned as if it were alone on the device (engine/memory.py's plan); when the weights of
all of them, plus the largest activations any of them needs, fit the plan's budget, all
stay resident and the worker claims the jobs of every one. Otherwise (or with
``--resident-models``) it keeps fewer resident, one where they do not all fit, and claims
only the resident models' jobs; the others wait:

- in host memory, when the machine has the RAM: a copy of their weights (pinned, on CUDA,
  so that a swap is one copy over PCIe); leaving the device then costs nothing, since the
  weights never change;
- else on disk: a swap loads them again (``ModelSpec.load_engine``).

When to swap is ``plan_swap`` (worker/swap_policy.py), a pure function of the queue's
heads; moving the weights is worker/host_copy.py's. Only ``ModelSpec`` and the engine's own
objects are used, whatever the family.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ovis_server.jobs.worker_detail import ModelDetail, PlacementDetail, Where
from ovis_server.worker.host_copy import (
    HostCopy,
    available_host_bytes,
    device_bytes,
    movable,
    release_device_memory,
    weight_bytes,
)
from ovis_server.worker.swap_policy import plan_swap

if TYPE_CHECKING:
    from ovis_server.catalogue.spec import ModelSpec
    from ovis_server.engine.memory import MemoryPlan
    from ovis_server.engine.pipeline import Engine

logger = logging.getLogger(__name__)

# What a swap may use of the host's available memory for the copies it keeps.
HOST_SHARE = 0.8


# --- the placement --------------------------------------------------------------------------


@dataclass
class Placed:
    """One served model: its engine (None while on disk), where it is, and what it may run."""

    spec: ModelSpec
    engine: Engine | None
    batch_limit: int
    plan: MemoryPlan
    where: Where = "device"
    since: float = 0.0  # when it last came onto the device (time.time())
    host: HostCopy | None = None
    device_bytes: int = 0  # its weights on the device, measured when it was loaded
    max_pixels: int | None = None


@dataclass
class SwapStats:
    count: int = 0
    seconds_total: float = 0.0
    last_seconds: float | None = None
    durations: list[float] = field(default_factory=list)


class Placement:
    """The served models of one worker and which of them are on its device."""

    def __init__(
        self,
        load: Callable[[ModelSpec], Engine],
        *,
        resident_limit: int = 0,
        swap_after: float = 30.0,
        clock: Callable[[], float] = time.time,
        host_bytes: Callable[[], int | None] = available_host_bytes,
    ) -> None:
        self.load = load  # loads a model again from disk (no warm-up)
        self.resident_limit = resident_limit  # 0: as many as fit
        self.swap_after = swap_after
        self.clock = clock
        self.host_bytes = host_bytes
        self.models: dict[str, Placed] = {}
        # Variants of served models (their "/image-to-image"...): id -> spec, run by the
        # engine of the model they are a variant of.
        self.variants: dict[str, ModelSpec] = {}
        self.capacity = 1
        self.swaps = SwapStats()
        self._lock = threading.Lock()

    @classmethod
    def single(cls, spec: ModelSpec, engine: Engine, batch_limit: int) -> Placement:
        """One model, resident for good (the worker's own loop, tests, benchmarks)."""
        placement = cls(lambda _spec: engine)
        placement.models[spec.model_id] = Placed(spec, engine, max(1, batch_limit), engine.memory)
        return placement

    # --- loading ---------------------------------------------------------------------------

    def make_room(self) -> None:
        """Take every model loaded so far off the device, so that the next one loads and
        plans its memory as if it were alone there."""
        for placed in self.models.values():
            if placed.where == "device" and placed.engine is not None:
                if placed.engine.device.type == "cpu":
                    continue  # nothing to plan on a CPU: it stays
                self._leave(placed)
        release_device_memory()

    def add(self, spec: ModelSpec, engine: Engine, batch_limit: int) -> None:
        """A model just loaded (and warmed up) onto the device."""
        self.models[spec.model_id] = Placed(
            spec=spec,
            engine=engine,
            batch_limit=max(1, batch_limit),
            plan=engine.memory,
            since=self.clock(),
            device_bytes=device_bytes(engine),
            max_pixels=engine.max_pixels,
        )

    def settle(self) -> None:
        """Decide how many models stay resident (all that fit, else one, at most
        ``resident_limit``), bring in the first ones in serving order, and share the memory
        plan's budget among those that stay together."""
        placed = list(self.models.values())
        fits_all = self._fit_together(placed)
        capacity = len(placed) if fits_all else 1
        if self.resident_limit:
            capacity = min(capacity, self.resident_limit)
        self.capacity = max(1, capacity)
        for index, model in enumerate(placed):
            if index < self.capacity:
                self._bring(model)
            elif model.where == "device":
                self._leave(model)
        if self.capacity == len(placed):
            for model in placed:
                model.host = None  # never swapped: no copy to keep in host memory
        release_device_memory()
        if fits_all and len(placed) > 1:
            self._share_budget(placed)
        logger.info(
            "models: %s (%s)",
            ", ".join(f"{m.spec.model_id} on the {m.where}" for m in placed),
            "all fit the device together"
            if self.capacity == len(placed)
            else f"{self.capacity} resident at a time, swapped in as their jobs wait",
        )

    def _fit_together(self, placed: Sequence[Placed]) -> bool:
        """Whether every model's weights and the largest activations any one needs fit the
        smallest budget they were planned with (no budget, a CPU: they fit)."""
        from ovis_server.engine.memory import usable_bytes

        budgets = [m.plan.budget_bytes for m in placed if m.plan.budget_bytes is not None]
        if not budgets:
            return True
        weights = sum(m.device_bytes for m in placed)
        activations = max(max(0, m.plan.peak_bytes - m.device_bytes) for m in placed)
        return weights + activations <= usable_bytes(min(budgets))

    def _share_budget(self, placed: Sequence[Placed]) -> None:
        """Each model's plan, when all stay resident: its budget less the others' weights,
        so that a batch of one model leaves room for the weights of the rest."""
        from ovis_server.engine.memory import largest_image_pixels

        total = sum(m.device_bytes for m in placed)
        for model in placed:
            budget = model.plan.budget_bytes
            if budget is None:
                continue
            shared = replace(model.plan, budget_bytes=budget - (total - model.device_bytes))
            model.plan = shared
            if shared.sizes is not None:
                model.max_pixels = largest_image_pixels(
                    shared.sizes, shared.profile, shared.budget_bytes
                )

    # --- moving ----------------------------------------------------------------------------

    def _leave(self, model: Placed) -> None:
        """Take ``model`` off the device: to host memory if it can wait there, else drop it
        (it is loaded from disk when it comes back)."""
        engine = model.engine
        if engine is None:
            model.where = "disk"
            return
        if model.host is None and movable(engine):
            available = self.host_bytes()
            needed = weight_bytes(engine)
            if available is None or needed <= HOST_SHARE * available:
                model.host = HostCopy(engine)
            else:
                logger.info(
                    "%s waits on disk: its %.1f GiB of weights do not fit the host's available "
                    "memory",
                    model.spec.model_id,
                    needed / 2**30,
                )
        if model.host is not None:
            model.host.leave()
            model.where = "host"
        else:
            model.engine = None
            model.where = "disk"

    def _bring(self, model: Placed) -> None:
        """Put ``model`` on the device: by a copy from host memory, or loaded from disk."""
        if model.where == "device":
            return
        if model.where == "host" and model.host is not None and model.engine is not None:
            model.host.bring(model.engine.device)
        else:
            model.engine = self.load(model.spec)
        model.where = "device"
        model.since = self.clock()

    # --- the worker's questions ------------------------------------------------------------

    def add_variant(self, spec: ModelSpec) -> None:
        """A variant of a model added before: its jobs run on that model's engine."""
        if spec.variant_of not in self.models:
            raise ValueError(f"{spec.model_id} is a variant of a model this worker lacks")
        self.variants[spec.model_id] = spec

    def spec_of(self, model_id: str) -> ModelSpec | None:
        """The spec of a served model or variant (its input schema), or None."""
        variant = self.variants.get(model_id)
        if variant is not None:
            return variant
        placed = self.models.get(model_id)
        return None if placed is None else placed.spec

    def _base(self, model_id: str) -> str:
        variant = self.variants.get(model_id)
        return model_id if variant is None or variant.variant_of is None else variant.variant_of

    def queue_ids(self) -> list[str]:
        """Every id whose queued jobs this worker runs: its models and their variants."""
        return [*self.models, *self.variants]

    def heads_by_model(self, heads: Mapping[str, float]) -> dict[str, float]:
        """Queue heads per placed model: a variant's jobs count as its model's."""
        merged: dict[str, float] = {}
        for model_id, since in heads.items():
            base = self._base(model_id)
            merged[base] = min(since, merged.get(base, since))
        return merged

    def claimable(self) -> list[str]:
        """The models whose jobs the worker may claim now: the resident ones, and their
        variants."""
        resident = [mid for mid, model in self.models.items() if model.where == "device"]
        return [*resident, *(mid for mid in self.variants if self._base(mid) in resident)]

    def waiting_models(self) -> list[str]:
        """Served models that are not on the device."""
        return [mid for mid, model in self.models.items() if model.where != "device"]

    def get(self, model_id: str) -> Placed | None:
        """The placed model that runs ``model_id``'s jobs (a variant's: its model)."""
        return self.models.get(self._base(model_id))

    def engine_of(self, model_id: str) -> Engine:
        model = self.models[self._base(model_id)]
        if model.engine is None or model.where != "device":
            raise RuntimeError(f"{model_id} is not on the device")
        return model.engine

    def consider(self, heads: Mapping[str, float]) -> tuple[str, str] | None:
        """Swap if the policy says so, given the queue's heads (model -> when its oldest
        queued job was queued); the swap made, or None."""
        resident = {mid: m.since for mid, m in self.models.items() if m.where == "device"}
        if len(resident) == len(self.models):
            return None
        waiting = [mid for mid in heads if mid not in resident]
        if len(resident) < self.capacity and waiting:
            # A free place (a swap whose model failed to come in left one): no one leaves.
            incoming = min(waiting, key=lambda mid: (heads[mid], mid))
            self.swap(None, incoming)
            return None
        chosen = plan_swap(resident, heads, self.clock(), self.swap_after)
        if chosen is not None:
            self.swap(*chosen)
        return chosen

    def swap(self, out: str | None, incoming: str) -> float:
        """Take ``out`` off the device and bring ``incoming`` in; the seconds it took."""
        started = time.perf_counter()
        with self._lock:
            if out is not None:
                self._leave(self.models[out])
                release_device_memory()
            self._bring(self.models[incoming])
            seconds = time.perf_counter() - started
            self.swaps.count += 1
            self.swaps.seconds_total += seconds
            self.swaps.last_seconds = seconds
            self.swaps.durations.append(seconds)
        logger.info(
            "swapped %s in%s in %.2fs (swap %d)",
            incoming,
            f" for {out}" if out else "",
            seconds,
            self.swaps.count,
        )
        return seconds

    def detail(self) -> PlacementDetail:
        """What /readyz and /metrics show: each model, where it is, and the swaps."""
        with self._lock:
            models = [
                ModelDetail(
                    model_id=mid,
                    resident=model.where == "device",
                    where=model.where,
                    batch_limit=model.batch_limit,
                    max_pixels=model.max_pixels,
                )
                for mid, model in self.models.items()
            ]
            last = self.swaps.last_seconds
            return PlacementDetail(
                models=models,
                resident_models=self.capacity,
                swaps=self.swaps.count,
                swap_seconds_total=round(self.swaps.seconds_total, 3),
                last_swap_seconds=None if last is None else round(last, 3),
            )
