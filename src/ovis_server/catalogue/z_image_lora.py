"""Z-Image-Turbo with LoRAs (``tongyi-mai/z-image/turbo/lora``): a variant of
``tongyi-mai/z-image/turbo`` with the same family, weights and workers.

RunComfy's fields: the text-to-image ones, plus ``loras``, at most three items
``{"path": ..., "scale": ...}`` (scale 0 to 4, default 1). A ``path`` is the name of one of
the operator's LoRAs (``GET /v1/loras``), or, where the operator allows downloads, a hub
repository id or an https URL of a ``.safetensors`` file (inputs/loras.py): the API judges
it at submit (a 422 naming ``loras``), the worker obtains the file (worker/loras.py) and
loads it through diffusers' PEFT integration (engine/loras.py).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ovis_server.catalogue.spec import ModelSpec
from ovis_server.catalogue.z_image import (
    Z_IMAGE_FAMILY,
    Z_IMAGE_TURBO,
    Z_IMAGE_TURBO_MODEL_ID,
    ZImageInput,
)
from ovis_server.engine.request import GenerationRequest
from ovis_server.model_names import Z_IMAGE_LORA_MODEL_ID

MAX_LORAS = 3
MAX_LORA_SCALE = 4.0
MAX_LORA_PATH = 2048


class LoraWeight(BaseModel):
    """One LoRA and how strongly it applies."""

    model_config = ConfigDict(extra="forbid", strict=True, title="LoRA")

    path: str = Field(
        min_length=1,
        max_length=MAX_LORA_PATH,
        title="Path",
        description="The name of one of this server's LoRAs (GET /v1/loras), or, where the "
        "operator allows downloads, a hub repository id (owner/name, or "
        "owner/name/file.safetensors) or an https URL of a .safetensors file.",
    )
    scale: float = Field(
        default=1.0,
        ge=0.0,
        le=MAX_LORA_SCALE,
        title="Scale",
        description="How strongly the LoRA applies: 0 not at all, 1 as trained.",
    )


class ZImageLoraInput(ZImageInput):
    """Text to image with Z-Image-Turbo and up to three LoRAs."""

    model_config = ConfigDict(extra="forbid", strict=True, title="Z-Image-Turbo with LoRAs")

    loras: list[LoraWeight] = Field(
        default_factory=list,
        max_length=MAX_LORAS,
        title="LoRAs",
        description=f"At most {MAX_LORAS} LoRAs applied together, each with its scale.",
    )

    def lora_paths(self) -> list[str]:
        """The paths the API judges at submit."""
        return [lora.path for lora in self.loras]

    def to_generation_request(self, seed: int) -> GenerationRequest:
        request = super().to_generation_request(seed)
        return GenerationRequest(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            seed=request.seed,
            loras=tuple((lora.path.strip(), lora.scale) for lora in self.loras),
        )


Z_IMAGE_LORA = ModelSpec(
    model_id=Z_IMAGE_LORA_MODEL_ID,
    display_name="Z-Image-Turbo with LoRAs",
    description=(
        "Z-Image-Turbo by Tongyi-MAI with up to three LoRAs: the operator's, or, where "
        "allowed, downloaded from the hub or a URL."
    ),
    input_model=ZImageLoraInput,
    default_weights=Z_IMAGE_TURBO.default_weights,
    engine_factory=Z_IMAGE_TURBO.engine_factory,
    categories=("text-to-image",),
    owned_by="tongyi-mai",
    created=1764201600,
    family=Z_IMAGE_FAMILY,
    variant_of=Z_IMAGE_TURBO_MODEL_ID,
)
