"""The status call's short path (api/runcomfy/status_path.py) answers exactly as the FastAPI route
it stands in front of: the same bodies, codes and headers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from .bodies import ONE_STEP
from .conftest import BACKENDS
from .helpers import InProcessServer, ServerFactory, http_get, submit


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, shared_server: ServerFactory) -> InProcessServer:
    """On SQLite the short path reads through the engine on the event loop; on PostgreSQL
    through db/loop_reads.py's connections."""
    return shared_server(backend=request.param, no_worker=True)


@pytest.fixture(scope="module")
def alice(server: InProcessServer) -> Iterator[httpx.Client]:
    with server.client(server.token("short-alice")) as client:
        yield client


def both_paths(client: httpx.Client, path: str) -> tuple[httpx.Response, httpx.Response]:
    """The call answered by the short path (no query, a token verified a moment ago), and
    by the FastAPI route (a query string sends it there)."""
    client.get("/v1/models")  # the token is now verified: the short path may answer
    return client.get(path), client.get(path, params={"logs": "false"})


def same(short: httpx.Response, route: httpx.Response) -> None:
    assert short.status_code == route.status_code
    assert short.content == route.content
    for header in ("content-type", "content-security-policy", "x-content-type-options"):
        assert short.headers.get(header) == route.headers.get(header), header


def test_status_bodies_are_the_routes(server: InProcessServer, alice: httpx.Client) -> None:
    request_id = submit(alice, **ONE_STEP)
    short, route = both_paths(alice, f"/v1/requests/{request_id}/status")
    same(short, route)
    assert short.json()["status"] == "in_queue"
    assert short.json()["status_url"] == f"{server.base_url}/v1/requests/{request_id}/status"
    # queue_position counts the jobs queued before this one (other tests' included).
    assert short.json()["queue_position"] >= 0


def test_status_errors_are_the_routes(server: InProcessServer, alice: httpx.Client) -> None:
    request_id = submit(alice, **ONE_STEP)
    with server.client(server.token("short-bob")) as bob:
        forbidden = both_paths(bob, f"/v1/requests/{request_id}/status")
        same(*forbidden)
        assert forbidden[0].json()["error_code"] == 403001
    for path in ("/v1/requests/no-such-request/status", "/v1/requests/bad%20id!/status"):
        missing = both_paths(alice, path)
        same(*missing)
        assert missing[0].json()["error_code"] == 404001
    with server.client("ovis_not-a-token") as stranger:
        refused = both_paths(stranger, f"/v1/requests/{request_id}/status")
        same(*refused)
        assert refused[0].status_code == 401
    assert http_get(f"{server.base_url}/v1/requests/{request_id}/status").status_code == 401
