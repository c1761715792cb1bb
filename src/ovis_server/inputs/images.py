"""Input images: what a request's ``image_url`` becomes before any worker sees it.

``image_url`` is an ``https://`` URL (fetched under :mod:`ovis_server.inputs.fetch`'s
rules) or a ``data:image/...;base64,`` URI. Either way the bytes are judged by Pillow, not
by a header or a file name: PNG, JPEG or WEBP only; the pixel count is read from the
header and checked before a single pixel is decoded, so a decompression bomb (a
30000x30000 PNG of one colour is a few KB) costs nothing; a truncated file is refused;
EXIF orientation is applied and the image converted to RGB. What comes out is a PNG of
that RGB image, which the API stores as the job's input.

Memory: a data URI is decoded into one buffer of its exact size, and Pillow reads that
buffer in place, a PNG's text chunks left out (:mod:`ovis_server.inputs.image_bytes`):
judging a 16 MiB body costs its parsed text and its decoded bytes, no more.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

from ovis_server.inputs.fetch import FetchError, FetchPolicy, Resolver, fetch_into
from ovis_server.inputs.image_bytes import without_png_text

if TYPE_CHECKING:
    from ovis_server.config import Settings

FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 50 * 1000 * 1000  # RunComfy's recommended ceiling for an input file
# Why a value is no input image a client can send (after the field's name).
NOT_AN_IMAGE_SOURCE = "must be an https URL or a data:image/...;base64, URI"
_DECODE_STEP = 4 << 18  # characters of base64 decoded at once (1 MiB)
_DATA_URI = re.compile(r"data:(image/[A-Za-z0-9.+-]+)?((?:;[A-Za-z0-9=.+-]+)*);base64,", re.I)


class ImageInputError(ValueError):
    """The input image cannot be used; the message says why, for the client."""


@dataclass(frozen=True)
class ImagePolicy:
    fetch: FetchPolicy
    max_pixels: int = DEFAULT_MAX_PIXELS


def image_policy_from_settings(settings: Settings) -> ImagePolicy:
    """The operator's input-image rules: ``--max-input-image-size`` and
    ``--max-input-image-pixels``; private addresses and plain http only with
    ``--allow-private-image-urls``."""
    return ImagePolicy(
        FetchPolicy(
            max_bytes=settings.max_input_image_size,
            allow_private=settings.allow_private_image_urls,
            allow_http=settings.allow_private_image_urls,
        ),
        max_pixels=settings.max_input_image_pixels,
    )


@dataclass(frozen=True)
class InputImage:
    """A checked input image: RGB, upright, as PNG bytes."""

    png: bytes
    width: int
    height: int


def decode_data_uri(uri: str, max_bytes: int) -> bytearray:
    """The bytes of a ``data:image/...;base64,`` URI, bounded before decoding."""
    match = _DATA_URI.match(uri)
    if match is None:
        raise ImageInputError(NOT_AN_IMAGE_SOURCE)
    start = match.end()
    # Base64 gives 3 bytes for 4 characters: judge the size before decoding it.
    most = (len(uri) - start) // 4 * 3
    if most > max_bytes + 2:
        raise ImageInputError(f"is larger than {max_bytes} bytes")
    # A piece at a time (whole groups of 4 characters) into one buffer of the decoded
    # size, so that neither the text nor the bytes are copied whole: a data URI may be
    # 16 MiB, and several arrive at once.
    decoded = bytearray(most)
    filled = 0
    try:
        for piece in range(start, len(uri), _DECODE_STEP):
            part = base64.b64decode(uri[piece : piece + _DECODE_STEP], validate=True)
            decoded[filled : filled + len(part)] = part
            filled += len(part)
    except (binascii.Error, ValueError):
        raise ImageInputError("is not valid base64") from None
    del decoded[filled:]  # the padding's bytes
    return decoded


def check_image(data: bytes | bytearray, max_pixels: int) -> InputImage:
    """``data`` as a checked RGB image (ImageInputError if it is none or too large)."""
    try:
        with warnings.catch_warnings():
            # Our own pixel cap below is the bomb check; Pillow's warning is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(without_png_text(data))
    except Image.DecompressionBombError:
        raise ImageInputError(f"has more than {max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError):
        raise ImageInputError("is not an image (PNG, JPEG or WEBP)") from None
    with image:
        if image.format not in FORMATS:
            raise ImageInputError(f"is a {image.format or 'unknown'} image; send PNG, JPEG or WEBP")
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageInputError("has no pixels")
        if width * height > max_pixels:
            raise ImageInputError(
                f"is {width}x{height}, more than the {max_pixels} pixels this server takes"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
                upright = ImageOps.exif_transpose(image)
                rgb = upright.convert("RGB")
        except Image.DecompressionBombError:
            raise ImageInputError(f"has more than {max_pixels} pixels") from None
        except (OSError, ValueError, SyntaxError):
            raise ImageInputError("is truncated or damaged") from None
    out = io.BytesIO()
    rgb.save(out, format="PNG", compress_level=1)
    return InputImage(out.getvalue(), rgb.width, rgb.height)


async def load_input_image(
    image_url: str, policy: ImagePolicy, resolver: Resolver | None = None
) -> InputImage:
    """Fetch or decode ``image_url`` and check it: the image a job will use."""
    data: bytes | bytearray
    if image_url[:5].lower() == "data:":
        data = decode_data_uri(image_url, policy.fetch.max_bytes)
    else:
        try:
            data = bytearray()  # grown in place: no list of pieces joined into a copy
            await fetch_into(image_url, policy.fetch, data.extend, resolver)
        except FetchError as exc:
            raise ImageInputError(str(exc)) from None
    return check_image(data, policy.max_pixels)
