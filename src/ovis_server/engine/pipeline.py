"""The engine: diffusers' OvisImagePipeline, loaded once, turned into a function of a request."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from ovis_server.engine.request import GenerationRequest

logger = logging.getLogger(__name__)

# Called after every denoising step with (steps done, steps in all); returning False
# stops the run at that step boundary, before the VAE decode.
StepCallback = Callable[[int, int], bool]


class GenerationCancelled(Exception):  # noqa: N818 - a signal, not a failure
    """The step callback asked to stop; no image was decoded."""


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


def silence_loading_progress() -> None:
    """Turn off the per-shard progress bars diffusers and transformers draw while loading."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


class Engine:
    """One loaded pipeline on one device; generates images for validated requests."""

    def __init__(self, pipeline: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.pipeline = pipeline
        self.device = device
        self.dtype = dtype
        self.load_seconds = 0.0

    @classmethod
    def load(cls, weights: str, device: str | None = None, dtype: str | None = None) -> Engine:
        """Load ``weights`` (a hub id or a local diffusers directory) onto ``device``."""
        from diffusers import OvisImagePipeline

        silence_loading_progress()
        target = pick_device(device)
        torch_dtype = pick_dtype(target, dtype)
        started = time.perf_counter()
        try:
            pipeline = OvisImagePipeline.from_pretrained(weights, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise EngineLoadError(
                f"could not load Ovis-Image weights from {weights!r}: {exc}. Pass --model with "
                "a local diffusers directory if this machine cannot reach the Hugging Face hub."
            ) from exc
        pipeline.to(target)
        pipeline.set_progress_bar_config(disable=True)
        engine = cls(pipeline, target, torch_dtype)
        engine.load_seconds = time.perf_counter() - started
        logger.info(
            "loaded %s on %s (%s) in %.1fs", weights, target, torch_dtype, engine.load_seconds
        )
        return engine

    def generate(
        self, request: GenerationRequest, on_step: StepCallback | None = None
    ) -> Image.Image:
        """The image for ``request``; raises GenerationCancelled if ``on_step`` says stop."""
        total = request.num_inference_steps

        def step_end(
            _pipe: Any, step: int, _timestep: Any, _tensors: dict[str, Any]
        ) -> dict[str, Any]:
            if on_step is not None and on_step(step + 1, total) is False:
                raise GenerationCancelled
            return {}

        # The noise comes from a CPU generator, so a seed gives the same starting latents on
        # every device.
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        output = self.pipeline(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            generator=generator,
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=[],
        )
        image: Image.Image = output.images[0]
        return image
