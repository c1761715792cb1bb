"""Model families: one module each (``ovis_image``, ``z_image``), each a ``ModelFamily``
(base.py) the engine runs. A catalogue spec names its family by ``name``; this package's
top level imports no torch, so the API process can name families without loading one."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ovis_server.engine.families.base import ModelFamily

OVIS_IMAGE = "ovis-image"
Z_IMAGE = "z-image"
DEFAULT_FAMILY = OVIS_IMAGE
# Family name -> its module, which defines FAMILY.
MODULES: dict[str, str] = {
    OVIS_IMAGE: "ovis_server.engine.families.ovis_image",
    Z_IMAGE: "ovis_server.engine.families.z_image",
}
# The diffusers pipeline class of each (model_index.json's _class_name).
PIPELINE_CLASSES: dict[str, str] = {
    "OvisImagePipeline": OVIS_IMAGE,
    "ZImagePipeline": Z_IMAGE,
}


def get_family(name: str | None = None) -> ModelFamily:
    """The family called ``name`` (None: Ovis-Image); KeyError naming the known ones."""
    name = name or DEFAULT_FAMILY
    if name not in MODULES:
        raise KeyError(f"no model family {name!r}; there are {', '.join(MODULES)}")
    family: ModelFamily = importlib.import_module(MODULES[name]).FAMILY
    return family


def import_pipeline_classes(names: Iterable[str]) -> None:
    """Import the diffusers pipeline class of each family in ``names``, and with them
    torch, diffusers and transformers: what loading the models would import (diffusers
    imports a pipeline's module, and transformers its text encoder's, on first use)."""
    for name in sorted(set(names) & set(MODULES)):  # an unknown one: loading says so
        get_family(name).pipeline_class()


def family_of_pipeline(class_name: str) -> str | None:
    """The family whose pipeline class is ``class_name``, or None."""
    return PIPELINE_CLASSES.get(class_name)


def family_of_directory(directory: str | Path) -> str | None:
    """The family of a diffusers directory, read from its model_index.json; None where
    there is none, it cannot be read, or no family has its pipeline class."""
    try:
        index = json.loads((Path(directory) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    name = index.get("_class_name") if isinstance(index, dict) else None
    return family_of_pipeline(name) if isinstance(name, str) else None
