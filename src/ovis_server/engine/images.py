"""Encoding generated images into the formats the API offers."""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
from PIL import Image

ImageFormat = Literal["jpeg", "png", "webp"]

MEDIA_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}

FILE_EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def to_image(pixels: np.ndarray[Any, np.dtype[np.uint8]]) -> Image.Image:
    """The RGB image of a height x width x 3 uint8 array (``Engine.generate_pixels``)."""
    return Image.fromarray(pixels)


def encode_image(image: Image.Image, image_format: ImageFormat) -> bytes:
    """The image as a file in ``image_format``: png is lossless, jpeg and webp at quality 95."""
    buffer = io.BytesIO()
    rgb = image.convert("RGB")
    if image_format == "png":
        rgb.save(buffer, format="PNG")
    elif image_format == "jpeg":
        rgb.save(buffer, format="JPEG", quality=95)
    elif image_format == "webp":
        rgb.save(buffer, format="WEBP", quality=95)
    else:  # pragma: no cover - the Literal type rules it out
        raise ValueError(f"unknown image format {image_format!r}")
    return buffer.getvalue()
