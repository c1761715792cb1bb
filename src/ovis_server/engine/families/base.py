"""What a model family is to the engine: how its pipeline is loaded or built, how a prompt
becomes embeddings, how a batch of requests is denoised step by step and turned into
latents for the VAE, and the figures the memory plan needs.

``Engine`` (engine/pipeline.py) holds one family and does the rest the same way for all of
them: the prompt cache, the step loop with its per-step callback (progress, cancel at a
step, a request leaving a batch), the VAE decode (tiled in a light run), the pixels on the
device, memory profiles, compiling the repeated blocks and FP8.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image

from ovis_server.engine.request import GenerationRequest

# Prompt text -> its embeddings, through the engine's cache.
PromptEncoder = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class MemoryReference:
    """What the memory plan scales a family's activation peaks from: the real model's
    parameter counts per component and its activation peaks (bytes) at 1024x1024, a batch
    of one, in bf16. memory.py scales them by pixels, batch, dtype and parameters."""

    parameters: Mapping[str, int]
    activations: Mapping[str, float]


class Denoising(ABC):
    """One batched run in progress: the latents of the requests still running."""

    @abstractmethod
    def step(self, index: int) -> None:
        """Run denoising step ``index`` (0-based) for every row still running."""

    @abstractmethod
    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch); the others were stopped."""

    @abstractmethod
    def vae_latents(self) -> torch.Tensor:
        """The final latents as the VAE decodes them (unpacked, unscaled, in its dtype)."""


class ModelFamily(ABC):
    """One family of models: a diffusers pipeline class and how the engine runs it."""

    # Short name, as catalogue specs name it: "ovis-image", "z-image".
    name: str
    # For messages: "Ovis-Image-7B".
    title: str
    # The diffusers pipeline class (model_index.json's _class_name).
    pipeline_class_name: str
    # What ``--model random-full`` builds, for the refusal on a CPU: "about 9.2B parameters:
    # some 36 GB in float32".
    random_full_size: str
    # The activation figures of the memory plan.
    memory_reference: MemoryReference

    # --- loading ---------------------------------------------------------------------------

    def pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def from_pretrained(self, weights: str, dtype: torch.dtype) -> Any:
        """The pipeline from a diffusers directory (or hub id), on the CPU."""
        return self.pipeline_class().from_pretrained(weights, dtype=dtype)

    @abstractmethod
    def build_tiny(self) -> Any:
        """A tiny pipeline of the real classes with random weights (fixed seed), in memory."""

    @abstractmethod
    def build_random_full(self, device: torch.device | str, dtype: torch.dtype) -> Any:
        """The real architecture with random weights, built on ``device`` ("meta" to count)."""

    # --- prompts ---------------------------------------------------------------------------

    @abstractmethod
    def encode_prompt(self, pipeline: Any, prompt: str, device: torch.device) -> torch.Tensor:
        """The embeddings of one prompt, as the stock pipeline makes them (what the engine
        caches)."""

    @abstractmethod
    def prompt_warnings(self, pipeline: Any, request: GenerationRequest) -> list[str]:
        """What the client should know about how its prompts were read (a prompt cut)."""

    # --- generation ------------------------------------------------------------------------

    def batch_shape(self, request: GenerationRequest) -> str:
        """Requests with equal shapes may share one batched run: by default size, steps and
        guidance (``GenerationRequest.batch_shape``), which the worker's claims group by
        through ``ModelSpec.batch_key``; a family with other rules overrides this and gives
        its spec a matching ``batch_key``."""
        return request.batch_shape()

    @abstractmethod
    def start(
        self,
        pipeline: Any,
        requests: Sequence[GenerationRequest],
        prompts: PromptEncoder,
        device: torch.device,
        *,
        light: bool,
    ) -> Denoising:
        """A run of ``requests`` (one batch shape), each with its own generator seeded with
        its seed, so that each image equals the stock pipeline's for that seed. ``light``
        spends less memory where the family can (the engine decodes in tiles then)."""

    def stock(self, pipeline: Any, request: GenerationRequest) -> Image.Image:
        """The plain pipeline call: the baseline the engine must match."""
        # The request's fields other than the seed are the pipeline's argument names.
        arguments = asdict(request)
        if request.init_image is not None or request.strength < 1.0:
            raise ValueError(f"{self.title} does not take an input image")
        for name in ("init_image", "strength", "loras"):
            arguments.pop(name)
        generator = torch.Generator(device="cpu").manual_seed(arguments.pop("seed"))
        output = pipeline(**arguments, generator=generator)
        image: Image.Image = output.images[0]
        return image
