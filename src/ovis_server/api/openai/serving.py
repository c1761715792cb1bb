"""What an OpenAI image generation does: submits ``n`` jobs to the queue (same tokens,
limits, metrics and request list as any submit), waits for them as ``Prefer: wait`` does,
and answers synchronously in OpenAI's shape. The queue is reached through ``ImageQueue``
(built over the RunComfy dialect's services in api/state.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from typing import Any, Protocol

from fastapi.concurrency import run_in_threadpool

from ovis_server.api.errors import ApiError
from ovis_server.api.openai.errors import OpenAIError
from ovis_server.api.openai.protocol import ImageData, ImageGenerationRequest, ImagesResponse
from ovis_server.catalogue.registry import ModelRegistry
from ovis_server.catalogue.spec import ImageSizes, ModelSpec
from ovis_server.jobs.job import Job, JobStatus

# How long a generation waits for its jobs: generous for a queue, and below the OpenAI
# SDK's own 10-minute timeout. Jobs still unfinished then are cancelled.
WAIT_SECONDS = 480
# "auto", and no size at all: OpenAI's usual square.
AUTO_SIZE = "square_hd"
SIZE_PATTERN = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


class ImageQueue(Protocol):
    """What a generation needs of the queue: its calls that block run in the thread pool."""

    def submit(self, token_id: str, model_id: str, body: bytes, base_url: str) -> str:
        """Submit one job as ``token_id``; its request id (an ApiError if refused)."""

    def get(self, request_id: str) -> Job | None:
        """The job, or None once deleted."""

    def cancel(self, request_id: str) -> None:
        """Cancel the job (or ask its worker to)."""

    async def wait_final(self, request_id: str, seconds: float) -> Job | None:
        """The job once final, or None if it is not within ``seconds``."""

    def read_output(self, key: str) -> bytes:
        """An output file's bytes (FileNotFoundError once deleted)."""

    def output_url(self, key: str, base_url: str) -> str:
        """An output file's signed URL."""


def requested_size(size: str | None, sizes: ImageSizes | None) -> str | dict[str, int]:
    """``size`` as the model's image_size: a preset for auto, else width and height (within
    the model's ``sizes``; a model with none judges them itself)."""
    if size is None or size == "auto":
        return AUTO_SIZE
    match = SIZE_PATTERN.fullmatch(size)
    width, height = (int(match[1]), int(match[2])) if match else (0, 0)
    if sizes is None and match:
        return {"width": width, "height": height}
    if sizes is None or not all(
        sizes.min_side <= side <= sizes.max_side and side % sizes.multiple == 0
        for side in (width, height)
    ):
        rule = (
            f"multiples of {sizes.multiple} from {sizes.min_side} to {sizes.max_side}"
            if sizes
            else "numbers"
        )
        raise OpenAIError(
            400,
            f"Invalid size {size[:20]!r}: send WxH with both sides {rule} (such as "
            "1024x768), or auto",
            param="size",
            code="invalid_value",
        )
    return {"width": width, "height": height}


def job_inputs(body: ImageGenerationRequest, spec: ModelSpec) -> list[dict[str, Any]]:
    """The model input of each of the ``n`` jobs on ``spec``."""
    base: dict[str, Any] = {
        "prompt": body.prompt,
        "image_size": requested_size(body.size, spec.sizes),
        "output_format": body.output_format or "png",
    }
    extensions = {
        "negative_prompt": body.negative_prompt,
        "num_inference_steps": body.num_inference_steps,
        "guidance_scale": body.guidance_scale,
    }
    base.update({name: value for name, value in extensions.items() if value is not None})
    return [
        {**base, "seed": None if body.seed is None else body.seed + index}
        for index in range(body.n)
    ]


def model_for(models: ModelRegistry, name: str) -> ModelSpec:
    """The model an OpenAI ``model`` names, by id or alias; 404 in OpenAI's words if none."""
    spec = models.resolve(name)
    if spec is None:
        known = ", ".join(models.names())
        raise OpenAIError(
            404,
            f"The model {name[:200]!r} does not exist on this server; it offers: {known}",
            param="model",
            code="model_not_found",
        )
    return spec


def edit_model(models: ModelRegistry, name: str | None) -> ModelSpec:
    """The image model an edit runs on: ``name`` (or its image-to-image variant), else the
    first served model with an image input; a 400 naming ``model`` if there is none."""
    if name is None:
        spec = next((spec for spec in models if spec.takes_images), None)
        if spec is None:
            raise OpenAIError(
                400,
                "image edits are not supported here: no model of this server takes an input "
                "image; use POST /v1/images/generations",
                param="model",
                code="unsupported_operation",
            )
        return spec
    spec = model_for(models, name)
    if spec.takes_images:
        return spec
    variant = next(
        (one for one in models if one.variant_of == spec.model_id and one.takes_images), None
    )
    if variant is None:
        raise OpenAIError(
            400,
            f"the model {spec.model_id} takes no input image, so it cannot edit one; models "
            "with one: " + (", ".join(m.model_id for m in models if m.takes_images) or "none"),
            param="model",
            code="unsupported_operation",
        )
    return variant


