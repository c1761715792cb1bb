"""Every client's dialect: RunComfy's CLI catalogue calls, generic RunComfy clients'
``aspect_ratio``, and OpenAI's Images API through the official ``openai`` package."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from ovis_server.api.openai.errors import OpenAIError
from ovis_server.api.openai.serving import requested_size
from ovis_server.catalogue import OVIS_IMAGE, OvisImageInput
from ovis_server.catalogue.spec import ImageSizes
from ovis_server.storage.local import LocalFileStore
from ovis_server.storage.s3 import S3FileStore
from ovis_server.storage.signing import UrlSigner

from .bodies import OVIS_ID, OVIS_PATH
from .helpers import InProcessServer, ServerFactory, download, http_get, http_request, wait_result

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def token(server: InProcessServer) -> str:
    return server.token("dialects")


@pytest.fixture(scope="module")
def client(server: InProcessServer, token: str) -> Iterator[httpx.Client]:
    with server.client(token) as client:
        yield client


def submit_raw(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post(OVIS_PATH, json=body)
    assert response.status_code == 200, response.text
    request_id: str = response.json()["request_id"]
    return request_id


# --- RunComfy's CLI: runcomfy models {list,categories,get} ----------------------------------


def test_cli_models_list_reads_models_total_and_row_fields(client: httpx.Client) -> None:
    response = client.get("/v1/models?limit=100&offset=0&search=ovis")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total"] == 1
    (row,) = body["models"]
    assert row["model_id"] == OVIS_ID
    assert row["display_name"]
    assert row["categories"] == ["text-to-image"]
    assert row["price_unit"] == "output"
    assert isinstance(row["base_price_usd"], int | float)
    assert "input_schema" not in row


@pytest.mark.parametrize(
    "query",
    [
        "search=OVIS",  # case-insensitive, on the id
        "search=legible%20text",  # on the description
        "search=Ovis-Image",  # on the display name
        "category=text-to-image",
        "category=Text-To-Image",
        "kind=model",
        "limit=1",
        "limit=500",
    ],
)
def test_cli_filters_that_match(client: httpx.Client, query: str) -> None:
    body = client.get(f"/v1/models?limit=100&offset=0&{query}").json()
    assert body["total"] == 1
    assert [row["model_id"] for row in body["models"]] == [OVIS_ID]


@pytest.mark.parametrize(
    "query", ["search=no-such-model-anywhere", "category=text-to-video", "kind=workflow"]
)
def test_cli_filters_that_match_nothing(client: httpx.Client, query: str) -> None:
    body = client.get(f"/v1/models?limit=100&offset=0&{query}").json()
    assert body["total"] == 0
    assert body["models"] == []
    assert body["data"] == []


def test_offset_past_the_end_is_an_empty_page_of_all_matches(client: httpx.Client) -> None:
    body = client.get("/v1/models?limit=100&offset=1").json()
    assert body["models"] == []
    assert body["total"] == 1


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=501", "limit=x", "offset=-1", "kind=plugin", "include_schema=maybe"]
)
def test_bad_catalogue_filters_are_422(client: httpx.Client, query: str) -> None:
    response = client.get(f"/v1/models?{query}")
    assert response.status_code == 422
    assert response.json()["error_code"] == 422001


def test_include_schema_puts_each_models_input_schema_in_its_row(client: httpx.Client) -> None:
    body = client.get("/v1/models?limit=100&offset=0&include_schema=true").json()
    (row,) = body["models"]
    detail = client.get(f"/v1/models/{OVIS_ID}").json()
    assert row["input_schema"] == detail["input_schema"]
    assert row["input_schema"]["required"] == ["prompt"]


def test_cli_categories(client: httpx.Client) -> None:
    response = client.get("/v1/models/categories")
    assert response.status_code == 200, response.text
    assert response.json() == {"categories": ["text-to-image"]}


def test_cli_models_get(client: httpx.Client) -> None:
    # `runcomfy models get aidc-ai/ovis-image` sends no query; a query is tolerated.
    for path in (f"/v1/models/{OVIS_ID}", f"/v1/models/{OVIS_ID}?include_schema=true"):
        detail = client.get(path).json()
        assert detail["model_id"] == OVIS_ID
        assert detail["categories"] == ["text-to-image"]
        assert detail["input_schema"]["properties"]["prompt"]


def test_model_list_is_also_openais_list(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    (model,) = body["data"]
    assert model["id"] == OVIS_ID
    assert model["object"] == "model"
    assert isinstance(model["created"], int)
    assert model["owned_by"]


def test_catalogue_needs_a_token(server: InProcessServer) -> None:
    for path in ("/v1/models/categories", "/v1/models?search=ovis"):
        assert http_get(server.base_url + path).status_code == 401


# --- generic RunComfy clients: aspect_ratio, webhook_url ------------------------------------


@pytest.mark.parametrize(("ratio", "size"), [("16:9", (1024, 576)), ("9:16", (576, 1024))])
def test_aspect_ratio_submissions_complete_in_that_orientation(
    client: httpx.Client, ratio: str, size: tuple[int, int]
) -> None:
    # What avalla/mcp-runcomfy sends: the prompt, the model inputs, aspect_ratio and seed.
    body = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2, "aspect_ratio": ratio}
    request_id = submit_raw(client, {**body, "seed": 7})
    result = wait_result(client, request_id)
    assert result["status"] == "succeeded", result
    image = download(result["output"]["image"])
    assert image.size == size


@pytest.mark.parametrize(
    ("ratio", "size"),
    [
        ("1:1", (1024, 1024)),
        ("4:3", (1024, 768)),
        ("3:4", (768, 1024)),
        ("32:18", (1024, 576)),
        ("3:2", (1248, 832)),
        ("2:3", (832, 1248)),
        ("21:9", (1568, 672)),
        ("32:1", (2048, 64)),
    ],
)
def test_aspect_ratio_sizes(ratio: str, size: tuple[int, int]) -> None:
    validated = OvisImageInput.model_validate({"prompt": "x", "aspect_ratio": ratio})
    assert validated.dimensions() == size
    width, height = size
    assert width % 16 == 0
    assert height % 16 == 0
    # Not stored: the job's input carries the size the ratio settled on.
    assert "aspect_ratio" not in validated.model_dump()


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"aspect_ratio": "16:9", "image_size": "square"}, "aspect_ratio and image_size"),
        ({"aspect_ratio": "16:9", "image_size": {"width": 256, "height": 256}}, "image_size"),
        ({"aspect_ratio": "16x9"}, "aspect_ratio"),
        ({"aspect_ratio": "0:1"}, "aspect_ratio"),
        ({"aspect_ratio": "1.78"}, "aspect_ratio"),
        ({"aspect_ratio": "1000:1"}, "aspect_ratio"),
        ({"aspect_ratio": 1.78}, "aspect_ratio"),
        ({"aspect_ratio": ""}, "aspect_ratio"),
    ],
)
def test_bad_aspect_ratios_are_422_naming_it(
    client: httpx.Client, body: dict[str, Any], named: str
) -> None:
    response = client.post(OVIS_PATH, json={"prompt": "x", **body})
    assert response.status_code == 422, response.text
    assert response.json()["error_code"] == 422001
    assert named in response.json()["error_message"]


def test_aspect_ratio_is_not_in_the_published_schema(client: httpx.Client) -> None:
    # Accepted for clients that send it, not offered: image_size is the schema's way.
    detail = client.get(f"/v1/models/{OVIS_ID}").json()
    assert "aspect_ratio" not in detail["input_schema"]["properties"]


@pytest.mark.parametrize(
    ("query", "body", "message"),
    [
        ("", {"webhook_url": "ftp://example.com/hook"}, "webhook"),
        ("", {"webhook_url": 42}, "webhook"),
        (
            "",
            {"webhook": "https://example.com/a", "webhook_url": "https://example.com/b"},
            "webhook_url",
        ),
        ("", {"webhook_intermediate_status": True}, "webhook_intermediate_status"),
    ],
)
def test_webhook_url_in_the_body_is_the_webhook_parameter(
    client: httpx.Client, query: str, body: dict[str, Any], message: str
) -> None:
    # Judged as a webhook (not refused as an unknown input field).
    response = client.post(OVIS_PATH + query, json={"prompt": "x", **body})
    assert response.status_code == 422, response.text
    error = response.json()["error_message"]
    assert message in error
    assert "Extra inputs" not in error


# --- OpenAI's Images API, through the official SDK ------------------------------------------


def sdk_client(server: InProcessServer, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=token, max_retries=0)


@pytest.fixture(scope="module")
def openai_client(server: InProcessServer, token: str) -> Iterator[openai.OpenAI]:
    with sdk_client(server, token) as sdk:
        yield sdk


EXTENSIONS = {"num_inference_steps": 2}


def decoded(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_openai_generate_b64_json(openai_client: openai.OpenAI, client: httpx.Client) -> None:
    answer = openai_client.images.generate(
        model="ovis-image",
        prompt="a red bicycle",
        size="256x192",
        response_format="b64_json",
        extra_body={**EXTENSIONS, "seed": 3},
    )
    assert isinstance(answer.created, int)
    assert answer.data is not None
    (item,) = answer.data
    assert item.b64_json
    image = decoded(item.b64_json)
    assert image.size == (256, 192)
    assert image.format == "PNG"
    # The job went through the queue and shows in the token's request list.
    listed = client.get("/v1/requests").json()["requests"]
    assert any(entry["seed"] == 3 and entry["status"] == "succeeded" for entry in listed)


def test_openai_generate_url_two_images(openai_client: openai.OpenAI) -> None:
    answer = openai_client.images.generate(
        model=OVIS_ID,
        prompt="a blue kite",
        n=2,
        size="192x256",
        response_format="url",
        output_format="webp",
        quality="high",
        style="vivid",
        user="someone",
        extra_body=EXTENSIONS,
    )
    assert answer.data is not None
    assert len(answer.data) == 2
    urls = [item.url for item in answer.data]
    assert all(urls)
    assert len(set(urls)) == 2
    for url in urls:
        assert url
        image = download(url)  # a plain GET, no token
        assert image.size == (192, 256)
        assert image.format == "WEBP"


def test_openai_models_list(openai_client: openai.OpenAI) -> None:
    models = list(openai_client.models.list())
    assert [model.id for model in models] == [OVIS_ID]
    assert models[0].object == "model"


@pytest.mark.parametrize("size", ["100x100", "256", "4096x4096", "256x0", "big", "256x256x2"])
def test_openai_bad_size_is_a_400_in_openais_shape(openai_client: openai.OpenAI, size: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.images.generate(model="ovis-image", prompt="x", size=size)
    assert caught.value.status_code == 400
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "size"
    assert error["type"] == "invalid_request_error"
    assert "size" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "n": 5}, "n"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "   "}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "response_format": "jpeg"}, "response_format"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "num_inference_steps": 500}, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": 0}, "guidance_scale"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "image_size": "square"}, "image_size"),
        ({"prompt": "x", "stream": True}, "stream"),
        ({"prompt": "x", "size": 256}, "size"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "n": "2"}, "n"),
        ({"prompt": ["x"]}, "prompt"),
        ({"prompt": "x", "seed": 2**63}, "seed"),
        ({"prompt": "x", "quality": "x" * 1000}, "quality"),
    ],
)
def test_openai_bad_parameters_are_400s_naming_them(
    client: httpx.Client, body: dict[str, Any], param: str
) -> None:
    response = client.post("/v1/images/generations", json={"size": "256x256", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"[]", b"null", b'"prompt"', b'{"prompt": "x", "size": "\xff"}']
)
def test_openai_malformed_bodies_are_400s(client: httpx.Client, raw: bytes) -> None:
    response = client.post(
        "/v1/images/generations", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_openai_unknown_model_is_a_404(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.images.generate(model="dall-e-3", prompt="x", size="256x256")
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"


def test_openai_bad_token_is_a_401(server: InProcessServer) -> None:
    with (
        sdk_client(server, "ovis_nope") as bad,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        bad.images.generate(model="ovis-image", prompt="x", size="256x256")
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "invalid_api_key"
    response = http_request(
        "POST", f"{server.base_url}/v1/images/generations", json={"prompt": "x"}
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_openai_edits_and_variations_are_400s(
    openai_client: openai.OpenAI, client: httpx.Client
) -> None:
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.images.edit(image=("in.png", png.getvalue()), prompt="x")
    assert "not supported" in caught.value.message
    # Newer SDKs mark create_variation deprecated (OpenAI retired DALL-E 2's variations).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(openai.BadRequestError):
            openai_client.images.create_variation(image=("in.png", png.getvalue()))
    for path in ("/v1/images/edits", "/v1/images/variations"):
        error = client.post(path, json={"prompt": "x"}).json()["error"]
        assert error["code"] == "unsupported_operation"


@pytest.mark.usefixtures("aws_credentials")
def test_file_stores_read_back_what_they_keep(tmp_path: Path) -> None:
    # b64_json answers read the image back from the file store: local or S3.
    import boto3
    from moto import mock_aws

    key = "0f6d7a52-0000-4000-8000-000000000000/0.png"
    local = LocalFileStore(tmp_path, UrlSigner("s" * 32))
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="outputs")
        for store in (local, S3FileStore("outputs", "results", s3)):
            with pytest.raises(FileNotFoundError):
                store.read(key)
            store.put(key, b"\x89PNG...", "image/png")
            assert store.read(key) == b"\x89PNG..."


def test_openai_over_the_limit_is_a_429_and_submits_none(fresh_server: ServerFactory) -> None:
    # One queued request per token, and no worker to run it: n=2 gets one job in, then
    # the limit; the answer is OpenAI's 429 and the job already in leaves the queue.
    server = fresh_server(no_worker=True, max_queued_per_token=1)
    token = server.token("limited")
    with sdk_client(server, token) as sdk, pytest.raises(openai.RateLimitError) as caught:
        sdk.images.generate(model="ovis-image", prompt="x", n=2, size="256x256")
    assert caught.value.response.headers["Retry-After"]
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "rate_limit_exceeded"
    with server.client(token) as client:
        (request,) = client.get("/v1/requests").json()["requests"]
    assert request["status"] == "cancelled"


# --- the README's examples work as written --------------------------------------------------


def readme_block(marker: str, language: str) -> str:
    """The fenced block right after ``<!-- readme-test: MARKER -->``."""
    text = README.read_text()
    match = re.search(rf"<!-- readme-test: {marker} -->\n```{language}\n(.*?)\n```", text, re.S)
    assert match, f"README has no {language} block marked {marker}"
    return match.group(1)


@pytest.mark.parametrize(
    ("marker", "language", "images"),
    [
        ("runcomfy-dialect", "bash", {"lighthouse.png": (1024, 576)}),
        ("openai-sdk", "python", {"bakery-0.png": (1024, 768), "bakery-1.png": (1024, 768)}),
        ("openai-curl", "bash", {"menu.png": (1024, 1024)}),
    ],
)
def test_readme_examples_run_as_written(
    tmp_path: Path,
    server: InProcessServer,
    token: str,
    marker: str,
    language: str,
    images: dict[str, tuple[int, int]],
) -> None:
    block = readme_block(marker, language)
    command = ["bash", "-euo", "pipefail", "-c", block]
    if language == "python":
        command = [sys.executable, "-c", block]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env={**os.environ, "OVIS_SERVER_URL": server.base_url, "OVIS_SERVER_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    for name, size in images.items():
        with Image.open(tmp_path / name) as image:
            assert image.size == size


def test_openai_sizes_are_judged_by_the_models_spec() -> None:
    """``size`` is checked against the served model's ``ModelSpec.sizes``, not constants of
    one family; a model without sizes judges a WxH itself."""
    assert OVIS_IMAGE.sizes is not None
    assert requested_size("1024x768", OVIS_IMAGE.sizes) == {"width": 1024, "height": 768}
    coarse = ImageSizes(multiple=32, min_side=64, max_side=512, presets={})
    assert requested_size("128x64", coarse) == {"width": 128, "height": 64}
    assert requested_size("auto", coarse) == "square_hd"
    with pytest.raises(OpenAIError, match="multiples of 32 from 64 to 512") as refused:
        requested_size("1024x1024", coarse)
    assert refused.value.param == "size"
    with pytest.raises(OpenAIError, match="multiples of 32"):
        requested_size("80x64", coarse)
    assert requested_size("1000x7", None) == {"width": 1000, "height": 7}
    with pytest.raises(OpenAIError, match="Invalid size"):
        requested_size("large", None)
