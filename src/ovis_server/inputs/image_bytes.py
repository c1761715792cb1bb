"""An input image's bytes as Pillow reads them: without copies, and without a PNG's text.

A PNG's text chunks (tEXt, zTXt, iTXt) are metadata the API throws away (the job's input
is re-encoded), but Pillow reads each one whole, copies it three times over and inflates
zTXt up to 64 MB in all: a 60 KB PNG of compressed text chunks held 64 MB while it was
judged. Text chunks are skipped here before Pillow sees the file, and the rest is read
through views of the one buffer the bytes arrived in.
"""

from __future__ import annotations

import bisect
import io
from itertools import accumulate
from typing import IO, cast

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt"})


def without_png_text(data: bytes | bytearray) -> IO[bytes]:
    """``data`` as a file; a PNG's text chunks left out (the rest of the file as it is, so
    that a truncated or damaged PNG reads as damaged as it is)."""
    view = memoryview(data)
    if view[:8] != PNG_SIGNATURE:
        return cast(IO[bytes], BufferReader([view]))
    pieces: list[memoryview] = []
    kept_from = 0  # where the run of chunks being kept started
    position = 8
    while position + 12 <= len(view):
        length = int.from_bytes(view[position : position + 4], "big")
        end = position + 12 + length  # length, type, data, CRC
        if end > len(view):
            break
        if bytes(view[position + 4 : position + 8]) in TEXT_CHUNKS:
            pieces.append(view[kept_from:position])
            kept_from = end
        position = end
    pieces.append(view[kept_from:])
    return cast(IO[bytes], BufferReader([piece for piece in pieces if len(piece)]))


class BufferReader(io.BufferedIOBase):
    """A read-only, seekable file over pieces of memory, read in order as one file."""

    def __init__(self, pieces: list[memoryview]) -> None:
        super().__init__()
        self._pieces = pieces
        self._starts = list(accumulate((len(piece) for piece in pieces), initial=0))
        self._position = 0

    @property
    def size(self) -> int:
        return self._starts[-1]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self._position + size)
        if end <= self._position:
            return b""
        index = bisect.bisect_right(self._starts, self._position) - 1
        parts = []
        while self._position < end:
            offset = self._position - self._starts[index]
            piece = self._pieces[index][offset : offset + end - self._position]
            parts.append(piece)
            self._position += len(piece)
            index += 1
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    read1 = read

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
