"""A job as the store keeps it: one request to one model, from queued to a final state."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class DeliveryState(StrEnum):
    """Where a webhook message stands."""

    PENDING = "pending"  # not yet taken by the receiver: sent, or retried, when due
    DELIVERED = "delivered"
    FAILED = "failed"  # out of retries, or its request is gone


class CancelOutcome(StrEnum):
    """What a cancel request achieved; the values are the wire contract's words."""

    CANCELLED = "cancelled"
    REQUESTED = "cancellation_requested"
    NOT_CANCELLABLE = "not_cancellable"


@dataclass(frozen=True)
class StoredOutput:
    """One file a job produced, by its key in the file store."""

    key: str
    media_type: str
    width: int
    height: int

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "media_type": self.media_type,
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoredOutput:
        return cls(
            key=str(data["key"]),
            media_type=str(data["media_type"]),
            width=int(data["width"]),
            height=int(data["height"]),
        )


@dataclass(frozen=True)
class Job:
    id: str
    seq: int
    token_id: str
    model_id: str
    input: dict[str, Any]
    seed: int
    batch_key: str
    status: JobStatus
    cancel_requested: bool
    progress_step: int
    progress_total: int
    attempts: int
    worker_id: str | None
    lease_expires_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error_type: str | None
    error_message: str | None
    outputs: tuple[StoredOutput, ...] = field(default=())
    idempotency_key: str | None = None
    request_hash: str | None = None
    webhook_url: str | None = None
    webhook_intermediate: bool = False
    base_url: str | None = None
    deadline: datetime | None = None
    # Notes for the client that are not errors, e.g. that the prompt was cut.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobEvent:
    """One state change of one job, as the event log keeps it (``seq`` orders them all)."""

    seq: int
    request_id: str
    status: JobStatus
    step: int
    total: int
    at: datetime
