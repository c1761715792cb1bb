"""The names models answer to, free of the catalogue: what a model id may be, the built-in
models' ids and aliases, and ``--extra-models``'s and ``--model``'s grammar.

``config.py`` checks ``--model-id`` and ``--extra-models`` with these (an operator's id may
not take a built-in model's name) without importing the catalogue, which sits above it; the
catalogue's specs take their ids from here, and ``catalogue/registry.py`` refuses, on
import, a built-in spec whose names are not those listed here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

OVIS_IMAGE_MODEL_ID = "aidc-ai/ovis-image"
OVIS_IMAGE_ALIASES = ("ovis-image",)
Z_IMAGE_TURBO_MODEL_ID = "tongyi-mai/z-image/turbo"
Z_IMAGE_TURBO_ALIASES = ("z-image-turbo",)
Z_IMAGE_EDIT_MODEL_ID = f"{Z_IMAGE_TURBO_MODEL_ID}/image-to-image"
Z_IMAGE_LORA_MODEL_ID = f"{Z_IMAGE_TURBO_MODEL_ID}/lora"
DEFAULT_MODEL_ID = OVIS_IMAGE_MODEL_ID

# Every id and alias of the built-in models and their variants.
BUILT_IN_NAMES = frozenset(
    {
        OVIS_IMAGE_MODEL_ID,
        *OVIS_IMAGE_ALIASES,
        Z_IMAGE_TURBO_MODEL_ID,
        *Z_IMAGE_TURBO_ALIASES,
        Z_IMAGE_EDIT_MODEL_ID,
        Z_IMAGE_LORA_MODEL_ID,
    }
)
# Path segments of letters, digits, '.', '_' and '-' (a model id is part of the submit URL);
# at most the 200 characters the jobs table keeps.
MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
MAX_MODEL_ID = 200
# GET /v1/models/categories is a route of its own.
RESERVED_IDS = frozenset({"categories"})


def parse_extra_models(items: Sequence[str]) -> list[tuple[str, str]]:
    """``--extra-models``: (model id, weights) of each ``ID=WEIGHTS``; ValueError naming
    what is wrong (a malformed or taken id, no weights)."""
    taken = set(BUILT_IN_NAMES)
    pairs = []
    for item in items:
        model_id, equals, weights = (part.strip() for part in item.partition("="))
        if not equals or not weights:
            raise ValueError(f"{item!r}: give ID=WEIGHTS, e.g. acme/ovis-ft=/models/ovis-ft")
        if not MODEL_ID_PATTERN.fullmatch(model_id) or len(model_id) > MAX_MODEL_ID:
            raise ValueError(
                f"{model_id!r}: a model id is letters, digits, '.', '_' and '-' in "
                "'/'-separated parts, such as acme/ovis-ft"
            )
        if model_id in taken or model_id in RESERVED_IDS:
            raise ValueError(f"{model_id!r}: that id is taken")
        taken.add(model_id)
        pairs.append((model_id, weights))
    return pairs


# --model values that mean each served model's own build, whatever its family.
SHARED_BUILDS = frozenset({"tiny", "random-full"})


def parse_model_weights(value: str) -> dict[str, str]:
    """``--model``'s per-model form, ``ID=WEIGHTS,ID=WEIGHTS``: weights by model name (an id
    or an alias); empty for a plain value. ValueError naming what is wrong."""
    if "=" not in value:
        return {}
    given: dict[str, str] = {}
    for item in value.split(","):
        name, equals, weights = (part.strip() for part in item.partition("="))
        if not item.strip():
            continue
        if not equals or not name or not weights:
            raise ValueError(f"{item!r}: give ID=WEIGHTS, e.g. aidc-ai/ovis-image=/models/ovis")
        if name in given:
            raise ValueError(f"{name!r} is given weights twice")
        given[name] = weights
    return given


def extra_model_items(items: Sequence[object]) -> tuple[str, ...]:
    """``--extra-models`` as a list of ``ID=WEIGHTS`` items, stripped, empty ones left out;
    ValueError as ``parse_extra_models`` says."""
    entries = tuple(str(item).strip() for item in items if str(item).strip())
    parse_extra_models(entries)
    return entries


def model_id_list(items: Sequence[object]) -> tuple[str, ...]:
    """``--model-id``, given once or more, each maybe comma-separated: the names in order,
    each once."""
    names = [part.strip() for item in items for part in str(item).split(",")]
    return tuple(dict.fromkeys(name for name in names if name))


def check_model_weights(model: str | None, model_ids: Sequence[str]) -> None:
    """``--model`` with ``--model-id``: a per-model form that parses, a shared build, or
    one model's weights for one model; ValueError otherwise."""
    if model is None or "=" in model or model in SHARED_BUILDS:
        parse_model_weights(model or "")
    elif len(model_ids) > 1:
        raise ValueError(
            f"--model {model!r} with several --model-id: give each model its own "
            "weights, comma-separated ID=WEIGHTS (tiny and random-full alone serve for all)"
        )
