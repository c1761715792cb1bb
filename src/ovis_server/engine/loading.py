"""Where the engine runs and what it loads: the device and dtype, the pipeline from a
diffusers directory, or the real architecture with random weights (``random-full``)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ovis_server.engine.random_full import build_full_size_pipeline

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


def check_random_full_device(device: torch.device) -> None:
    """Refuse ``--model random-full`` where it cannot be of use: on a CPU."""
    if device.type == "cpu":
        raise EngineLoadError(
            "--model random-full builds the real Ovis-Image-7B architecture (about 9.2B "
            "parameters: some 36 GB in float32, and many minutes per image on a CPU) and is "
            "meant for load tests on a GPU: pass --device cuda on a machine with one, or use "
            "--model tiny to try the server on a CPU"
        )


def build_random_full(device: torch.device, dtype: torch.dtype) -> Any:
    """The real architecture with random weights, built on ``device`` (random_full.py)."""
    logger.warning(
        "--model random-full: the real Ovis-Image-7B architecture with RANDOM weights on %s "
        "(%s), for load tests; its images are noise",
        device,
        dtype,
    )
    return build_full_size_pipeline(device, dtype)


def from_pretrained(weights: str, dtype: torch.dtype) -> Any:
    """The pipeline on the CPU; the memory profile puts it on the device."""
    from diffusers import OvisImagePipeline

    try:
        return OvisImagePipeline.from_pretrained(weights, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise EngineLoadError(
            f"could not load Ovis-Image weights from {weights!r}: {exc}. Pass --model with "
            "a local diffusers directory if this machine cannot reach the Hugging Face hub."
        ) from exc


def silence_loading_progress() -> None:
    """Turn off the per-shard progress bars diffusers and transformers draw while loading."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
