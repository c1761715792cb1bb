"""What Pillow is given to judge an input image: the one buffer the bytes arrived in, read
through views, a PNG's text chunks left out (their metadata is thrown away anyway, and
Pillow inflates zTXt chunks up to 64 MB)."""

from __future__ import annotations

import base64
import io
import struct
import tracemalloc
import zlib

import pytest
from PIL import Image

from ovis_server.inputs.image_bytes import BufferReader, without_png_text
from ovis_server.inputs.images import ImageInputError, check_image, decode_data_uri

MB = 1000 * 1000


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(size: tuple[int, int] = (8, 8), color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def with_chunks(image: bytes, chunks: bytes, after_header: bool = True) -> bytes:
    """``image`` with ``chunks`` after its IHDR (as text is usually written) or before IEND."""
    at = 33 if after_header else len(image) - 12
    return image[:at] + chunks + image[at:]


def ztxt_bomb(count: int = 60) -> bytes:
    """A PNG of ``count`` zTXt chunks of 1 MB of zeros each: about 1 KB apiece compressed."""
    text = zlib.compress(b"\0" * (MB - 1), 9)
    return with_chunks(png(), b"".join(chunk(b"zTXt", b"k%d\0\0" % i + text) for i in range(count)))


def test_a_png_of_compressed_text_is_judged_without_inflating_it() -> None:
    bomb = ztxt_bomb()
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        image = check_image(bomb, 40_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (image.width, image.height) == (8, 8)
    assert peak < 5 * MB, peak  # Pillow alone inflates all 60 MB


@pytest.mark.parametrize("after_header", [True, False], ids=["before-IDAT", "after-IDAT"])
def test_text_chunks_change_nothing_in_the_image(after_header: bool) -> None:
    text = chunk(b"tEXt", b"prompt\0" + b"{}" * 50_000) + chunk(b"iTXt", b"k\0\0\0\0\0v")
    plain = check_image(png(color="blue"), 1_000_000)
    with_text = check_image(with_chunks(png(color="blue"), text, after_header), 1_000_000)
    assert with_text == plain


def test_a_png_truncated_inside_a_chunk_still_reads_as_damaged() -> None:
    data = with_chunks(png((64, 48)), chunk(b"tEXt", b"k\0v"))
    with pytest.raises(ImageInputError, match=r"truncated or damaged|not an image"):
        check_image(data[: len(data) - 40], 1_000_000)


def test_a_data_uri_decodes_to_its_exact_bytes_in_one_buffer() -> None:
    for size in (0, 1, 2, 3, 4, (1 << 20) * 3 // 4 + 1, 3 << 20):  # padding 0-2; pieces
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        assert decode_data_uri(uri, 8 * MB) == data, size


def test_a_buffer_reader_reads_its_pieces_as_one_file() -> None:
    pieces = [memoryview(b"abc"), memoryview(bytearray(b"defg")), memoryview(b"h")]
    reader = BufferReader(pieces)
    assert reader.read(2) == b"ab"
    assert reader.read(3) == b"cde"  # across a piece
    assert reader.read() == b"fgh"
    assert reader.read(1) == b""
    assert reader.seek(-2, io.SEEK_END) == 6
    assert reader.read(5) == b"gh"
    reader.seek(1)
    buffer = bytearray(4)
    assert reader.readinto(buffer) == 4
    assert buffer == b"bcde"
    assert reader.seek(-3, io.SEEK_CUR) == 2
    assert reader.tell() == 2


def test_only_text_chunks_are_left_out() -> None:
    image = png()
    reader = without_png_text(with_chunks(image, chunk(b"zTXt", b"k\0\0" + zlib.compress(b"v"))))
    assert reader.read() == image
    other = with_chunks(image, chunk(b"prVt", b"private"))  # kept: Pillow decides
    assert without_png_text(other).read() == other
    assert without_png_text(b"GIF89a...").read() == b"GIF89a..."
