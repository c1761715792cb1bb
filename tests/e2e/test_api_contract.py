"""The wire contract over real HTTP: the API on a real port, a real worker process, the tiny
model."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

import httpx
import numpy as np
import pytest

from ovis_server.catalogue import IMAGE_SIZE_PRESETS
from ovis_server.tokens import VERIFIED_FOR_SECONDS

from .bodies import OVIS_PATH, SLOW
from .conftest import BACKENDS
from .helpers import (
    InProcessServer,
    ServerFactory,
    download,
    http_get,
    http_request,
    pixels,
    status_of,
    submit,
    wait_for,
    wait_result,
)


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, shared_server: ServerFactory) -> InProcessServer:
    """Every test here runs on SQLite and on PostgreSQL."""
    return shared_server(backend=request.param, base_price_usd=0.01)


@pytest.fixture(scope="module")
def alice(server: InProcessServer) -> Iterator[httpx.Client]:
    with server.client(server.token("alice")) as client:
        yield client


def error_of(response: httpx.Response) -> tuple[int, int, str]:
    body = response.json()
    return response.status_code, body["error_code"], body["error_message"]


# --- submit, status, result, download -----------------------------------------------------


def test_every_preset_in_every_format_downloads_without_auth(alice: httpx.Client) -> None:
    wanted = {
        (preset, fmt): submit(alice, image_size=preset, output_format=fmt, num_inference_steps=1)
        for preset in IMAGE_SIZE_PRESETS
        for fmt in ("png", "jpeg", "webp")
    }
    for (preset, fmt), request_id in wanted.items():
        result = wait_result(alice, request_id)
        assert result["status"] == "succeeded", result
        assert "error_code" not in result
        image = download(result["output"]["image"])
        assert image.size == IMAGE_SIZE_PRESETS[preset], (preset, fmt)
        assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]


def test_submit_answer_has_absolute_urls_that_work_verbatim(alice: httpx.Client) -> None:
    response = alice.post(OVIS_PATH, json={"prompt": "hi", "num_inference_steps": 1})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"request_id", "status_url", "result_url", "cancel_url"}
    request_id = body["request_id"]
    assert len(request_id) <= 128
    assert all(c.isalnum() or c in "_-" for c in request_id)
    prefix = f"{alice.base_url}/v1/requests/{request_id}".replace("//v1", "/v1")
    assert body["status_url"] == f"{prefix}/status"
    assert body["result_url"] == f"{prefix}/result"
    assert body["cancel_url"] == f"{prefix}/cancel"
    wait_result(alice, request_id)
    # One official client fetches result_url exactly as given, with a query string.
    fetched = http_get(
        body["result_url"] + "?include_cost=true", headers=alice.headers, timeout=30
    ).json()
    assert fetched["status"] == "succeeded"
    assert fetched["model_id"] == "aidc-ai/ovis-image"
    assert fetched["cost"] == pytest.approx(0.01)
    for stamp in ("created_at", "finished_at"):
        assert fetched[stamp].endswith("Z")
    status = http_get(body["status_url"], headers=alice.headers, timeout=30).json()
    assert status["status"] == "completed"
    assert "queue_position" not in status


def test_result_answers_200_while_queued_or_running(alice: httpx.Client) -> None:
    request_id = submit(alice, **{**SLOW, "num_inference_steps": 10})
    seen = set()
    while True:
        response = alice.get(f"/v1/requests/{request_id}/result")
        assert response.status_code == 200
        body = response.json()
        seen.add(body["status"])
        if body["status"] == "succeeded":
            break
        assert "output" not in body
        assert body["status"] in {"in_queue", "in_progress"}
        time.sleep(0.05)
    assert "in_progress" in seen or "in_queue" in seen


def test_same_seed_same_pixels_and_a_null_seed_is_reported(alice: httpx.Client) -> None:
    fields: dict[str, Any] = {
        "prompt": "a red door",
        "image_size": "square",
        "num_inference_steps": 3,
    }
    first = submit(alice, seed=42, **fields)
    second = submit(alice, seed=42, **fields)
    drawn = submit(alice, seed=None, **fields)
    other = submit(alice, seed=43, **fields)
    results = {rid: wait_result(alice, rid) for rid in (first, second, drawn, other)}
    assert results[first]["seed"] == 42
    image = {rid: pixels(download(r["output"]["image"])) for rid, r in results.items()}
    assert np.array_equal(image[first], image[second])
    assert not np.array_equal(image[first], image[other])

    reported = results[drawn]["seed"]
    assert isinstance(reported, int)
    again = wait_result(alice, submit(alice, seed=reported, **fields))
    assert np.array_equal(pixels(download(again["output"]["image"])), image[drawn])


def test_custom_dimensions_beyond_the_presets(alice: httpx.Client) -> None:
    result = wait_result(
        alice, submit(alice, image_size={"width": 320, "height": 192}, num_inference_steps=1)
    )
    assert download(result["output"]["image"]).size == (320, 192)


# --- validation -------------------------------------------------------------------------

BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x" * 20_001}, "prompt"),
    ({"prompt": "x", "negative_prompt": ["no"]}, "negative_prompt"),
    ({"prompt": "x", "image_size": "huge"}, "image_size"),
    ({"prompt": "x", "image_size": 1024}, "image_size"),
    ({"prompt": "x", "image_size": {"width": 1000, "height": 512}}, "image_size"),
    ({"prompt": "x", "image_size": {"width": 32, "height": 512}}, "image_size"),
    ({"prompt": "x", "image_size": {"width": 4096, "height": 512}}, "image_size"),
    ({"prompt": "x", "image_size": {"width": 512}}, "image_size"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 51}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 2.5}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": "28"}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": True}, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": 0.5}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 20.5}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": "5"}, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": 2**63}, "seed"),
    ({"prompt": "x", "seed": "7"}, "seed"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "output_format": "gif"}, "output_format"),
    ({"prompt": "x", "output_format": "PNG"}, "output_format"),
    ({"prompt": "x", "num_images": 2}, "num_images"),
]


@pytest.mark.parametrize(("body", "field"), BAD_INPUTS)
def test_schema_violations_are_422_naming_the_field(
    alice: httpx.Client, body: dict[str, Any], field: str
) -> None:
    status, code, message = error_of(alice.post(OVIS_PATH, json=body))
    assert (status, code) == (422, 422001)
    assert field in message
    detail = alice.post(OVIS_PATH, json=body).json()["detail"]
    assert any(field in ".".join(item["loc"]) for item in detail)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"prompt"', b""])
def test_malformed_bodies_are_422(alice: httpx.Client, raw: bytes) -> None:
    response = alice.post(OVIS_PATH, content=raw, headers={"Content-Type": "application/json"})
    status, code, _ = error_of(response)
    assert (status, code) == (422, 422001)


def test_bounds_themselves_are_accepted(alice: httpx.Client) -> None:
    edges: list[dict[str, Any]] = [
        {"num_inference_steps": 1, "guidance_scale": 1},
        {"num_inference_steps": 50, "guidance_scale": 20.0, "seed": 2**63 - 1},
        {"seed": 0, "negative_prompt": "blurry", "image_size": {"width": 64, "height": 2048}},
    ]
    for fields in edges:
        response = alice.post(OVIS_PATH, json={"prompt": "edge", **fields})
        assert response.status_code == 200, (fields, response.text)
        alice.post(f"/v1/requests/{response.json()['request_id']}/cancel")


# --- errors: models, requests, tokens, ownership -----------------------------------------


def test_unknown_model(alice: httpx.Client) -> None:
    for response in (
        alice.post("/v1/models/acme/unknown", json={"prompt": "x"}),
        alice.post("/v1/models/acme/unknown", content=b"{bad"),
        alice.get("/v1/models/acme/unknown/variant/v2"),
    ):
        status, code, message = error_of(response)
        assert (status, code) == (404, 400001)
        assert "acme/unknown" in message


def test_unknown_request(alice: httpx.Client) -> None:
    for response in (
        alice.get("/v1/requests/0000-no-such-job/status"),
        alice.get("/v1/requests/0000-no-such-job/result"),
        alice.post("/v1/requests/0000-no-such-job/cancel"),
        alice.get("/v1/requests/bad%20id%21/status"),
    ):
        assert error_of(response)[:2] == (404, 404001)


def test_token_failures_are_401(server: InProcessServer, alice: httpx.Client) -> None:
    victim = server.token("soon-revoked")
    with server.client(victim) as client:
        assert client.get("/v1/models").status_code == 200
    server.cli("token", "revoke", "soon-revoked")
    # Revoked by another process: the API trusts the token it verified above for up to
    # VERIFIED_FOR_SECONDS more (README: revoking takes effect within 2 s, a test of its
    # own). Past that window, every route refuses it.
    time.sleep(VERIFIED_FOR_SECONDS)
    attempts = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": f"Token {victim}"},
        {"Authorization": "Bearer ovis_not-a-real-token"},
        {"Authorization": f"Bearer {victim}"},  # revoked
    ]
    for headers in attempts:
        for method, path in [
            ("GET", "/v1/models"),
            ("GET", "/v1/models/aidc-ai/ovis-image"),
            ("POST", OVIS_PATH),
            ("GET", "/v1/requests/x/status"),
            ("GET", "/v1/requests/x/result"),
            ("POST", "/v1/requests/x/cancel"),
        ]:
            response = http_request(method, server.base_url + path, headers=headers, json={})
            assert error_of(response)[:2] == (401, 400004), (headers, path)
            assert response.headers["www-authenticate"] == "Bearer"


def test_a_request_is_visible_only_to_its_token(alice: httpx.Client, bob: httpx.Client) -> None:
    request_id = submit(alice, num_inference_steps=1)
    for response in (
        bob.get(f"/v1/requests/{request_id}/status"),
        bob.get(f"/v1/requests/{request_id}/result"),
        bob.post(f"/v1/requests/{request_id}/cancel"),
    ):
        assert error_of(response)[:2] == (403, 403001)
    assert wait_result(alice, request_id)["status"] == "succeeded"  # bob's cancel did nothing


# --- cancel -------------------------------------------------------------------------------


def test_cancel_a_finished_job_is_not_cancellable(alice: httpx.Client) -> None:
    request_id = submit(alice, num_inference_steps=1)
    wait_result(alice, request_id)
    response = alice.post(f"/v1/requests/{request_id}/cancel")
    assert response.status_code == 202
    assert response.json() == {
        "request_id": request_id,
        "status": "completed",
        "outcome": "not_cancellable",
    }


def test_cancel_a_running_job_stops_it(alice: httpx.Client) -> None:
    request_id = submit(alice, **SLOW)
    wait_for(lambda: status_of(alice, request_id)["status"] == "in_progress", interval=0.05)
    started = time.monotonic()
    response = alice.post(f"/v1/requests/{request_id}/cancel")
    answered_in = time.monotonic() - started
    assert response.status_code == 202
    # The cancel answers at once, without waiting for the worker (it used to sleep up to
    # 2 s in a server thread); the final state is read from status.
    assert response.json() == {
        "request_id": request_id,
        "status": "in_progress",
        "outcome": "cancellation_requested",
    }
    assert answered_in < 1.0
    result = wait_result(alice, request_id)
    assert result["status"] == "cancelled"
    assert "output" not in result
    # The worker moves on to the next job.
    assert wait_result(alice, submit(alice, num_inference_steps=1))["status"] == "succeeded"


# --- files ---------------------------------------------------------------------------------


def with_query(url: str, **changes: str) -> str:
    parts = urlparse(url)
    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunparse(parts._replace(query=urlencode(query)))


def test_signed_urls_refuse_tampering(alice: httpx.Client) -> None:
    result = wait_result(alice, submit(alice, num_inference_steps=1))
    url = result["output"]["image"]
    assert http_get(url).status_code == 200
    expires = parse_qs(urlparse(url).query)["expires"][0]
    signature = parse_qs(urlparse(url).query)["signature"][0]
    forged = [
        with_query(url, signature=signature[:-1] + ("A" if signature[-1] != "A" else "B")),
        with_query(url, expires=str(int(expires) + 1)),
        with_query(url, expires="soon"),
        url.split("?")[0],
        url.replace("/0.png", "/1.png"),
    ]
    for candidate in forged:
        response = http_get(candidate)
        assert error_of(response)[:2] == (403, 403002), candidate


# --- catalogue, openapi, routing ------------------------------------------------------------


def test_catalogue(alice: httpx.Client) -> None:
    listing = alice.get("/v1/models").json()
    assert listing["total"] == 1
    (entry,) = listing["models"]
    assert entry["model_id"] == "aidc-ai/ovis-image"
    assert entry["display_name"]
    detail = alice.get("/v1/models/aidc-ai/ovis-image").json()
    assert detail["model_id"] == "aidc-ai/ovis-image"
    assert detail["price_unit"] == "output"
    assert detail["base_price_usd"] == pytest.approx(0.01)
    schema = detail["input_schema"]
    assert schema["required"] == ["prompt"]
    props = schema["properties"]
    assert set(props) == {
        "prompt",
        "negative_prompt",
        "image_size",
        "num_inference_steps",
        "guidance_scale",
        "seed",
        "output_format",
    }
    assert props["prompt"]["default"].startswith("A casually captured")
    assert (props["num_inference_steps"]["minimum"], props["num_inference_steps"]["maximum"]) == (
        1,
        50,
    )
    assert props["num_inference_steps"]["default"] == 28
    assert (props["guidance_scale"]["minimum"], props["guidance_scale"]["maximum"]) == (1, 20)
    assert props["output_format"]["enum"] == ["jpeg", "png", "webp"]
    assert props["image_size"]["default"] == "landscape_4_3"
    assert "$ref" not in json.dumps(schema)
    presets = next(opt for opt in props["image_size"]["anyOf"] if opt.get("type") == "string")
    assert presets["enum"] == list(IMAGE_SIZE_PRESETS)
    assert set(detail["output_schema"]["properties"]) == {"image", "images", "video", "videos"}


def test_openapi_describes_the_api(server: InProcessServer) -> None:
    spec = http_get(server.base_url + "/openapi.json").json()
    paths = spec["paths"]
    assert "/v1/models/{model_id}" in paths
    assert "/v1/requests/{request_id}/status" in paths
    body_ref = paths["/v1/models/{model_id}"]["post"]["requestBody"]["content"]
    assert body_ref["application/json"]["schema"]["$ref"].endswith("/OvisImageInput")
    assert "OvisImageInput" in spec["components"]["schemas"]


def test_no_redirects_and_json_errors_on_unknown_routes(alice: httpx.Client) -> None:
    for response in (
        alice.get("/v1/models/"),
        alice.get("/v1/requests/abc/status/"),
        alice.get("/v1/nothing-here"),
        alice.delete("/v1/models"),
    ):
        assert response.status_code < 300 or response.status_code >= 400
        assert "error_code" in response.json()
