"""The engine: a model family's diffusers pipeline, loaded once, turned into a function of
requests.

The model is diffusers' own (transformer, text encoder, VAE, scheduler and the pipeline's
helpers for prompts, latents and timesteps); what the engine replaces is the denoising loop
around it, to make it faster without changing the image a seed gives. What is particular
to a family (Ovis-Image, Z-Image: engine/families/) is how it encodes a prompt and what one
step does; the rest is here, the same for every family:

- prompt embeddings come from a bounded LRU cache, so the empty negative prompt is
  encoded once per process and a repeated prompt once;
- requests that share size, steps and guidance run as one batch, each with its own
  generator, so each image equals the image it would get alone; a cancelled request
  leaves the batch at the next step and the others go on;
- on CUDA, optionally, the repeated transformer blocks are compiled and the VAE runs
  channels-last; FP8 matmuls (torchao) are opt-in because they change the numerics;
- the images come back as uint8 pixels made on the device (``generate_pixels``), so that
  the worker can turn them into files on another thread while the next batch runs; a
  ``light`` run, the worker's retry after an out-of-memory error, spends less memory
  where the family can (Ovis-Image runs its guidance branches one after the other) and
  decodes in tiles.

``generate_stock`` keeps the plain pipeline call, for the benchmark and the fidelity tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image

from ovis_server.engine.families import family_of_directory, family_of_pipeline, get_family
from ovis_server.engine.families.base import ModelFamily
from ovis_server.engine.images import to_image
from ovis_server.engine.loading import (
    EngineLoadError,
    build_random_full,
    check_random_full_device,
    from_pretrained,
    pick_device,
    pick_dtype,
    silence_loading_progress,
)
from ovis_server.engine.loras import HOTSWAP_RANK, LoraAdapters
from ovis_server.engine.memory import (
    AUTO,
    MemoryPlan,
    MemoryProfile,
    MemoryProfileError,
    ModelSizes,
    gpu_budget,
    largest_image_pixels,
    model_sizes,
    plan,
)
from ovis_server.engine.memory_apply import apply as apply_memory_profile
from ovis_server.engine.prompts import DEFAULT_CAPACITY, PromptCache
from ovis_server.engine.request import GenerationRequest
from ovis_server.engine.weights import RANDOM_FULL

logger = logging.getLogger(__name__)

# Called after every denoising step with (steps done, steps in all); returning False
# stops the run at that step boundary, before the VAE decode.
StepCallback = Callable[[int, int], bool]
# For a batch: (steps done, steps in all, indices of the requests still running) -> the
# indices of those to stop now.
BatchStepCallback = Callable[[int, int, Sequence[int]], Collection[int]]


class GenerationCancelled(Exception):  # noqa: N818 - a signal, not a failure
    """The step callback asked to stop; no image was decoded."""


class IncompatibleBatchError(ValueError):
    """Requests of one batch must share size, steps and guidance."""


# Tile size, in pixels, of the VAE decode of a light run (Engine.generate_pixels).
LIGHT_TILE = 512


@contextmanager
def tiled_decode(vae: Any, tile: int | None) -> Iterator[None]:
    """Decode in ``tile`` x ``tile`` pixel tiles for the duration (None: as configured)."""
    if tile is None:
        yield
        return
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    vae.use_tiling = True
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved


def resolve_family(family: ModelFamily | str | None, weights: str | None = None) -> ModelFamily:
    """``family`` itself or by name; when None, the family of the diffusers directory
    ``weights`` (its model_index.json), else Ovis-Image."""
    if isinstance(family, ModelFamily):
        return family
    if family is None and weights is not None:
        family = family_of_directory(weights)
    return get_family(family)


class Engine:
    """One loaded pipeline on one device; generates images for validated requests."""

    def __init__(
        self,
        pipeline: Any,
        device: torch.device,
        dtype: torch.dtype,
        prompt_cache_size: int = DEFAULT_CAPACITY,
        family: ModelFamily | str | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.device = device
        self.dtype = dtype
        # How this pipeline is run (engine/families/): given, else told by its class.
        self.family = resolve_family(
            family if family is not None else family_of_pipeline(type(pipeline).__name__)
        )
        self.load_seconds = 0.0
        self.prompts = PromptCache(self._encode_prompt, prompt_cache_size)
        self.compiled = False  # whether optimize() compiled the transformer's blocks
        # The LoRAs loaded into the pipeline, and those the next run uses (engine/loras.py).
        self.loras = LoraAdapters(pipeline)
        self.sizes: ModelSizes | None = None  # the parameter sizes the plan was made from
        # Which memory profile the weights were placed by, and why (Engine.load plans it).
        self.memory = MemoryPlan(
            MemoryProfile.FULL, None, 0, 1, "placed by the caller, not planned"
        )

    @classmethod
    def load(
        cls,
        weights: str,
        device: str | None = None,
        dtype: str | None = None,
        *,
        compile: bool | None = None,
        fp8: bool = False,
        memory: str = AUTO,
        gpu_memory: float | None = None,
        compile_dynamic: bool = False,
        family: ModelFamily | str | None = None,
        lora_hotswap_rank: int = HOTSWAP_RANK,
    ) -> Engine:
        """Load ``weights`` (a hub id, a local diffusers directory, or ``random-full``)
        of ``family`` (engine/families/; by default the directory's own, else Ovis-Image)
        onto ``device``.

        ``random-full`` builds the real architecture with random weights on the device (no
        download; its images are noise), and is refused on a CPU. ``memory`` is a profile of
        memory.py or ``auto`` (planned from the free GPU memory, or ``gpu_memory``: bytes, or
        a fraction of the GPU's memory when at most 1). ``compile`` (default: on CUDA, unless
        the profile offloads groups of layers) compiles the repeated transformer blocks;
        ``fp8`` quantizes the transformer's matmuls to FP8 with torchao (Hopper-class GPUs);
        ``compile_dynamic`` compiles with dynamic shapes from the first call.
        """
        silence_loading_progress()
        model_family = resolve_family(family, None if weights == RANDOM_FULL else weights)
        reference = model_family.memory_reference
        target = pick_device(device)
        torch_dtype = pick_dtype(target, dtype)
        started = time.perf_counter()
        try:
            budget = gpu_budget(target, gpu_memory)
        except MemoryProfileError as exc:
            raise EngineLoadError(str(exc)) from None
        if gpu_memory is not None and budget is None:
            logger.warning("--gpu-memory applies to CUDA GPUs: ignored on %s", target)
        if weights == RANDOM_FULL:
            check_random_full_device(target, model_family)
            sizes = model_sizes(model_family.build_random_full("meta", torch_dtype), reference)
        else:
            pipeline = from_pretrained(weights, torch_dtype, model_family)
            sizes = model_sizes(pipeline, reference)
        memory_plan = plan(sizes, budget, memory, device_type=target.type)
        profile = memory_plan.profile
        if fp8 and profile.offloads_groups:
            raise EngineLoadError(
                f"--fp8 does not go with --memory {profile}: use --memory 8bit, which "
                "quantizes the transformer and offloads the text encoder"
            )
        logger.info("%s", memory_plan.describe())
        if not profile.keeps_image:
            logger.warning(
                "--memory %s quantizes the transformer's weights: the same seed no longer "
                "gives the full profile's image",
                profile,
            )
        if weights == RANDOM_FULL:
            # Built where the profile wants the weights: on the device whole for full, else
            # on the CPU for the profile to move (or quantize) part by part.
            home = target if profile is MemoryProfile.FULL else torch.device("cpu")
            pipeline = build_random_full(home, torch_dtype, model_family)
        try:
            apply_memory_profile(pipeline, profile, target)
        except MemoryProfileError as exc:
            raise EngineLoadError(str(exc)) from None
        pipeline.set_progress_bar_config(disable=True)
        engine = cls(pipeline, target, torch_dtype, family=model_family)
        engine.memory = memory_plan
        engine.sizes = sizes
        if compile is None:
            compile = target.type == "cuda" and not profile.offloads_groups
        engine.optimize(
            compile=compile,
            fp8=fp8 and profile is not MemoryProfile.EIGHT_BIT,
            dynamic=compile_dynamic,
            lora_hotswap_rank=lora_hotswap_rank,
        )
        engine.load_seconds = time.perf_counter() - started
        logger.info(
            "loaded %s on %s (%s) in %.1fs", weights, target, torch_dtype, engine.load_seconds
        )
        return engine

    def optimize(
        self, *, compile: bool, fp8: bool, dynamic: bool = False, lora_hotswap_rank: int = 0
    ) -> None:
        """Speed-ups that leave the model's arithmetic as it is, plus opt-in FP8.

        ``dynamic`` compiles with dynamic shapes from the first call (the weights' shapes
        stay static, as torch keeps parameters' shapes static: what varies is the batch
        and the image tokens); by default torch compiles static graphs first and makes a
        dimension dynamic once it has seen it change (its automatic dynamic shapes), which
        the warm-up (warmup.py) brings about before the worker reports ready."""
        pipe = self.pipeline
        if fp8:
            if self.device.type != "cuda":
                raise EngineLoadError("--fp8 needs a CUDA GPU (Hopper-class or newer)")
            try:
                from torchao.quantization import (
                    Float8DynamicActivationFloat8WeightConfig,
                    quantize_,
                )
            except ImportError as exc:
                raise EngineLoadError(
                    "--fp8 needs torchao: pip install 'ovis-server[fp8]'"
                ) from exc
            quantize_(pipe.transformer, Float8DynamicActivationFloat8WeightConfig())
        if self.device.type == "cuda" and not self.memory.profile.offloads_groups:
            # Not under group offloading: its hooks keep copies of the weights as they were.
            pipe.vae.to(memory_format=torch.channels_last)
        if compile:
            # LoRAs are then swapped into one slot made now, so that switching them does
            # not recompile (engine/loras.py); a family without LoRAs has none.
            if lora_hotswap_rank > 0:
                self.loras.prepare_hotswap(rank=lora_hotswap_rank)
            # Regional compile: each repeated block compiles once and is reused 33 times,
            # so the warm-up stays short.
            pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=dynamic or None)
            self.compiled = True

    @property
    def max_pixels(self) -> int | None:
        """The largest image (pixels, at a batch of 1) the memory plan fits in its budget;
        None where there is no budget to fit (a CPU)."""
        if self.memory.budget_bytes is None:
            return None
        sizes = self.sizes or model_sizes(self.pipeline, self.family.memory_reference)
        return largest_image_pixels(sizes, self.memory.profile, self.memory.budget_bytes)

    # --- prompts ----------------------------------------------------------------------------

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        return self.family.encode_prompt(self.pipeline, prompt, self.device)

    def prompt_warnings(self, request: GenerationRequest) -> list[str]:
        """What the client should know about how its prompts were read: a prompt (or a
        negative prompt that guidance uses) longer than the model reads is cut."""
        return self.family.prompt_warnings(self.pipeline, request)

    # --- generation ------------------------------------------------------------------------

    def generate(
        self, request: GenerationRequest, on_step: StepCallback | None = None
    ) -> Image.Image:
        """The image for ``request``; raises GenerationCancelled if ``on_step`` says stop."""

        def one(step: int, total: int, _active: Sequence[int]) -> Collection[int]:
            return () if on_step is None or on_step(step, total) is not False else (0,)

        (image,) = self.generate_batch([request], one)
        if image is None:
            raise GenerationCancelled
        return image

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_step: BatchStepCallback | None = None,
    ) -> list[Image.Image | None]:
        """Images for ``requests`` (same size, steps and guidance) in one batched run.

        An entry is None for a request the callback stopped. Raises GenerationCancelled
        when the callback stops them all (nothing is decoded then).
        """
        return [
            None if pixels is None else to_image(pixels)
            for pixels in self.generate_pixels(requests, on_step)
        ]

    @torch.no_grad()
    def generate_pixels(
        self,
        requests: Sequence[GenerationRequest],
        on_step: BatchStepCallback | None = None,
        *,
        light: bool = False,
    ) -> list[np.ndarray[Any, np.dtype[np.uint8]] | None]:
        """``generate_batch``'s images as height x width x 3 uint8 arrays in host memory,
        the pixels the stock pipeline's PIL images hold: what is left to make a file of
        them (``to_image``, then encode) is CPU work the worker does on another thread.

        ``light`` uses less device memory, for a retry after running out of it: the family
        spends less where it can (Ovis-Image runs its two guidance branches one after the
        other, as its stock pipeline does), and the VAE decodes in tiles of ``LIGHT_TILE``
        pixels, which changes the pixels of an image larger than one tile slightly where the
        tiles are blended.
        """
        if not requests:
            return []
        if len({self.family.batch_shape(request) for request in requests}) != 1:
            raise IncompatibleBatchError("a batch needs one size, step count and guidance")
        pipe = self.pipeline
        first = requests[0]
        self.loras.activate(first.loras)  # one LoRA set a batch (its batch shape says so)
        steps = first.steps_run  # image to image runs strength's share of the schedule
        run = self.family.start(pipe, requests, self.prompts.get, self.device, light=light)

        active = list(range(len(requests)))
        for index in range(steps):
            run.step(index)
            stop = set(on_step(index + 1, steps, tuple(active))) if on_step else set()
            if stop:
                keep = [row for row, original in enumerate(active) if original not in stop]
                if not keep:
                    raise GenerationCancelled
                run.keep(torch.tensor(keep, device=self.device))
                active = [active[row] for row in keep]

        latents = run.vae_latents()
        with tiled_decode(pipe.vae, LIGHT_TILE if light else None):
            decoded = pipe.vae.decode(latents, return_dict=False)[0]
        # The stock postprocess's arithmetic, on the device: [-1, 1] to [0, 1] in the
        # model's dtype, then x255 and round half to even in float32 as numpy does it.
        unit = pipe.image_processor.postprocess(decoded, output_type="pt")
        rows = (unit.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images: list[np.ndarray[Any, np.dtype[np.uint8]] | None] = [None] * len(requests)
        for original, pixels in zip(active, rows, strict=True):
            images[original] = pixels
        return images

    def generate_stock(self, request: GenerationRequest) -> Image.Image:
        """The plain pipeline call (``OvisImagePipeline.__call__``, ``ZImagePipeline``'s):
        the baseline the engine must match."""
        return self.family.stock(self.pipeline, request)
