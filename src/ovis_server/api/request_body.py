"""Reading a client's body: in one growing buffer, and its JSON nesting bounded before it
reaches ``json.loads``."""

from __future__ import annotations

import re
from itertools import accumulate

from fastapi import Request

from ovis_server.api.errors import INVALID_INPUT, ApiError

# Deeper than any input this API takes (image_size is 2), shallow enough that no parser
# on the way recurses into trouble.
MAX_JSON_DEPTH = 32

# JSON strings (with their escapes, up to the end if unterminated), which may hold
# brackets that nest nothing. Possessive: one pass, whatever the input.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NESTING = [0] * 256
for _open, _close in (b"[]", b"{}"):
    _NESTING[_open], _NESTING[_close] = 1, -1


def json_depth(body: bytes | bytearray) -> int:
    """How deep ``body``'s arrays and objects nest, read without parsing it (for malformed
    JSON, an estimate; the parser refuses it after)."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_NESTING.__getitem__, brackets)), default=0)


def check_json_depth(body: bytes | bytearray, limit: int = MAX_JSON_DEPTH) -> None:
    """422 for JSON nested deeper than ``limit``, before a recursive parser meets it."""
    if json_depth(body) > limit:
        raise ApiError(
            422,
            INVALID_INPUT,
            f"the JSON body nests arrays and objects deeper than {limit} levels",
        )


async def read_body(request: Request) -> bytearray:
    """The request's body, grown in one buffer as it arrives: no list of pieces joined
    into a second copy (a submit's body may be 16 MiB, and several arrive at once)."""
    body = bytearray()
    async for piece in request.stream():
        body += piece
    return body
