"""DELETE /v1/requests/{id}: the owner removes a request and its files at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ovis_server.catalogue import OVIS_IMAGE
from ovis_server.client import AsyncClient, Client, NotFoundError
from ovis_server.db.connect import connect, migrate, sqlite_url
from ovis_server.engine.pipeline import Engine
from ovis_server.jobs.deletions import FileDeletions
from ovis_server.jobs.job import NewJob
from ovis_server.jobs.store import JobStore
from ovis_server.storage.local import LocalFileStore
from ovis_server.storage.signing import UrlSigner
from ovis_server.worker.runner import Worker

from .bodies import SLOW
from .helpers import (
    InProcessServer,
    http_get,
    run_cli,
    status_of,
    submit,
    wait_for,
    wait_result,
)


@pytest.fixture(scope="module")
def alice_token(server: InProcessServer) -> str:
    return server.token("alice")


@pytest.fixture(scope="module")
def alice(server: InProcessServer, alice_token: str) -> Iterator[httpx.Client]:
    with server.client(alice_token) as client:
        yield client


def error_code(response: httpx.Response) -> tuple[int, int]:
    return response.status_code, response.json()["error_code"]


def test_delete_removes_the_files_and_the_request(
    server: InProcessServer, alice: httpx.Client, bob: httpx.Client
) -> None:
    request_id = submit(alice, num_inference_steps=1)
    url = wait_result(alice, request_id)["output"]["image"]
    assert http_get(url).status_code == 200
    path = f"/v1/requests/{request_id}"

    assert error_code(bob.delete(path)) == (403, 403001)
    assert http_get(url).status_code == 200, "another token's delete changes nothing"
    assert error_code(alice.delete("/v1/requests/no-such-request")) == (404, 404001)

    response = alice.delete(path)
    assert response.status_code == 204, response.text
    assert http_get(url).status_code == 404, "the signed URL stops working at once"
    assert not (server.data_dir / "files" / request_id).exists()
    for method, suffix in [("GET", "/status"), ("GET", "/result"), ("POST", "/cancel")]:
        assert error_code(alice.request(method, path + suffix)) == (404, 404001)
    assert error_code(alice.get(path + "/stream")) == (404, 404001)
    assert error_code(alice.delete(path)) == (404, 404001)
    listed = alice.get("/v1/requests").json()["requests"]
    assert request_id not in [item["request_id"] for item in listed]


def test_deleting_a_running_job_stops_it_and_leaves_no_file(
    server: InProcessServer, alice: httpx.Client
) -> None:
    request_id = submit(alice, **SLOW)
    wait_for(lambda: status_of(alice, request_id)["status"] == "in_progress", interval=0.05)
    assert alice.delete(f"/v1/requests/{request_id}").status_code == 204
    assert alice.get(f"/v1/requests/{request_id}/status").status_code == 404
    # The worker drops it at its next step and takes the next job.
    assert wait_result(alice, submit(alice, num_inference_steps=1), timeout=60)["status"] == (
        "succeeded"
    )
    assert not (server.data_dir / "files" / request_id).exists()


def test_the_clients_and_the_cli_delete(
    server: InProcessServer, alice: httpx.Client, alice_token: str
) -> None:
    first, second, third = (submit(alice, num_inference_steps=1) for _ in range(3))
    for request_id in (first, second, third):
        wait_result(alice, request_id)
    with Client(server.base_url, alice_token) as client:
        client.delete(first)
        with pytest.raises(NotFoundError):
            client.status(first)
        with pytest.raises(NotFoundError):
            client.delete(first)

    async def delete_async() -> None:
        async with AsyncClient(server.base_url, alice_token) as client:
            await client.delete(second)
            with pytest.raises(NotFoundError):
                await client.result(second)

    asyncio.run(delete_async())
    done = run_cli("delete", third, "--url", server.base_url, "--token", alice_token)
    assert f"deleted {third}" in done.stderr
    again = run_cli("delete", third, "--url", server.base_url, "--token", alice_token, check=False)
    assert again.returncode == 1
    assert "404" in again.stderr or "not found" in again.stderr.lower()


class DeletedDuringPut(LocalFileStore):
    """A real file store where the request's DELETE (its row, then its files) lands just
    before the worker writes the file and records the job complete: the race the worker
    must clean up after."""

    def __init__(self, root: Path, signer: UrlSigner, store: JobStore) -> None:
        super().__init__(root, signer)
        self.store = store

    def put(self, key: str, data: bytes, media_type: str) -> None:
        request_id = key.split("/")[0]
        FileDeletions(self.store.engine).delete_request(request_id)
        self.delete_request(request_id)
        super().put(key, data, media_type)


def test_a_job_deleted_while_its_file_is_stored_leaves_no_orphan(
    tmp_path: Path, engine: Engine
) -> None:
    db = connect(sqlite_url(tmp_path))
    migrate(db)
    store = JobStore(db)
    files = DeletedDuringPut(tmp_path / "files", UrlSigner("secret"), store)
    store.submit(
        NewJob(
            id="doomed",
            token_id="tok_a",
            model_id="aidc-ai/ovis-image",
            input={"prompt": "a lighthouse", "num_inference_steps": 1, "image_size": "square"},
            seed=1,
            progress_total=1,
            batch_key="k",
        )
    )
    worker = Worker(store=store, files=files, engine=engine, model=OVIS_IMAGE, worker_id="w1")
    batch = store.claim_batch("w1", lease_seconds=30, max_batch=1)
    assert [job.id for job in batch] == ["doomed"]
    worker.run_jobs(batch, threading.Event())
    assert store.get("doomed") is None
    assert not (tmp_path / "files" / "doomed").exists()
    db.dispose()
