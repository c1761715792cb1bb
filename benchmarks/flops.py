"""What one image costs in matrix work, counted from the transformer's own layers.

Only the matmuls that act on every token are counted (design.md): the adaLN modulation
layers act on one vector per image and are left out. Attention adds 4 * L^2 * width per
block (QK^T and AV, two FLOPs a multiply-add).
"""

from __future__ import annotations

from typing import Any

import torch


def _linear_params(block: torch.nn.Module, *, context: bool | None) -> int:
    total = 0
    for name, module in block.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.startswith("norm"):
            continue
        is_context = "context" in name or "add_" in name
        if context is None or context == is_context:
            total += module.weight.numel()
    return total


def transformer_forward_flops(transformer: Any, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one transformer forward for one image."""
    tokens = image_tokens + text_tokens
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    flops = 0.0
    for block in transformer.transformer_blocks:
        flops += 2 * _linear_params(block, context=False) * image_tokens
        flops += 2 * _linear_params(block, context=True) * text_tokens
        flops += 4 * tokens**2 * width
    for block in transformer.single_transformer_blocks:
        flops += 2 * _linear_params(block, context=None) * tokens
        flops += 4 * tokens**2 * width
    return flops


def image_flops(
    transformer: Any,
    width: int,
    height: int,
    steps: int,
    guidance: bool,
    text_tokens: int = 256,
    vae_scale_factor: int = 8,
) -> float:
    """FLOPs of the denoising loop for one image: steps x (2 with guidance) x a forward."""
    image_tokens = (width // (vae_scale_factor * 2)) * (height // (vae_scale_factor * 2))
    forwards = steps * (2 if guidance else 1)
    return forwards * transformer_forward_flops(transformer, image_tokens, text_tokens)
