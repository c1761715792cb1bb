"""Memory profiles: how much of the model lives on the GPU, so that smaller cards run it.

From the fastest to the smallest:

- ``full``: everything resident (measured on an H200 at 1024x1024 in bf16: weights
  17.1 GiB, peak 19.5 GiB).
- ``text-encoder-offload``: the text encoder stays on the CPU and visits the GPU only to
  encode a prompt it has not seen (embeddings are cached: prompts.py).
- ``8bit``: the transformer's weights in 8 bits through torchao (FP8 where the GPU has FP8
  matmuls, int8 weight-only elsewhere, the CPU included), and the text encoder offloaded as
  above. It **changes the numerics**: ``auto`` never picks it.
- ``group-offload-block`` / ``group-offload-leaf``: diffusers' group offloading of every
  component, a block or a leaf module at a time, with the next one copied on a CUDA stream
  while the current one runs.

Every profile but ``8bit`` only moves weights, so it gives the ``full`` image. ``plan``
picks one from the memory at hand: the planned peak of a profile is computed from the
loaded model's parameter sizes plus activation estimates taken from the H200 measurements
and scaled by pixels, batch, dtype and parameter count (so the tiny model gets tiny ones).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ovis_server.memory_profiles import AUTO as AUTO
from ovis_server.memory_profiles import MEMORY_CHOICES as MEMORY_CHOICES
from ovis_server.memory_profiles import MemoryProfile as MemoryProfile

logger = logging.getLogger(__name__)

GiB = 1 << 30


class MemoryProfileError(ValueError):
    """A profile cannot run here (a missing package, a device it does not support)."""


# --- what the planner knows about a model --------------------------------------------------

COMPONENTS = ("text_encoder", "transformer", "vae")


@dataclass(frozen=True)
class ComponentSize:
    """One component's parameters, counted the ways the profiles move them."""

    parameters: int
    # Parameters outside the top-level ModuleLists (onloaded as one group) plus the two
    # largest blocks (the one running and the one being copied in).
    block_window: int
    # The two largest leaf modules' own parameters.
    leaf_window: int


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts per component and the bytes one weight takes."""

    text_encoder: ComponentSize
    transformer: ComponentSize
    vae: ComponentSize
    bytes_per_weight: int
    # The family's real parameter counts and activation peaks (families/base.py's
    # MemoryReference) the activations are scaled from; None: Ovis-Image-7B's, below.
    reference_parameters: Mapping[str, int] | None = None
    reference_activations: Mapping[str, float] | None = None

    def component(self, name: str) -> ComponentSize:
        size: ComponentSize = getattr(self, name)
        return size


def _count(parameters: Iterable[torch.nn.Parameter]) -> int:
    return sum(parameter.numel() for parameter in parameters)


def component_size(module: torch.nn.Module) -> ComponentSize:
    blocks = [
        child
        for child in module.children()
        if isinstance(child, torch.nn.ModuleList | torch.nn.Sequential)
    ]
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    outside = _count(p for p in module.parameters() if id(p) not in in_blocks)
    block_sizes = sorted(
        (_count(item.parameters()) for block in blocks for item in block), reverse=True
    )
    leaf_sizes = sorted(
        (_count(m.parameters(recurse=False)) for m in module.modules()), reverse=True
    )
    return ComponentSize(
        parameters=_count(module.parameters()),
        block_window=outside + sum(block_sizes[:2]),
        leaf_window=sum(leaf_sizes[:2]),
    )


def model_sizes(pipeline: Any, reference: Any = None) -> ModelSizes:
    """The sizes of a loaded (or meta-device) pipeline of a text encoder, a transformer and
    a VAE; ``reference`` is its family's MemoryReference (None: Ovis-Image-7B's figures)."""
    dtype = pipeline.transformer.dtype
    return ModelSizes(
        text_encoder=component_size(pipeline.text_encoder),
        transformer=component_size(pipeline.transformer),
        vae=component_size(pipeline.vae),
        bytes_per_weight=torch.finfo(dtype).bits // 8,
        reference_parameters=None if reference is None else reference.parameters,
        reference_activations=None if reference is None else reference.activations,
    )


# Activation peaks of the real model at 1024x1024, batch 1 with guidance, in bf16, derived
# from the H200 measurements (README "Which GPU runs what"): decoding is the full profile's
# peak less its weights (19.5 - 17.1 GiB); denoising is model offload's peak less the
# transformer's weights (14.4 - 13.7 GiB); encoding 256 tokens is an estimate.
REFERENCE_PIXELS = 1024 * 1024
REFERENCE_PARAMETERS = {
    "text_encoder": 1_720_574_976,
    "transformer": 7_370_449_728,
    "vae": 83_819_683,
}
REFERENCE_ACTIVATIONS = {"text_encoder": 0.1 * GiB, "transformer": 0.67 * GiB, "vae": 2.4 * GiB}
# FP8 and int8 weights take a byte each; their per-channel scales are left out.
QUANTIZED_BYTES = 1


def margin(budget: int) -> int:
    """Headroom left unplanned: allocator fragmentation, the CUDA context, estimates' error."""
    return int(0.05 * budget + 0.5 * GiB)


