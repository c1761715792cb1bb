"""LoRAs on a loaded pipeline, through diffusers' PEFT integration.

A request's LoRAs arrive as local ``.safetensors`` files with scales (the worker obtained
them: worker/loras.py). :class:`LoraAdapters` loads each file once as a named adapter
(``load_lora_weights(..., adapter_name=...)``), keeps at most ``capacity`` loaded (the least
recently used are deleted first), and before each batched run activates the batch's set
with its weights (``set_adapters``), or disables every adapter for a run without LoRAs.

A file whose keys or shapes do not fit the model's transformer is refused with
:class:`LoraMismatchError` ("this LoRA is not for <model id>"): diffusers removes what it
had begun to load, so the model is as it was and the next job runs as usual.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 8


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Without PEFT's notes on what we mean to do: several adapters in one model, the
    active one deleted (set_adapters follows)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
        yield


class LoraError(ValueError):
    """A LoRA that cannot be used for this job; the message is the client's to read."""


class LoraMismatchError(LoraError):
    """The file's keys or shapes do not fit the model."""


def adapter_name(path: Path) -> str:
    """A name for the adapter of ``path``'s current content: its path, size and time."""
    stat = path.stat()
    text = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return "lora_" + hashlib.sha256(text.encode()).hexdigest()[:16]


class LoraAdapters:
    """The adapters loaded into one pipeline, least recently used first."""

    def __init__(self, pipeline: Any, capacity: int = DEFAULT_CAPACITY) -> None:
        self.pipeline = pipeline
        self.capacity = max(1, capacity)
        self.model_id = "this model"  # named in a mismatch's message (the worker sets it)
        self.loaded: OrderedDict[str, Path] = OrderedDict()
        self.active: tuple[tuple[str, float], ...] = ()
        self.loads = 0  # files loaded so far (tests)

    @property
    def supported(self) -> bool:
        return hasattr(self.pipeline, "load_lora_weights")

    def activate(self, loras: Sequence[tuple[str, float]]) -> None:
        """Make ``loras`` (local file, scale) the adapters the next run uses; none: run
        the base model."""
        if not loras:
            if self.loaded and self.active != ():
                self.pipeline.disable_lora()
            self.active = ()
            return
        if not self.supported:
            raise LoraError(f"{self.model_id} takes no LoRAs")
        names = [self._load(Path(path), keep={Path(p) for p, _ in loras}) for path, _ in loras]
        weights = [float(scale) for _, scale in loras]
        wanted = tuple(zip(names, weights, strict=True))
        if wanted != self.active:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters(names, weights)
            self.active = wanted

    def _load(self, path: Path, keep: set[Path]) -> str:
        name = adapter_name(path)
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return name
        self._evict(keep, room_for=1)
        try:
            with quiet_peft():
                self.pipeline.load_lora_weights(str(path), adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as exc:
            logger.warning("LoRA %s does not fit %s: %s", path.name, self.model_id, exc)
            self._forget(name)
            raise LoraMismatchError(f"this LoRA is not for {self.model_id}") from None
        if name not in self._present():
            # Keys of no module of the model: diffusers loaded nothing.
            raise LoraMismatchError(f"this LoRA is not for {self.model_id}")
        self.loaded[name] = path
        self.loads += 1
        self.active = ()  # loading changes which adapters are set
        return name

    def _present(self) -> set[str]:
        found: dict[str, list[str]] = self.pipeline.get_list_adapters()
        return {name for names in found.values() for name in names}

    def _forget(self, name: str) -> None:
        if name in self._present():
            with quiet_peft():
                self.pipeline.delete_adapters(name)

    def _evict(self, keep: set[Path], room_for: int) -> None:
        while len(self.loaded) + room_for > self.capacity:
            victim = next((n for n, p in self.loaded.items() if p not in keep), None)
            if victim is None:
                return
            del self.loaded[victim]
            with quiet_peft():
                self.pipeline.delete_adapters(victim)
            self.active = ()