class ImagesService:
    """OpenAI's image generations and edits on ``models``, through ``queue``."""

    def __init__(self, models: ModelRegistry, queue: ImageQueue) -> None:
        self.models = models
        self.queue = queue

    def model(self, name: str) -> ModelSpec:
        return model_for(self.models, name)

    def edit_model(self, name: str | None) -> ModelSpec:
        return edit_model(self.models, name)

    async def generate(
        self,
        token_id: str,
        body: ImageGenerationRequest,
        base: str,
        edit: tuple[ModelSpec, dict[str, Any]] | None = None,
    ) -> ImagesResponse:
        """The images of ``body``; with ``edit``, of that image model with those fields
        added to every job (the input image). URLs start at ``base``."""
        queue = self.queue
        spec = self.model(body.model) if edit is None else edit[0]
        if body.stream:
            raise OpenAIError(
                400, "streaming is not supported: leave stream out", param="stream", code=None
            )
        inputs = job_inputs(body, spec)
        if edit is not None:
            inputs = [
                {**one, **edit[1], **({} if body.size else {"image_size": "auto"})}
                for one in inputs
            ]
        request_ids: list[str] = []
        try:
            for job_input in inputs:
                request_id = await run_in_threadpool(
                    queue.submit,
                    token_id=token_id,
                    model_id=spec.model_id,
                    body=json.dumps(job_input).encode(),
                    base_url=base,
                )
                request_ids.append(request_id)
        except ApiError:
            await self._cancel(request_ids)  # all n or none: the answer would miss the rest
            raise
        started = time.monotonic()
        finished = await asyncio.gather(
            *(queue.wait_final(request_id, WAIT_SECONDS) for request_id in request_ids)
        )
        jobs = [job for job in finished if job is not None]
        if len(jobs) < len(request_ids):
            if time.monotonic() - started < WAIT_SECONDS - 1:
                # Not a timeout: a job was deleted, or the server is shutting down.
                for request_id in request_ids:
                    if await run_in_threadpool(queue.get, request_id) is None:
                        raise OpenAIError(
                            404,
                            f"request {request_id} was deleted before its image was made",
                            code="not_found",
                        )
                raise OpenAIError(
                    503,
                    "the server is shutting down; requests "
                    f"{', '.join(request_ids)} stay queued (see GET /v1/requests)",
                    type="server_error",
                    headers={"Retry-After": "10"},
                )
            # Nobody would see these images: they leave the queue to those who wait less.
            await self._cancel(request_ids)
            raise OpenAIError(
                504,
                f"the images were not ready within {WAIT_SECONDS} s (the queue is long); "
                f"requests {', '.join(request_ids)} were cancelled",
                type="server_error",
                code="timeout",
            )
        for job in jobs:
            _check_succeeded(job)
        data = [
            ImageData(seed=job.seed, **await run_in_threadpool(self._image, job, body, base))
            for job in jobs
        ]
        made = jobs[0].outputs[0]  # the size made ("auto" of an edit: the input's ratio)
        width, height = made.width, made.height
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            size=f"{width}x{height}",
            output_format=body.output_format or "png",
        )

    async def _cancel(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            await run_in_threadpool(self.queue.cancel, request_id)

    def _image(self, job: Job, body: ImageGenerationRequest, base: str) -> dict[str, str]:
        (output, *_) = job.outputs
        if body.response_format == "b64_json":
            try:
                data = self.queue.read_output(output.key)
            except FileNotFoundError:
                raise OpenAIError(
                    404,
                    f"the image of request {job.id} was deleted before it could be sent",
                    code="not_found",
                ) from None
            return {"b64_json": base64.b64encode(data).decode()}
        return {"url": self.queue.output_url(output.key, base)}


def _check_succeeded(job: Job) -> None:
    if job.status == JobStatus.FAILED:
        raise OpenAIError(
            500,
            f"the image generation failed (request {job.id}): "
            f"{job.error_type or 'generation_error'}: {job.error_message or 'no reason given'}",
            type="server_error",
        )
    if job.status == JobStatus.CANCELLED:
        raise OpenAIError(
            400,
            f"request {job.id} was cancelled before its image was made"
            + (f": {job.error_message}" if job.error_message else ""),
            code="request_cancelled",
        )
