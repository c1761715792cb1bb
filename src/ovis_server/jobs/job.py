"""A job as the store keeps it: one request to one model, from queued to a final state."""

from __future__ import annotations

from dataclasses import dataclass, fields
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
class NewJob:
    """A job as its submit asks for it: the request (``id``) to one model, and what its
    client chose beside it. ``progress_total``: its denoising steps. ``deadline``: it is
    cancelled then if not finished (Cancel-After). With an ``idempotency_key``,
    ``request_hash`` tells a repeat of the request from another one.
    """

    id: str
    token_id: str
    model_id: str
    input: dict[str, Any]
    seed: int
    progress_total: int
    batch_key: str
    idempotency_key: str | None = None
    request_hash: str | None = None
    webhook_url: str | None = None
    webhook_intermediate: bool = False
    base_url: str | None = None
    deadline: datetime | None = None

    def row(self, created_at: datetime) -> dict[str, Any]:
        """The job's row as it enters the queue: at the back, no step run, no attempt made."""
        row = {field.name: getattr(self, field.name) for field in fields(NewJob)}
        row.update(status=JobStatus.QUEUED, cancel_requested=False, progress_step=0, attempts=0)
        row["created_at"] = created_at
        return row


@dataclass(frozen=True, kw_only=True)
class Job(NewJob):
    """A job as the store keeps it: what its submit asked for, and where it stands."""

    seq: int
    status: JobStatus
    cancel_requested: bool
    progress_step: int
    attempts: int
    worker_id: str | None
    lease_expires_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error_type: str | None
    error_message: str | None
    outputs: tuple[StoredOutput, ...] = ()
    # Notes for the client that are not errors, e.g. that the prompt was cut.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobState:
    """Where a job stands, as a status body tells it (the columns of ``Job`` it needs, read
    alone: a status call, the API's most frequent, reads no more)."""

    id: str
    token_id: str
    status: JobStatus
    progress_step: int
    progress_total: int
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error_type: str | None
    error_message: str | None
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
