"""The real Ovis-Image-7B architecture with random weights, for timing without a download.

Speed does not depend on weight values, so this builds every component at its real size
from its config (design.md): the 7.4B transformer, the Qwen3 text encoder with hidden
size 2048 (the LLM of Ovis2.5-2B, about 1.7B) and FLUX.1's VAE. The tokenizer is the tiny
checkpoint's byte-level one; every id it makes is a valid id of the real vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch

from ovis_server.engine.tiny import WEIGHT_SEED, assemble_pipeline, build_tokenizer

QWEN3_2B = {
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
}
FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}


def build_full_size_pipeline(device: torch.device | str, dtype: torch.dtype) -> Any:
    """An OvisImagePipeline of the real sizes with random weights, built on ``device``."""
    from diffusers import AutoencoderKL, OvisImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(WEIGHT_SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = OvisImageTransformer2DModel()  # its defaults are the 7B config
            text_encoder = Qwen3Model(Qwen3Config(**QWEN3_2B))
            vae = AutoencoderKL(**FLUX_VAE)
    finally:
        torch.set_default_dtype(previous)
    for module in (transformer, text_encoder, vae):
        module.eval()  # as from_pretrained leaves them
    return assemble_pipeline(transformer, text_encoder, vae, build_tokenizer())
