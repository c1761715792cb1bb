"""Input images through the API: ``tongyi-mai/z-image/turbo/image-to-image`` served beside
``tongyi-mai/z-image/turbo`` (no extra option), its ``image_url`` fetched or decoded once by
the API at submit, stored as the job's input and read by the worker from the file store;
every bad image a 422 naming ``image_url``, and the API's memory bounded while refusing."""

from __future__ import annotations

import base64
import io
import os
import sqlite3
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from ovis_server.catalogue.z_image_edit import STORED_IMAGE_REFERENCE, auto_size
from ovis_server.client import Client

from .bodies import Z_IMAGE_ID
from .helpers import REFUSED_URLS, Server, http_get, run_cli, start_server, wait_for, wait_result
from .test_image_inputs import body, data_uri, png_bomb, serving

EDIT_ID = f"{Z_IMAGE_ID}/image-to-image"
MB = 1000 * 1000
MiB = 1024 * 1024


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """Random pixels: a PNG that hardly compresses (about 3 bytes a pixel)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def rss(server: Server) -> int:
    """The API process's resident memory, in bytes (serve runs the API in-process)."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Z-Image-Turbo on the tiny build with a worker, image URLs on loopback allowed."""
    data_dir = tmp_path_factory.mktemp("i2i-serve")
    server = start_server(
        data_dir, "tiny", "--model-id", Z_IMAGE_ID, "--no-auth", "--allow-private-image-urls",
        timeout=120,
    )  # fmt: skip
    try:
        with server.client() as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, timeout=300)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The API alone (no worker), with the default destination rules."""
    data_dir = tmp_path_factory.mktemp("i2i-api")
    server = start_server(data_dir, "tiny", "--model-id", Z_IMAGE_ID, "--no-auth", "--no-worker")
    try:
        yield server
    finally:
        server.stop()


def stored_inputs(server: Server) -> list[str]:
    """The inputs of the jobs table, as stored."""
    (db,) = server.data_dir.glob("*.db")
    with sqlite3.connect(db) as connection:
        return [row[0] for row in connection.execute("SELECT input FROM jobs")]


def refused(client: httpx.Client, image_url: str) -> str:
    answer = client.post(f"/v1/models/{EDIT_ID}", json={"prompt": "x", "image_url": image_url})
    assert answer.status_code == 422, (image_url, answer.text)
    message: str = answer.json()["error_message"]
    assert "image_url" in message, message
    return message


# --- jobs that complete -----------------------------------------------------------------------


def test_serving_the_model_serves_its_image_to_image_variant(served: Server) -> None:
    with served.client() as client:
        ids = [row["model_id"] for row in client.get("/v1/models").json()["models"]]
        assert ids == [Z_IMAGE_ID, EDIT_ID, f"{Z_IMAGE_ID}/lora"]  # and its LoRA variant
        schema = client.get(f"/v1/models/{EDIT_ID}").json()["input_schema"]
        assert schema["required"] == ["prompt", "image_url"]


def test_a_data_uri_job_completes_at_the_inputs_aspect_ratio(served: Server) -> None:
    source = noise_png(120, 90)
    with served.client() as client:
        answer = client.post(
            f"/v1/models/{EDIT_ID}",
            json={"prompt": "a red bicycle", "image_url": data_uri(source), "seed": 3,
                  "num_inference_steps": 2, "strength": 0.5},
        )  # fmt: skip
        assert answer.status_code == 200, answer.text
        request_id = answer.json()["request_id"]
        result = wait_result(client, request_id, timeout=300)
        assert result["status"] == "succeeded", result
        assert result["model_id"] == EDIT_ID
        image = Image.open(io.BytesIO(http_get(result["output"]["image"]).content))
        assert image.size == auto_size(120, 90)
    # The job row keeps a short reference, not the data URI; the image is in the store.
    (row,) = [text for text in stored_inputs(served) if "a red bicycle" in text]
    assert len(row) < 1000
    assert "base64" not in row
    (stored,) = [path for path in served.data_dir.rglob("input-0.png") if request_id in str(path)]
    with Image.open(stored) as kept:
        assert kept.size == (120, 90)
    with served.client() as client:  # DELETE takes the input with the outputs
        assert client.delete(f"/v1/requests/{request_id}").status_code == 204
    assert not stored.exists()


def test_an_http_url_on_loopback_completes_with_the_opt_in(served: Server) -> None:
    source = body(noise_png(64, 64, seed=1), ("Content-Type", "image/png"))
    with serving(source) as url, served.client() as client:
        answer = client.post(
            f"/v1/models/{EDIT_ID}",
            json={"prompt": "snow", "image_url": f"{url}/in.png", "image_size": "square",
                  "num_inference_steps": 2, "seed": 1},
        )  # fmt: skip
        assert answer.status_code == 200, answer.text
        result = wait_result(client, answer.json()["request_id"], timeout=300)
    assert result["status"] == "succeeded", result
    image = Image.open(io.BytesIO(http_get(result["output"]["image"]).content))
    assert image.size == (512, 512)


def test_the_sdk_sends_a_local_file_as_a_data_uri(served: Server, tmp_path: Path) -> None:
    source = tmp_path / "photo.png"
    source.write_bytes(noise_png(96, 64, seed=4))
    with Client(served.base_url, None) as client:
        result = client.run(
            {"prompt": "autumn", "image_url": str(source), "num_inference_steps": 2, "seed": 2},
            EDIT_ID,
            timeout=300,
        )
    assert result.image_url is not None
    image = Image.open(io.BytesIO(http_get(result.image_url).content))
    assert image.size == auto_size(96, 64)
    with Client(served.base_url, None) as client:  # a Path too
        submitted = client.submit({"prompt": "x", "image_url": source}, EDIT_ID)
        assert client.wait(submitted.request_id, timeout=300).status == "succeeded"


def test_the_cli_runs_image_to_image_from_a_local_file(served: Server, tmp_path: Path) -> None:
    source = tmp_path / "in.jpg"
    Image.open(io.BytesIO(noise_png(80, 80, seed=5))).save(source, format="JPEG")
    out = tmp_path / "out.png"
    done = run_cli(
        "run", "a watercolour", "-o", str(out), "--image", str(source), "--strength", "0.8",
        "--steps", "2", "--model-id", EDIT_ID, "--url", served.base_url,
    )  # fmt: skip
    assert "saved" in done.stderr
    with Image.open(out) as image:
        assert image.size == auto_size(80, 80)


def test_a_60_mb_image_is_refused_without_the_api_growing(served: Server) -> None:
    big = b"\x89PNG\r\n\x1a\n" + bytes(60 * MB)
    with serving(body(big, ("Content-Type", "image/png"))) as url, served.client() as client:
        before = rss(served)
        message = refused(client, f"{url}/big.png")
        assert "larger than" in message
        assert rss(served) - before < 100 * MB


# --- refusals, by the API alone ---------------------------------------------------------------


def test_a_6_mib_data_uri_png_is_accepted(api_only: Server) -> None:
    # As RunComfy's ComfyUI partner nodes send images: up to 6 MiB a PNG.
    source = noise_png(1440, 1440)
    assert 5.5 * MiB < len(source) <= 6.5 * MiB
    with api_only.client() as client:
        answer = client.post(
            f"/v1/models/{EDIT_ID}", json={"prompt": "x", "image_url": data_uri(source)}
        )
        assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    "url", REFUSED_URLS + [u.replace("http://", "https://", 1) for u in REFUSED_URLS]
)
def test_every_refused_address_form_is_a_422_naming_image_url(api_only: Server, url: str) -> None:
    with api_only.client() as client:
        refused(client, url)


@pytest.mark.parametrize("image_size", ["auto", "square"])
def test_the_stored_images_reference_is_no_input_a_client_can_send(
    api_only: Server, image_size: str
) -> None:
    """What image_url becomes in the job row once its image is stored: sent by a client, it
    names no image of its own (and with auto, no size)."""
    with api_only.client() as client:
        answer = client.post(
            f"/v1/models/{EDIT_ID}",
            json={"prompt": "x", "image_url": STORED_IMAGE_REFERENCE, "image_size": image_size},
        )
    assert answer.status_code == 422, answer.text
    assert answer.json()["error_message"] == (
        "image_url: must be an https URL or a data:image/...;base64, URI"
    )


def test_http_needs_the_opt_in(api_only: Server) -> None:
    with serving(body(noise_png(32, 32))) as url, api_only.client() as client:
        assert "https" in refused(client, f"{url}/in.png")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (noise_png(64, 64)[:400], "truncated"),
        (b"just some text, named .png", "not an image"),
    ],
)
def test_what_is_no_image_is_a_422(api_only: Server, data: bytes, why: str) -> None:
    with api_only.client() as client:
        assert why in refused(client, data_uri(data))


def test_a_png_bomb_is_refused_without_the_api_growing(api_only: Server) -> None:
    with api_only.client() as client:
        before = rss(api_only)
        assert "pixels" in refused(client, data_uri(png_bomb()))
        assert rss(api_only) - before < 100 * MB
    assert stored_inputs(api_only) == [] or all("stored:" in row for row in stored_inputs(api_only))


def test_four_concurrent_16_mib_submits_grow_the_api_by_less_than_150_mb(
    api_only: Server,
) -> None:
    # Bodies just under the 16 MiB cap: data URIs of a PNG padded with a text chunk.
    image = noise_png(64, 64)
    padding = 16 * MiB * 3 // 4 - len(image) - 4096
    payload = data_uri(image[:-12] + _text_chunk(padding) + image[-12:])
    bodies = [f'{{"prompt": "x", "image_url": "{payload}"}}'.encode() for _ in range(4)]
    assert all(15 * MiB < len(one) <= 16 * MiB for one in bodies)
    with api_only.client() as warm:  # the first submit's imports are not what is measured
        warm.post(f"/v1/models/{EDIT_ID}", json={"prompt": "x", "image_url": data_uri(image)})
    before = rss(api_only)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss(api_only))
            done.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    answers: list[int] = []

    def send(one: bytes) -> None:
        with api_only.client() as client:
            answers.append(
                client.post(
                    f"/v1/models/{EDIT_ID}", content=one,
                    headers={"Content-Type": "application/json"},
                ).status_code
            )  # fmt: skip

    threads = [threading.Thread(target=send, args=(one,)) for one in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    sampler.join()
    assert answers == [200] * 4
    assert peak[0] - before < 150 * MB, (peak[0] - before) / MB
    # And gives it back: glibc's malloc kept 106 MB resident after such a burst until the
    # API fixed its mmap threshold (api/large_buffers.py).
    wait_for(lambda: rss(api_only) - before < 40 * MB, timeout=5, interval=0.1)


def _text_chunk(size: int) -> bytes:
    data = b"pad\x00" + b"x" * size
    return (
        struct.pack(">I", len(data))
        + b"tEXt"
        + data
        + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    )


def test_a_body_over_the_image_cap_is_a_413(api_only: Server) -> None:
    with api_only.client() as client:
        answer = client.post(
            f"/v1/models/{EDIT_ID}", content=b"{" + b" " * (16 * MiB) + b"}",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert answer.status_code == 413
        # Other models keep the 1 MiB default.
        small = client.post(
            f"/v1/models/{Z_IMAGE_ID}", content=b"{" + b" " * (2 * MiB) + b"}",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert small.status_code == 413


# --- OpenAI's images.edit ---------------------------------------------------------------------


def test_openai_edits_run_on_the_image_to_image_variant(served: Server) -> None:
    with openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused") as sdk:
        answer = sdk.images.edit(
            model="z-image-turbo",  # the text-to-image alias: its image-to-image variant
            image=("in.png", noise_png(64, 48, seed=6), "image/png"),
            prompt="the same, in winter",
            n=2,
            size="256x192",
            response_format="b64_json",
            extra_body={"seed": 4, "num_inference_steps": 2, "strength": 0.7},
        )
        assert answer.data is not None
        assert len(answer.data) == 2
        for data in answer.data:
            assert data.b64_json is not None
            with Image.open(io.BytesIO(base64.b64decode(data.b64_json))) as image:
                assert image.size == (256, 192)
        assert answer.size == "256x192"
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.images.edit(
                model="z-image-turbo", image=("t.png", b"not an image", "image/png"), prompt="x"
            )
        assert "image_url" in str(caught.value.body)


def test_openai_edits_on_a_model_without_an_image_input_is_a_400(tmp_path: Path) -> None:
    server = start_server(tmp_path, "tiny", "--no-auth", "--no-worker")  # Ovis-Image only
    try:
        with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused") as sdk:
            with pytest.raises(openai.BadRequestError) as caught:
                sdk.images.edit(
                    model="ovis-image", image=("in.png", noise_png(32, 32), "image/png"),
                    prompt="x",
                )  # fmt: skip
            assert "takes no input image" in str(caught.value.body)
            assert caught.value.body["param"] == "model"  # type: ignore[index]
    finally:
        server.stop()


# --- the README's examples, as written ---------------------------------------------------------


def test_the_readme_examples_run_as_written(served: Server, tmp_path: Path) -> None:
    from .test_dialects import readme_block

    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "OVIS_SERVER_URL": served.base_url,
        "OVIS_SERVER_TOKEN": "unused",  # the served fixture runs --no-auth
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    shell = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_block("image-to-image", "bash")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    assert '"request_id"' in shell.stdout
    assert '"b64_json"' in shell.stdout
    for marker in ("image-to-image-python", "image-to-image-openai"):
        subprocess.run(
            [sys.executable, "-c", readme_block(marker, "python")],
            cwd=tmp_path, env=env, timeout=600, check=True,
        )  # fmt: skip
    for name in ("night.png", "night-python.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size == auto_size(320, 240)
    with Image.open(tmp_path / "night-openai.png") as image:
        assert image.size == (256, 192)
