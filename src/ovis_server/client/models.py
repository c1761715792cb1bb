"""What the client reads back: lenient models, so that answers from RunComfy's hosted API
(which lacks some of ovis-server's extra fields) parse too."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

FINAL_STATUSES = frozenset({"completed", "succeeded", "failed", "cancelled"})


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


class Submission(_Answer):
    request_id: str
    status_url: str | None = None
    result_url: str | None = None
    cancel_url: str | None = None


class Progress(_Answer):
    step: int
    total: int


class Status(_Answer):
    request_id: str
    status: str
    queue_position: int | None = None
    progress: Progress | None = None
    warnings: list[str] | None = None  # e.g. the prompt was cut to what the model reads

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


class JobError(_Answer):
    type: str | None = None
    message: str | None = None


class Result(_Answer):
    request_id: str
    status: str
    output: dict[str, Any] | None = None
    error: JobError | None = None
    seed: int | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    warnings: list[str] | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def image_url(self) -> str | None:
        """The first output image's URL, if any."""
        if not self.output:
            return None
        image = self.output.get("image")
        if isinstance(image, str):
            return image
        images = self.output.get("images")
        return str(images[0]) if images else None


class Cancellation(_Answer):
    request_id: str
    status: str | None = None
    outcome: str
