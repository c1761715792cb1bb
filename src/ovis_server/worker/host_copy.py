"""Moving a model's weights off the device and back, whatever its family: the pipeline's
torch modules move with their own tensors. A model that waits off the device keeps a copy
of its weights in host memory (pinned, on CUDA, so that coming back is one copy over PCIe)
where its memory profile allows it and the host has the RAM; worker/placement.py decides.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ovis_server.engine.pipeline import Engine


def _modules(engine: Engine) -> list[torch.nn.Module]:
    """The pipeline's torch modules (transformer, text encoder, VAE...), whatever the family."""
    import torch

    components = getattr(getattr(engine, "pipeline", None), "components", None) or {}
    return [item for item in components.values() if isinstance(item, torch.nn.Module)]


def _tensors(engine: Engine) -> Iterator[torch.Tensor]:
    """Every parameter and buffer of the pipeline, once each (tied weights are one)."""
    seen: set[int] = set()
    for module in _modules(engine):
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor


def device_bytes(engine: Engine) -> int:
    """Bytes of the pipeline's weights that are on the device now (not on the CPU)."""
    return sum(
        tensor.numel() * tensor.element_size()
        for tensor in _tensors(engine)
        if tensor.device.type != "cpu" or engine.device.type == "cpu"
    )


def weight_bytes(engine: Engine) -> int:
    """Bytes of all the pipeline's weights, wherever they are."""
    return sum(tensor.numel() * tensor.element_size() for tensor in _tensors(engine))


def available_host_bytes() -> int | None:
    """The host memory available to new allocations (Linux's MemAvailable); None unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def movable(engine: Engine) -> bool:
    """Whether the engine's weights can wait in host memory and come back by a copy: the
    ``full`` profile, every weight a plain tensor on the device. Offloading and quantized
    profiles are reloaded from disk instead."""
    from ovis_server.engine.memory import MemoryProfile

    return engine.memory.profile is MemoryProfile.FULL


class HostCopy:
    """A copy of an engine's weights in host memory (pinned on CUDA), kept while the model is
    not resident; leaving the device is pointing each tensor back at it, coming in is one copy."""

    def __init__(self, engine: Engine) -> None:
        import torch

        pin = engine.device.type == "cuda" and torch.cuda.is_available()
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for tensor in _tensors(engine):
            host = tensor.data.to("cpu", copy=True)
            self.pairs.append((tensor, host.pin_memory() if pin else host))
        self.nbytes = sum(host.numel() * host.element_size() for _, host in self.pairs)

    def leave(self) -> None:
        """Free the device's copies: each tensor is its host copy again."""
        for tensor, host in self.pairs:
            tensor.data = host

    def bring(self, device: torch.device) -> None:
        """Copy the weights onto ``device`` (the host copy stays for the next leave)."""
        import torch

        for tensor, host in self.pairs:
            tensor.data = host.to(device, non_blocking=True, copy=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def release_device_memory() -> None:
    """Free what is no longer referenced on the GPU: tensors in reference cycles (the
    frames of a failed run's traceback), then the allocator's cached blocks. Without CUDA
    there is no device memory to free, and nothing is done: a full collection among the
    half a million objects a worker holds takes 0.25 s of CPU (2-core machine), and the
    garbage collector frees host memory in its own time."""
    import torch

    if not torch.cuda.is_available():
        return
    gc.collect()
    torch.cuda.empty_cache()
