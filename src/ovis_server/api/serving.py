"""What the endpoints do, apart from HTTP: submit, status, result, cancel, the catalogue."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from ovis_server.api.capacity import SizeCapacity
from ovis_server.api.destinations import url_problem
from ovis_server.api.errors import (
    FORBIDDEN,
    INVALID_INPUT,
    MODEL_NOT_FOUND,
    ApiError,
    request_not_found,
    too_many,
    validation_failed,
)
from ovis_server.api.limits import check_json_depth
from ovis_server.api.protocol import (
    RESULT_WORDS,
    STATUS_WORDS,
    CancelResponse,
    CatalogueQuery,
    CategoryList,
    JobError,
    LogLine,
    ModelDetail,
    ModelList,
    ModelSummary,
    OpenAIModel,
    Progress,
    RequestList,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
)
from ovis_server.catalogue import (
    CATALOGUE,
    OUTPUT_SCHEMA,
    ModelSpec,
    all_categories,
    find_model,
    search_catalogue,
)
from ovis_server.config import Settings
from ovis_server.jobs.job import Job, JobStatus
from ovis_server.jobs.store import (
    IdempotencyConflictError,
    JobStore,
    LimitExceededError,
    SubmitLimits,
    utcnow,
)
from ovis_server.storage.base import REQUEST_ID_PATTERN, FileStore

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces
# A full queue clears at the pace of the GPU; clients come back after this long.
QUEUE_FULL_RETRY_SECONDS = 10
WEBHOOK_FIELDS = frozenset({"webhook", "webhook_url", "webhook_intermediate_status"})
# Cancel-After: seconds, or a duration in Go's notation as Replicate takes it (90s, 5m,
# 1h30m, 1500ms), from one second to seven days.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
CANCEL_AFTER_BOUNDS = (1.0, 7 * 24 * 3600.0)


def parse_cancel_after(value: str) -> timedelta:
    """The ``Cancel-After`` header as a duration, or a 422 naming it."""
    text = value.strip().lower()
    seconds: float | None = None
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        seconds = float(text)
    elif text and _DURATION_PART.sub("", text) == "":
        seconds = sum(
            float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text)
        )
    low, high = CANCEL_AFTER_BOUNDS
    if seconds is None or not low <= seconds <= high:
        raise ApiError(
            422,
            INVALID_INPUT,
            f"Cancel-After: {value[:50]!r} is not a duration from 1 second to 7 days; send "
            "seconds (90) or a duration such as 90s, 5m or 1h30m",
        )
    return timedelta(seconds=seconds)


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with its ``$defs`` written in place, for clients that do not follow $ref."""
    definitions = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items() if key != "$defs"}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def job_log(job: Job) -> list[LogLine]:
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
        if job.status == JobStatus.FAILED or (
            job.status == JobStatus.CANCELLED and job.error_type is not None
        ):
            ending += f": {job.error_type}: {job.error_message}"
        lines.append(LogLine(timestamp=iso(job.finished_at) or "", message=ending))
    return lines


@dataclass(frozen=True)
class Webhook:
    """Where a job's webhooks go: from the submit's query, or else from its body."""

    url: str | None = None
    intermediate: bool | None = None

    def merged(self, body: dict[str, Any]) -> Webhook:
        """Take the webhook fields out of ``body`` and settle what the submit asks for."""
        url = body.pop("webhook", None)
        alias = body.pop("webhook_url", None)  # what some clients call it
        if url is None:
            url = alias
        elif alias is not None and alias != url:
            raise ApiError(422, INVALID_INPUT, "webhook_url: differs from webhook; send one")
        intermediate = body.pop("webhook_intermediate_status", None)
        if url is not None and not isinstance(url, str):
            raise ApiError(422, INVALID_INPUT, "webhook: must be a URL string")
        if intermediate is not None and not isinstance(intermediate, bool):
            raise ApiError(422, INVALID_INPUT, "webhook_intermediate_status: must be a boolean")
        merged = Webhook(
            self.url if self.url is not None else url,
            self.intermediate if self.intermediate is not None else intermediate,
        )
        if merged.url is None and merged.intermediate:
            raise ApiError(
                422, INVALID_INPUT, "webhook_intermediate_status: needs a webhook URL too"
            )
        return merged


def check_webhook_url(url: str, *, allow_private: bool = False) -> None:
    """Refuse at submit what the destination policy refuses from the URL alone."""
    problem = url_problem(url, allow_private=allow_private)
    if problem is not None:
        raise ApiError(422, INVALID_INPUT, f"webhook: {problem}")


