"""The bodies that tell a request's state, made in one place: the status body and the
result body, as /status, /result, the request list, ``Prefer: wait``, the status stream's
events and webhook messages all send them."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from pydantic import BaseModel

from ovis_server.api.runcomfy.protocol import (
    RESULT_WORDS,
    STATUS_WORDS,
    JobError,
    LogLine,
    Progress,
    ResultResponse,
    StatusResponse,
)
from ovis_server.catalogue.registry import ModelRegistry
from ovis_server.config import Settings
from ovis_server.jobs.events import utcnow
from ovis_server.jobs.job import Job, JobState, JobStatus
from ovis_server.storage.base import FileStore


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def wire_json(body: BaseModel) -> str:
    """A body as JSON the way every route sends it: fields that are None left out."""
    return body.model_dump_json(exclude_none=True)


def request_urls(base_url: str, request_id: str) -> dict[str, str]:
    """The status, result and cancel URLs of a request."""
    prefix = f"{base_url}/v1/requests/{request_id}"
    return {
        "status_url": f"{prefix}/status",
        "result_url": f"{prefix}/result",
        "cancel_url": f"{prefix}/cancel",
    }


def job_log(job: Job | JobState) -> list[LogLine]:
    """A job's story in a few timestamped lines, told from what the store records."""
    lines = [LogLine(timestamp=iso(job.created_at) or "", message="queued")]
    if job.started_at is not None:
        attempt = f" (attempt {job.attempts})" if job.attempts > 1 else ""
        lines.append(LogLine(timestamp=iso(job.started_at) or "", message=f"started{attempt}"))
        if job.status == JobStatus.RUNNING:
            lines.append(
                LogLine(
                    timestamp=iso(utcnow()) or "",
                    message=f"step {job.progress_step} of {job.progress_total}",
                )
            )
    if job.finished_at is not None:
        ending = str(job.status.value)
        if _has_reason(job):
            ending += f": {job.error_type}: {job.error_message}"
        lines.append(LogLine(timestamp=iso(job.finished_at) or "", message=ending))
    return lines


def _has_reason(job: Job | JobState) -> bool:
    """Whether the job ended with an error to tell: it failed, or a cancel with a reason
    (its deadline passed)."""
    return job.status == JobStatus.FAILED or (
        job.status == JobStatus.CANCELLED and job.error_type is not None
    )


class BodyRenderer:
    """Makes status and result bodies from job rows; signs their file URLs."""

    def __init__(self, files: FileStore, models: ModelRegistry, settings: Settings) -> None:
        self.files = files
        self.models = models
        self.url_ttl_seconds = settings.url_ttl_seconds
        # Webhooks of jobs submitted before base URLs were kept start their URLs here.
        self.public_url = settings.public_url or ""
        # The price of a job whose model this server no longer offers.
        self.base_price_usd = settings.base_price_usd

    def output_url(self, key: str, base_url: str) -> str:
        """A signed (or presigned) URL of an output file, valid for --url-ttl."""
        return self.files.url(key, base_url=base_url, expires_in=self.url_ttl_seconds)

    def status_body(
        self, job: Job | JobState, base_url: str, queue_position: int | None, logs: bool = False
    ) -> StatusResponse:
        urls = request_urls(base_url, job.id)
        return StatusResponse(
            request_id=job.id,
            status=STATUS_WORDS[job.status],
            status_url=urls["status_url"],
            result_url=urls["result_url"],
            queue_position=queue_position if job.status == JobStatus.QUEUED else None,
            progress=(
                Progress(step=job.progress_step, total=job.progress_total)
                if job.status == JobStatus.RUNNING
                else None
            ),
            created_at=iso(job.created_at) or "",
            started_at=iso(job.started_at),
            finished_at=iso(job.finished_at),
            logs=job_log(job) if logs else None,
            warnings=list(job.warnings) or None,
        )

    def result_body(self, job: Job, base_url: str) -> ResultResponse:
        output: dict[str, str | list[str]] | None = None
        error: JobError | None = None
        if job.status == JobStatus.SUCCEEDED:
            urls = [self.output_url(item.key, base_url) for item in job.outputs]
            output = {"image": urls[0]} if len(urls) == 1 else {"images": urls}
        elif _has_reason(job):
            error = JobError(
                type=job.error_type or "generation_error",
                message=job.error_message or "the job failed",
            )
        return ResultResponse(
            request_id=job.id,
            status=RESULT_WORDS[job.status],
            model_id=job.model_id,
            output=output,
            error=error,
            seed=job.seed,
            cost=self.price_usd(job.model_id) * len(job.outputs),
            created_at=iso(job.created_at) or "",
            started_at=iso(job.started_at),
            finished_at=iso(job.finished_at),
            warnings=list(job.warnings) or None,
        )

    def price_usd(self, model_id: str) -> float:
        """The price of one output of ``model_id``."""
        spec = self.models.get(model_id)
        return self.base_price_usd if spec is None else spec.base_price_usd

    def webhook_body(self, job: Job, status: JobStatus, step: int, total: int) -> bytes:
        """A webhook message's body: the result body for a final state, else the status
        body of the job as it was then (``status`` at ``step`` of ``total``)."""
        base_url = job.base_url or self.public_url
        if status.is_final:
            return wire_json(self.result_body(job, base_url)).encode()
        then = replace(
            job,
            status=status,
            progress_step=step,
            progress_total=total,
            started_at=job.started_at if status == JobStatus.RUNNING else None,
            finished_at=None,
        )
        return wire_json(self.status_body(then, base_url, None)).encode()
