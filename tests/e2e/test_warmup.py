"""The worker warms up before it reports ready, with torch.compile's caches kept in the data
directory; /readyz shows the warm-up's progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from ovis_server.catalogue import OVIS_IMAGE, Z_IMAGE_TURBO
from ovis_server.config import Settings
from ovis_server.engine.compile_cache import CACHE_DIR_ENV, CompileCache, use_compile_cache
from ovis_server.engine.pipeline import Engine
from ovis_server.engine.warmup import WarmupShape, warm_up, warmup_shapes
from ovis_server.worker.readiness import default_shapes

from .helpers import http_get, start_server, submit, wait_for, wait_result

PRESETS = [(1024, 1024), (512, 512), (768, 1024), (576, 1024), (1024, 768), (1024, 576)]


def test_shapes_are_every_batch_of_the_default_size_then_each_other_size() -> None:
    shapes = warmup_shapes((1024, 768), PRESETS, batch_limit=3)
    assert shapes[:3] == [WarmupShape(1024, 768, batch) for batch in (1, 2, 3)]
    assert [(s.width, s.height, s.batch) for s in shapes[3:]] == [
        (1024, 1024, 1), (512, 512, 1), (768, 1024, 1), (576, 1024, 1), (1024, 576, 1)
    ]  # fmt: skip
    # Sizes the memory plan does not fit are left out (a submit of them gets 422).
    small = warmup_shapes((1024, 768), PRESETS, batch_limit=2, max_pixels=600 * 1024)
    assert [(s.width, s.height) for s in small] == [(512, 512), (576, 1024), (1024, 576)]
    assert WarmupShape(1024, 768, 2).describe() == "1024x768, a batch of 2"


def test_warmup_setting() -> None:
    assert Settings(warmup="auto").warms_up(compiling=True)
    assert not Settings(warmup="auto").warms_up(compiling=False)
    assert Settings(warmup="on").warms_up(compiling=False)
    assert not Settings(warmup="off").warms_up(compiling=True)
    assert Settings(data_dir=Path("/srv/ovis")).compile_cache_dir == Path("/srv/ovis/compile-cache")


@pytest.fixture
def clean_environment() -> Iterator[None]:
    """use_compile_cache writes os.environ: put back as it was after the test."""
    saved = dict(os.environ)
    for name in (CACHE_DIR_ENV, "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        os.environ.pop(name, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_cache_folder_is_private_or_left_to_torch(tmp_path: Path, clean_environment: None) -> None:
    cache = use_compile_cache(tmp_path / "data" / "compile-cache")
    assert cache.directory == tmp_path / "data" / "compile-cache"
    assert (cache.directory.stat().st_mode & 0o777) == 0o700
    assert os.environ[CACHE_DIR_ENV] == str(cache.directory)
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
    # The operator's own folder wins.
    assert use_compile_cache(tmp_path / "other").directory == cache.directory
    assert not (tmp_path / "other").exists()


def test_a_folder_that_cannot_be_made_leaves_torchs_default(
    tmp_path: Path, clean_environment: None
) -> None:
    (tmp_path / "a-file").write_text("")
    cache = use_compile_cache(tmp_path / "a-file" / "compile-cache")
    assert cache.directory is None
    assert "unavailable" in cache.note
    assert CACHE_DIR_ENV not in os.environ


COMPILE_ONCE = """
import json, sys
from pathlib import Path
from ovis_server.engine.compile_cache import cache_counters, use_compile_cache
cache = use_compile_cache(Path(sys.argv[1]))
import torch


@torch.compile(fullgraph=True)
def block(x, weight):
    return torch.nn.functional.gelu(x @ weight) * 2


