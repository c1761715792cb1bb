"""Every client's dialect: RunComfy's CLI catalogue calls, generic RunComfy clients'
``aspect_ratio``, and OpenAI's Images API through the official ``openai`` package."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .helpers import Server, create_token, start_server

MODEL_ID = "aidc-ai/ovis-image"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("dialects"), tiny_weights)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def token(server: Server) -> str:
    return create_token(server.data_dir, "dialects")


@pytest.fixture(scope="module")
def client(server: Server, token: str) -> Iterator[httpx.Client]:
    with server.client(token) as client:
        yield client


# --- RunComfy's CLI: runcomfy models {list,categories,get} ----------------------------------


def test_cli_models_list_reads_models_total_and_row_fields(client: httpx.Client) -> None:
    response = client.get("/v1/models?limit=100&offset=0&search=ovis")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total"] == 1
    (row,) = body["models"]
    assert row["model_id"] == MODEL_ID
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
    assert [row["model_id"] for row in body["models"]] == [MODEL_ID]


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
    detail = client.get(f"/v1/models/{MODEL_ID}").json()
    assert row["input_schema"] == detail["input_schema"]
    assert row["input_schema"]["required"] == ["prompt"]


def test_cli_categories(client: httpx.Client) -> None:
    response = client.get("/v1/models/categories")
    assert response.status_code == 200, response.text
    assert response.json() == {"categories": ["text-to-image"]}


def test_cli_models_get(client: httpx.Client) -> None:
    # `runcomfy models get aidc-ai/ovis-image` sends no query; a query is tolerated.
    for path in (f"/v1/models/{MODEL_ID}", f"/v1/models/{MODEL_ID}?include_schema=true"):
        detail = client.get(path).json()
        assert detail["model_id"] == MODEL_ID
        assert detail["categories"] == ["text-to-image"]
        assert detail["input_schema"]["properties"]["prompt"]


def test_model_list_is_also_openais_list(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    (model,) = body["data"]
    assert model["id"] == MODEL_ID
    assert model["object"] == "model"
    assert isinstance(model["created"], int)
    assert model["owned_by"]


def test_catalogue_needs_a_token(server: Server) -> None:
    for path in ("/v1/models/categories", "/v1/models?search=ovis"):
        assert httpx.get(server.base_url + path).status_code == 401
