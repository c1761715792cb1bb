"""Z-Image-Turbo (Tongyi-MAI): its input schema and its entry in the catalogue.

RunComfy serves it as ``tongyi-mai/z-image/turbo`` with these fields: ``prompt``,
``image_size`` (the six presets or a custom ``{width, height}``), ``num_inference_steps``
(1 to 8, default 8), ``seed`` and ``output_format``. The turbo model is distilled to run
without guidance, so there is no ``guidance_scale`` (nor ``negative_prompt``, which only
guidance reads): the input forbids unknown fields, so a body with either is a 422 naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from ovis_server.catalogue.spec import ModelSpec, load_family_engine
from ovis_server.catalogue.text_to_image import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MIN_SIDE,
    SEED_DESCRIPTION,
    ImageDimensions,
    ImageSizePreset,
    OutputFormat,
    TextToImageInput,
    ranged,
)
from ovis_server.engine.request import GenerationRequest
from ovis_server.model_names import Z_IMAGE_TURBO_ALIASES
from ovis_server.model_names import Z_IMAGE_TURBO_MODEL_ID as Z_IMAGE_TURBO_MODEL_ID

if TYPE_CHECKING:
    from ovis_server.config import Settings
    from ovis_server.engine.pipeline import Engine

Z_IMAGE_FAMILY = "z-image"  # engine/families/z_image.py
MAX_STEPS = 8  # the turbo model is distilled to 8 steps
EXAMPLE_PROMPT = (
    'A hand-painted wooden sign that reads "Z-IMAGE TURBO" hanging above a small bakery '
    "door at dawn, warm light from the window, a bicycle leaning against the wall"
)


class ZImageInput(TextToImageInput):
    """Text to image with Z-Image-Turbo, in 8 steps without guidance."""

    model_config = ConfigDict(extra="forbid", strict=True, title="Z-Image-Turbo input")

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        title="Prompt",
        description="What the image shows, in English or Chinese. The model reads 512 text "
        "tokens, template included; a longer prompt is accepted, its end is cut, and the "
        "status and result say so in `warnings`.",
        json_schema_extra={"default": EXAMPLE_PROMPT},
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
        MAX_STEPS,
        1,
        MAX_STEPS,
        "Number of Inference Steps",
        "The number of inference steps to perform (the turbo model is made for 8).",
    )
    seed: int | None = ranged(None, 0, MAX_SEED, "Seed", SEED_DESCRIPTION)
    output_format: OutputFormat = Field(
        default="png", title="Output Format", description="The format of the generated image."
    )
    # Sent by generic RunComfy clients; it settles image_size and is not stored.
    aspect_ratio: SkipJsonSchema[str | None] = Field(default=None, max_length=20, exclude=True)

    def to_generation_request(self, seed: int) -> GenerationRequest:
        width, height = self.dimensions()
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt="",
            width=width,
            height=height,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=0.0,  # the turbo model runs without guidance
            seed=seed,
        )


def load_z_image(weights: str, settings: Settings) -> Engine:
    """diffusers' ZImagePipeline on ``weights`` (a directory, or random-full), placed and
    optimised as ``settings`` say."""
    return load_family_engine(Z_IMAGE_FAMILY, weights, settings)


Z_IMAGE_TURBO = ModelSpec(
    model_id=Z_IMAGE_TURBO_MODEL_ID,
    display_name="Z-Image-Turbo",
    description=(
        "Z-Image-Turbo by Tongyi-MAI: a 6B single-stream diffusion transformer distilled to "
        "8 steps, photorealistic text-to-image with English and Chinese text rendering."
    ),
    input_model=ZImageInput,
    default_weights="Tongyi-MAI/Z-Image-Turbo",
    engine_factory=load_z_image,
    categories=("text-to-image",),
    owned_by="tongyi-mai",
    created=1764201600,  # 2025-11-27, its release
    aliases=Z_IMAGE_TURBO_ALIASES,
    family=Z_IMAGE_FAMILY,
)
