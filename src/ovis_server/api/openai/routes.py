"""OpenAI's Images API routes: ``POST /v1/images/generations``, ``/edits`` (a multipart
form, read by hand) and ``/variations`` (not supported). Every failure on them answers in
OpenAI's shape (``errors.OpenAIRoute``)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ovis_server.api.auth import Caller, authenticate
from ovis_server.api.openai.errors import OpenAIError, OpenAIRoute, from_validation_error
from ovis_server.api.openai.protocol import (
    ImageGenerationRequest,
    ImagesResponse,
    OpenAIErrorBody,
)
from ovis_server.api.openai.serving import ImagesService
from ovis_server.api.state import base_url

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


def images(request: Request) -> ImagesService:
    service: ImagesService = request.app.state.images
    return service


@router.post("/generations", responses=_ERRORS, response_model_exclude_none=True)
async def create_images(
    body: ImageGenerationRequest,
    request: Request,
    caller: Annotated[Caller, Depends(authenticate)],
) -> ImagesResponse:
    """Make 1 to 4 images and answer once they are done, as OpenAI's API does. The jobs go
    through the same queue and show in ``GET /v1/requests``."""
    return await images(request).generate(caller.token_id, body, base_url(request))


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
    service = images(request)
    form = await request.form(max_files=1, max_fields=len(EDIT_FORM_FIELDS))
    try:
        unknown = sorted(set(form.keys()) - EDIT_FORM_FIELDS)
        if unknown:
            raise OpenAIError(
                400, f"unknown parameter {unknown[0][:50]!r}", param=unknown[0][:50], code=None
            )
        model = form.get("model")
        spec = service.edit_model(None if model is None else str(model))
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
    return await service.generate(caller.token_id, body, base_url(request), edit=(spec, extra))


@router.post("/variations", include_in_schema=False)
async def image_variations(_caller: Annotated[Caller, Depends(authenticate)]) -> Response:
    """Not supported: answers 400."""
    raise _unsupported("variations")
