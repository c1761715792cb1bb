"""What a worker tells the API about itself, as typed messages: its memory plan, its models
and swaps, its start-up, and how far its current phase is.

The worker writes a :class:`WorkerDetail` into its row of the workers table
(worker/report.py), and the API reads it back as one (jobs/workers.py's ``alive``) for
/readyz, /metrics and the submit's size check. In the row (a JSON column) a detail is one
flat object of the fields that are set: what workers of earlier versions wrote too, so
their rows read back the same. A field that does not read (a damaged row, a worker of
another version) is left out, and logged once per process; it never fails the rest.
"""

from __future__ import annotations

import logging
import threading
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)

logger = logging.getLogger(__name__)

# Where a model's weights are: on the device, waiting in host memory, or on disk.
Where = Literal["device", "host", "disk"]
Count = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[StrictInt, Field(gt=0)]
Seconds = Annotated[StrictFloat, Field(ge=0)]

_unreadable_seen: set[str] = set()
_unreadable_lock = threading.Lock()


def _log_unreadable(what: str) -> None:
    """Log, once per process, that a worker's detail has ``what`` unreadable."""
    with _unreadable_lock:
        if what in _unreadable_seen:
            return
        _unreadable_seen.add(what)
    logger.warning(
        "a worker reports an unreadable %s; it is left out (a worker of another version?)",
        what,
    )


class DetailPart(BaseModel):
    """A part of the detail: its optional fields that do not read are left out (None)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    @field_validator("*", mode="wrap")
    @classmethod
    def _leave_out_unreadable(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        try:
            return handler(value)
        except ValidationError:
            name = info.field_name or "?"
            if cls.model_fields[name].is_required():
                raise
            _log_unreadable(f"{name} in its {cls.__name__}")
            return None


class ProgressDetail(BaseModel):
    """How far the worker is in its phase: ``done`` of ``total`` ``unit``s (bytes of weights
    downloaded, shapes compiled), ``rate`` units a second, ``eta_seconds`` left."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    done: float
    total: float | None = None
    unit: str = ""
    rate: float | None = None
    eta_seconds: float | None = None
    text: str | None = None


class ModelDetail(DetailPart):
    """One model of the worker (worker/placement.py): where it is, and what it may run."""

    model_id: StrictStr
    resident: StrictBool  # on the device now: the worker takes its jobs
    where: Where
    batch_limit: Positive | None = None
    max_pixels: Count | None = None  # the largest image its plan fits; None: no limit


class MemoryPlanDetail(DetailPart):
    """The memory plan of the worker's (first) model (engine/memory.py)."""

    memory_profile: StrictStr | None = None
    memory_budget_bytes: Count | None = None
    memory_reason: StrictStr | None = None
    batch_limit: Positive | None = None
    # The most pixels one image may have under the plan; None: no limit (a CPU).
    max_pixels: Count | None = None


class PlacementDetail(DetailPart):
    """The worker's models, how many stay resident together, and its swaps."""

    models: list[ModelDetail] | None = None
    resident_models: Positive | None = None
    swaps: Count | None = None
    swap_seconds_total: Seconds | None = None
    last_swap_seconds: Seconds | None = None


class StartupDetail(DetailPart):
    """How long the worker took to get ready, and the warm-up's share of it."""

    startup_seconds: Seconds | None = None
    warmup_seconds: Seconds | None = None


class WorkerDetail(MemoryPlanDetail, PlacementDetail, StartupDetail):
    """Everything a worker tells of itself besides its phase (and its problem, which the
    row keeps apart): the parts above, merged, and the phase's progress."""

    progress: ProgressDetail | None = None

    @classmethod
    def read(cls, stored: object) -> WorkerDetail:
        """The detail a worker's row holds (None: none yet); what does not read is left
        out."""
        if stored is None:
            return cls()
        if isinstance(stored, dict):
            try:
                return cls.model_validate(stored)
            except ValidationError:  # not expected: every field is optional and tolerant
                pass
        _log_unreadable(f"detail of type {type(stored).__name__}")
        return cls()

    def merged(self, *parts: DetailPart) -> Self:
        """This detail with the fields each part was given replacing its own (None leaves
        one out), the others kept."""
        update = {name: getattr(part, name) for part in parts for name in part.model_fields_set}
        return self.model_copy(update=update)

    def with_progress(self, progress: ProgressDetail | None) -> Self:
        return self.model_copy(update={"progress": progress})

    def stored(self) -> dict[str, Any]:
        """The row's JSON: the fields that are set, flat, as every version reads them."""
        return self.model_dump(mode="json", exclude_none=True)
