"""What the engine is asked to draw, independent of any wire format."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

# Ovis-Image and Z-Image turn an 8x downsampled latent into 2x2 patches: an image's sides
# are multiples of 16 (the catalogue's SIZE_MULTIPLE).
PIXELS_PER_PATCH = 16


@dataclass(frozen=True)
class GenerationRequest:
    """One image: everything that decides its pixels, the seed included."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    # Image to image: how much of the input image is noised away (1.0: text to image).
    strength: float = 1.0
    # The input image as PNG bytes (image to image), read from the file store by the worker.
    init_image: bytes | None = field(default=None, repr=False, compare=False)
    # LoRAs, (path, scale) each: the request's paths as sent; the worker replaces each with
    # its local file (worker/loras.py) before the engine loads it (engine/loras.py).
    loras: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.width % PIXELS_PER_PATCH or self.height % PIXELS_PER_PATCH:
            raise ValueError(
                f"width and height must be multiples of {PIXELS_PER_PATCH}, "
                f"got {self.width}x{self.height}"
            )
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"width and height must be positive, got {self.width}x{self.height}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {self.strength}")

    @property
    def steps_run(self) -> int:
        """The denoising steps actually run: all of them, or strength's share (image to
        image skips the schedule's first steps)."""
        if self.strength >= 1.0:
            return self.num_inference_steps
        return steps_to_run(self.num_inference_steps, self.strength)

    def batch_shape(self) -> str:
        """What requests that share one batched call have in common: size, steps and
        guidance (a job's batch key is its model and this)."""
        shape = f"{self.width}x{self.height}:{self.num_inference_steps}:{self.guidance_scale!r}"
        if self.strength < 1.0:
            shape = f"{shape}:strength={self.strength!r}"
        if self.loras:
            # One LoRA set a batch: its paths and scales, hashed (the key column is short).
            text = json.dumps([list(pair) for pair in self.loras])
            shape = f"{shape}:loras={hashlib.sha256(text.encode()).hexdigest()[:16]}"
        return shape


def steps_to_run(steps: int, strength: float) -> int:
    """How many of ``steps`` an image-to-image run at ``strength`` denoises, as diffusers'
    ``ZImageImg2ImgPipeline.get_timesteps`` counts them."""
    start = int(max(steps - min(steps * strength, steps), 0))
    return steps - start