def activation_bytes(
    sizes: ModelSizes, component: str, width: int, height: int, batch: int
) -> float:
    parameters = sizes.reference_parameters or REFERENCE_PARAMETERS
    activations = sizes.reference_activations or REFERENCE_ACTIVATIONS
    scale = (
        width * height / REFERENCE_PIXELS
        * batch
        * sizes.bytes_per_weight / 2
        * sizes.component(component).parameters / parameters[component]
    )  # fmt: skip
    return activations[component] * scale


def planned_peak(
    sizes: ModelSizes,
    profile: MemoryProfile,
    width: int = 1024,
    height: int = 1024,
    batch: int = 1,
) -> int:
    """GPU bytes ``profile`` is planned to peak at: the largest over the three phases
    (encode, denoise, decode) of the weights on the GPU then plus that phase's activations."""
    weight = sizes.bytes_per_weight

    def resident(name: str) -> float:
        size = sizes.component(name)
        if profile.offloads_groups:
            return 0.0
        if profile.offloads_text_encoder and name == "text_encoder":
            return 0.0
        if profile is MemoryProfile.EIGHT_BIT and name == "transformer":
            return size.parameters * QUANTIZED_BYTES
        return size.parameters * weight

    def running(name: str) -> float:
        """Weights of ``name`` on the GPU while it runs, beyond what is resident."""
        size = sizes.component(name)
        if profile is MemoryProfile.GROUP_OFFLOAD_BLOCK:
            return size.block_window * weight
        if profile is MemoryProfile.GROUP_OFFLOAD_LEAF:
            return size.leaf_window * weight
        return size.parameters * weight if resident(name) == 0 else 0.0

    always = sum(resident(name) for name in COMPONENTS)
    phases = (
        always + running(name) + activation_bytes(sizes, name, width, height, batch)
        for name in COMPONENTS
    )
    return int(max(phases))


# Beyond this many pixels the search stops: far more than any request can ask for.
PIXEL_SEARCH_LIMIT = 64 * 1024 * 1024


def largest_image_pixels(
    sizes: ModelSizes, profile: MemoryProfile, budget_bytes: int | None
) -> int | None:
    """The most pixels one image (a batch of 1) may have for ``profile``'s planned peak to
    fit ``budget_bytes`` less the margin; None without a budget (a CPU: no limit), 0 when
    not even the weights fit. Activations grow with the pixel count alone, not the shape."""
    if budget_bytes is None:
        return None
    usable = budget_bytes - margin(budget_bytes)

    def fits(pixels: int) -> bool:
        return planned_peak(sizes, profile, width=pixels, height=1) <= usable

    if fits(PIXEL_SEARCH_LIMIT):
        return PIXEL_SEARCH_LIMIT
    low, high = 0, PIXEL_SEARCH_LIMIT  # fits(high) is False
    if not fits(low):
        return 0
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


# --- the plan -------------------------------------------------------------------------------


def usable_bytes(budget: int) -> int:
    """What a plan may fill of ``budget``: all of it less the margin."""
    return budget - margin(budget)


def batch_fitting(
    sizes: ModelSizes, profile: MemoryProfile, usable: int, width: int, height: int, limit: int
) -> int:
    """The largest batch of ``width`` x ``height`` images, up to ``limit``, planned to peak
    within ``usable`` bytes; 1 when not even one is (a single job always runs: an
    out-of-memory error then frees memory and retries it lighter, worker/runner.py)."""
    fitting = [
        n for n in range(1, limit + 1) if planned_peak(sizes, profile, width, height, n) <= usable
    ]
    return max(fitting, default=1)


@dataclass(frozen=True)
class MemoryPlan:
    profile: MemoryProfile
    budget_bytes: int | None  # None where there is no GPU memory to plan (a CPU)
    peak_bytes: int  # planned, at 1024x1024 and a batch of 1
    batch_limit: int  # the largest batch planned to fit at 1024x1024 (at most the device's default)
    reason: str
    # The model's sizes the plan was made from; None for a plan made by hand.
    sizes: ModelSizes | None = None

    def describe(self) -> str:
        return f"memory profile {self.profile}: {self.reason}"

    def batch_fitting(self, width: int, height: int, limit: int) -> int:
        """How many ``width`` x ``height`` images one batch may hold: ``limit``, or fewer
        where the budget has no room for that many (a batch costs more the larger its
        images: on the real model four at 1024x1024 plan 7 GiB more than one). Without a
        budget (a CPU) or sizes, ``limit``."""
        if self.budget_bytes is None or self.sizes is None:
            return limit
        usable = usable_bytes(self.budget_bytes)
        return batch_fitting(self.sizes, self.profile, usable, width, height, limit)


