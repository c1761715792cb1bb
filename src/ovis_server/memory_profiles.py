"""The memory profiles' names, free of torch: ``--memory``'s choices (config.py) and the
profiles the engine puts into effect (engine/memory.py, which describes each)."""

from __future__ import annotations

import enum
from typing import Literal, get_args

AUTO = "auto"


class MemoryProfile(enum.StrEnum):
    """How much of the model lives on the GPU, from the fastest to the smallest."""

    FULL = "full"
    TEXT_ENCODER_OFFLOAD = "text-encoder-offload"
    EIGHT_BIT = "8bit"
    GROUP_OFFLOAD_BLOCK = "group-offload-block"
    GROUP_OFFLOAD_LEAF = "group-offload-leaf"

    @property
    def keeps_image(self) -> bool:
        """Whether the same seed gives the ``full`` image (offloading changes no arithmetic)."""
        return self is not MemoryProfile.EIGHT_BIT

    @property
    def offloads_groups(self) -> bool:
        return self in (MemoryProfile.GROUP_OFFLOAD_BLOCK, MemoryProfile.GROUP_OFFLOAD_LEAF)

    @property
    def offloads_text_encoder(self) -> bool:
        return self in (MemoryProfile.TEXT_ENCODER_OFFLOAD, MemoryProfile.EIGHT_BIT)


# ``--memory``: auto, or a profile. The type spells the names out for mypy and pydantic;
# MEMORY_CHOICES is built from the enum, and importing this module checks the two agree.
MemoryChoice = Literal[
    "auto", "full", "text-encoder-offload", "8bit", "group-offload-block", "group-offload-leaf"
]
MEMORY_CHOICES: tuple[str, ...] = (AUTO, *(profile.value for profile in MemoryProfile))
if get_args(MemoryChoice) != MEMORY_CHOICES:  # pragma: no cover (a typo here stops imports)
    raise ImportError("MemoryChoice and MemoryProfile name different profiles")
