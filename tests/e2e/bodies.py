"""Request bodies and paths that more than one test module sends: each written once.

The model ids are the wire contract's, written out rather than imported from the code, so
that a renamed id fails the tests instead of following along."""

from __future__ import annotations

from typing import Any

from .faults import SLOW_MARKER

OVIS_ID = "aidc-ai/ovis-image"
OVIS_PATH = f"/v1/models/{OVIS_ID}"
Z_IMAGE_ID = "tongyi-mai/z-image/turbo"

# The quickest image the tiny model makes: one step at 64x64, guidance 1 (one pass a step).
ONE_STEP: dict[str, Any] = {
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 1,
    "guidance_scale": 1,
}
# Long enough to be caught while it runs (cancels, deletes, deadlines, kills, restarts) and
# cheap on the CPU: the tests' hook makes each step of a prompt with SLOW_MARKER wait
# SLOW_STEP_SECONDS (faults.py): 15 s for these 50 steps, or 0.3 s a step with fewer.
SLOW: dict[str, Any] = {
    "prompt": f"a shop sign that reads OVIS {SLOW_MARKER}",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 50,
}
