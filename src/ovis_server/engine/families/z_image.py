"""Z-Image: diffusers' ``ZImagePipeline`` (Tongyi-MAI's 6B single-stream DiT, a Qwen3-4B
text encoder, FLUX.1's VAE, flow matching with a fixed shift of 3). Z-Image-Turbo is
distilled to 8 steps at guidance 0: one transformer forward a step, no guidance pair.

The loop is the stock one, step for step: latents in float32 of shape (batch, 16, H/8,
W/8) from one generator per image; sigmas ``linspace(1, 1/steps, steps)`` through the
scheduler (shift 3.0, no dynamic shifting, so its ``mu`` does nothing); the transformer
takes a list of per-image latents (with a frame axis) and a list of caption features of
each prompt's own length (the hidden states before the text encoder's last layer, at the
prompt's tokens only), at timestep ``(1000 - t) / 1000``, and its output is negated
before the scheduler's step. Where the engine differs: prompt features come from the cache,
and with guidance (``guidance_scale`` > 0; Z-Image-Turbo runs without) both branches go
through one forward, as the stock pipeline also does.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from PIL import Image

from ovis_server.engine.families.base import (
    Denoising,
    MemoryReference,
    ModelFamily,
    PromptEncoder,
)
from ovis_server.engine.request import GenerationRequest

# ZImagePipeline.__call__'s max_sequence_length: the tokens read, chat template included.
TEXT_TOKENS = 512
GiB = 1 << 30

# The real Z-Image-Turbo's text encoder: Qwen3-4B (hub Tongyi-MAI/Z-Image-Turbo,
# text_encoder/config.json).
QWEN3_4B = {
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
}
# The tiny build: a Qwen3 text encoder of hidden size 32 and a transformer of dim 32 with
# one layer and one refiner layer; dim / n_heads == sum(axes_dims). axes_lens stay at the
# defaults (1024, 512, 512): smaller ones index out of range at 1024x576.
TINY_TEXT_HIDDEN = 32
TINY_TRANSFORMER = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 32,
    "n_layers": 1,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": TINY_TEXT_HIDDEN,
    "axes_dims": [4, 6, 6],
    "axes_lens": [1024, 512, 512],
}


def build_scheduler() -> Any:
    """Z-Image-Turbo's scheduler: flow matching, shift 3.0, no dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    )


