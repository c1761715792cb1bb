"""The SDK's AsyncClient over httpx.MockTransport: the same calls, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import pytest

from ovis_server.client import (
    ApiConnectionError,
    AsyncClient,
    InvalidInputError,
    JobFailedError,
    NotFoundError,
    RateLimitError,
    Status,
    WaitTimeoutError,
)

from .conftest import BASE, TOKEN, FakeApi, FakeClock

T = TypeVar("T")


def run(client: AsyncClient, use: Callable[[AsyncClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with client:
            return await use(client)

    return asyncio.run(main())


def test_submit_and_status(async_client: AsyncClient, fake_api: FakeApi) -> None:
    async def use(sdk: AsyncClient) -> Status:
        submission = await sdk.submit({"prompt": "x"}, "tongyi-mai/z-image/turbo")
        return await sdk.status(submission.request_id)

    status = run(async_client, use)
    assert status.status == "in_queue"
    assert fake_api.requests[0].url.path == "/v1/models/tongyi-mai/z-image/turbo"
    assert fake_api.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert "idempotency-key" in fake_api.requests[0].headers


def test_run_polls_to_completion_reporting_sync_and_async_callbacks(
    async_client: AsyncClient, fake_api: FakeApi, clock: FakeClock
) -> None:
    seen: list[str] = []

    async def report(status: Status) -> None:
        seen.append(status.status)

    result = run(async_client, lambda sdk: sdk.run({"prompt": "x"}, on_progress=report))
    assert result.status == "succeeded"
    assert seen == ["in_queue", "in_progress", "completed"]
    assert clock.sleeps == [0.5, 0.5]


def test_a_plain_function_callback_works_too(async_client: AsyncClient) -> None:
    seen: list[str] = []
    run(
        async_client,
        lambda sdk: sdk.run({"prompt": "x"}, on_progress=lambda s: seen.append(s.status)),
    )
    assert seen[-1] == "completed"


def test_run_of_a_failed_job_raises(async_client: AsyncClient, fake_api: FakeApi) -> None:
    fake_api.failure = "bad weights"
    with pytest.raises(JobFailedError, match="bad weights"):
        run(async_client, lambda sdk: sdk.run({"prompt": "x"}))


def test_wait_times_out(async_client: AsyncClient, fake_api: FakeApi) -> None:
    fake_api.statuses = ["in_progress"]

    async def use(sdk: AsyncClient) -> object:
        request_id = (await sdk.submit({"prompt": "x"})).request_id
        return await sdk.wait(request_id, timeout=3.0, stream=False)

    with pytest.raises(WaitTimeoutError):
        run(async_client, use)


def test_retries_on_429_and_503_honour_retry_after(
    async_client: AsyncClient, fake_api: FakeApi, clock: FakeClock
) -> None:
    fake_api.before = [
        httpx.Response(429, json={"error_code": 429001}, headers={"Retry-After": "2"}),
        httpx.Response(503, json={"error_code": 503001}, headers={"Retry-After": "4"}),
    ]
    submission = run(async_client, lambda sdk: sdk.submit({"prompt": "x"}))
    assert submission.request_id in fake_api.jobs
    assert clock.sleeps == [2.0, 4.0]
    assert len(fake_api.jobs) == 1


def test_retries_give_up_with_the_typed_error(async_client: AsyncClient, fake_api: FakeApi) -> None:
    fake_api.before = [httpx.Response(429, json={"error_code": 429001})] * 4
    with pytest.raises(RateLimitError):
        run(async_client, lambda sdk: sdk.submit({"prompt": "x"}))
    assert len(fake_api.requests) == 4


def test_errors_map_as_in_the_sync_client(async_client: AsyncClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        run(async_client, lambda sdk: sdk.cancel("nope"))
    assert caught.value.error_code == 404001
    with pytest.raises(InvalidInputError):
        run(
            AsyncClient(BASE, TOKEN, transport=httpx.MockTransport(FakeApi())),
            lambda sdk: sdk.submit({}),
        )


def test_connection_error_is_one_line(fake_api: FakeApi, clock: FakeClock) -> None:
    fake_api.before = [httpx.ConnectError("Connection refused")] * 2
    sdk = AsyncClient(BASE, TOKEN, max_retries=1, transport=httpx.MockTransport(fake_api))
    with pytest.raises(ApiConnectionError) as caught:
        run(sdk, lambda s: s.result("abc"))
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"cannot reach {BASE}/v1/requests/abc/result")
    assert str(caught.value).endswith("(after 1 retry)")


def test_delete_then_the_request_is_gone(async_client: AsyncClient, fake_api: FakeApi) -> None:
    async def use(sdk: AsyncClient) -> None:
        request_id = (await sdk.submit({"prompt": "x"})).request_id
        await sdk.delete(request_id)
        await sdk.status(request_id)

    with pytest.raises(NotFoundError):
        run(async_client, use)
    assert fake_api.paths()[1].startswith("DELETE /v1/requests/")
