"""The models this server offers: what one is (``spec``), the input fields text-to-image
models share (``text_to_image``), each model's own entry and input schema (``ovis_image``,
``z_image``), and the set a deployment serves (``registry``)."""

from ovis_server.catalogue.ovis_image import OVIS_IMAGE, OVIS_IMAGE_MODEL_ID, OvisImageInput
from ovis_server.catalogue.registry import ModelRegistry, UnknownModelError
from ovis_server.catalogue.spec import ModelInput, ModelSpec, field_problems
from ovis_server.catalogue.text_to_image import IMAGE_SIZE_PRESETS
from ovis_server.catalogue.z_image import Z_IMAGE_TURBO, Z_IMAGE_TURBO_MODEL_ID, ZImageInput
from ovis_server.model_names import DEFAULT_MODEL_ID, parse_extra_models

__all__ = [
    "DEFAULT_MODEL_ID",
    "IMAGE_SIZE_PRESETS",
    "OVIS_IMAGE",
    "OVIS_IMAGE_MODEL_ID",
    "Z_IMAGE_TURBO",
    "Z_IMAGE_TURBO_MODEL_ID",
    "ModelInput",
    "ModelRegistry",
    "ModelSpec",
    "OvisImageInput",
    "UnknownModelError",
    "ZImageInput",
    "field_problems",
    "parse_extra_models",
]