def assemble(transformer: Any, text_encoder: Any, vae: Any, tokenizer: Any) -> Any:
    from diffusers import ZImagePipeline

    return ZImagePipeline(
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def edit_pipeline(pipeline: Any) -> Any:
    """diffusers' ZImageImg2ImgPipeline on ``pipeline``'s own modules (no copy)."""
    from diffusers import ZImageImg2ImgPipeline

    edit = ZImageImg2ImgPipeline(**pipeline.components)
    edit.set_progress_bar_config(disable=True)
    return edit


def init_pixels(pipeline: Any, request: GenerationRequest) -> torch.Tensor:
    """The request's input image as the VAE takes it: resized to the request's size (as
    the image processor does) and scaled to [-1, 1], in float32 (the stock call's)."""
    assert request.init_image is not None
    with Image.open(io.BytesIO(request.init_image)) as image:
        rgb = image.convert("RGB")
    pixels: torch.Tensor = pipeline.image_processor.preprocess(
        rgb, height=request.height, width=request.width
    )
    return pixels.to(dtype=torch.float32)


class ZImageDenoising(Denoising):
    """A batch of Z-Image requests between steps: float32 latents, caption features per
    row (of each prompt's own length), and the negative prompts' with guidance."""

    def __init__(
        self,
        pipeline: Any,
        requests: Sequence[GenerationRequest],
        prompts: PromptEncoder,
        device: torch.device,
    ) -> None:
        from diffusers.pipelines.z_image.pipeline_z_image import (
            calculate_shift,
            get_default_z_image_sigmas,
            retrieve_timesteps,
        )

        pipe = self.pipeline = pipeline
        first = requests[0]
        steps = first.num_inference_steps
        self.guidance = first.guidance_scale
        self.embeds = [prompts(request.prompt) for request in requests]
        self.negative = (
            [prompts(request.negative_prompt) for request in requests]
            if self.guidance > 0
            else None
        )
        generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
        edit = first.init_image is not None
        if edit and any(request.init_image is None for request in requests):
            raise ValueError("a batch is all image-to-image or all text-to-image")
        if not edit:
            self.latents: torch.Tensor = pipe.prepare_latents(
                len(requests),
                pipe.transformer.in_channels,
                first.height,
                first.width,
                torch.float32,
                device,
                generators,
            )
        # The stock pipelines' latent sizes (both make them so): 2 x (side // 16).
        latent_side = pipe.vae_scale_factor * 2
        image_seq_len = (first.height // latent_side) * (first.width // latent_side)
        mu = calculate_shift(
            image_seq_len,
            pipe.scheduler.config.get("base_image_seq_len", 256),
            pipe.scheduler.config.get("max_image_seq_len", 4096),
            pipe.scheduler.config.get("base_shift", 0.5),
            pipe.scheduler.config.get("max_shift", 1.15),
        )
        sigmas = get_default_z_image_sigmas(steps)
        self.timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
        if not edit:
            pipe.scheduler.set_begin_index(0)
            return
        # Image to image, as ZImageImg2ImgPipeline: skip the schedule's first steps, encode
        # each input with the VAE (a sample drawn with its own generator) and noise it to
        # the first step kept.
        img2img = edit_pipeline(pipe)
        self.timesteps, run = img2img.get_timesteps(steps, first.strength, device)
        if run != first.steps_run:
            raise ValueError(f"{run} steps to run, {first.steps_run} counted at submit")
        dtype = self.embeds[0].dtype  # the stock call's: its prompt features'
        rows = []
        for request, generator in zip(requests, generators, strict=True):
            image = init_pixels(pipe, request)
            rows.append(
                img2img.prepare_latents(
                    image,
                    self.timesteps[:1],
                    1,
                    pipe.transformer.in_channels,
                    request.height,
                    request.width,
                    dtype,
                    device,
                    generator,
                )
            )
        self.latents = torch.cat(rows)

    def step(self, index: int) -> None:
        pipe = self.pipeline
        t = self.timesteps[index]
        rows = self.latents.shape[0]
        timestep = (1000 - t.expand(rows)) / 1000
        hidden = self.latents.to(pipe.transformer.dtype)
        embeds = self.embeds
        if self.negative is not None:  # both branches in one forward, as the stock call
            hidden = hidden.repeat(2, 1, 1, 1)
            embeds = [*embeds, *self.negative]
            timestep = timestep.repeat(2)
        out = pipe.transformer(
            list(hidden.unsqueeze(2).unbind(dim=0)), timestep, embeds, return_dict=False
        )[0]
        if self.negative is not None:
            positive = torch.stack([item.float() for item in out[:rows]])
            negative = torch.stack([item.float() for item in out[rows:]])
            noise = positive + self.guidance * (positive - negative)
        else:
            noise = torch.stack([item.float() for item in out])
        noise = -noise.squeeze(2)
        self.latents = pipe.scheduler.step(
            noise.to(torch.float32), t, self.latents, return_dict=False
        )[0]

    def keep(self, rows: torch.Tensor) -> None:
        self.latents = self.latents.index_select(0, rows)
        kept = rows.tolist()
        self.embeds = [self.embeds[row] for row in kept]
        if self.negative is not None:
            self.negative = [self.negative[row] for row in kept]

    def vae_latents(self) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = self.latents.to(vae.dtype)
        scaled: torch.Tensor = latents / vae.config.scaling_factor + vae.config.shift_factor
        return scaled


class ZImageFamily(ModelFamily):
    name = "z-image"
    title = "Z-Image-Turbo"
    pipeline_class_name = "ZImagePipeline"
    random_full_size = "about 10.3B parameters: some 41 GB in float32"
    # Parameters counted from the real architecture (build_random_full on "meta");
    # activations PLANNED, not measured: FLUX.1's VAE decode as measured for Ovis-Image,
    # the transformer's one forward a step (no guidance pair) at about two thirds of
    # Ovis-Image's pair, and 512 text tokens through the 4B encoder.
    memory_reference = MemoryReference(
        parameters={
            "text_encoder": 4_022_468_096,
            "transformer": 6_154_908_736,
            "vae": 83_819_683,
        },
        activations={"text_encoder": 0.25 * GiB, "transformer": 0.45 * GiB, "vae": 2.4 * GiB},
    )

    def build_tiny(self) -> Any:
        from diffusers import ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        from ovis_server.engine.tiny import WEIGHT_SEED, build_tiny_vae, build_tokenizer

        tokenizer = build_tokenizer()
        torch.manual_seed(WEIGHT_SEED)
        text_encoder = Qwen3Model(
            Qwen3Config(
                hidden_size=TINY_TEXT_HIDDEN,
                intermediate_size=2 * TINY_TEXT_HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                vocab_size=len(tokenizer),
                max_position_embeddings=TEXT_TOKENS,
            )
        )
        transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER)
        return assemble(transformer, text_encoder, build_tiny_vae(), tokenizer)

    def build_random_full(self, device: torch.device | str, dtype: torch.dtype) -> Any:
        from diffusers import AutoencoderKL, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        from ovis_server.engine.random_full import FLUX_VAE
        from ovis_server.engine.tiny import WEIGHT_SEED, build_tokenizer

        torch.manual_seed(WEIGHT_SEED)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                transformer = ZImageTransformer2DModel()  # its defaults are the 6B config
                text_encoder = Qwen3Model(Qwen3Config(**QWEN3_4B))
                vae = AutoencoderKL(**FLUX_VAE)
        finally:
            torch.set_default_dtype(previous)
        for module in (transformer, text_encoder, vae):
            module.eval()  # as from_pretrained leaves them
        return assemble(transformer, text_encoder, vae, build_tokenizer())

    def encode_prompt(self, pipeline: Any, prompt: str, device: torch.device) -> torch.Tensor:
        (embeds,) = pipeline._encode_prompt(
            prompt=[prompt], device=device, max_sequence_length=TEXT_TOKENS
        )
        features: torch.Tensor = embeds
        return features

    def _tokens(self, pipeline: Any, text: str) -> int:
        message = pipeline.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        return len(pipeline.tokenizer(message, truncation=False)["input_ids"])

    def prompt_warnings(self, pipeline: Any, request: GenerationRequest) -> list[str]:
        texts = [("prompt", request.prompt)]
        if request.guidance_scale > 0 and request.negative_prompt:
            texts.append(("negative_prompt", request.negative_prompt))
        found = []
        for field, text in texts:
            total = self._tokens(pipeline, text)
            if total > TEXT_TOKENS:
                length = total - self._tokens(pipeline, "")
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
        return ZImageDenoising(pipeline, requests, prompts, device)

    def stock(self, pipeline: Any, request: GenerationRequest) -> Image.Image:
        """ZImagePipeline's call, or ZImageImg2ImgPipeline's for a request with an image."""
        if request.init_image is None:
            return super().stock(pipeline, request)
        arguments = asdict(request)
        for name in ("init_image", "seed", "negative_prompt", "loras"):
            arguments.pop(name)
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        with Image.open(io.BytesIO(request.init_image)) as image:
            rgb = image.convert("RGB")
        output = edit_pipeline(pipeline)(**arguments, image=rgb, generator=generator)
        result: Image.Image = output.images[0]
        return result


FAMILY = ZImageFamily()
