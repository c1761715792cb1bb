"""Where the weights come from: a hub id, a local diffusers directory, ``tiny`` or
``random-full``."""

from __future__ import annotations

import re
from pathlib import Path

from ovis_server.engine.tiny import write_tiny_checkpoint

TINY = "tiny"
# The real architecture with random weights, built on the device (Engine.load): no download,
# for load tests on a GPU. Its images are noise.
RANDOM_FULL = "random-full"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class WeightsNotFoundError(ValueError):
    """The ``--model`` value names nothing we can load."""


def tiny_checkpoint_dir(data_dir: Path) -> Path:
    return data_dir / "models" / TINY


def resolve_weights(model: str, data_dir: Path) -> str:
    """What to pass to ``from_pretrained`` for ``model``.

    ``tiny`` builds the tiny random checkpoint into the data directory on first use;
    ``random-full`` is passed on as is (Engine.load builds it on the device); an existing
    directory must hold a diffusers ``model_index.json``; anything else must look
    like a hub id (``owner/name``), which ``from_pretrained`` downloads or finds in the
    Hugging Face cache.
    """
    if model == TINY:
        target = tiny_checkpoint_dir(data_dir)
        if not (target / "model_index.json").is_file():
            write_tiny_checkpoint(target)
        return str(target)
    if model == RANDOM_FULL:
        return RANDOM_FULL
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise WeightsNotFoundError(
                f"{path} has no model_index.json: --model takes a diffusers-format directory"
            )
        return str(path.resolve())
    if _HUB_ID.match(model):
        return model
    raise WeightsNotFoundError(
        f"--model {model!r} is neither 'tiny', 'random-full', an existing directory, nor a hub "
        "id such as AIDC-AI/Ovis-Image-7B"
    )
