"""Ovis-Image-7B: its input schema, presets, and its entry in the catalogue.

The input schema is part of the wire contract (see the README): field names, bounds,
enums and defaults are what RunComfy's clients send, so they live here once and every
entry point (HTTP API, ``ovis-server generate``) validates through them.
"""

from __future__ import annotations

import math
import re
import secrets
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from ovis_server.catalogue.spec import ModelInput, ModelSpec, field_problems
from ovis_server.engine.request import GenerationRequest

if TYPE_CHECKING:
    from ovis_server.config import Settings
    from ovis_server.engine.pipeline import Engine

OVIS_IMAGE_MODEL_ID = "aidc-ai/ovis-image"

# width x height, the convention fal and RunComfy share.
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

ImageSizePreset = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]
OutputFormat = Literal["jpeg", "png", "webp"]

# Ovis-Image works on 2x2 patches of an 8x downsampled latent: sides are multiples of 16.
SIZE_MULTIPLE = 16
MIN_SIDE = 64
MAX_SIDE = 2048
# An ``aspect_ratio`` asks for about this many pixels (one megapixel)...
ASPECT_RATIO_PIXELS = 1024 * 1024
# ...except where a preset has exactly that ratio: then the preset, as clients that map
# ratios to fal's presets would get (16:9 is 1024x576, not 1360x768).
ASPECT_RATIO_PRESETS: dict[tuple[int, int], ImageSizePreset] = {
    (1, 1): "square_hd",
    (4, 3): "landscape_4_3",
    (16, 9): "landscape_16_9",
    (3, 4): "portrait_4_3",
    (9, 16): "portrait_16_9",
}
ASPECT_RATIO_PATTERN = re.compile(r"([1-9][0-9]{0,3}):([1-9][0-9]{0,3})")
MAX_PROMPT_CHARS = 20_000
MAX_SEED = 2**63 - 1
# A seed drawn for a request that gave none: 32 bits, exact in any JSON client.
RANDOM_SEED_BOUND = 2**32


EXAMPLE_PROMPT = (
    "A casually captured spontaneous iPhone photograph featuring an individual standing relaxed "
    "with arms gently crossed on a lightly grassy alpine slope beside rugged rocky formations. "
    "The subject wears a burgundy windbreaker jacket with an Arc'teryx logo, elastic cuffs, and "
    "a full-length zipper, crafted from durable water-resistant fabric realistically creased and "
    "subtly weathered with slight dirt marks. Loose, khaki cargo pants provide a comfortable fit, "
    "textured with natural creases and faint soil traces near the hems. Chunky dark gray sneakers "
    "with thick soles add a modern technical vibe. The jacket hood is casually pulled up, slightly "
    "shadowing their neutral, slightly obscured face, while sleek realistic sunglasses reflect the "
    "soft diffused mountain light. Ambient natural daylight is slightly overcast, casting gentle "
    "shadows on the uneven terrain of grassy wildflowers and rugged rocks. The framing holds a "
    "casual, slightly tilted angle, enhancing the authentic spontaneity and candid intimacy "
    "typical of trendy outdoor gorpcore iPhone photography. The background showcases distant "
    "jagged mountain ridges partially veiled in mist and low-hanging cloud layers, emphasizing "
    "pristine alpine wilderness and rugged outdoor adventure stylistics. Textural authenticity is "
    "prioritized with visible fabric textures, subtle weathering of shoes, natural grass details, "
    "and reflective sunglass lenses, reinforcing a highly believable, stylish technical outdoor "
    "aesthetic."
)


def aspect_ratio_size(ratio: str) -> ImageSizePreset | tuple[int, int]:
    """The size an ``aspect_ratio`` such as "16:9" asks for: the preset with exactly that
    ratio if there is one, else about one megapixel at that ratio with sides that are
    multiples of 16 (shrunk to fit the largest side). ValueError if ``ratio`` is not
    "W:H" or no size within the bounds has it."""
    match = ASPECT_RATIO_PATTERN.fullmatch(ratio)
    if match is None:
        raise ValueError("must be W:H in whole numbers, such as 16:9, 1:1 or 9:16")
    across, down = int(match[1]), int(match[2])
    common = math.gcd(across, down)
    across, down = across // common, down // common
    preset = ASPECT_RATIO_PRESETS.get((across, down))
    if preset is not None:
        return preset
    scale = math.sqrt(ASPECT_RATIO_PIXELS / (across * down))
    scale = min(scale, MAX_SIDE / max(across, down))

    def side(length: float) -> int:
        return min(MAX_SIDE, round(length / SIZE_MULTIPLE) * SIZE_MULTIPLE)

    width, height = side(across * scale), side(down * scale)
    if min(width, height) < MIN_SIDE:
        raise ValueError(
            f"{ratio} is too far from square for sides between {MIN_SIDE} and {MAX_SIDE}"
        )
    return width, height


SEED_DESCRIPTION = "The same seed and input give the same image. Null picks one at random."


def ranged(default: float | None, low: float, high: float, title: str, description: str) -> Any:
    """A numeric field between ``low`` and ``high`` (both allowed)."""
    return Field(default=default, ge=low, le=high, title=title, description=description)


