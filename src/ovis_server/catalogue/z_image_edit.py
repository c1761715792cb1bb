"""Z-Image-Turbo image-to-image (``tongyi-mai/z-image/turbo/image-to-image``): a variant of
``tongyi-mai/z-image/turbo`` with the same family, weights and workers.

RunComfy's fields: ``prompt``, ``image_url`` (required: an https URL, or a
``data:image/...;base64,`` URI), ``strength`` (0 to 1, default 0.6: how much of the input
is noised away), ``image_size`` (a preset, ``{width, height}``, or ``auto``: the input's
aspect ratio at about one megapixel), ``num_inference_steps`` (1 to 8, default 8),
``seed`` and ``output_format``.

The API fetches or decodes ``image_url`` once, at submit (inputs/images.py), stores the
checked image as the job's ``input-0.png`` and keeps in the job row only a short reference
and the size ``auto`` settled to (:meth:`ZImageEditInput.with_input_image`): the worker
reads the image from the file store, never from the internet.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, Self

from pydantic import ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from ovis_server.catalogue.spec import ModelSpec
from ovis_server.catalogue.text_to_image import (
    ASPECT_RATIO_PIXELS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MIN_SIDE,
    SEED_DESCRIPTION,
    SIZE_MULTIPLE,
    ImageDimensions,
    ImageSizePreset,
    OutputFormat,
    TextToImageInput,
    ranged,
)
from ovis_server.catalogue.z_image import (
    MAX_STEPS,
    Z_IMAGE_FAMILY,
    Z_IMAGE_TURBO,
    Z_IMAGE_TURBO_MODEL_ID,
)
from ovis_server.engine.request import GenerationRequest, steps_to_run
from ovis_server.model_names import Z_IMAGE_EDIT_MODEL_ID

# What image_url becomes in the job row once the image is stored (the worker reads the
# file store's "<request id>/input-0.png"); the API refuses it from a client (422).
STORED_IMAGE_REFERENCE = "stored:input-0.png"
EXAMPLE_IMAGE_URL = "https://example.com/photo.png"


def auto_size(width: int, height: int) -> tuple[int, int]:
    """``image_size: auto``: the input's aspect ratio at about one megapixel, sides
    multiples of 16 between the bounds."""
    scale = math.sqrt(ASPECT_RATIO_PIXELS / (width * height))
    scale = min(scale, MAX_SIDE / max(width, height))

    def side(length: float) -> int:
        snapped = round(length / SIZE_MULTIPLE) * SIZE_MULTIPLE
        return max(MIN_SIDE, min(MAX_SIDE, snapped))

    return side(width * scale), side(height * scale)


class ZImageEditInput(TextToImageInput):
    """Image to image with Z-Image-Turbo: the input image, noised to ``strength``, then
    denoised towards the prompt."""

    model_config = ConfigDict(extra="forbid", strict=True, title="Z-Image-Turbo image-to-image")
    AUTO_IMAGE_SIZE: ClassVar[bool] = True
    IMAGE_FIELDS: ClassVar[tuple[str, ...]] = ("image_url",)

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        title="Prompt",
        description="What the image should show, in English or Chinese.",
        json_schema_extra={"default": "the same scene at night, under falling snow"},
    )
    image_url: str = Field(
        min_length=1,
        title="Image URL",
        description="The input image: an https URL or a data:image/...;base64, URI (PNG, "
        "JPEG or WEBP). The server fetches it once, when the request is submitted.",
        json_schema_extra={"default": EXAMPLE_IMAGE_URL},
    )
    strength: float = ranged(
        0.6,
        0.0,
        1.0,
        "Strength",
        "How much of the input image is noised away: 0 keeps it, 1 ignores it. The steps "
        "run are about strength x num_inference_steps.",
    )
    image_size: Literal["auto"] | ImageSizePreset | ImageDimensions = Field(  # type: ignore[assignment]
        default="auto",
        title="Image Size",
        description=(
            "auto (the input's aspect ratio at about one megapixel), a preset, or an object "
            f"{{width, height}} with sides that are multiples of 16 between {MIN_SIDE} and "
            f"{MAX_SIDE}."
        ),
    )
    num_inference_steps: int = ranged(
        MAX_STEPS,
        1,
        MAX_STEPS,
        "Number of Inference Steps",
        "The number of inference steps of the full schedule; strength decides how many run.",
    )
    seed: int | None = ranged(None, 0, MAX_SEED, "Seed", SEED_DESCRIPTION)
    output_format: OutputFormat = Field(
        default="png", title="Output Format", description="The format of the generated image."
    )

    @model_validator(mode="after")
    def _some_steps_run(self) -> Self:
        if steps_to_run(self.num_inference_steps, self.strength) < 1:
            raise PydanticCustomError(
                "strength", "strength 0 runs no step and keeps the input: send more than 0"
            )
        return self

    def image_urls(self) -> dict[str, str]:
        """The fields that name an input image, still to fetch (not yet stored)."""
        if self.image_url == STORED_IMAGE_REFERENCE:
            return {}
        return {"image_url": self.image_url}

    def reads_input_image(self) -> bool:
        return True

    def with_input_image(self, width: int, height: int) -> Self:
        """This input once its image (``width`` x ``height``) is stored: ``image_url`` a
        short reference, ``auto`` settled to a size."""
        size: ImageSizePreset | ImageDimensions | Literal["auto"] = self.image_size
        if size == "auto":
            across, down = auto_size(width, height)
            size = ImageDimensions(width=across, height=down)
        return self.model_copy(update={"image_url": STORED_IMAGE_REFERENCE, "image_size": size})

    def dimensions(self) -> tuple[int, int]:
        if self.image_size == "auto":
            raise ValueError("image_size auto is settled when the input image is stored")
        return super().dimensions()

    def to_generation_request(self, seed: int) -> GenerationRequest:
        width, height = self.dimensions()
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt="",
            width=width,
            height=height,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=0.0,
            seed=seed,
            strength=self.strength,
        )


Z_IMAGE_EDIT = ModelSpec(
    model_id=Z_IMAGE_EDIT_MODEL_ID,
    display_name="Z-Image-Turbo image-to-image",
    description=(
        "Z-Image-Turbo by Tongyi-MAI, image to image: an input image redrawn towards a "
        "prompt, as much as strength says."
    ),
    input_model=ZImageEditInput,
    default_weights=Z_IMAGE_TURBO.default_weights,
    engine_factory=Z_IMAGE_TURBO.engine_factory,
    categories=("image-to-image",),
    owned_by="tongyi-mai",
    created=1764201600,
    family=Z_IMAGE_FAMILY,
    variant_of=Z_IMAGE_TURBO_MODEL_ID,
)
