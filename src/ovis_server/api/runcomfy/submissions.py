"""Taking a submit: the model's input schema, webhook parameters, Cancel-After, the
idempotency key and the submit limits, then the job in the queue."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import threading
import uuid
from datetime import timedelta
from typing import Any

from pydantic import ValidationError

from ovis_server.api.capacity import SizeCapacity
from ovis_server.api.errors import INVALID_INPUT, ApiError, too_many, validation_failed
from ovis_server.api.request_body import check_json_depth
from ovis_server.api.runcomfy.catalogue import CataloguePages
from ovis_server.api.runcomfy.protocol import SubmitResponse
from ovis_server.api.runcomfy.rendering import request_urls
from ovis_server.catalogue.spec import ModelInput, ModelSpec
from ovis_server.config import Settings
from ovis_server.inputs.fetch import Resolver
from ovis_server.inputs.images import (
    NOT_AN_IMAGE_SOURCE,
    ImageInputError,
    image_policy_from_settings,
    load_input_image,
)
from ovis_server.inputs.loras import policy_from_settings, source_problems
from ovis_server.jobs.job import Job, NewJob
from ovis_server.jobs.store import (
    IdempotencyConflictError,
    JobStore,
    LimitExceededError,
    SubmitLimits,
    utcnow,
)
from ovis_server.storage.base import FileStore, input_image_key
from ovis_server.units import parse_duration
from ovis_server.webhooks.params import (
    WEBHOOK_FIELDS,
    Webhook,
    WebhookParamError,
    check_webhook_url,
)

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces
# A full queue clears at the pace of the GPU; clients come back after this long.
QUEUE_FULL_RETRY_SECONDS = 10
# Cancel-After: a duration (units.parse_duration) from one second to seven days.
CANCEL_AFTER_BOUNDS = (1.0, 7 * 24 * 3600.0)


def parse_cancel_after(value: str) -> timedelta:
    """The ``Cancel-After`` header as a duration, or a 422 naming it."""
    try:
        seconds: float | None = parse_duration(value)
    except ValueError:
        seconds = None
    low, high = CANCEL_AFTER_BOUNDS
    if seconds is None or not low <= seconds <= high:
        raise ApiError(
            422,
            INVALID_INPUT,
            f"Cancel-After: {value[:50]!r} is not a duration from 1 second to 7 days; send "
            "seconds (90) or a duration such as 90s, 5m or 1h30m",
        )
    return timedelta(seconds=seconds)


# Bodies above this are judged one at a time (Submissions.submit).
LARGE_BODY_BYTES = 1024 * 1024


def url_digest(url: str) -> str:
    """A short stand-in for an image URL in what is hashed: its SHA-256, taken a piece at a
    time (no copy of a 16 MiB data URI)."""
    digest = hashlib.sha256()
    step = 1 << 20
    for start in range(0, len(url), step):
        digest.update(url[start : start + step].encode())
    return f"sha256:{digest.hexdigest()}"


class Submissions:
    def __init__(
        self,
        store: JobStore,
        catalogue: CataloguePages,
        settings: Settings,
        capacity: SizeCapacity | None = None,
        files: FileStore | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.store = store
        self.catalogue = catalogue
        self.settings = settings
        self.capacity = capacity  # a size no worker fits gets a 422 (capacity.py)
        self.files = files  # where input images are stored (models with an image input)
        self.resolver = resolver  # how fetches resolve names (a test seam; default: DNS)
        self._large_bodies = threading.Lock()

    def submit(
        self,
        token_id: str,
        model_id: str,
        body: bytes | bytearray,
        base_url: str,
        idempotency_key: str | None = None,
        webhook: Webhook | None = None,
        cancel_after: str | None = None,
    ) -> SubmitResponse:
        arguments = (token_id, model_id, body, base_url, idempotency_key, webhook, cancel_after)
        if len(body) <= LARGE_BODY_BYTES:
            return self._submit(*arguments)
        # A large body is a data URI: its parsed text and decoded bytes are several times
        # its size, so large bodies are judged one at a time (memory: the bodies read, plus
        # one being judged).
        with self._large_bodies:
            return self._submit(*arguments)

    def _submit(
        self,
        token_id: str,
        model_id: str,
        body: bytes | bytearray,
        base_url: str,
        idempotency_key: str | None,
        webhook: Webhook | None,
        cancel_after: str | None,
    ) -> SubmitResponse:
        spec = self.catalogue.spec(model_id)
        lifetime = None if cancel_after is None else parse_cancel_after(cancel_after)
        check_json_depth(body)  # json.loads recurses, and a client's nesting is unbounded
        webhook = webhook or Webhook()
        fields: Any = None
        if b'"webhook' in body:
            with contextlib.suppress(ValueError):
                fields = json.loads(body)
        try:
            if isinstance(fields, dict) and WEBHOOK_FIELDS & fields.keys():
                webhook = webhook.merged(fields)  # takes them out: they are not model input
                body = json.dumps(fields).encode()
            else:
                webhook = webhook.merged({})
            if webhook.url is not None:
                check_webhook_url(webhook.url, allow_private=self.settings.allow_private_webhooks)
        except WebhookParamError as exc:
            raise ApiError(422, INVALID_INPUT, str(exc)) from None
        try:
            validated = spec.input_model.model_validate_json(body or b"{}")
        except ValidationError as exc:
            raise validation_failed(exc.errors(include_url=False)) from None
        lora_problems = source_problems(validated.lora_paths(), policy_from_settings(self.settings))
        if lora_problems:
            raise validation_failed(lora_problems)  # a LoRA not allowed, or no such name
        seed = validated.resolved_seed()
        image_urls = validated.image_urls()
        if validated.reads_input_image() and not image_urls:
            # The stored image's reference (what the job row keeps) names none of the client's.
            field = type(validated).IMAGE_FIELDS[0]
            raise ApiError(422, INVALID_INPUT, f"{field}: {NOT_AN_IMAGE_SOURCE}")
        # What is asked, for Idempotency-Key: an image by its digest (a data URI may be
        # 16 MiB; the job row keeps a reference).
        canonical = validated.model_copy(
            update={name: url_digest(url) for name, url in image_urls.items()}
        ).model_dump_json()
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
                    return SubmitResponse(request_id=twin.id, **request_urls(base_url, twin.id))
            request_id = str(uuid.uuid4())
            stored_image = False
            if image_urls:
                # Fetched or decoded once, here; the job row keeps a short reference.
                validated = self._store_input_image(request_id, validated)
                image_urls.clear()  # the data URI's text goes with the input as sent
                stored_image = True
                canonical = validated.model_dump_json()
            try:
                job = self._queue(
                    spec, validated, canonical, seed, request_id, token_id, idempotency_key,
                    request_hash, webhook, base_url, lifetime,
                )  # fmt: skip
            except BaseException:
                if stored_image and self.files is not None:
                    self.files.delete_request(request_id)  # no job: no input to keep
                raise
        except LimitExceededError as exc:
            raise self._refusal(exc) from None
        except IdempotencyConflictError as exc:
            raise ApiError(
                422,
                INVALID_INPUT,
                f"Idempotency-Key was used in the last 24 hours for request {exc.job.id} with "
                "a different body; use a new key for a new request",
            ) from None
        return SubmitResponse(request_id=job.id, **request_urls(base_url, job.id))

    def _queue(
        self,
        spec: ModelSpec,
        validated: ModelInput,
        canonical: str,
        seed: int,
        request_id: str,
        token_id: str,
        idempotency_key: str | None,
        request_hash: str,
        webhook: Webhook,
        base_url: str,
        lifetime: timedelta | None,
    ) -> Job:
        """The job in the queue (its size checked against the workers first)."""
        generation = validated.to_generation_request(seed)
        if self.capacity is not None:
            multiple = spec.sizes.multiple if spec.sizes else 1
            self.capacity.check(spec.model_id, generation.width, generation.height, multiple)
        new_job = NewJob(
            id=request_id,
            token_id=token_id,
            model_id=spec.model_id,
            input=json.loads(canonical),
            seed=seed,
            progress_total=generation.steps_run,
            batch_key=spec.batch_key(generation),
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            webhook_url=webhook.url,
            webhook_intermediate=bool(webhook.intermediate),
            base_url=base_url,
            deadline=None if lifetime is None else utcnow() + lifetime,
        )
        return self.store.submit(new_job, self._limits())

    def _store_input_image(self, request_id: str, validated: ModelInput) -> ModelInput:
        """Fetch or decode the input image, check it and store it as the job's input; the
        input with a reference to it. A bad image is a 422 naming the field and why."""
        ((field, url),) = validated.image_urls().items()
        if self.files is None:
            raise ApiError(422, INVALID_INPUT, f"{field}: this server stores no input images")
        policy = image_policy_from_settings(self.settings)
        try:
            # A threadpool thread (routes.py): its own event loop for the async fetch.
            image = asyncio.run(load_input_image(url, policy, self.resolver))
        except ImageInputError as exc:
            raise ApiError(422, INVALID_INPUT, f"{field}: {exc}") from None
        self.files.put(input_image_key(request_id), image.png, "image/png")
        return validated.with_input_image(image.width, image.height)

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
