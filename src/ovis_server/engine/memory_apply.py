"""Putting a memory profile (memory.py) into effect on a loaded pipeline: offloading the text
encoder, quantizing the transformer's weights to 8 bits, or diffusers' group offloading."""

from __future__ import annotations

from typing import Any

import torch

from ovis_server.engine.memory import MemoryProfile, MemoryProfileError


def _on_device_for_forward(module: torch.nn.Module, device: torch.device) -> None:
    """Keep ``module`` on the CPU and bring it to ``device`` only for each forward."""
    home = torch.device("cpu")

    def arrive(_module: torch.nn.Module, _args: Any) -> None:
        module.to(device)

    def leave(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
        module.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    module.to(home)
    module.register_forward_pre_hook(arrive)
    module.register_forward_hook(leave)


def quantize_config(device: torch.device) -> Any:
    """FP8 (dynamic activations, FP8 weights) where the GPU multiplies in FP8 (compute
    capability 8.9 and up), int8 weight-only elsewhere; needs torchao."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8WeightOnlyConfig,
        )
    except ImportError:
        raise MemoryProfileError(
            "--memory 8bit needs torchao (FP8 or int8 weights): pip install 'ovis-server[fp8]'"
        ) from None
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return Float8DynamicActivationFloat8WeightConfig()
    return Int8WeightOnlyConfig()


def check_supported(profile: MemoryProfile, device: torch.device) -> None:
    """Refuse a profile that cannot run on ``device``, saying what it needs."""
    if profile.offloads_groups and device.type not in ("cuda", "cpu"):
        raise MemoryProfileError(
            f"--memory {profile} needs a CUDA GPU (diffusers' group offloading onto "
            f"{device.type} is not supported here); use --memory full or text-encoder-offload"
        )
    if profile is MemoryProfile.EIGHT_BIT:
        quantize_config(device)


def apply(pipeline: Any, profile: MemoryProfile, device: torch.device) -> None:
    """Put ``pipeline`` (on the CPU, or already on ``device`` for ``full``) where ``profile``
    wants it, quantizing the transformer for ``8bit``."""
    check_supported(profile, device)
    if profile is MemoryProfile.FULL:
        pipeline.to(device)
        return
    if profile.offloads_groups:
        pipeline.to("cpu")
        pipeline.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level"
            if profile is MemoryProfile.GROUP_OFFLOAD_BLOCK
            else "leaf_level",
            num_blocks_per_group=1 if profile is MemoryProfile.GROUP_OFFLOAD_BLOCK else None,
            use_stream=device.type == "cuda",
        )
        return
    if profile is MemoryProfile.EIGHT_BIT:
        from torchao.quantization import quantize_

        # Module by module onto the device, so the bf16 transformer is never there whole.
        quantize_(pipeline.transformer, quantize_config(device), device=device)
    pipeline.transformer.to(device)
    pipeline.vae.to(device)
    _on_device_for_forward(pipeline.text_encoder, device)
