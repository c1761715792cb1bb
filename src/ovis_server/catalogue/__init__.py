"""The models this server offers: what one is (``spec``), Ovis-Image's own entry and input
schema (``ovis_image``), and the set a deployment serves (``registry``)."""

from ovis_server.catalogue.ovis_image import (
    IMAGE_SIZE_PRESETS,
    OVIS_IMAGE,
    OVIS_IMAGE_MODEL_ID,
    OvisImageInput,
)
from ovis_server.catalogue.registry import (
    DEFAULT_MODEL_ID,
    ModelRegistry,
    UnknownModelError,
    parse_extra_models,
)
from ovis_server.catalogue.spec import ModelInput, ModelSpec, field_problems

__all__ = [
    "DEFAULT_MODEL_ID",
    "IMAGE_SIZE_PRESETS",
    "OVIS_IMAGE",
    "OVIS_IMAGE_MODEL_ID",
    "ModelInput",
    "ModelRegistry",
    "ModelSpec",
    "OvisImageInput",
    "UnknownModelError",
    "field_problems",
    "parse_extra_models",
]
