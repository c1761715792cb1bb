"""An image too large for every worker's memory is refused at submit (422), and each
worker's memory plan shows in /readyz and /metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ovis_server.api.capacity import SizeCapacity, largest_fitting, suggested_square
from ovis_server.api.errors import ApiError
from ovis_server.catalogue import OVIS_IMAGE
from ovis_server.db.connect import connect, migrate, sqlite_url
from ovis_server.engine import memory
from ovis_server.engine.memory import GiB, MemoryProfile, ModelSizes, largest_image_pixels
from ovis_server.engine.pipeline import Engine
from ovis_server.engine.random_full import build_full_size_pipeline
from ovis_server.jobs.worker_detail import WorkerDetail
from ovis_server.jobs.workers import WorkerRegistry, WorkerState

from .bodies import OVIS_ID, OVIS_PATH
from .helpers import start_server, wait_for


@pytest.fixture(scope="module")
def full_size() -> ModelSizes:
    return memory.model_sizes(build_full_size_pipeline("meta", torch.bfloat16))


def test_largest_image_from_the_plan(full_size: ModelSizes) -> None:
    usable = 24 * GiB - memory.margin(24 * GiB)
    pixels = largest_image_pixels(full_size, MemoryProfile.FULL, 24 * GiB)
    assert pixels is not None
    assert pixels >= 1024 * 1024  # a 24 GB card runs 1024x1024 in full (the H200 figures)
    assert memory.planned_peak(full_size, MemoryProfile.FULL, pixels, 1) <= usable
    assert memory.planned_peak(full_size, MemoryProfile.FULL, pixels + 1, 1) > usable
    # Offloading leaves room for more pixels in less memory.
    offloaded = largest_image_pixels(full_size, MemoryProfile.GROUP_OFFLOAD_BLOCK, 8 * GiB)
    assert offloaded is not None
    assert offloaded > pixels
    # Full does not fit 8 GiB at all: not even its weights.
    assert largest_image_pixels(full_size, MemoryProfile.FULL, 8 * GiB) == 0
    assert largest_image_pixels(full_size, MemoryProfile.FULL, None) is None  # a CPU: no limit


def test_the_tiny_engine_on_a_cpu_has_no_limit(engine: Engine) -> None:
    assert engine.max_pixels is None


def test_suggested_square() -> None:
    assert suggested_square(512 * 512, multiple=16) == 512
    assert suggested_square(512 * 512 - 1, multiple=16) == 496


def fake_worker(
    registry: WorkerRegistry, worker_id: str, model: str = OVIS_ID, **detail: object
) -> None:
    """A worker row as a ready worker of ``model`` writes it (worker/process.py), with
    ``detail``."""
    registry.register(worker_id, "host", 1, model, "cuda:0")
    state = WorkerState(ready=True, phase="ready", detail=WorkerDetail.model_validate(detail))
    registry.heartbeat(worker_id, state)


def test_capacity_reads_the_workers_table_at_most_once_a_second(tmp_path: Path) -> None:
    db = connect(sqlite_url(tmp_path))
    migrate(db)
    registry = WorkerRegistry(db)
    now = [0.0]
    capacity = SizeCapacity(registry, alive_within=60, clock=lambda: now[0])
    capacity.check("aidc-ai/ovis-image", 2048, 2048)  # no worker: accepted
    fake_worker(registry, "small", max_pixels=512 * 512)
    capacity.check("aidc-ai/ovis-image", 2048, 2048)  # the read of a moment ago still holds
    now[0] = 1.5
    with pytest.raises(Exception, match="2048x2048"):
        capacity.check("aidc-ai/ovis-image", 2048, 2048)
    assert largest_fitting(capacity.workers(), "aidc-ai/ovis-image") == 512 * 512
    # Only the workers of the model asked for count: another model's small worker does not.
    fake_worker(registry, "other", "someone/other", max_pixels=256 * 256)
    now[0] = 3.0
    assert largest_fitting(capacity.workers(), "aidc-ai/ovis-image") == 512 * 512
    assert largest_fitting(capacity.workers(), "someone/other") == 256 * 256
    assert largest_fitting(capacity.workers(), "nobody/serves-this") is None


def test_the_suggested_size_takes_the_models_side_multiple(tmp_path: Path) -> None:
    """The 422's example size is a square whose side is a multiple of the model's own
    (``ModelSpec.sizes``), as the submit passes it: 496, not 511, for Ovis-Image."""
    db = connect(sqlite_url(tmp_path))
    migrate(db)
    registry = WorkerRegistry(db)
    fake_worker(registry, "small", max_pixels=512 * 512 - 1)
    sizes = OVIS_IMAGE.sizes
    assert sizes is not None
    assert sizes.multiple == 16
    with pytest.raises(ApiError, match="such as 496x496"):
        SizeCapacity(registry, alive_within=60).check(OVIS_ID, 2048, 2048, sizes.multiple)
    with pytest.raises(ApiError, match="such as 511x511"):
        SizeCapacity(registry, alive_within=60).check(OVIS_ID, 2048, 2048)


def test_too_large_a_size_is_refused_at_submit(
    tmp_path: Path, tiny_weights: Path, database_url: str | None
) -> None:
    server = start_server(tmp_path, tiny_weights, "--no-worker", "--no-auth", "--metrics-public")
    registry = WorkerRegistry(connect(database_url or sqlite_url(tmp_path)))
    try:
        with server.client() as client:
            square_hd = {"prompt": "a lighthouse", "image_size": "square_hd"}
            # No worker alive: the submit queues, as any does.
            assert client.post(OVIS_PATH, json=square_hd).status_code == 200

            plan: dict[str, object] = {
                "memory_profile": "group-offload-block",
                "memory_budget_bytes": 8 * GiB,
                "max_pixels": 512 * 512,
                "batch_limit": 2,
            }
            fake_worker(registry, "small", OVIS_ID, **plan)

            def refused() -> dict[str, object] | None:
                response = client.post(OVIS_PATH, json=square_hd)
                return response.json() if response.status_code == 422 else None

            body = wait_for(refused, timeout=10)
            assert body["error_code"] == 422001
            message = str(body["error_message"])
            assert "1024x1024" in message, message
            assert "262,144 pixels" in message
            assert "512x512" in message
            assert body["detail"][0]["loc"] == ["body", "image_size"]  # type: ignore[index]
            # A custom size over the limit too, and one within it goes through.
            custom = {"prompt": "a lighthouse", "image_size": {"width": 1024, "height": 320}}
            assert client.post(OVIS_PATH, json=custom).status_code == 422
            square = {"prompt": "a lighthouse", "image_size": "square"}
            assert client.post(OVIS_PATH, json=square).status_code == 200
            # OpenAI's route refuses in its own words, naming the size parameter.
            answer = client.post(
                "/v1/images/generations", json={"prompt": "a lighthouse", "size": "1024x1024"}
            )
            assert answer.status_code == 400
            error = answer.json()["error"]
            assert (error["param"], error["code"]) == ("size", "invalid_value")
            assert "1024x1024" in error["message"]

            # /readyz and /metrics show the worker's plan.
            (shown,) = client.get("/readyz").json()["workers"]
            assert (shown["memory_profile"], shown["batch_limit"], shown["max_pixels"]) == (
                "group-offload-block", 2, 512 * 512
            )  # fmt: skip
            metrics = client.get("/metrics").text
            assert (
                'ovis_worker_info{device="cuda:0",memory_profile="group-offload-block",'
                'worker="small"} 1.0' in metrics
            )
            assert 'ovis_worker_batch_limit{worker="small"} 2.0' in metrics
            assert 'ovis_worker_max_pixels{worker="small"} 262144.0' in metrics
            assert 'ovis_worker_memory_budget_bytes{worker="small"} 8.589934592e+09' in metrics

            # A second worker with no limit (a CPU) takes any size.
            fake_worker(registry, "roomy", memory_profile="full", batch_limit=1)
            wait_for(lambda: client.post(OVIS_PATH, json=square_hd).status_code == 200, timeout=10)
    finally:
        server.stop()
        registry.engine.dispose()