class ImageDimensions(BaseModel):
    """A custom size: both sides multiples of 16."""

    # As fal accepts it; the docstring is the schema's description.
    model_config = ConfigDict(extra="forbid", strict=True, title="Image Dimensions")

    width: int = Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
    height: int = Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)


class OvisImageInput(ModelInput):
    """Text to image with Ovis-Image-7B."""

    # The seed page's schema, field for field; the docstring is the description clients see.
    model_config = ConfigDict(extra="forbid", strict=True, title="Ovis-Image input")

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        title="Prompt",
        description="What the image shows. Ovis-Image is strong at rendering text in images. "
        "The model reads 256 text tokens (roughly 180 English words); a longer prompt is "
        "accepted, its end is cut, and the status and result say so in `warnings`.",
        json_schema_extra={"default": EXAMPLE_PROMPT},
    )
    negative_prompt: str = Field(
        default="",
        max_length=MAX_PROMPT_CHARS,
        title="Negative Prompt",
        description="What the image should not show.",
    )
    image_size: ImageSizePreset | ImageDimensions = Field(
        default="landscape_4_3",
        title="Image Size",
        description=(
            "A preset, or an object {width, height} with sides that are multiples of 16 "
            f"between {MIN_SIDE} and {MAX_SIDE}."
        ),
    )
    num_inference_steps: int = ranged(
        28, 1, 50, "Number of Inference Steps", "The number of inference steps to perform."
    )
    guidance_scale: float = ranged(
        5.0, 1, 20, "Guidance Scale", "The guidance scale to use for the image generation."
    )
    seed: int | None = ranged(None, 0, MAX_SEED, "Seed", SEED_DESCRIPTION)
    output_format: OutputFormat = Field(
        default="png", title="Output Format", description="The format of the generated image."
    )
    # Sent by generic RunComfy clients; it settles image_size and is not stored.
    aspect_ratio: SkipJsonSchema[str | None] = Field(default=None, max_length=20, exclude=True)

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("prompt_blank", "the prompt must contain some text")
        return value

    @field_validator("image_size", mode="wrap")
    @classmethod
    def _check_image_size(
        cls, value: object, handler: ValidatorFunctionWrapHandler
    ) -> ImageSizePreset | ImageDimensions:
        # One readable error per case instead of pydantic's error-per-union-member.
        if isinstance(value, str):
            if value not in IMAGE_SIZE_PRESETS:
                raise PydanticCustomError(
                    "image_size",
                    "must be one of {presets}, or an object with width and height",
                    {"presets": ", ".join(IMAGE_SIZE_PRESETS)},
                )
            return handler(value)  # type: ignore[no-any-return]
        if isinstance(value, dict | ImageDimensions):
            try:
                return ImageDimensions.model_validate(value)
            except ValidationError as exc:
                problems = "; ".join(field_problems(exc.errors(), empty="value"))
                raise PydanticCustomError(
                    "image_size", "{problems}", {"problems": problems}
                ) from None
        raise PydanticCustomError(
            "image_size", "must be a preset name or an object with width and height"
        )

    @field_validator("aspect_ratio")
    @classmethod
    def _check_aspect_ratio(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                aspect_ratio_size(value)
            except ValueError as exc:
                raise PydanticCustomError("aspect_ratio", str(exc)) from None
        return value

    @model_validator(mode="after")
    def _size_from_aspect_ratio(self) -> Self:
        if self.aspect_ratio is None:
            return self
        if "image_size" in self.model_fields_set:
            raise PydanticCustomError(
                "aspect_ratio_conflict",
                "aspect_ratio and image_size were both given: send one of them",
            )
        size = aspect_ratio_size(self.aspect_ratio)
        self.image_size = (
            size if isinstance(size, str) else ImageDimensions(width=size[0], height=size[1])
        )
        return self

    def dimensions(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        if isinstance(self.image_size, ImageDimensions):
            return self.image_size.width, self.image_size.height
        return IMAGE_SIZE_PRESETS[self.image_size]

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else secrets.randbelow(RANDOM_SEED_BOUND)

    def to_generation_request(self, seed: int) -> GenerationRequest:
        width, height = self.dimensions()
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=seed,
        )


def load_ovis_image(weights: str, settings: Settings) -> Engine:
    """diffusers' OvisImagePipeline on ``weights`` (a directory, or random-full), placed and
    optimised as ``settings`` say."""
    from ovis_server.engine.pipeline import Engine

    return Engine.load(
        weights,
        device=settings.device,
        dtype=settings.dtype,
        compile=settings.compile_flag,
        fp8=settings.fp8,
        memory=settings.memory,
        gpu_memory=settings.gpu_memory_bytes,
        compile_dynamic=settings.compile_dynamic,
    )


OVIS_IMAGE = ModelSpec(
    model_id=OVIS_IMAGE_MODEL_ID,
    display_name="Ovis-Image",
    description=(
        "Ovis-Image-7B by AIDC-AI: text-to-image, strong at rendering legible text in images."
    ),
    input_model=OvisImageInput,
    default_weights="AIDC-AI/Ovis-Image-7B",
    engine_factory=load_ovis_image,
    categories=("text-to-image",),
    owned_by="aidc-ai",
    created=1764547200,  # 2025-12-01
    aliases=("ovis-image",),
)
