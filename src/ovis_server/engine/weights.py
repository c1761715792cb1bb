"""Where the weights come from: a hub id, a local diffusers directory, ``tiny`` or
``random-full``. A hub id's weights are fetched into the Hugging Face cache first
(engine/download.py, whose ``local_weights`` gives what to load)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from ovis_server.engine.tiny import write_tiny_checkpoint

logger = logging.getLogger(__name__)

TINY = "tiny"
# The real architecture with random weights, built on the device (Engine.load): no download,
# for load tests on a GPU. Its images are noise.
RANDOM_FULL = "random-full"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
MODEL_INDEX = "model_index.json"


class WeightsNotFoundError(ValueError):
    """The ``--model`` value names nothing we can load."""


def tiny_checkpoint_dir(data_dir: Path, family: str | None = None) -> Path:
    """Where ``--model tiny`` of ``family`` (a name of engine/families; None: Ovis-Image)
    is built: each family has its own."""
    from ovis_server.engine.families import DEFAULT_FAMILY

    # Ovis-Image's is "tiny", as before there were families; the others' "tiny-<family>".
    name = family or DEFAULT_FAMILY
    return data_dir / "models" / (TINY if name == DEFAULT_FAMILY else f"{TINY}-{name}")


def resolve_weights(model: str, data_dir: Path, family: str | None = None) -> str:
    """What to pass to ``from_pretrained`` for ``model``, a model of ``family`` (a name of
    engine/families; None: Ovis-Image).

    ``tiny`` builds the family's tiny random checkpoint into the data directory on first use;
    ``random-full`` is passed on as is (Engine.load builds it on the device); an existing
    directory must hold a diffusers ``model_index.json``; anything else must look
    like a hub id (``owner/name``), which ``from_pretrained`` downloads or finds in the
    Hugging Face cache.
    """
    if model == TINY:
        target = tiny_checkpoint_dir(data_dir, family)
        if not (target / "model_index.json").is_file():
            write_tiny_checkpoint(target, family)
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


def is_hub_id(weights: str) -> bool:
    """Whether ``resolve_weights`` gave a hub id (rather than a directory or random-full)."""
    return weights != RANDOM_FULL and not Path(weights).is_dir() and bool(_HUB_ID.match(weights))


@dataclass(frozen=True)
class Progress:
    """How far the current phase is: ``done`` of ``total`` ``unit``s, at ``rate`` per second."""

    done: float
    total: float | None = None
    unit: str = ""
    rate: float | None = None
    text: str | None = None

    def detail(self) -> dict[str, Any]:
        """The /readyz form: the fields that are set, and the seconds left where known."""
        entry = asdict(self)
        if self.total is not None and self.rate:
            entry["eta_seconds"] = round(max(self.total - self.done, 0) / self.rate, 1)
        return {key: value for key, value in entry.items() if value is not None}


class PhaseReport(Protocol):
    """What a worker tells /readyz (worker/report.py's StateReport)."""

    def phase(self, phase: Literal["downloading", "loading"]) -> None: ...

    def progress(self, progress: Progress, *, force: bool = False) -> None: ...


def cache_folder(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """The repository's folder in the hub cache (``models--owner--name``)."""
    from huggingface_hub import constants

    root = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    return root / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, cache_dir: str | Path | None = None) -> Path | None:
    """The cached snapshot of the repository's main revision, if it holds every component
    ``model_index.json`` names (and every shard their safetensors indexes list); found
    without the hub."""
    storage = cache_folder(repo_id, cache_dir)
    try:
        commit = (storage / "refs" / "main").read_text().strip()
        folder = storage / "snapshots" / commit
        model_index = json.loads((folder / MODEL_INDEX).read_text())
    except (OSError, ValueError):
        return None
    for name, value in model_index.items():
        if name.startswith("_") or not isinstance(value, list) or not value or value[0] is None:
            continue
        component = folder / name
        if not component.is_dir() or not any(component.iterdir()):
            return None
        for index in component.glob("*.index.json"):
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return None
            if not all((component / shard).is_file() for shard in shards):
                return None
    return folder