def gib(size: float) -> str:
    return f"{size / GiB:.1f} GiB"


def plan(
    sizes: ModelSizes,
    budget_bytes: int | None,
    requested: str = AUTO,
    *,
    device_type: str = "cuda",
    max_batch: int | None = None,
    width: int = 1024,
    height: int = 1024,
) -> MemoryPlan:
    """The profile to run with ``budget_bytes`` of GPU memory (None: not a GPU).

    ``auto`` takes the first profile, in the order of MemoryProfile, that keeps the image
    and whose planned peak at ``width`` x ``height`` fits the budget with a margin; the
    batch limit is the largest batch (up to ``max_batch``: 4 on CUDA, 1 elsewhere) that still
    fits. A profile asked for by name is taken as asked, with a warning in the reason when
    it is planned not to fit.
    """
    limit = max_batch if max_batch is not None else (4 if device_type == "cuda" else 1)
    size = f"{width}x{height}"

    def peak(profile: MemoryProfile, batch: int = 1) -> int:
        return planned_peak(sizes, profile, width, height, batch)

    if budget_bytes is None:
        profile = MemoryProfile.FULL if requested == AUTO else MemoryProfile(requested)
        why = (
            f"on {device_type} there is no GPU memory to plan, so everything stays in memory"
            if requested == AUTO
            else f"asked for with --memory; on {device_type} it saves no GPU memory"
        )
        return MemoryPlan(profile, None, peak(profile), limit, why, sizes)

    usable = usable_bytes(budget_bytes)

    def fitting(profile: MemoryProfile) -> int:
        return batch_fitting(sizes, profile, usable, width, height, limit)

    budget_text = f"{gib(budget_bytes)} (less a margin of {gib(margin(budget_bytes))})"
    if requested != AUTO:
        profile = MemoryProfile(requested)
        fits = peak(profile) <= usable
        why = f"asked for with --memory; planned peak {gib(peak(profile))} at {size} " + (
            f"fits {budget_text}" if fits else f"DOES NOT fit {budget_text}: expect out-of-memory"
        )
        batch = fitting(profile)
        return MemoryPlan(
            profile, budget_bytes, peak(profile), batch, f"{why}; batch up to {batch}", sizes
        )

    for profile in MemoryProfile:
        if not profile.keeps_image or peak(profile) > usable:
            continue
        batch = fitting(profile)
        why = f"planned peak {gib(peak(profile))} at {size} fits {budget_text}; batch up to {batch}"
        order = list(MemoryProfile)
        faster = [
            p for p in order[: order.index(profile)] if not p.keeps_image and peak(p) <= usable
        ]
        if faster:
            why += (
                f" ({faster[0]} would fit too, {gib(peak(faster[0]))}, and runs faster, "
                f"but changes the image a seed gives: --memory {faster[0]})"
            )
        return MemoryPlan(profile, budget_bytes, peak(profile), batch, why, sizes)
    smallest = MemoryProfile.GROUP_OFFLOAD_LEAF
    why = (
        f"nothing fits {budget_text} at {size}: the smallest profile plans "
        f"{gib(peak(smallest))}; expect out-of-memory (a smaller image may fit)"
    )
    return MemoryPlan(smallest, budget_bytes, peak(smallest), 1, why, sizes)


# --- the budget -----------------------------------------------------------------------------


def gpu_budget(device: torch.device, gpu_memory: float | None) -> int | None:
    """The GPU bytes to plan with: ``gpu_memory`` (bytes, or a fraction of the GPU's memory
    when at most 1) capped by what is free, else what is free; None off CUDA. With
    ``gpu_memory`` the allocator is capped too, so a large GPU stands in for a small one."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    if gpu_memory is None:
        return int(free)
    cap = int(gpu_memory * total if gpu_memory <= 1 else gpu_memory)
    if cap > total:
        raise MemoryProfileError(f"--gpu-memory {gib(cap)} is more than the GPU has ({gib(total)})")
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    if cap > free:
        logger.warning(
            "--gpu-memory %s, but only %s is free on %s: planning with %s",
            gib(cap), gib(free), device, gib(free),
        )  # fmt: skip
    return min(cap, int(free))
