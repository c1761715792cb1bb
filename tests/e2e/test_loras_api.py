"""LoRAs through the API and a real worker: ``tongyi-mai/z-image/turbo/lora`` served beside
``tongyi-mai/z-image/turbo`` (no extra option), each LoRA path judged at submit (a 422
naming ``loras``), the operator's LoRAs listed by ``GET /v1/loras`` to token holders, the
worker's image equal to the stock ZImagePipeline's with the LoRA loaded, and a LoRA that
cannot be had or does not fit failing its job alone."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from ovis_server.config import Settings
from ovis_server.engine.families import get_family

from .bodies import Z_IMAGE_ID
from .helpers import (
    REFUSED_URLS,
    TOLERANCE,
    InProcessServer,
    download,
    http_get,
    pixels,
    run_cli,
    wait_for,
    wait_result,
)
from .test_image_inputs import body, serving
from .test_loras import make_lora, request, stock_with, wrong_keys_lora

LORA_ID = f"{Z_IMAGE_ID}/lora"
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")


@pytest.fixture(scope="module")
def tiny_pipeline() -> Any:
    """The tiny Z-Image pipeline as ``--model tiny`` builds it (the same seeded weights)."""
    return get_family("z-image").build_tiny()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_pipeline: Any
) -> Iterator[InProcessServer]:
    """Z-Image-Turbo on the tiny build with a worker; two operator LoRAs (one for another
    model), URL downloads allowed from loopback (the image opt-in)."""
    data_dir = tmp_path_factory.mktemp("lora-serve")
    loras = data_dir / "loras"
    make_lora(tiny_pipeline.transformer, loras / "watercolour.safetensors", seed=1)
    wrong_keys_lora(loras / "for-another-model.safetensors")
    (loras / "pickled.bin").write_bytes(pickle.dumps({"w": 1}))
    (loras / "notes.txt").write_text("not a LoRA")
    settings = Settings(
        model="tiny", model_ids=(Z_IMAGE_ID,), data_dir=data_dir, lora_downloads=("url",),
        allow_private_image_urls=True, max_batch="1",
    )  # fmt: skip
    server = InProcessServer(settings)
    try:
        server.wait_until_ready(timeout=300)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(served: InProcessServer) -> Iterator[httpx.Client]:
    with served.client(served.token("lora-tests")) as http:
        yield http


def submit(client: httpx.Client, model: str = LORA_ID, **fields: Any) -> str:
    body = {"prompt": "a lighthouse in a storm, oil painting", "num_inference_steps": 2,
            "image_size": {"width": 128, "height": 128}, "seed": 7, **fields}  # fmt: skip
    answer = client.post(f"/v1/models/{model}", json=body)
    assert answer.status_code == 200, answer.text
    request_id: str = answer.json()["request_id"]
    return request_id


def refused(client: httpx.Client, path: str) -> str:
    answer = client.post(
        f"/v1/models/{LORA_ID}", json={"prompt": "x", "loras": [{"path": path, "scale": 1}]}
    )
    assert answer.status_code == 422, (path, answer.text)
    reply = answer.json()
    assert reply["error_code"] == 422001
    assert "loras" in reply["error_message"], reply
    assert reply["detail"][0]["loc"] == ["loras", "0", "path"]
    message: str = reply["error_message"]
    return message


def test_the_lora_variant_is_served_with_its_model_and_listed_with_its_schema(
    client: httpx.Client,
) -> None:
    listed = client.get("/v1/models").json()
    assert [row["model_id"] for row in listed["models"]] == [
        Z_IMAGE_ID, f"{Z_IMAGE_ID}/image-to-image", LORA_ID,
    ]  # fmt: skip
    detail = client.get(f"/v1/models/{LORA_ID}")
    assert detail.status_code == 200, detail.text
    schema = detail.json()["input_schema"]
    assert schema["properties"]["loras"]["maxItems"] == 3


def test_get_loras_lists_the_operators_loras_to_token_holders(
    served: InProcessServer, client: httpx.Client
) -> None:
    assert http_get(f"{served.base_url}/v1/loras").status_code == 401
    assert http_get(f"{served.base_url}/v1/loras",
                     headers={"Authorization": "Bearer ovis_wrong"}).status_code == 401  # fmt: skip
    answer = client.get("/v1/loras")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "loras": [{"name": "for-another-model"}, {"name": "watercolour"}],
        "downloads": ["url"],
    }


def test_a_lora_job_gives_the_stock_pipelines_image_with_the_lora(
    client: httpx.Client, served: InProcessServer, tiny_pipeline: Any
) -> None:
    lora = served.data_dir / "loras" / "watercolour.safetensors"
    result = wait_result(client, submit(client, loras=[{"path": "watercolour", "scale": 1.5}]))
    assert result["status"] == "succeeded", result
    image = download(result["output"]["image"])
    wanted = request(prompt="a lighthouse in a storm, oil painting", num_inference_steps=2,
                     seed=7)  # fmt: skip
    stock = stock_with(tiny_pipeline, wanted, {lora: 1.5})
    assert np.abs(pixels(image) - pixels(stock)).max() <= TOLERANCE
    # Scale 0: the base model's image, as Z-Image-Turbo's own id gives it.
    zero = wait_result(client, submit(client, loras=[{"path": "watercolour", "scale": 0}]))
    base = wait_result(client, submit(client, Z_IMAGE_ID))
    assert zero["status"] == base["status"] == "succeeded", (zero, base)
    zero_image = pixels(download(zero["output"]["image"]))
    base_image = pixels(download(base["output"]["image"]))
    assert np.abs(zero_image - base_image).max() <= TOLERANCE
    assert np.abs(pixels(image) - base_image).max() > TOLERANCE


def test_a_lora_for_another_model_fails_its_job_and_the_worker_goes_on(
    client: httpx.Client,
) -> None:
    failed = wait_result(client, submit(client, loras=[{"path": "for-another-model"}]))
    assert failed["status"] == "failed", failed
    assert failed["error"]["message"] == f"this LoRA is not for {Z_IMAGE_ID}", failed
    after = wait_result(client, submit(client, loras=[{"path": "watercolour"}]))
    assert after["status"] == "succeeded", after


def test_the_cli_runs_a_job_with_loras(
    client: httpx.Client, served: InProcessServer, tmp_path: Path
) -> None:
    out = tmp_path / "out.png"
    token = client.headers["Authorization"].removeprefix("Bearer ")
    ran = run_cli(
        "run", "a lighthouse in a storm, oil painting", "-o", str(out), "--model-id", LORA_ID,
        "--lora", "watercolour:1.5", "--steps", "2", "--image-size", "128x128", "--seed", "7",
        "--url", served.base_url, "--token", token,
    )  # fmt: skip
    assert "seed 7: saved" in ran.stderr
    # The same image as the API gives for the same body.
    sent = wait_result(client, submit(client, loras=[{"path": "watercolour", "scale": 1.5}]))
    assert sent["status"] == "succeeded", sent
    with Image.open(out) as image:
        assert np.abs(pixels(image) - pixels(download(sent["output"]["image"]))).max() == 0
    # A LoRA the server does not have: the 422 in one line, nothing saved.
    refused = run_cli(
        "run", "x", "-o", str(tmp_path / "no.png"), "--model-id", LORA_ID, "--lora", "no-such",
        "--url", served.base_url, "--token", token, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "no LoRA called" in refused.stderr, refused.stderr
    assert "loras.0.path" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "no.png").exists()


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("no-such-lora", "no LoRA called"),
        ("pickled.bin", "safetensors"),
        ("https://example.com/style.pt", "safetensors"),
        ("acme/style-lora", "from the hub are off"),
        ("../../etc/passwd", "must be"),
    ],
)
def test_a_path_that_names_no_allowed_lora_is_a_422_naming_loras(
    client: httpx.Client, path: str, why: str
) -> None:
    assert why in refused(client, path)


def test_a_failed_download_fails_its_job_once_with_the_reason(
    client: httpx.Client, served: InProcessServer
) -> None:
    with serving(body(b"gone", status=404)) as url:
        missing = wait_result(client, submit(client, loras=[{"path": f"{url}/a.safetensors"}]))
    assert missing["status"] == "failed", missing
    assert "could not be downloaded" in missing["error"]["message"], missing
    assert "loras.0.path" in missing["error"]["message"]
    with serving(body(pickle.dumps({"w": torch.zeros(2)}))) as url:
        pickled = wait_result(client, submit(client, loras=[{"path": f"{url}/b.safetensors"}]))
    assert pickled["status"] == "failed", pickled
    assert "not a safetensors file" in pickled["error"]["message"], pickled
    assert not list((served.data_dir / "lora-cache").glob("*.safetensors"))  # nothing kept


def test_a_download_shows_in_the_jobs_status_then_loads(
    client: httpx.Client, served: InProcessServer, tiny_pipeline: Any, tmp_path: Path
) -> None:
    data = make_lora(tiny_pipeline.transformer, tmp_path / "slow.safetensors", seed=4).read_bytes()
    release = threading.Event()

    def slowly(handler: BaseHTTPRequestHandler) -> None:
        release.wait(30)
        body(data)(handler)

    with serving(slowly) as url:
        request_id = submit(client, loras=[{"path": f"{url}/slow.safetensors"}])
        shown = wait_for(
            lambda: client.get(f"/v1/requests/{request_id}/status").json().get("warnings"),
            timeout=120,
        )
        release.set()
        result = wait_result(client, request_id)
    assert any("downloading LoRA" in note for note in shown), shown
    assert result["status"] == "succeeded", result
    assert "downloading LoRA" not in str(result.get("warnings"))
    assert len(list((served.data_dir / "lora-cache").glob("*.safetensors"))) == 1


def test_the_readme_example_runs_as_written(
    served: InProcessServer, client: httpx.Client, tmp_path: Path
) -> None:
    from .test_dialects import readme_block

    token = client.headers["Authorization"].removeprefix("Bearer ")
    env = {**os.environ, "OVIS_SERVER_URL": served.base_url, "OVIS_SERVER_TOKEN": token}
    shell = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_block("loras", "bash")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    listed, submitted = shell.stdout.split("}{", 1)
    assert '{"name":"watercolour"}' in listed
    request_id = json.loads("{" + submitted)["request_id"]
    assert wait_result(client, request_id)["status"] == "succeeded"


@pytest.fixture(scope="module")
def api_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """The API alone with downloads allowed, under the default destination rules."""
    settings = Settings(
        model="tiny", model_ids=(Z_IMAGE_ID,), data_dir=tmp_path_factory.mktemp("lora-api"),
        lora_downloads=("hub", "url"), no_worker=True, no_auth=True,
    )  # fmt: skip
    server = InProcessServer(settings)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_every_refused_address_form_is_a_422_naming_loras(
    api_only: InProcessServer, url: str
) -> None:
    with api_only.client() as http:
        for form in (url, url.replace("http://", "https://", 1)):
            refused(http, form.rstrip("/") + ".safetensors")


def test_downloads_are_422s_unless_the_operator_allows_them(tmp_path: Path) -> None:
    server = InProcessServer(
        Settings(
            model="tiny", model_ids=(Z_IMAGE_ID,), data_dir=tmp_path, no_worker=True, no_auth=True
        )
    )
    try:
        with server.client() as http:
            assert "from URLs are off" in refused(http, "https://example.com/style.safetensors")
            assert "from the hub are off" in refused(http, "alibaba-pai/some-lora")
            assert http.get("/v1/loras").json() == {"loras": [], "downloads": []}
    finally:
        server.stop()