block(torch.ones(2, 16), torch.ones(16, 16))
print(json.dumps({"note": cache.note, "files": cache.files(), **cache_counters()}))
"""


def compile_in_a_new_process(directory: Path) -> dict[str, Any]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")}
    script = directory.parent / "compile_once.py"  # dynamo skips code given with -c
    script.write_text(COMPILE_ONCE)
    done = subprocess.run(
        [sys.executable, str(script), str(directory)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def test_a_restart_loads_what_the_last_process_compiled(tmp_path: Path) -> None:
    directory = tmp_path / "compile-cache"
    first = compile_in_a_new_process(directory)
    assert first["note"] == "new"
    assert first["fx_graph_misses"] >= 1
    assert (directory.stat().st_mode & 0o777) == 0o700
    assert first["files"] > 0
    second = compile_in_a_new_process(directory)
    assert second["note"] == "reused"
    assert second["fx_graph_hits"] >= 1, second
    assert second["fx_graph_misses"] == 0


@pytest.fixture
def compiled_engine(tiny_weights: Path) -> Iterator[Callable[[Callable[..., Any]], Engine]]:
    """A fresh tiny engine whose blocks compile with the given torch.compile backend."""

    def build(backend: Callable[..., Any]) -> Engine:
        engine = Engine.load(str(tiny_weights), device="cpu")
        engine.pipeline.transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
        engine.compiled = True
        return engine

    yield build
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


SMALL = [WarmupShape(64, 64, 1)]


def test_a_cache_that_breaks_compilation_is_set_aside_and_compiled_afresh(
    tmp_path: Path, compiled_engine: Callable[[Callable[..., Any]], Engine]
) -> None:
    calls: list[int] = []

    def broken_once(graph: torch.fx.GraphModule, _inputs: Any) -> Callable[..., Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a damaged kernel library in the cache")
        return graph.forward

    engine = compiled_engine(broken_once)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "damaged.so").write_bytes(b"\0")
    result = warm_up(engine, SMALL, guidance=5.0, cache=CompileCache(tmp_path / "cache", "reused"))
    assert [shape for shape, _ in result.timings] == SMALL
    assert not result.eager_fallback
    assert result.error is None
    assert list((tmp_path / "cache").iterdir()) == []  # moved aside, empty again
    assert len(calls) >= 2


def test_compilation_that_keeps_failing_runs_eagerly(
    compiled_engine: Callable[[Callable[..., Any]], Engine],
) -> None:
    def broken(_graph: torch.fx.GraphModule, _inputs: Any) -> Callable[..., Any]:
        raise RuntimeError("no C++ compiler")

    compiled = compiled_engine(broken)
    result = warm_up(compiled, SMALL, guidance=5.0)
    assert result.eager_fallback
    assert "running eagerly" in (result.error or "")
    assert [shape for shape, _ in result.timings] == SMALL


def readyz(server_url: str) -> dict[str, Any] | None:
    try:
        body: dict[str, Any] = http_get(f"{server_url}/readyz", timeout=5).json()
    except httpx.HTTPError:
        return None
    return body


def test_serve_warms_up_before_ready_and_readyz_shows_it(
    tmp_path: Path, tiny_weights: Path
) -> None:
    server = start_server(tmp_path, tiny_weights, "--warmup", "on", "--no-auth", "--metrics-public")
    seen: list[dict[str, Any]] = []
    try:

        def ready() -> bool:
            body = readyz(server.base_url)
            if body is None:
                return False
            seen.extend(body.get("workers", []))
            return bool(body["status"] == "ready")

        wait_for(ready, timeout=240, interval=0.05)
        warming = [worker for worker in seen if worker["phase"] == "warming"]
        assert warming, seen
        progress = [worker["progress"] for worker in warming if "progress" in worker]
        assert progress
        assert all(p["unit"] == "shapes" and p["total"] == 6 for p in progress)
        assert any(p.get("text") == "running 1024x768, 1 image" for p in progress), progress
        (worker,) = readyz(server.base_url)["workers"]  # type: ignore[index]
        assert worker["phase"] == "ready"
        assert "progress" not in worker
        assert (worker["memory_profile"], worker["batch_limit"]) == ("full", 1)
        assert "max_pixels" not in worker  # a CPU: no limit
        log = server.log()
        assert "warm-up took" in log
        assert "ready " in log
        assert "after the worker started" in log
        assert "warm-up 1/6: 1024x768, 1 image in" in log
        with server.client() as client:
            metrics = client.get("/metrics").text
            assert "ovis_worker_startup_seconds{" in metrics
            request_id = submit(client)
            assert wait_result(client, request_id)["status"] == "succeeded"
    finally:
        server.stop()


def test_a_worker_warms_up_its_models_defaults_and_the_preset_sizes_its_input_takes() -> None:
    # The sizes come through the spec (ModelSpec.sizes), whatever the family.
    for spec in (OVIS_IMAGE, Z_IMAGE_TURBO):
        shapes, _ = default_shapes(spec, 2, None)
        assert spec.sizes is not None
        presets = list(spec.sizes.presets.values())
        assert (512, 512) in presets  # RunComfy's "square"
        assert (shapes[0].batch, shapes[1].batch) == (1, 2)  # the default size, batched
        assert {(s.width, s.height) for s in shapes} == {(shapes[0].width, shapes[0].height)} | set(
            presets
        )
        # Sizes over the plan's largest image are left out.
        small, _ = default_shapes(spec, 1, 512 * 512)
        assert all(s.width * s.height <= 512 * 512 for s in small)
        assert small
