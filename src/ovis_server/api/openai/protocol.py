"""OpenAI's Images API on the wire: the body of ``images.generate`` (with a model's own
knobs as extensions), the images answered, and OpenAI's error body."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ovis_server.catalogue.registry import DEFAULT_MODEL
from ovis_server.catalogue.text_to_image import OutputFormat

MAX_IMAGES = 4
_SIZES = DEFAULT_MODEL.sizes
SIZE_DESCRIPTION = (
    f"`WxH`, sides multiples of {_SIZES.multiple} from {_SIZES.min_side} to "
    f"{_SIZES.max_side}, or `auto` (1024x1024, as when absent)."
    if _SIZES is not None
    else "`WxH`, or `auto` (1024x1024, as when absent)."
)


class ImageGenerationRequest(BaseModel):
    """OpenAI's ``images.generate`` body, with Ovis-Image's own knobs as extensions."""

    model_config = ConfigDict(extra="forbid", strict=True, title="ImageGenerationRequest")

    prompt: str = Field(description="What the image shows.")
    model: str = Field(
        default=DEFAULT_MODEL.model_id,
        max_length=200,
        description="A model id of GET /v1/models, or the short name `ovis-image`.",
    )
    n: int = Field(default=1, ge=1, le=MAX_IMAGES, description="How many images (1 to 4).")
    size: str | None = Field(default=None, max_length=20, description=SIZE_DESCRIPTION)
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
