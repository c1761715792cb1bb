"""What the text-to-image models of the catalogue share in their input schemas: the prompt,
the image size (RunComfy's six presets, a custom ``{width, height}``, or a generic client's
``aspect_ratio``), the seed and the output format. Each model's input class
(``ovis_image.OvisImageInput``, ``z_image.ZImageInput``) declares its own fields, in its own
order, and inherits the checks of those fields from ``TextToImageInput``.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ovis_server.catalogue.spec import ModelInput, field_problems

# width x height, the convention fal and RunComfy share.
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

ImageSizePreset = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]
OutputFormat = Literal["jpeg", "png", "webp"]

# Ovis-Image works on 2x2 patches of an 8x downsampled latent: sides are multiples of 16.
SIZE_MULTIPLE = 16
MIN_SIDE = 64
MAX_SIDE = 2048
# An ``aspect_ratio`` asks for about this many pixels (one megapixel)...
ASPECT_RATIO_PIXELS = 1024 * 1024
# ...except where a preset has exactly that ratio: then the preset, as clients that map
# ratios to fal's presets would get (16:9 is 1024x576, not 1360x768).
ASPECT_RATIO_PRESETS: dict[tuple[int, int], ImageSizePreset] = {
    (1, 1): "square_hd",
    (4, 3): "landscape_4_3",
    (16, 9): "landscape_16_9",
    (3, 4): "portrait_4_3",
    (9, 16): "portrait_16_9",
}
ASPECT_RATIO_PATTERN = re.compile(r"([1-9][0-9]{0,3}):([1-9][0-9]{0,3})")
MAX_PROMPT_CHARS = 20_000
MAX_SEED = 2**63 - 1
# A seed drawn for a request that gave none: 32 bits, exact in any JSON client.
RANDOM_SEED_BOUND = 2**32


def aspect_ratio_size(ratio: str) -> ImageSizePreset | tuple[int, int]:
    """The size an ``aspect_ratio`` such as "16:9" asks for: the preset with exactly that
    ratio if there is one, else about one megapixel at that ratio with sides that are
    multiples of 16 (shrunk to fit the largest side). ValueError if ``ratio`` is not
    "W:H" or no size within the bounds has it."""
    match = ASPECT_RATIO_PATTERN.fullmatch(ratio)
    if match is None:
        raise ValueError("must be W:H in whole numbers, such as 16:9, 1:1 or 9:16")
    across, down = int(match[1]), int(match[2])
    common = math.gcd(across, down)
    across, down = across // common, down // common
    preset = ASPECT_RATIO_PRESETS.get((across, down))
    if preset is not None:
        return preset
    scale = math.sqrt(ASPECT_RATIO_PIXELS / (across * down))
    scale = min(scale, MAX_SIDE / max(across, down))

    def side(length: float) -> int:
        return min(MAX_SIDE, round(length / SIZE_MULTIPLE) * SIZE_MULTIPLE)

    width, height = side(across * scale), side(down * scale)
    if min(width, height) < MIN_SIDE:
        raise ValueError(
            f"{ratio} is too far from square for sides between {MIN_SIDE} and {MAX_SIDE}"
        )
    return width, height


SEED_DESCRIPTION = "The same seed and input give the same image. Null picks one at random."


def ranged(default: float | None, low: float, high: float, title: str, description: str) -> Any:
    """A numeric field between ``low`` and ``high`` (both allowed)."""
    return Field(default=default, ge=low, le=high, title=title, description=description)


class ImageDimensions(BaseModel):
    """A custom size: both sides multiples of 16."""

    # As fal accepts it; the docstring is the schema's description.
    model_config = ConfigDict(extra="forbid", strict=True, title="Image Dimensions")

    width: int = Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
    height: int = Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)


class TextToImageInput(ModelInput):
    """The checks and helpers of the shared fields; a subclass declares the fields
    (``prompt``, ``image_size``, ``seed``, ``aspect_ratio``...) it has."""

    # Whether image_size may be "auto" (sized from an input image: z_image_edit.py).
    AUTO_IMAGE_SIZE: ClassVar[bool] = False
    SIZE_PRESETS: ClassVar[Mapping[str, tuple[int, int]]] = IMAGE_SIZE_PRESETS

    if TYPE_CHECKING:
        image_size: ImageSizePreset | ImageDimensions
        seed: int | None
        aspect_ratio: str | None

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("prompt_blank", "the prompt must contain some text")
        return value

    @field_validator("image_size", mode="wrap", check_fields=False)
    @classmethod
    def _check_image_size(
        cls, value: object, handler: ValidatorFunctionWrapHandler
    ) -> ImageSizePreset | ImageDimensions:
        # One readable error per case instead of pydantic's error-per-union-member.
        if value == "auto" and cls.AUTO_IMAGE_SIZE:
            return handler(value)  # type: ignore[no-any-return]
        if isinstance(value, str):
            if value not in IMAGE_SIZE_PRESETS:
                raise PydanticCustomError(
                    "image_size",
                    "must be one of {presets}, or an object with width and height",
                    {"presets": ", ".join(IMAGE_SIZE_PRESETS)},
                )
            return handler(value)  # type: ignore[no-any-return]
        if isinstance(value, dict | ImageDimensions):
            try:
                return ImageDimensions.model_validate(value)
            except ValidationError as exc:
                problems = "; ".join(field_problems(exc.errors(), empty="value"))
                raise PydanticCustomError(
                    "image_size", "{problems}", {"problems": problems}
                ) from None
        raise PydanticCustomError(
            "image_size", "must be a preset name or an object with width and height"
        )

    @field_validator("aspect_ratio", check_fields=False)
    @classmethod
    def _check_aspect_ratio(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                aspect_ratio_size(value)
            except ValueError as exc:
                raise PydanticCustomError("aspect_ratio", str(exc)) from None
        return value

    @model_validator(mode="after")
    def _size_from_aspect_ratio(self) -> Self:
        ratio: str | None = getattr(self, "aspect_ratio", None)
        if ratio is None:
            return self
        if "image_size" in self.model_fields_set:
            raise PydanticCustomError(
                "aspect_ratio_conflict",
                "aspect_ratio and image_size were both given: send one of them",
            )
        size = aspect_ratio_size(ratio)
        self.image_size = (
            size if isinstance(size, str) else ImageDimensions(width=size[0], height=size[1])
        )
        return self

    def dimensions(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        if isinstance(self.image_size, ImageDimensions):
            return self.image_size.width, self.image_size.height
        return IMAGE_SIZE_PRESETS[self.image_size]

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else secrets.randbelow(RANDOM_SEED_BOUND)
