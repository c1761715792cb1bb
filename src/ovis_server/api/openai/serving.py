"""OpenAI's Images API over the same queue: ``POST /v1/images/generations``.

A generation submits ``n`` jobs through ``Submissions.submit`` (same tokens, limits,
metrics and request list as any submit), waits for them as ``Prefer: wait`` does, and
answers synchronously in OpenAI's shape. Errors on these routes are OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with OpenAI's status codes, so that
the official SDKs raise their usual exceptions.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ovis_server.api.auth import Caller, authenticate
from ovis_server.api.errors import MODEL_NOT_FOUND, ApiError
from ovis_server.api.runcomfy.rendering import BodyRenderer
from ovis_server.api.runcomfy.routes import base_url, owned_requests, submissions
from ovis_server.api.stream import StatusHub, wait_final
from ovis_server.catalogue.ovis_image import (
    MAX_SIDE,
    MIN_SIDE,
    OVIS_IMAGE_MODEL_ID,
    SIZE_MULTIPLE,
    OutputFormat,
)
from ovis_server.catalogue.registry import ModelRegistry
from ovis_server.catalogue.spec import ModelSpec
from ovis_server.jobs.job import Job, JobStatus
from ovis_server.jobs.store import JobStore

MAX_IMAGES = 4
# How long a generation waits for its jobs: generous for a queue, and below the OpenAI
# SDK's own 10-minute timeout. Jobs still unfinished then are cancelled.
WAIT_SECONDS = 480
# "auto", and no size at all: OpenAI's usual square.
AUTO_SIZE = "square_hd"
SIZE_PATTERN = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")

ErrorType = Literal["invalid_request_error", "requests", "server_error"]


# --- the wire -----------------------------------------------------------------------------


class ImageGenerationRequest(BaseModel):
    """OpenAI's ``images.generate`` body, with Ovis-Image's own knobs as extensions."""

    model_config = ConfigDict(extra="forbid", strict=True, title="ImageGenerationRequest")

    prompt: str = Field(description="What the image shows.")
    model: str = Field(
        default=OVIS_IMAGE_MODEL_ID,
        max_length=200,
        description="A model id of GET /v1/models, or the short name `ovis-image`.",
    )
    n: int = Field(default=1, ge=1, le=MAX_IMAGES, description="How many images (1 to 4).")
    size: str | None = Field(
        default=None,
        max_length=20,
        description=f"`WxH`, sides multiples of {SIZE_MULTIPLE} from {MIN_SIDE} to "
        f"{MAX_SIDE}, or `auto` (1024x1024, as when absent).",
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        default=None, description="`url` (a signed link, the default) or `b64_json`."
    )
    output_format: OutputFormat | None = Field(default=None, description="png (default).")
    # OpenAI's, accepted and ignored.
    quality: str | None = Field(default=None, max_length=50)
    style: str | None = Field(default=None, max_length=50)
    user: str | None = Field(default=None, max_length=500)
    background: str | None = Field(default=None, max_length=50)
    moderation: str | None = Field(default=None, max_length=50)
    output_compression: int | None = Field(default=None, ge=0, le=100)
    stream: bool | None = Field(default=None, description="Not supported: false or absent.")
    # Ovis-Image's, passed on to the model (see its input schema).
    negative_prompt: str | None = None
    seed: int | None = Field(
        default=None, description="The first image's seed; image k gets seed + k."
    )
    num_inference_steps: int | None = None
    guidance_scale: float | None = None


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    seed: int = Field(description="The seed this image was made with (an extension).")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix seconds.")
    data: list[ImageData]
    size: str
    output_format: OutputFormat


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


@dataclass(eq=False)
class OpenAIError(Exception):
    status_code: int
    message: str
    _: KW_ONLY
    type: ErrorType = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def response(self) -> JSONResponse:
        body = OpenAIErrorBody(
            error=OpenAIErrorDetail(
                message=self.message, type=self.type, param=self.param, code=self.code
            )
        )
        return JSONResponse(
            body.model_dump(),
            status_code=self.status_code,
            headers=dict(self.headers) if self.headers else None,
        )


def _param(loc: Sequence[Any], model_input: bool = False) -> str | None:
    """The request parameter an error location points at (in the model's input, which is
    built from the request, image_size comes from ``size``)."""
    names = [str(part) for part in loc if part != "body"]
    if not names:
        return None
    return "size" if model_input and names[0] == "image_size" else names[0]


def from_api_error(exc: ApiError) -> OpenAIError:
    """Our RunComfy-dialect error, told in OpenAI's words and codes."""
    if exc.status_code == 401:
        return OpenAIError(401, exc.message, code="invalid_api_key", headers=exc.headers)
    if exc.status_code == 404 and exc.error_code == MODEL_NOT_FOUND:
        return OpenAIError(404, exc.message, param="model", code="model_not_found")
    if exc.status_code == 422:
        param = _param(exc.detail[0]["loc"], model_input=True) if exc.detail else None
        return OpenAIError(400, exc.message, param=param, code="invalid_value")
    if exc.status_code == 429:
        return OpenAIError(
            429, exc.message, type="requests", code="rate_limit_exceeded", headers=exc.headers
        )
    if exc.status_code >= 500:
        return OpenAIError(exc.status_code, exc.message, type="server_error", headers=exc.headers)
    return OpenAIError(exc.status_code, exc.message, headers=exc.headers)


