"""Input images (ovis_server.inputs): fetched under the destination rules, bounded in time
and size, judged by Pillow. Real HTTP servers on 127.0.0.1; no API server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from PIL import Image

from ovis_server.inputs.fetch import FetchError, FetchPolicy, fetch_into
from ovis_server.inputs.images import (
    ImageInputError,
    ImagePolicy,
    check_image,
    decode_data_uri,
    load_input_image,
)
from ovis_server.webhooks.destinations import IPAddress, resolve

from .helpers import REFUSED_URLS

MB = 1 << 20
# Loopback test servers are reached only with the operator's opt-ins.
OPEN = FetchPolicy(max_bytes=8 * MB, allow_private=True, allow_http=True, total_seconds=5)
STRICT = FetchPolicy(max_bytes=8 * MB, allow_http=True)

Answer = Callable[[BaseHTTPRequestHandler], None]


@contextlib.contextmanager
def serving(answer: Answer) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 whose every GET ``answer`` writes; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with contextlib.suppress(OSError):
                answer(self)

        def log_message(self, *_: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    http.daemon_threads = True
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{http.server_port}"
    finally:
        http.shutdown()
        http.server_close()


def body(data: bytes, *headers: tuple[str, str], status: int = 200) -> Answer:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        names = {name.lower() for name, _ in headers}
        if "content-length" not in names:
            handler.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    return answer


def png(size: tuple[int, int] = (64, 48), mode: str = "RGB", **save: Any) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, "red" if mode != "P" else 3).save(out, format="PNG", **save)
    return out.getvalue()


def png_bomb(side: int = 30000) -> bytes:
    """A valid one-colour PNG of side x side pixels (1 bit grey), about 100 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    packer = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def load(url: str, policy: FetchPolicy = OPEN, max_pixels: int = 40_000_000) -> Any:
    return asyncio.run(load_input_image(url, ImagePolicy(policy, max_pixels)))


# --- what the bytes may be -------------------------------------------------------------


def test_a_png_data_uri_becomes_an_rgb_png() -> None:
    image = load(data_uri(png((40, 24), "RGBA")))
    assert (image.width, image.height) == (40, 24)
    with Image.open(io.BytesIO(image.png)) as decoded:
        assert decoded.format == "PNG"
        assert decoded.mode == "RGB"
        assert decoded.getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied() -> None:
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.new("RGB", (64, 32), "blue").save(out, format="JPEG", exif=exif)
    image = check_image(out.getvalue(), 1_000_000)
    assert (image.width, image.height) == (32, 64)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_are_taken(fmt: str) -> None:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "green").save(out, format=fmt)
    assert check_image(out.getvalue(), 1_000_000).width == 16


def test_a_png_bomb_is_refused_without_decoding_it() -> None:
    bomb = png_bomb()
    assert len(bomb) < 200_000
    started = time.monotonic()
    with pytest.raises(ImageInputError, match="pixels"):
        check_image(bomb, 40_000_000)
    assert time.monotonic() - started < 5


def test_more_pixels_than_the_cap_is_refused() -> None:
    with pytest.raises(ImageInputError, match=r"64x48, more than the 1000 pixels"):
        check_image(png(), 1000)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (png()[: len(png()) // 2], "truncated or damaged"),
        (b"just some text, saved as picture.png\n" * 10, "not an image"),
        (b"", "not an image"),
    ],
    ids=["truncated", "text-named-png", "empty"],
)
def test_what_is_no_usable_image_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(ImageInputError, match=why):
        check_image(data, 1_000_000)


def test_a_gif_is_refused_by_its_content_not_its_name() -> None:
    out = io.BytesIO()
    Image.new("P", (8, 8)).save(out, format="GIF")
    with pytest.raises(ImageInputError, match="GIF image; send PNG, JPEG or WEBP"):
        load(data_uri(out.getvalue(), "image/png"))


def test_a_data_uri_over_the_size_cap_is_refused_before_decoding() -> None:
    uri = "data:image/png;base64," + "A" * (12 * MB)
    with pytest.raises(ImageInputError, match="larger than"):
        decode_data_uri(uri, 8 * MB)


@pytest.mark.parametrize(
    "uri", ["data:text/plain;base64,aGk=", "data:image/png,rawbytes", "data:image/png;base64,@@@"]
)
def test_malformed_data_uris_are_refused(uri: str) -> None:
    with pytest.raises(ImageInputError):
        load(uri)


