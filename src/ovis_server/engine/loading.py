"""Where the engine runs and what it loads: the device and dtype, the pipeline from a
diffusers directory, or the real architecture with random weights (``random-full``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ovis_server.engine.families.base import ModelFamily

logger = logging.getLogger(__name__)


class EngineLoadError(RuntimeError):
    """The weights could not be loaded."""


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given (``cpu``, ``cuda``, ``cuda:1``, ``mps``), else the best present."""
    if requested and requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EngineLoadError(f"device {requested!r} asked for, but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """bf16 on CUDA (what the model was trained in), float32 elsewhere, unless asked."""
    if requested and requested != "auto":
        try:
            return _DTYPES[requested]
        except KeyError:
            raise EngineLoadError(
                f"unknown dtype {requested!r}: choose one of {', '.join(_DTYPES)}"
            ) from None
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _family(family: ModelFamily | None) -> ModelFamily:
    from ovis_server.engine.families import get_family

    return family if family is not None else get_family()


def check_random_full_device(device: torch.device, family: ModelFamily | None = None) -> None:
    """Refuse ``--model random-full`` where it cannot be of use: on a CPU."""
    if device.type == "cpu":
        model = _family(family)
        raise EngineLoadError(
            f"--model random-full builds the real {model.title} architecture "
            f"({model.random_full_size}, and many minutes per image on a CPU) and is "
            "meant for load tests on a GPU: pass --device cuda on a machine with one, or use "
            "--model tiny to try the server on a CPU"
        )


def build_random_full(
    device: torch.device, dtype: torch.dtype, family: ModelFamily | None = None
) -> Any:
    """The real architecture of ``family`` (default Ovis-Image) with random weights, built
    on ``device``."""
    model = _family(family)
    logger.warning(
        "--model random-full: the real %s architecture with RANDOM weights on %s "
        "(%s), for load tests; its images are noise",
        model.title,
        device,
        dtype,
    )
    return model.build_random_full(device, dtype)


def from_pretrained(weights: str, dtype: torch.dtype, family: ModelFamily | None = None) -> Any:
    """The pipeline of ``family`` (default Ovis-Image) on the CPU; the memory profile puts
    it on the device."""
    model = _family(family)
    try:
        return model.from_pretrained(weights, dtype)
    except (OSError, ValueError) as exc:
        raise EngineLoadError(
            f"could not load {model.title} weights from {weights!r}: {exc}. Pass --model "
            "with a local diffusers directory if this machine cannot reach the Hugging Face "
            "hub."
        ) from exc


def silence_loading_progress() -> None:
    """Turn off the per-shard progress bars diffusers and transformers draw while loading."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
