"""The models this server offers: ids, input schemas, presets and prices.

The input schema is part of the wire contract (see the README): field names, bounds,
enums and defaults are what RunComfy's clients send, so they live here once and every
entry point (HTTP API, ``ovis-server generate``) validates through them.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from ovis_server.engine.request import GenerationRequest

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
MAX_PROMPT_CHARS = 20_000
MAX_SEED = 2**63 - 1
# A seed drawn for a request that gave none: 32 bits, exact in any JSON client.
RANDOM_SEED_BOUND = 2**32


def field_problems(errors: Iterable[Mapping[str, Any]], empty: str = "body") -> list[str]:
    """Pydantic's errors as "field.path: message" lines (``empty`` names a field-less one)."""
    return [
        f"{'.'.join(str(part) for part in error.get('loc', ())) or empty}: {error['msg']}"
        for error in errors
    ]


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


class ImageDimensions(BaseModel):
    # A custom size, as fal accepts it.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        title="Image Dimensions",
        json_schema_extra={"description": "A custom size: both sides multiples of 16."},
    )

    width: int = Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
    height: int = Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)


class OvisImageInput(BaseModel):
    # The seed page's schema, field for field; the description below is what clients see.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        title="Ovis-Image input",
        json_schema_extra={"description": "Text to image with Ovis-Image-7B."},
    )

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
    num_inference_steps: int = Field(
        default=28,
        ge=1,
        le=50,
        title="Number of Inference Steps",
        description="The number of inference steps to perform.",
    )
    guidance_scale: float = Field(
        default=5.0,
        ge=1,
        le=20,
        title="Guidance Scale",
        description="The guidance scale to use for the image generation.",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        title="Seed",
        description="The same seed and input give the same image. Null picks one at random.",
    )
    output_format: OutputFormat = Field(
        default="png", title="Output Format", description="The format of the generated image."
    )

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

    def dimensions(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        if isinstance(self.image_size, ImageDimensions):
            return self.image_size.width, self.image_size.height
        return IMAGE_SIZE_PRESETS[self.image_size]

    def resolved_seed(self) -> int:
        """The seed asked for, or a random one to use and report back."""
        return self.seed if self.seed is not None else secrets.randbelow(RANDOM_SEED_BOUND)

    def batch_key(self, model_id: str) -> str:
        """Jobs with equal keys share size, steps and guidance: one batched call runs them."""
        width, height = self.dimensions()
        return f"{model_id}:{width}x{height}:{self.num_inference_steps}:{self.guidance_scale!r}"

    def to_generation_request(self, seed: int) -> GenerationRequest:
        """The engine's view of this input, with the seed resolved."""
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


OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "image": {"type": "string", "format": "uri", "description": "The generated image."},
        "images": {
            "type": "array",
            "description": "The generated images.",
            "items": {"type": "string", "format": "uri"},
        },
        "video": {"type": "string", "format": "uri", "description": "A generated video."},
        "videos": {
            "type": "array",
            "description": "Generated videos.",
            "items": {"type": "string", "format": "uri"},
        },
    },
}


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the catalogue."""

    model_id: str
    display_name: str
    description: str
    input_model: type[OvisImageInput]
    default_weights: str
    tags: tuple[str, ...] = ()

    def input_schema(self) -> dict[str, Any]:
        return self.input_model.model_json_schema()


OVIS_IMAGE = ModelSpec(
    model_id=OVIS_IMAGE_MODEL_ID,
    display_name="Ovis-Image",
    description=(
        "Ovis-Image-7B by AIDC-AI: text-to-image, strong at rendering legible text in images."
    ),
    input_model=OvisImageInput,
    default_weights="AIDC-AI/Ovis-Image-7B",
    tags=("text-to-image",),
)

CATALOGUE: dict[str, ModelSpec] = {OVIS_IMAGE.model_id: OVIS_IMAGE}


def find_model(model_id: str) -> ModelSpec | None:
    """The catalogue entry for ``model_id``, or None."""
    return CATALOGUE.get(model_id)
