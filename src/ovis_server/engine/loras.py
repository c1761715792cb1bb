"""LoRAs on a loaded pipeline, through diffusers' PEFT integration.

A request's LoRAs arrive as local ``.safetensors`` files with scales (the worker obtained
them: worker/loras.py). :class:`LoraAdapters` loads each file once as a named adapter
(``load_lora_weights(..., adapter_name=...)``), keeps at most ``capacity`` loaded (the least
recently used are deleted first), and before each batched run activates the batch's set
with its weights (``set_adapters``), or disables every adapter for a run without LoRAs.

A file whose keys or shapes do not fit the model's transformer is refused with
:class:`LoraMismatchError` ("this LoRA is not for <model id>"): diffusers removes what it
had begun to load, so the model is as it was and the next job runs as usual.

A compiled transformer instead holds one adapter slot, made before it compiles
(:meth:`LoraAdapters.prepare_hotswap`: diffusers' ``enable_lora_hotswap``, then an adapter
of zeros on every linear layer). A job's LoRAs are folded into one adapter (their ranks
side by side, each scale and alpha/rank in its B matrix: the same sum the separate
adapters make) and copied into the slot in place (``hotswap=True``): switching LoRAs
changes weights, never the modules the compiled graphs were traced with, so nothing
recompiles.
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
# A compiled transformer's slot: the rank it is padded to, per LoRA of a job.
HOTSWAP_RANK = 32
MAX_HOTSWAP_LORAS = 3
SLOT = "hotswap_slot"


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
        self.model_id = "this model"  # named in mismatches (ModelSpec.load_engine sets it)
        self.loaded: OrderedDict[str, Path] = OrderedDict()
        self.active: tuple[tuple[str, float], ...] = ()
        self.loads = 0  # files loaded so far (tests)
        # A compiled transformer's one slot (prepare_hotswap): the linear layers it covers
        # (name -> (in, out)) and its rank; None without.
        self.slot_layers: dict[str, tuple[int, int]] | None = None
        self.slot_rank = 0
        # The slot's LoRAs as read from their files, least recently used first: switching
        # back to a LoRA does not read and check its file again.
        self.read: OrderedDict[str, dict[str, tuple[Any, Any]]] = OrderedDict()

    @property
    def supported(self) -> bool:
        return hasattr(self.pipeline, "load_lora_weights")

    def activate(self, loras: Sequence[tuple[str, float]]) -> None:
        """Make ``loras`` (local file, scale) the adapters the next run uses; none: run
        the base model."""
        if not loras:
            if self.slot_layers is not None:
                self._swap_in(())
            elif self.loaded and self.active != ():
                self.pipeline.disable_lora()
            self.active = ()
            return
        if not self.supported:
            raise LoraError(f"{self.model_id} takes no LoRAs")
        if self.slot_layers is not None:
            self._swap_in(tuple(loras))
            return
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

    # --- a compiled transformer: one slot, swapped in place ---------------------------------

    def prepare_hotswap(self, rank: int = HOTSWAP_RANK, loras: int = MAX_HOTSWAP_LORAS) -> None:
        """Before the transformer compiles: one adapter slot on every linear layer, of
        ``rank`` x ``loras``, all zeros (the base model's output), that later LoRAs are
        copied into."""
        import torch

        if not self.supported or self.slot_layers is not None:
            return
        transformer = self.pipeline.transformer
        self.slot_layers = {
            name: (module.in_features, module.out_features)
            for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        self.slot_rank = rank * loras
        self.pipeline.enable_lora_hotswap(target_rank=self.slot_rank)
        with quiet_peft():
            self.pipeline.load_lora_weights(self._slot_state(()), adapter_name=SLOT)
        self.active = ()

    def _swap_in(self, loras: tuple[tuple[str, float], ...]) -> None:
        if loras == self.active:
            return
        state = self._slot_state(loras)
        with quiet_peft():
            self.pipeline.load_lora_weights(state, adapter_name=SLOT, hotswap=True)
        self.active = loras

    def _slot_state(self, loras: tuple[tuple[str, float], ...]) -> dict[str, Any]:
        """One adapter of every linear layer the slot covers: ``loras`` side by side,
        each scaled by its scale and alpha/rank; zeros where none of them reaches."""
        import torch

        assert self.slot_layers is not None
        pieces: dict[str, list[tuple[Any, Any]]] = {}
        for path, scale in loras:
            for layer, (down, up) in self._read(Path(path)).items():
                pieces.setdefault(layer, []).append((down, up * scale))
        state: dict[str, Any] = {}
        rank = self.slot_rank
        for layer, (inputs, outputs) in self.slot_layers.items():
            # Every layer at the slot's rank, zeros past the LoRAs' own (one rank and alpha
            # throughout: the config hot-swapping needs unchanged).
            down, up = torch.zeros(rank, inputs), torch.zeros(outputs, rank)
            found = pieces.get(layer, [])
            used = sum(piece.shape[0] for piece, _ in found)
            if used > rank:
                raise LoraError(
                    f"these LoRAs have rank {used} together; a compiled worker takes at most {rank}"
                )
            start = 0
            for piece_down, piece_up in found:
                end = start + piece_down.shape[0]
                down[start:end] = piece_down
                up[:, start:end] = piece_up
                start = end
            state[f"transformer.{layer}.lora_A.weight"] = down
            state[f"transformer.{layer}.lora_B.weight"] = up
        return state

    def _read(self, path: Path) -> dict[str, tuple[Any, Any]]:
        """``path``'s pairs (``_pairs``), from the cache of the last ``capacity`` read."""
        name = adapter_name(path)
        if name in self.read:
            self.read.move_to_end(name)
            return self.read[name]
        pairs = self._pairs(path)
        self.loads += 1
        self.read[name] = pairs
        while len(self.read) > self.capacity:
            self.read.popitem(last=False)
        return pairs

    def _pairs(self, path: Path) -> dict[str, tuple[Any, Any]]:
        """A LoRA file's (A, B x alpha/rank) per layer, in diffusers' own reading of it;
        LoraMismatchError where a layer is not the model's or its shapes do not fit."""
        import torch

        assert self.slot_layers is not None
        mismatch = LoraMismatchError(f"this LoRA is not for {self.model_id}")
        try:
            state = self.pipeline.lora_state_dict(str(path))
        except (ValueError, RuntimeError, KeyError):
            raise mismatch from None
        if isinstance(state, tuple):
            state = state[0]
        pairs: dict[str, tuple[Any, Any]] = {}
        for key, down in state.items():
            if not key.endswith(".lora_A.weight"):
                continue
            layer = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            up = state.get(f"transformer.{layer}.lora_B.weight")
            shape = self.slot_layers.get(layer)
            if (
                up is None
                or shape is None
                or down.ndim != 2
                or up.ndim != 2
                or down.shape[1] != shape[0]
                or up.shape[0] != shape[1]
                or up.shape[1] != down.shape[0]
            ):
                raise mismatch
            rank = down.shape[0]
            alpha = state.get(f"transformer.{layer}.alpha")
            factor = float(alpha) / rank if alpha is not None else 1.0
            pairs[layer] = (down.to(torch.float32), up.to(torch.float32) * factor)
        if not pairs:
            raise mismatch
        return pairs
