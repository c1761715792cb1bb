"""A tiny Ovis-Image checkpoint with random weights, for tests and for trying the API
(``write_tiny_checkpoint`` writes any family's: each family builds its own).

Every component is the real class the 7B checkpoint uses (Qwen3Model, a Qwen2 fast
tokenizer, OvisImageTransformer2DModel, a 4-level AutoencoderKL, a dynamically shifted
FlowMatchEulerDiscreteScheduler), only much smaller, saved in diffusers format and
loaded through the same ``from_pretrained`` path as the real weights. Its images are
noise: the weights are random.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

# The chat template follows Qwen3's: the pipeline applies it with enable_thinking=False.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n"
    "{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# The text encoder's hidden size is the transformer's joint attention width.
TEXT_HIDDEN = 32
LATENT_CHANNELS = 16  # as FLUX.1's VAE; the transformer sees 2x2 patches of it: 64 inputs
WEIGHT_SEED = 0


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer built offline: every byte is a token, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return Qwen2TokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


def build_tiny_pipeline() -> Any:
    """The tiny OvisImagePipeline in memory, with weights drawn from a fixed seed."""
    import torch
    from diffusers import OvisImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()
    torch.manual_seed(WEIGHT_SEED)
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=TEXT_HIDDEN,
            intermediate_size=2 * TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
        )
    )
    transformer = OvisImageTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        out_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=1,
        joint_attention_dim=TEXT_HIDDEN,
        axes_dims_rope=(4, 6, 6),
    )
    vae = build_tiny_vae()
    return assemble_pipeline(transformer, text_encoder, vae, tokenizer)


def build_tiny_vae() -> Any:
    """FLUX.1's VAE in small: four levels, so it downsamples 8x like the real one; no
    attention in the mid block, which at 1024x1024 would dominate the run time on a CPU."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )


def assemble_pipeline(transformer: Any, text_encoder: Any, vae: Any, tokenizer: Any) -> Any:
    """An OvisImagePipeline of these components and the real model's scheduler: flow
    matching with dynamic shifting from 0.5 (256 image tokens) to 1.15 (4096)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return OvisImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def write_tiny_checkpoint(directory: Path, family: str | None = None) -> Path:
    """Save the tiny pipeline of ``family`` (a name of engine/families; None: Ovis-Image)
    in diffusers format at ``directory`` and return it.

    The checkpoint is written beside the target and renamed into place, so a reader never
    sees half of one and two processes building it at once both end with a whole one.
    """
    from ovis_server.engine.families import get_family
    from ovis_server.engine.loading import silence_loading_progress

    silence_loading_progress()
    directory = directory.expanduser().resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    pipeline = get_family(family).build_tiny()
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=directory.parent))
    try:
        pipeline.save_pretrained(staging)
        try:
            staging.rename(directory)
        except OSError:
            if not (directory / "model_index.json").is_file():
                raise
            # Another process finished first; its checkpoint is identical.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
