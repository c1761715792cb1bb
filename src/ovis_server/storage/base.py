"""The file store interface and the shape of its keys."""

from __future__ import annotations

import re
from typing import Protocol

# "<request_id>/<name>.<ext>": both parts from a closed alphabet, so a key can never
# climb out of the store's root, whatever a client puts in a URL.
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}/[A-Za-z0-9_-]{1,64}\.[a-z0-9]{2,5}$")
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# What the worker writes to test that the store takes writes again (outside the key space).
WRITE_CHECK_NAME = ".write-check"
# A job's input image, under its request id.
INPUT_IMAGE_NAME = "input-0.png"


class InvalidKeyError(ValueError):
    """Not a key this store could have written."""


def check_key(key: str) -> str:
    if not KEY_PATTERN.fullmatch(key):
        raise InvalidKeyError(f"not a valid file key: {key!r}")
    return key


def check_request_id(request_id: str) -> str:
    if not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise InvalidKeyError(f"not a valid request id: {request_id!r}")
    return request_id


def output_key(request_id: str, index: int, extension: str) -> str:
    return check_key(f"{request_id}/{index}.{extension}")


def input_image_key(request_id: str) -> str:
    """The file store key of a job's input image (the API stores it at submit, the worker
    reads it), whatever the model."""
    return f"{request_id}/{INPUT_IMAGE_NAME}"


class FileStore(Protocol):
    """Keeps output files and hands out URLs that a plain GET can fetch until they expire."""

    def put(self, key: str, data: bytes, media_type: str) -> None:
        """Store a file; OSError when the store cannot take it (a full or read-only disk,
        a refused bucket), which the worker treats as the store's problem, not the job's."""
        ...

    def check_writable(self) -> None:
        """A test write (then removed); OSError while the store cannot take writes."""
        ...

    def url(self, key: str, *, base_url: str, expires_in: int) -> str: ...

    def read(self, key: str) -> bytes:
        """The file's bytes; FileNotFoundError when it is gone."""
        ...

    def delete_request(self, request_id: str) -> int: ...