def from_validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    param = _param(first.get("loc", ()))
    if first.get("type") == "json_invalid" or param is None:
        return OpenAIError(
            400,
            "the body is not a JSON object of parameters: send JSON with a prompt",
            code="invalid_json",
        )
    if first.get("type") == "missing":
        return OpenAIError(
            400,
            f"Missing required parameter: {param!r}.",
            param=param,
            code="missing_required_parameter",
        )
    if first.get("type") == "extra_forbidden":
        return OpenAIError(
            400, f"Unknown parameter: {param!r}.", param=param, code="unknown_parameter"
        )
    problems = "; ".join(f"{_param(e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)
    return OpenAIError(400, problems, param=param, code="invalid_value")


class OpenAIRoute(APIRoute):
    """A route whose every failure (token, body, model, limits) answers in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except ApiError as exc:
                return from_api_error(exc).response()
            except RequestValidationError as exc:
                return from_validation_error(exc).response()
            except StarletteHTTPException as exc:  # a body FastAPI could not read at all
                return OpenAIError(
                    exc.status_code,
                    f"the body could not be read: {exc.detail}",
                    type="server_error" if exc.status_code >= 500 else "invalid_request_error",
                    headers=exc.headers,
                ).response()

        return answer


# --- what a generation does ---------------------------------------------------------------


def requested_size(size: str | None) -> str | dict[str, int]:
    """``size`` as the model's image_size: a preset for auto, else width and height."""
    if size is None or size == "auto":
        return AUTO_SIZE
    match = SIZE_PATTERN.fullmatch(size)
    width, height = (int(match[1]), int(match[2])) if match else (0, 0)
    if not all(
        MIN_SIDE <= side <= MAX_SIDE and side % SIZE_MULTIPLE == 0 for side in (width, height)
    ):
        raise OpenAIError(
            400,
            f"Invalid size {size[:20]!r}: send WxH with both sides multiples of "
            f"{SIZE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE} (such as 1024x768), or auto",
            param="size",
            code="invalid_value",
        )
    return {"width": width, "height": height}


def job_inputs(body: ImageGenerationRequest) -> list[dict[str, Any]]:
    """The model input of each of the ``n`` jobs."""
    base: dict[str, Any] = {
        "prompt": body.prompt,
        "image_size": requested_size(body.size),
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


async def generate(
    request: Request,
    token_id: str,
    body: ImageGenerationRequest,
    edit: tuple[ModelSpec, dict[str, Any]] | None = None,
) -> ImagesResponse:
    """The images of ``body``; with ``edit``, of that image model with those fields added
    to every job (the input image)."""
    taker, bodies, base = submissions(request), owned_requests(request).bodies, base_url(request)
    hub: StatusHub = request.app.state.hub
    spec = model_for(taker.catalogue.models, body.model) if edit is None else edit[0]
    store = taker.store
    if body.stream:
        raise OpenAIError(
            400, "streaming is not supported: leave stream out", param="stream", code=None
        )
    inputs = job_inputs(body)
    if edit is not None:
        inputs = [
            {**one, **edit[1], **({} if body.size else {"image_size": "auto"})} for one in inputs
        ]
    request_ids: list[str] = []
    try:
        for job_input in inputs:
            submitted = await run_in_threadpool(
                taker.submit,
                token_id=token_id,
                model_id=spec.model_id,
                body=json.dumps(job_input).encode(),
                base_url=base,
            )
            request_ids.append(submitted.request_id)
    except ApiError:
        await _cancel(store, request_ids)  # all n or none: the answer would miss the rest
        raise
    started = time.monotonic()
    finished = await asyncio.gather(
        *(wait_final(hub, store, request_id, WAIT_SECONDS) for request_id in request_ids)
    )
    jobs = [job for job in finished if job is not None]
    if len(jobs) < len(request_ids):
        if time.monotonic() - started < WAIT_SECONDS - 1:
            # Not a timeout: a job was deleted, or the server is shutting down.
            for request_id in request_ids:
                if await run_in_threadpool(store.get, request_id) is None:
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
        await _cancel(store, request_ids)
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
        ImageData(seed=job.seed, **await run_in_threadpool(_image, bodies, job, body, base))
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


async def _cancel(store: JobStore, request_ids: list[str]) -> None:
    for request_id in request_ids:
        await run_in_threadpool(store.request_cancel, request_id)


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


def _image(
    bodies: BodyRenderer, job: Job, body: ImageGenerationRequest, base: str
) -> dict[str, str]:
    (output, *_) = job.outputs
    if body.response_format == "b64_json":
        try:
            data = bodies.files.read(output.key)
        except FileNotFoundError:
            raise OpenAIError(
                404,
                f"the image of request {job.id} was deleted before it could be sent",
                code="not_found",
            ) from None
        return {"b64_json": base64.b64encode(data).decode()}
    return {"url": bodies.output_url(output.key, base)}


# --- the routes ---------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIErrorBody, "description": description}
    for status, description in {
        400: "Invalid parameters (param names the first), or an unsupported operation",
        401: "Missing, malformed, unknown or revoked token",
        404: "Unknown model",
        429: "Queue full or rate limited (Retry-After)",
        500: "An image generation failed",
        504: "The images were not ready in time",
    }.items()
}

router = APIRouter(prefix="/v1/images", tags=["OpenAI Images API"], route_class=OpenAIRoute)


@router.post("/generations", responses=_ERRORS, response_model_exclude_none=True)
async def create_images(
    body: ImageGenerationRequest,
    request: Request,
    caller: Annotated[Caller, Depends(authenticate)],
) -> ImagesResponse:
    """Make 1 to 4 images and answer once they are done, as OpenAI's API does. The jobs go
    through the same queue and show in ``GET /v1/requests``."""
    return await generate(request, caller.token_id, body)


def _unsupported(operation: str) -> OpenAIError:
    return OpenAIError(
        400,
        f"image {operation} are not supported: Ovis-Image makes images from text only; "
        "use POST /v1/images/generations",
        code="unsupported_operation",
    )


EDIT_FORM_FIELDS = frozenset(
    {
        "image", "prompt", "model", "n", "size", "response_format", "output_format", "seed",
        "num_inference_steps", "strength", "quality", "user", "background", "moderation",
        "output_compression", "input_fidelity", "stream",
    }
)  # fmt: skip


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


def _form_number(form: Mapping[str, Any], name: str, kind: type[int] | type[float]) -> Any:
    value = form.get(name)
    if value is None:
        return None
    try:
        return kind(str(value))
    except ValueError:
        raise OpenAIError(
            400, f"{name}: {str(value)[:30]!r} is not a number", param=name, code="invalid_value"
        ) from None


# Out of /openapi.json as variations is: its multipart form is read by hand, so the document
# could not describe the body it judges (OpenAI's SDK, the client that calls it, needs none).
@router.post("/edits", include_in_schema=False, response_model_exclude_none=True)
async def edit_images(
    request: Request, caller: Annotated[Caller, Depends(authenticate)]
) -> ImagesResponse:
    """OpenAI's ``images.edit``: a multipart form with ``image`` (a file), ``prompt``,
    ``n``, ``size``, ``response_format`` (and ``model``, ``strength``, ``seed``,
    ``num_inference_steps``), run on a model with an image input (an image-to-image
    variant); answers once the images are done."""
    taker = submissions(request)
    form = await request.form(max_files=1, max_fields=len(EDIT_FORM_FIELDS))
    try:
        unknown = sorted(set(form.keys()) - EDIT_FORM_FIELDS)
        if unknown:
            raise OpenAIError(
                400, f"unknown parameter {unknown[0][:50]!r}", param=unknown[0][:50], code=None
            )
        model = form.get("model")
        spec = edit_model(taker.catalogue.models, None if model is None else str(model))
        image = form.get("image")
        if image is None or isinstance(image, str):
            raise OpenAIError(400, "image: send the image as a file", param="image", code=None)
        data = await image.read()
        kind = image.content_type if (image.content_type or "").startswith("image/") else None
        uri = f"data:{kind or 'image/png'};base64," + base64.b64encode(data).decode("ascii")
        del data
        fields = {
            "prompt": form.get("prompt"),
            "model": spec.model_id,
            "n": _form_number(form, "n", int),
            "size": form.get("size"),
            "response_format": form.get("response_format"),
            "output_format": form.get("output_format"),
            "seed": _form_number(form, "seed", int),
            "num_inference_steps": _form_number(form, "num_inference_steps", int),
        }
        body = ImageGenerationRequest.model_validate(
            {name: value for name, value in fields.items() if value is not None}
        )
        extra: dict[str, Any] = {"image_url": uri}
        strength = _form_number(form, "strength", float)
        if strength is not None:
            extra["strength"] = strength
    except ValidationError as exc:
        raise from_validation_error(RequestValidationError(exc.errors())) from None
    finally:
        await form.close()
    return await generate(request, caller.token_id, body, edit=(spec, extra))


@router.post("/variations", include_in_schema=False)
async def image_variations(_caller: Annotated[Caller, Depends(authenticate)]) -> Response:
    """Not supported: answers 400."""
    raise _unsupported("variations")