class RequestService:
    def __init__(self, store: JobStore, files: FileStore, settings: Settings) -> None:
        self.store = store
        self.files = files
        self.settings = settings
        self.capacity: SizeCapacity | None = None  # app.py sets it: capacity.py

    # --- the catalogue ----------------------------------------------------------------

    def _summary(self, spec: ModelSpec) -> dict[str, Any]:
        return {
            "model_id": spec.model_id,
            "display_name": spec.display_name,
            "description": spec.description,
            "base_price_usd": self.settings.base_price_usd,
            "categories": list(spec.categories),
            "kind": spec.kind,
            "tags": list(spec.categories),
        }

    def list_models(self, query: CatalogueQuery | None = None) -> ModelList:
        """One page of the catalogue entries that pass the filters; ``total`` counts them all."""
        query = query or CatalogueQuery()
        matches = search_catalogue(query.search, query.category, query.kind)
        page = matches[query.offset : query.offset + query.limit]
        return ModelList(
            models=[
                ModelSummary(
                    **self._summary(spec),
                    input_schema=(
                        inline_refs(spec.input_schema()) if query.include_schema else None
                    ),
                )
                for spec in page
            ],
            total=len(matches),
            data=[
                OpenAIModel(id=spec.model_id, created=spec.created, owned_by=spec.owned_by)
                for spec in page
            ],
        )

    @staticmethod
    def categories() -> CategoryList:
        return CategoryList(categories=all_categories())

    def model(self, model_id: str) -> ModelDetail:
        spec = self._spec(model_id)
        return ModelDetail(
            **self._summary(spec),
            input_schema=inline_refs(spec.input_schema()),
            output_schema=OUTPUT_SCHEMA,
        )

    @staticmethod
    def _spec(model_id: str) -> ModelSpec:
        spec = find_model(model_id)
        if spec is None:
            known = ", ".join(CATALOGUE)
            raise ApiError(
                404, MODEL_NOT_FOUND, f"unknown model {model_id!r}; this server offers: {known}"
            )
        return spec

    # --- requests ---------------------------------------------------------------------

    def submit(
        self,
        token_id: str,
        model_id: str,
        body: bytes,
        base_url: str,
        idempotency_key: str | None = None,
        webhook: Webhook | None = None,
        cancel_after: str | None = None,
    ) -> SubmitResponse:
        spec = self._spec(model_id)
        lifetime = None if cancel_after is None else parse_cancel_after(cancel_after)
        check_json_depth(body)  # json.loads recurses, and a client's nesting is unbounded
        webhook = webhook or Webhook()
        fields: Any = None
        if b'"webhook' in body:
            with contextlib.suppress(ValueError):
                fields = json.loads(body)
        if isinstance(fields, dict) and WEBHOOK_FIELDS & fields.keys():
            webhook = webhook.merged(fields)  # takes them out: they are not model input
            body = json.dumps(fields).encode()
        else:
            webhook = webhook.merged({})
        if webhook.url is not None:
            check_webhook_url(webhook.url, allow_private=self.settings.allow_private_webhooks)
        try:
            validated = spec.input_model.model_validate_json(body or b"{}")
        except ValidationError as exc:
            raise validation_failed(exc.errors(include_url=False)) from None
        canonical = validated.model_dump_json()
        asked = f"{spec.model_id}\n{canonical}"
        if webhook.url is not None:
            # Part of what is asked: a retry that changes the webhook is a new request.
            asked += f"\n{webhook.url}\n{bool(webhook.intermediate)}"
        request_hash = hashlib.sha256(asked.encode()).hexdigest()
        try:
            if idempotency_key is not None:
                if not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
                    raise ApiError(
                        422,
                        INVALID_INPUT,
                        "Idempotency-Key must be 1 to 200 printable ASCII characters",
                    )
                twin = self.store.idempotent_twin(token_id, idempotency_key, request_hash)
                if twin is not None:
                    return SubmitResponse(request_id=twin.id, **self._urls(base_url, twin.id))
            if self.capacity is not None:
                self.capacity.check(spec.model_id, *validated.dimensions())
            job = self.store.submit(
                request_id=str(uuid.uuid4()),
                token_id=token_id,
                model_id=spec.model_id,
                input=json.loads(canonical),
                seed=validated.resolved_seed(),
                total_steps=validated.num_inference_steps,
                batch_key=validated.batch_key(spec.model_id),
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                webhook_url=webhook.url,
                webhook_intermediate=bool(webhook.intermediate),
                base_url=base_url,
                deadline=None if lifetime is None else utcnow() + lifetime,
                limits=self._limits(),
            )
        except LimitExceededError as exc:
            raise self._refusal(exc) from None
        except IdempotencyConflictError as exc:
            raise ApiError(
                422,
                INVALID_INPUT,
                f"Idempotency-Key was used in the last 24 hours for request {exc.job.id} with "
                "a different body; use a new key for a new request",
            ) from None
        return SubmitResponse(request_id=job.id, **self._urls(base_url, job.id))

    def _limits(self) -> SubmitLimits:
        settings = self.settings
        return SubmitLimits(
            per_minute=max(0, settings.rate_limit_per_minute),
            queued_per_token=max(0, settings.max_queued_per_token),
            queued=max(0, settings.max_queued),
        )

    def _refusal(self, exc: LimitExceededError) -> ApiError:
        """Backpressure: 429 with Retry-After when the queue or this token is over its limit."""
        if exc.kind == "rate":
            return too_many(
                f"rate limit: this token may submit {self.settings.rate_limit_per_minute} "
                "requests a minute; retry after the Retry-After seconds",
                math.ceil(exc.retry_after),
            )
        if exc.kind == "token_queue":
            return too_many(
                f"this token has {exc.count} requests waiting, the most allowed; "
                "retry when some have run",
                QUEUE_FULL_RETRY_SECONDS,
            )
        return too_many(
            f"the queue is full ({exc.count} requests waiting); retry later",
            QUEUE_FULL_RETRY_SECONDS,
        )

    def owned_job(self, token_id: str, request_id: str) -> Job:
        job = self.store.get(request_id) if REQUEST_ID_PATTERN.fullmatch(request_id) else None
        if job is None:
            raise request_not_found(request_id)
        if job.token_id != token_id:
            raise ApiError(403, FORBIDDEN, f"request {request_id!r} belongs to another token")
        return job

    @staticmethod
    def _urls(base_url: str, request_id: str) -> dict[str, str]:
        prefix = f"{base_url}/v1/requests/{request_id}"
        return {
            "status_url": f"{prefix}/status",
            "result_url": f"{prefix}/result",
            "cancel_url": f"{prefix}/cancel",
        }

    def status(
        self, token_id: str, request_id: str, base_url: str, logs: bool = False
    ) -> StatusResponse:
        job = self.owned_job(token_id, request_id)
        position = self.store.queue_position(job) if job.status == JobStatus.QUEUED else None
        return self.status_body(job, base_url, position, logs)

    def status_body(
        self, job: Job, base_url: str, queue_position: int | None, logs: bool = False
    ) -> StatusResponse:
        urls = self._urls(base_url, job.id)
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

    def result(self, token_id: str, request_id: str, base_url: str) -> ResultResponse:
        return self.result_body(self.owned_job(token_id, request_id), base_url)

    def list_requests(
        self, token_id: str, limit: int, cursor: str | None, base_url: str
    ) -> RequestList:
        before = None
        if cursor is not None:
            if not cursor.isdigit():
                raise ApiError(422, INVALID_INPUT, "cursor: not a cursor this API handed out")
            before = int(cursor)
        page = self.store.list_for_token(token_id, limit + 1, before)
        more = len(page) > limit
        page = page[:limit]
        return RequestList(
            requests=[self.result_body(job, base_url) for job in page],
            next_cursor=str(page[-1].seq) if more else None,
        )

    def result_body(self, job: Job, base_url: str) -> ResultResponse:
        output: dict[str, str | list[str]] | None = None
        error: JobError | None = None
        if job.status == JobStatus.SUCCEEDED:
            urls = [
                self.files.url(
                    item.key, base_url=base_url, expires_in=self.settings.url_ttl_seconds
                )
                for item in job.outputs
            ]
            output = {"image": urls[0]} if len(urls) == 1 else {"images": urls}
        elif job.status == JobStatus.FAILED or (
            # A cancel with a reason (its deadline passed) tells it.
            job.status == JobStatus.CANCELLED and job.error_type is not None
        ):
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
            cost=self.settings.base_price_usd * len(job.outputs),
            created_at=iso(job.created_at) or "",
            started_at=iso(job.started_at),
            finished_at=iso(job.finished_at),
            warnings=list(job.warnings) or None,
        )

    def cancel(self, token_id: str, request_id: str) -> CancelResponse:
        """Cancel a queued job at once; flag a running one for its worker and answer at
        once with ``cancellation_requested`` (the client reads the final state from status:
        waiting here would hold a server thread for up to a step)."""
        self.owned_job(token_id, request_id)
        answer = self.store.request_cancel(request_id)
        if answer is None:
            raise request_not_found(request_id)
        job, outcome = answer
        return CancelResponse(request_id=job.id, status=STATUS_WORDS[job.status], outcome=outcome)

    def delete(self, token_id: str, request_id: str) -> None:
        """Remove a request and its files at once. A running job loses its row, so its
        worker stops at the next step (and removes a file it stores after this)."""
        self.owned_job(token_id, request_id)
        # The row first: a worker that stores the file after this finds its job gone and
        # removes the file itself; one that stored it before has it removed here.
        if not self.store.delete([request_id]):
            raise request_not_found(request_id)
        self.files.delete_request(request_id)
