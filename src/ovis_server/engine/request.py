"""What the engine is asked to draw, independent of any wire format."""

from __future__ import annotations

from dataclasses import dataclass

# Ovis-Image turns an 8x downsampled latent into 2x2 patches.
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

    def batch_shape(self) -> str:
        """What requests that share one batched call have in common: size, steps and
        guidance (a job's batch key is its model and this)."""
        return f"{self.width}x{self.height}:{self.num_inference_steps}:{self.guidance_scale!r}"
