"""Ovis-Image: diffusers' ``OvisImagePipeline`` (a FLUX-style double- and single-stream
transformer, a Qwen3 text encoder read through a chat template, FLUX.1's VAE, flow matching
with dynamic shifting).

What the engine does differently from the stock loop, without changing the image a seed
gives: one transformer forward carries both guidance branches (a batch of 2) instead of
two, except in a light run, which runs them one after the other as the stock pipeline
does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ovis_server.engine.families.base import (
    Denoising,
    MemoryReference,
    ModelFamily,
    PromptEncoder,
)
from ovis_server.engine.memory import REFERENCE_ACTIVATIONS, REFERENCE_PARAMETERS
from ovis_server.engine.prompts import prompt_overflow
from ovis_server.engine.request import GenerationRequest

# The pipeline's prompt length: max_sequence_length of OvisImagePipeline.__call__.
TEXT_TOKENS = 256


class OvisDenoising(Denoising):
    """A batch of Ovis-Image requests between steps: packed latents, cond (and uncond)
    embeddings per row."""

    def __init__(
        self,
        pipeline: Any,
        requests: Sequence[GenerationRequest],
        prompts: PromptEncoder,
        device: torch.device,
        light: bool,
    ) -> None:
        from diffusers.pipelines.ovis_image.pipeline_ovis_image import (
            calculate_shift,
            retrieve_timesteps,
        )

        pipe = self.pipeline = pipeline
        first = requests[0]
        self.width, self.height = first.width, first.height
        steps = first.num_inference_steps
        self.guidance = first.guidance_scale
        self.light = light
        self.cond = torch.cat([prompts(request.prompt) for request in requests])
        self.uncond = (
            torch.cat([prompts(request.negative_prompt) for request in requests])
            if self.guidance > 1
            else None
        )
        # The pipeline's own position ids for text tokens, from embeddings already made.
        _, self.text_ids = pipe._prepare_prompt_embeds(None, self.cond[:1], 1, TEXT_TOKENS, device)
        generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
        self.latents, self.image_ids = pipe.prepare_latents(
            len(requests),
            pipe.transformer.config.in_channels // 4,
            self.height,
            self.width,
            self.cond.dtype,
            device,
            generators,
        )
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            self.latents.shape[1],
            pipe.scheduler.config.get("base_image_seq_len", 256),
            pipe.scheduler.config.get("max_image_seq_len", 4096),
            pipe.scheduler.config.get("base_shift", 0.5),
            pipe.scheduler.config.get("max_shift", 1.15),
        )
        self.timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
        pipe.scheduler.set_begin_index(0)

    def _predict(self, hidden: torch.Tensor, embeds: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        timestep = t.expand(hidden.shape[0]).to(hidden.dtype)
        noise: torch.Tensor = self.pipeline.transformer(
            hidden_states=hidden,
            timestep=timestep / 1000,
            encoder_hidden_states=embeds,
            txt_ids=self.text_ids,
            img_ids=self.image_ids,
            return_dict=False,
        )[0]
        return noise

    def step(self, index: int) -> None:
        t = self.timesteps[index]
        latents, cond, uncond = self.latents, self.cond, self.uncond
        if uncond is None:
            noise = self._predict(latents, cond, t)
        else:
            if self.light:  # two forwards of half the batch each
                noise_cond = self._predict(latents, cond, t)
                noise_uncond = self._predict(latents, uncond, t)
            else:  # one forward carries both branches
                both = self._predict(torch.cat([latents, latents]), torch.cat([cond, uncond]), t)
                noise_cond, noise_uncond = both.chunk(2)
            noise = noise_uncond + self.guidance * (noise_cond - noise_uncond)
        self.latents = self.pipeline.scheduler.step(noise, t, latents, return_dict=False)[0]

    def keep(self, rows: torch.Tensor) -> None:
        self.latents = self.latents.index_select(0, rows)
        self.cond = self.cond.index_select(0, rows)
        if self.uncond is not None:
            self.uncond = self.uncond.index_select(0, rows)

    def vae_latents(self) -> torch.Tensor:
        pipe = self.pipeline
        latents = pipe._unpack_latents(self.latents, self.height, self.width, pipe.vae_scale_factor)
        scaled: torch.Tensor = (
            latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        )
        return scaled


class OvisImageFamily(ModelFamily):
    name = "ovis-image"
    title = "Ovis-Image-7B"
    pipeline_class_name = "OvisImagePipeline"
    random_full_size = "about 9.2B parameters: some 36 GB in float32"
    # Derived from the H200 measurements (README "Which GPU runs what"): memory.py's.
    memory_reference = MemoryReference(REFERENCE_PARAMETERS, REFERENCE_ACTIVATIONS)

    def build_tiny(self) -> Any:
        from ovis_server.engine.tiny import build_tiny_pipeline

        return build_tiny_pipeline()

    def build_random_full(self, device: torch.device | str, dtype: torch.dtype) -> Any:
        from ovis_server.engine.random_full import build_full_size_pipeline

        return build_full_size_pipeline(device, dtype)

    def encode_prompt(self, pipeline: Any, prompt: str, device: torch.device) -> torch.Tensor:
        embeds: torch.Tensor = pipeline._get_ovis_prompt_embeds(
            prompt=[prompt], device=device, max_sequence_length=TEXT_TOKENS
        )
        return embeds

    def prompt_warnings(self, pipeline: Any, request: GenerationRequest) -> list[str]:
        texts = [("prompt", request.prompt)]
        if request.guidance_scale > 1 and request.negative_prompt:
            texts.append(("negative_prompt", request.negative_prompt))
        found = []
        for field, text in texts:
            length, dropped = prompt_overflow(pipeline, text, TEXT_TOKENS)
            if dropped:
                found.append(
                    f"{field} truncated: the model reads {TEXT_TOKENS} text tokens, template "
                    f"included; this {field} is about {length} tokens, so its end was cut "
                    "(shorten it to keep all of it)"
                )
        return found

    def start(
        self,
        pipeline: Any,
        requests: Sequence[GenerationRequest],
        prompts: PromptEncoder,
        device: torch.device,
        *,
        light: bool,
    ) -> Denoising:
        return OvisDenoising(pipeline, requests, prompts, device, light)


FAMILY = OvisImageFamily()
