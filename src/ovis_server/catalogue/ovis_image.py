"""Ovis-Image-7B: its input schema, presets, and its entry in the catalogue.

The input schema is part of the wire contract (see the README): field names, bounds,
enums and defaults are what RunComfy's clients send, so they live here once and every
entry point (HTTP API, ``ovis-server generate``) validates through them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from ovis_server.catalogue.spec import ModelSpec, load_family_engine
from ovis_server.catalogue.text_to_image import IMAGE_SIZE_PRESETS as IMAGE_SIZE_PRESETS
from ovis_server.catalogue.text_to_image import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    SEED_DESCRIPTION,
    ImageDimensions,
    ImageSizePreset,
    TextToImageInput,
    ranged,
)
from ovis_server.catalogue.text_to_image import MAX_SIDE as MAX_SIDE
from ovis_server.catalogue.text_to_image import MIN_SIDE as MIN_SIDE
from ovis_server.catalogue.text_to_image import SIZE_MULTIPLE as SIZE_MULTIPLE
from ovis_server.catalogue.text_to_image import OutputFormat as OutputFormat
from ovis_server.engine.request import GenerationRequest
from ovis_server.model_names import OVIS_IMAGE_ALIASES
from ovis_server.model_names import OVIS_IMAGE_MODEL_ID as OVIS_IMAGE_MODEL_ID

if TYPE_CHECKING:
    from ovis_server.config import Settings
    from ovis_server.engine.pipeline import Engine


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


class OvisImageInput(TextToImageInput):
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
    return load_family_engine("ovis-image", weights, settings)


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
    aliases=OVIS_IMAGE_ALIASES,
)
