"""The SDK's Client over httpx.MockTransport: calls, waiting, retries, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from ovis_server.client import (
    ApiConnectionError,
    ApiError,
    AsyncClient,
    AuthenticationError,
    Client,
    InvalidInputError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    Status,
    WaitTimeoutError,
)
from ovis_server.client._base import MAX_DELAY, verification

from .conftest import BASE, TOKEN, FakeApi, FakeClock


def _error(status: int, code: int = 0, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error_code": code, "error_message": f"said {status}"}, headers=headers
    )


def test_submit_posts_the_input_to_the_model_with_token_and_idempotency_key(
    client: Client, fake_api: FakeApi
) -> None:
    submission = client.submit({"prompt": "a fox"}, "tongyi-mai/z-image/turbo")
    request = fake_api.requests[-1]
    assert request.method == "POST"
    assert request.url.path == "/v1/models/tongyi-mai/z-image/turbo"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert len(request.headers["idempotency-key"]) == 32
    assert fake_api.jobs[submission.request_id].input == {"prompt": "a fox"}
    assert submission.status_url == f"{BASE}/v1/requests/{submission.request_id}/status"


def test_submit_defaults_to_ovis_image(client: Client, fake_api: FakeApi) -> None:
    client.submit({"prompt": "x"})
    assert fake_api.requests[-1].url.path == "/v1/models/aidc-ai/ovis-image"


def test_each_submit_has_its_own_idempotency_key(client: Client, fake_api: FakeApi) -> None:
    client.submit({"prompt": "x"})
    client.submit({"prompt": "x"})
    keys = {r.headers["idempotency-key"] for r in fake_api.requests}
    assert len(keys) == 2
    assert len(fake_api.jobs) == 2


def test_a_retried_submit_keeps_its_key_so_one_job_is_queued(
    client: Client, fake_api: FakeApi
) -> None:
    fake_api.before = [_error(503, 503001, **{"Retry-After": "1"})]
    client.submit({"prompt": "x"})
    assert len(fake_api.requests) == 2
    assert (
        fake_api.requests[0].headers["idempotency-key"]
        == (fake_api.requests[1].headers["idempotency-key"])
    )
    assert len(fake_api.jobs) == 1


def test_status_result_cancel_and_delete_use_the_contract_routes(
    client: Client, fake_api: FakeApi
) -> None:
    request_id = client.submit({"prompt": "x"}).request_id
    status = client.status(request_id)
    result = client.result(request_id)
    cancellation = client.cancel(request_id)
    client.delete(request_id)
    assert fake_api.paths()[1:] == [
        f"GET /v1/requests/{request_id}/status",
        f"GET /v1/requests/{request_id}/result",
        f"POST /v1/requests/{request_id}/cancel",
        f"DELETE /v1/requests/{request_id}",
    ]
    assert status.status == "in_queue"
    assert status.queue_position == 0
    assert not status.is_final
    assert result.status == "in_progress"  # the fake moves on once polled
    assert cancellation.outcome == "cancelled"
    assert request_id not in fake_api.jobs


def test_cancel_of_a_finished_job_is_not_cancellable(client: Client, fake_api: FakeApi) -> None:
    fake_api.statuses = ["completed"]
    request_id = client.submit({"prompt": "x"}).request_id
    assert client.cancel(request_id).outcome == "not_cancellable"


def test_run_polls_until_completed_and_returns_the_succeeded_result(
    client: Client, fake_api: FakeApi, clock: FakeClock
) -> None:
    seen: list[Status] = []
    result = client.run({"prompt": "x"}, on_progress=seen.append, poll_interval=2.0)
    assert result.status == "succeeded"
    assert result.image_url is not None
    assert result.image_url.endswith(".png?sig=s3cret")
    assert [s.status for s in seen] == ["in_queue", "in_progress", "completed"]
    assert seen[1].progress is not None
    assert seen[1].progress.step == 1
    # Poll sleeps only between non-final statuses, at the interval asked.
    assert clock.sleeps == [2.0, 2.0]
    paths = fake_api.paths()
    assert paths[1].endswith("/stream")  # the stream is tried first, then polling
    assert paths[-1].endswith("/result")
    assert sum(p.endswith("/status") for p in paths) == 3


def test_wait_without_stream_never_asks_for_one(client: Client, fake_api: FakeApi) -> None:
    request_id = client.submit({"prompt": "x"}).request_id
    client.wait(request_id, stream=False)
    assert not any(p.endswith("/stream") for p in fake_api.paths())


def test_polling_reports_only_changed_statuses(client: Client, fake_api: FakeApi) -> None:
    fake_api.statuses = ["in_queue", "in_queue", "in_queue", "completed"]
    seen: list[str] = []
    client.run({"prompt": "x"}, on_progress=lambda s: seen.append(s.status))
    assert seen == ["in_queue", "completed"]


def test_run_raises_job_failed_with_the_servers_message(client: Client, fake_api: FakeApi) -> None:
    fake_api.failure = "out of memory"
    with pytest.raises(JobFailedError, match="failed: out of memory") as caught:
        client.run({"prompt": "x"})
    assert caught.value.status == "failed"
    assert caught.value.request_id in fake_api.jobs


def test_wait_times_out_on_the_clock(client: Client, fake_api: FakeApi) -> None:
    fake_api.statuses = ["in_queue"]
    request_id = client.submit({"prompt": "x"}).request_id
    with pytest.raises(WaitTimeoutError, match=request_id):
        client.wait(request_id, poll_interval=1.0, timeout=5.0)


def test_wait_for_a_cancelled_job_returns_its_result(client: Client, fake_api: FakeApi) -> None:
    fake_api.statuses = ["in_queue"]
    request_id = client.submit({"prompt": "x"}).request_id
    client.cancel(request_id)
    assert client.wait(request_id).status == "cancelled"


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_retryable_statuses_are_retried_after_retry_after(
    client: Client, fake_api: FakeApi, clock: FakeClock, status: int
) -> None:
    fake_api.before = [_error(status, 0, **{"Retry-After": "7"}), _error(status)]
    client.submit({"prompt": "x"})
    assert len(fake_api.requests) == 3
    # Retry-After first, then the backoff (0.5 * 2**1).
    assert clock.sleeps == [7.0, 1.0]


def test_retry_after_is_capped(client: Client, fake_api: FakeApi, clock: FakeClock) -> None:
    fake_api.before = [_error(429, 429001, **{"Retry-After": "3600"})]
    client.submit({"prompt": "x"})
    assert clock.sleeps == [MAX_DELAY]


def test_a_malformed_retry_after_falls_back_to_backoff(
    client: Client, fake_api: FakeApi, clock: FakeClock
) -> None:
    fake_api.before = [_error(503, 0, **{"Retry-After": "soon"})]
    client.submit({"prompt": "x"})
    assert clock.sleeps == [0.5]


def test_backoff_doubles_each_retry(fake_api: FakeApi, clock: FakeClock) -> None:
    fake_api.before = [_error(502)] * 4
    transport = httpx.MockTransport(fake_api)
    with Client(BASE, TOKEN, max_retries=4, backoff=0.25, transport=transport) as sdk:
        sdk.submit({"prompt": "x"})
    assert clock.sleeps == [0.25, 0.5, 1.0, 2.0]


def test_rate_limit_after_the_retries_is_a_rate_limit_error(
    client: Client, fake_api: FakeApi, clock: FakeClock
) -> None:
    fake_api.before = [_error(429, 429001, **{"Retry-After": "1"})] * 4
    with pytest.raises(RateLimitError) as caught:
        client.submit({"prompt": "x"})
    assert caught.value.error_code == 429001
    assert caught.value.status_code == 429
    assert len(fake_api.requests) == 4  # one try and max_retries=3 retries
    assert clock.sleeps == [1.0, 1.0, 1.0]


def test_max_retries_zero_sends_once(fake_api: FakeApi, clock: FakeClock) -> None:
    fake_api.before = [_error(503, 503001)]
    with (
        Client(BASE, TOKEN, max_retries=0, transport=httpx.MockTransport(fake_api)) as sdk,
        pytest.raises(ServerError) as caught,
    ):
        sdk.submit({"prompt": "x"})
    assert caught.value.error_code == 503001
    assert len(fake_api.requests) == 1
    assert clock.sleeps == []


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, ApiError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ApiError),
        (413, ApiError),
        (422, InvalidInputError),
    ],
)
def test_client_errors_are_typed_and_not_retried(
    client: Client, fake_api: FakeApi, status: int, kind: type[ApiError]
) -> None:
    fake_api.before = [_error(status, status * 1000 + 1)]
    with pytest.raises(kind) as caught:
        client.status("abc")
    assert type(caught.value) is kind
    assert caught.value.error_code == status * 1000 + 1
    assert caught.value.message == f"said {status}"
    assert str(caught.value) == f"{status} (error_code {status * 1000 + 1}): said {status}"
    assert len(fake_api.requests) == 1


def test_an_unknown_request_is_not_found_with_its_code(client: Client) -> None:
    with pytest.raises(NotFoundError) as caught:
        client.result("nope")
    assert caught.value.error_code == 404001
    assert "nope" in caught.value.message


def test_a_wrong_token_is_an_authentication_error(fake_api: FakeApi, clock: FakeClock) -> None:
    with (
        Client(BASE, "ovis_wrong", transport=httpx.MockTransport(fake_api)) as sdk,
        pytest.raises(AuthenticationError) as caught,
    ):
        sdk.submit({"prompt": "x"})
    assert caught.value.error_code == 400004


def test_invalid_input_is_a_422_with_the_servers_message(client: Client) -> None:
    with pytest.raises(InvalidInputError) as caught:
        client.submit({"prompt": 3})
    assert caught.value.error_code == 422001
    assert "prompt" in caught.value.message


def test_an_error_without_a_json_body_still_maps(client: Client, fake_api: FakeApi) -> None:
    fake_api.before = [httpx.Response(403, text="<html>forbidden</html>")]
    with pytest.raises(PermissionDeniedError) as caught:
        client.status("abc")
    assert caught.value.error_code is None
    assert caught.value.message == "HTTP 403"


def test_a_non_integer_error_code_is_dropped(client: Client, fake_api: FakeApi) -> None:
    fake_api.before = [httpx.Response(404, json={"error_code": "x", "detail": "gone"})]
    with pytest.raises(NotFoundError) as caught:
        client.status("abc")
    assert caught.value.error_code is None
    assert caught.value.message == "gone"


def test_a_refused_connection_is_one_line_naming_the_url_without_query(
    client: Client, fake_api: FakeApi, clock: FakeClock
) -> None:
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    fake_api.before = [refused] * 4
    with pytest.raises(ApiConnectionError) as caught:
        client.status("abc")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot reach {BASE}/v1/requests/abc/status: connection refused")
    assert message.endswith("(after 3 retries)")
    assert "OVIS_SERVER_URL" in message
    assert caught.value.url == f"{BASE}/v1/requests/abc/status"
    assert len(clock.sleeps) == 3


def test_a_timeout_is_reported_as_timed_out(fake_api: FakeApi, clock: FakeClock) -> None:
    fake_api.before = [httpx.ReadTimeout("read timed out")] * 2
    with (
        Client(BASE, TOKEN, max_retries=1, transport=httpx.MockTransport(fake_api)) as sdk,
        pytest.raises(ApiConnectionError) as caught,
    ):
        sdk.status("abc")
    assert caught.value.reason == "timed out"
    assert str(caught.value).endswith("(after 1 retry)")


def test_an_unknown_host_is_reported_as_such(fake_api: FakeApi, clock: FakeClock) -> None:
    fake_api.before = [httpx.ConnectError("[Errno -2] Name or service not known")]
    with (
        Client(BASE, TOKEN, max_retries=0, transport=httpx.MockTransport(fake_api)) as sdk,
        pytest.raises(ApiConnectionError) as caught,
    ):
        sdk.status("abc")
    assert caught.value.reason == "host name not found"
    assert "retr" not in str(caught.value)


def test_a_connection_error_then_success_is_retried(
    client: Client, fake_api: FakeApi, clock: FakeClock
) -> None:
    fake_api.before = [httpx.ConnectError("Connection refused")]
    assert client.submit({"prompt": "x"}).request_id in fake_api.jobs
    assert clock.sleeps == [0.5]


def test_base_url_and_token_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, fake_api: FakeApi, clock: FakeClock
) -> None:
    monkeypatch.delenv("OVIS_SERVER_URL", raising=False)
    monkeypatch.setenv("RUNCOMFY_MODEL_API_BASE", "http://env.test/v1/")
    monkeypatch.setenv("OVIS_SERVER_TOKEN", TOKEN)
    with Client(transport=httpx.MockTransport(fake_api)) as sdk:
        assert sdk.settings.base_url == "http://env.test"
        sdk.submit({"prompt": "x"})
    assert str(fake_api.requests[-1].url) == "http://env.test/v1/models/aidc-ai/ovis-image"


def test_ovis_server_url_wins_over_runcomfys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVIS_SERVER_URL", "http://ours.test")
    monkeypatch.setenv("RUNCOMFY_MODEL_API_BASE", "http://theirs.test/v1")
    with Client(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as sdk:
        assert sdk.settings.base_url == "http://ours.test"


def test_no_token_sends_no_authorization(
    monkeypatch: pytest.MonkeyPatch, fake_api: FakeApi, clock: FakeClock
) -> None:
    monkeypatch.delenv("OVIS_SERVER_TOKEN", raising=False)
    with (
        Client(BASE, transport=httpx.MockTransport(fake_api)) as sdk,
        pytest.raises(AuthenticationError),
    ):
        sdk.status("abc")
    assert "authorization" not in fake_api.requests[-1].headers


def test_a_local_image_file_is_sent_as_a_data_uri(
    client: Client, fake_api: FakeApi, tmp_path: Path
) -> None:
    image = tmp_path / "in.png"
    image.write_bytes(b"\x89PNG fake")
    client.submit(
        {"prompt": "x", "image_url": str(image)}, "tongyi-mai/z-image/turbo/image-to-image"
    )
    sent = fake_api.jobs[next(iter(fake_api.jobs))].input["image_url"]
    assert sent == "data:image/png;base64,iVBORyBmYWtl"


def test_a_remote_image_url_is_sent_as_it_is(client: Client, fake_api: FakeApi) -> None:
    client.submit({"prompt": "x", "image_url": "https://example.com/a.png"})
    assert next(iter(fake_api.jobs.values())).input["image_url"] == "https://example.com/a.png"


def test_download_goes_through_the_transport_without_the_token(
    client: Client, fake_api: FakeApi, tmp_path: Path
) -> None:
    result = client.run({"prompt": "x"})
    assert result.image_url is not None
    fake_api.before = [httpx.Response(200, content=b"PNGDATA")]
    target = client.download(result.image_url, tmp_path / "out.png")
    assert target.read_bytes() == b"PNGDATA"
    assert "authorization" not in fake_api.requests[-1].headers
    assert fake_api.requests[-1].url.params["sig"] == "s3cret"


def test_a_refused_download_raises_the_typed_error(
    client: Client, fake_api: FakeApi, tmp_path: Path
) -> None:
    fake_api.before = [_error(404, 404001)]
    with pytest.raises(NotFoundError):
        client.download(f"{BASE}/files/x.png", tmp_path / "out.png")


def test_call_sends_any_route(client: Client, fake_api: FakeApi) -> None:
    fake_api.before = [httpx.Response(200, json={"models": [], "total": 0})]
    assert client._call("GET", "/v1/models", params={"limit": 5}) == {"models": [], "total": 0}
    assert fake_api.requests[-1].url.params["limit"] == "5"


def test_the_tier_refuses_real_connections() -> None:
    """Without transport=, a call would open a socket: the tier's guard stops it."""
    with (
        Client("http://127.0.0.1:9", TOKEN, max_retries=0) as sdk,
        pytest.raises(AssertionError, match="opens no socket"),
    ):
        sdk.status("abc")


def test_clients_share_one_tls_context(
    monkeypatch: pytest.MonkeyPatch, tls_contexts_made: list[dict[str, Any]]
) -> None:
    """httpx would read the whole CA bundle for each client (29 ms of CPU): the SDK's
    clients take one context per process, which still follows SSL_CERT_FILE/SSL_CERT_DIR."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    for _ in range(3):
        Client("http://127.0.0.1:9", TOKEN).close()
    asyncio.run(AsyncClient("http://127.0.0.1:9", TOKEN).aclose())
    assert len(tls_contexts_made) <= 1
    default = verification()
    assert default.cert_store_stats()["x509_ca"] > 0  # certifi's bundle

    monkeypatch.setenv("SSL_CERT_DIR", "/nonexistent-ca-dir")
    assert verification() is not default
    assert verification().cert_store_stats()["x509_ca"] == 0
    monkeypatch.delenv("SSL_CERT_DIR")
    assert verification() is default
