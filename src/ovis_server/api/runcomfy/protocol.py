"""The wire contract as Pydantic models: every body the API sends is one of these.

Field names and status words are what RunComfy's clients parse; see the README.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ovis_server.jobs.job import JobStatus

StatusWord = Literal["in_queue", "in_progress", "completed", "cancelled", "failed"]
ResultWord = Literal["in_queue", "in_progress", "succeeded", "cancelled", "failed"]
OutcomeWord = Literal["cancelled", "cancellation_requested", "not_cancellable"]

# /status says "completed" where /result says "succeeded": both are what clients expect.
STATUS_WORDS: dict[JobStatus, StatusWord] = {
    JobStatus.QUEUED: "in_queue",
    JobStatus.RUNNING: "in_progress",
    JobStatus.SUCCEEDED: "completed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.FAILED: "failed",
}
RESULT_WORDS: dict[JobStatus, ResultWord] = {
    JobStatus.QUEUED: "in_queue",
    JobStatus.RUNNING: "in_progress",
    JobStatus.SUCCEEDED: "succeeded",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.FAILED: "failed",
}


class ErrorBody(BaseModel):
    error_code: int
    error_message: str
    detail: list[dict[str, Any]] | None = None


class SubmitResponse(BaseModel):
    request_id: str
    status_url: str
    result_url: str
    cancel_url: str


class Progress(BaseModel):
    step: int = Field(description="Denoising steps done.")
    total: int = Field(description="Denoising steps in all.")


class LogLine(BaseModel):
    timestamp: str
    message: str


class StatusResponse(BaseModel):
    request_id: str
    status: StatusWord
    status_url: str
    result_url: str
    queue_position: int | None = Field(
        default=None, description="Present while in_queue: 0 means the job runs next."
    )
    progress: Progress | None = Field(default=None, description="Present while in_progress.")
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    logs: list[LogLine] | None = Field(default=None, description="With ?logs=1.")
    warnings: list[str] | None = Field(
        default=None,
        description="Notes that are not errors, e.g. that the prompt was longer than the "
        "model reads and was cut.",
    )


class JobError(BaseModel):
    type: str
    message: str


class ResultResponse(BaseModel):
    request_id: str
    status: ResultWord
    model_id: str
    output: dict[str, str | list[str]] | None = Field(
        default=None, description="Present when succeeded: {'image': <url>}."
    )
    error: JobError | None = Field(default=None, description="Present when failed.")
    seed: int = Field(description="The seed used: send it back to get the same image.")
    cost: float
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    warnings: list[str] | None = Field(
        default=None,
        description="Notes that are not errors, e.g. that the prompt was longer than the "
        "model reads and was cut.",
    )


class RequestList(BaseModel):
    requests: list[ResultResponse] = Field(description="This token's requests, newest first.")
    next_cursor: str | None = Field(
        default=None, description="Pass as ?cursor= for the next page; absent on the last."
    )


class CancelResponse(BaseModel):
    request_id: str
    status: StatusWord
    outcome: OutcomeWord


class ModelSummary(BaseModel):
    model_id: str
    display_name: str
    description: str
    price_unit: Literal["output"] = "output"
    base_price_usd: float
    categories: list[str] = Field(description="Capabilities, e.g. text-to-image.")
    kind: Literal["model", "workflow", "inference"]
    tags: list[str] = Field(description="The same as categories (older name).")
    input_schema: dict[str, Any] | None = Field(
        default=None, description="With ?include_schema=true."
    )


class CatalogueQuery(BaseModel):
    """The filters of ``GET /v1/models``, as RunComfy's CLI sends them."""

    limit: int = Field(default=100, ge=1, le=500, description="Entries per page.")
    offset: int = Field(default=0, ge=0, description="Entries to skip.")
    search: str | None = Field(
        default=None,
        max_length=200,
        description="Case-insensitive text in the model id, display name or description.",
    )
    category: str | None = Field(
        default=None, max_length=100, description="A capability, e.g. text-to-image."
    )
    kind: Literal["model", "workflow", "inference"] | None = None
    include_schema: bool = Field(default=False, description="Add each model's input_schema.")


class OpenAIModel(BaseModel):
    """A model as OpenAI's ``GET /v1/models`` lists it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    """RunComfy's catalogue page (``models``, ``total``) and OpenAI's model list (``object``,
    ``data``) in one body: each client reads its own fields."""

    models: list[ModelSummary]
    total: int = Field(description="Entries matching the filters, on every page together.")
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class CategoryList(BaseModel):
    categories: list[str]


class ModelDetail(ModelSummary):
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