# --- where it may come from --------------------------------------------------------------


def test_an_image_is_fetched_over_http_with_the_opt_ins() -> None:
    with serving(body(png(), ("Content-Type", "text/html"))) as url:
        image = load(f"{url}/cat.png")
    assert (image.width, image.height) == (64, 48)


def test_http_is_refused_without_the_opt_in() -> None:
    policy = FetchPolicy(max_bytes=MB, allow_private=True)
    with pytest.raises(ImageInputError, match="https"):
        load("http://example.com/cat.png", policy)


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_every_refused_address_form_is_refused_as_an_image_url(url: str) -> None:
    started = time.monotonic()
    with pytest.raises(ImageInputError) as refused:
        load(url, STRICT)
    assert "does not fetch http" not in str(refused.value)  # not for its scheme alone
    assert time.monotonic() - started < 5


def test_a_redirect_to_loopback_is_refused() -> None:
    """The first server passes the rules (a resolver standing in for public DNS); the
    address it redirects to does not."""

    async def public_dns(url: httpx.URL, allow_private: bool) -> IPAddress:
        if url.host == "images.example":
            return ipaddress.IPv4Address("127.0.0.1")
        return await resolve(url, allow_private=allow_private)

    reached: list[str] = []

    def inner(handler: BaseHTTPRequestHandler) -> None:
        reached.append(handler.path)
        body(png())(handler)

    with (
        serving(inner) as internal,
        serving(body(b"", ("Location", f"{internal}/secret"), status=302)) as outer,
    ):
        port = httpx.URL(outer).port
        policy = FetchPolicy(max_bytes=MB, allow_http=True)
        with pytest.raises(FetchError, match="loopback"):
            asyncio.run(
                fetch_into(
                    f"http://images.example:{port}/x.png", policy, bytearray().extend, public_dns
                )
            )
    assert reached == []


def test_a_redirect_within_the_rules_is_followed() -> None:
    with (
        serving(body(png())) as target,
        serving(body(b"", ("Location", f"{target}/real.png"), status=301)) as outer,
    ):
        assert load(f"{outer}/moved.png").width == 64


def test_fetches_share_one_tls_context(tls_contexts_made: list[dict[str, Any]]) -> None:
    """Each fetch makes an httpx client; none reads the CA bundle again (29 ms of CPU)."""
    with serving(body(png())) as url:
        for _ in range(3):
            assert load(f"{url}/x.png").width == 64
    assert len(tls_contexts_made) <= 1


def test_a_server_sending_a_byte_a_second_ends_within_the_total_timeout() -> None:
    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        for _ in range(1000):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(1)

    policy = FetchPolicy(max_bytes=MB, allow_private=True, allow_http=True, total_seconds=3)
    with serving(trickle) as url:
        started = time.monotonic()
        with pytest.raises(ImageInputError, match="within 3 s"):
            load(f"{url}/slow.png", policy)
        assert time.monotonic() - started < 5


def test_a_declared_size_over_the_cap_is_refused_before_reading() -> None:
    def huge(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(60 * MB))
        handler.end_headers()
        handler.wfile.write(bytes(MB))

    with serving(huge) as url, pytest.raises(ImageInputError, match="larger than"):
        load(f"{url}/big.png")


def test_an_undeclared_size_over_the_cap_stops_the_read() -> None:
    def chunked(handler: BaseHTTPRequestHandler) -> None:
        handler.protocol_version = "HTTP/1.1"
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        piece = bytes(MB)
        for _ in range(60):
            handler.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        handler.wfile.write(b"0\r\n\r\n")

    with serving(chunked) as url, pytest.raises(ImageInputError, match="larger than"):
        load(f"{url}/big.png")


def test_a_compressed_answer_is_not_inflated() -> None:
    packed = zlib.compress(png())
    answer = body(packed, ("Content-Encoding", "deflate"))
    with serving(answer) as url, pytest.raises(ImageInputError, match="Content-Encoding"):
        load(f"{url}/packed.png")


def test_an_error_status_is_refused_naming_it() -> None:
    with serving(body(b"nope", status=404)) as url, pytest.raises(ImageInputError, match="404"):
        load(f"{url}/missing.png")


def test_a_closed_port_is_unreachable() -> None:
    with serving(body(b"")) as url:
        closed = url
    with pytest.raises(ImageInputError, match="could not be reached"):
        load(f"{closed}/gone.png")
