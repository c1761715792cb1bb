"""Several models from one command: one ``serve`` answers every served model through every
dialect, a worker that cannot keep them all resident swaps by a policy that bounds waiting
and thrashing, and queue positions count only the job's own model."""

from __future__ import annotations

import io
import os
import re
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from ovis_server.catalogue import OVIS_IMAGE, Z_IMAGE_TURBO
from ovis_server.catalogue.spec import ModelSpec
from ovis_server.engine import families
from ovis_server.engine.pipeline import Engine
from ovis_server.jobs.store import JobStore
from ovis_server.worker.host_copy import device_bytes
from ovis_server.worker.placement import Placement
from ovis_server.worker.swap_policy import plan_swap

from .fake_hub import FakeHub
from .helpers import Cluster, create_token, queue_job, run_cli, start_server, wait_for, wait_result

FT = "acme/ovis-ft"
OVIS = OVIS_IMAGE.model_id
# Two models of one family: the second an operator's entry on the tiny build.
TWO_MODELS = ("--model-id", OVIS, "--model-id", FT, "--extra-models", f"{FT}=tiny")
# The two families, each on its own tiny build.
ZI = Z_IMAGE_TURBO.model_id
TWO_FAMILIES = ("--model-id", OVIS, "--model-id", ZI)
# Served with Z-Image-Turbo, by its workers, on its weights.
ZI_EDIT = f"{ZI}/image-to-image"
ZI_LORA = f"{ZI}/lora"


def held(worker: dict[str, Any], key: str) -> list[tuple[str, Any]]:
    """(model, worker["models"][...][key]) of the two families' models."""
    return [(m["model_id"], m[key]) for m in worker["models"] if m["model_id"] in (OVIS, ZI)]


# --- the swap policy, a pure function --------------------------------------------------------


def test_a_model_without_queued_jobs_gives_way_at_once() -> None:
    assert plan_swap({"a": 0.0}, {"b": 99.0}, now=100.0, swap_after=30) == ("a", "b")


def test_a_busy_model_keeps_the_device_until_another_job_waited_swap_after() -> None:
    heads = {"a": 0.0, "b": 50.0}
    assert plan_swap({"a": 0.0}, heads, now=79.9, swap_after=30) is None
    assert plan_swap({"a": 0.0}, heads, now=80.0, swap_after=30) == ("a", "b")


def test_the_wait_counts_from_when_the_resident_model_came_in() -> None:
    """A job older than the resident model's arrival does not push it out at once: each
    model, once in, keeps the device ``swap_after`` while it has work (no thrashing)."""
    heads = {"a": 0.0, "b": 0.0}
    assert plan_swap({"a": 100.0}, heads, now=129.0, swap_after=30) is None
    assert plan_swap({"a": 100.0}, heads, now=130.0, swap_after=30) == ("a", "b")


def test_nothing_to_swap_in() -> None:
    assert plan_swap({"a": 0.0}, {"a": 0.0}, now=1e6, swap_after=30) is None
    assert plan_swap({"a": 0.0}, {}, now=1e6, swap_after=30) is None
    assert plan_swap({"a": 0.0, "b": 0.0}, {"a": 0.0, "b": 0.0}, now=1e6, swap_after=30) is None


def test_the_oldest_waiting_model_comes_in_for_the_model_in_longest() -> None:
    resident = {"a": 10.0, "b": 5.0}
    heads = {"a": 0.0, "b": 0.0, "c": 20.0, "d": 15.0}
    assert plan_swap(resident, heads, now=100.0, swap_after=30) == ("b", "d")
    # An idle resident model goes first, whoever came in first.
    assert plan_swap(resident, {"b": 0.0, "c": 20.0}, now=21.0, swap_after=30) == ("a", "c")


def simulate(
    arrivals: list[tuple[float, str]], run: float, swap: float, swap_after: float
) -> tuple[int, float, float]:
    """A worker with one resident model and a fake clock: each job takes ``run`` seconds,
    each swap ``swap``. Returns (swaps, the longest wait of a job at the head of its
    model's queue, the time the last job ended)."""
    queues: dict[str, list[float]] = {}
    pending = sorted(arrivals)
    resident, since, now, swaps, longest = "a", 0.0, 0.0, 0, 0.0
    head_since: dict[str, float] = {}
    while pending or any(queues.values()):
        while pending and pending[0][0] <= now:
            at, model = pending.pop(0)
            queues.setdefault(model, []).append(at)
            if len(queues[model]) == 1:
                head_since[model] = at
        heads = {model: jobs[0] for model, jobs in queues.items() if jobs}
        chosen = plan_swap({resident: since}, heads, now, swap_after)
        if chosen is not None:
            resident, since, now, swaps = chosen[1], now + swap, now + swap, swaps + 1
        if queues.get(resident):
            queues[resident].pop(0)
            longest = max(longest, now - head_since.pop(resident))
            if queues[resident]:
                head_since[resident] = now
            now += run
        elif pending:
            now = max(now, pending[0][0])
    return swaps, longest, now


@pytest.mark.parametrize("run", [0.5, 2.0, 7.0])
def test_two_busy_models_neither_starve_nor_thrash(run: float) -> None:
    """Both queues full for a long time: swaps come at most once per ``swap_after`` and a
    job at the head of its queue waits at most ``swap_after`` plus two jobs and two swaps
    (its model's own job in hand when it was swapped out, the other's when its wait ran out,
    and the swap out and back in)."""
    swap_after, swap = 30.0, 1.0
    arrivals = [(index * 0.1, model) for index in range(400) for model in ("a", "b")]
    swaps, longest, end = simulate(arrivals, run, swap, swap_after)
    assert swaps >= 2
    assert swaps <= end / swap_after + 2
    assert longest <= swap_after + 2 * (run + swap)


def test_a_trickle_of_jobs_swaps_on_demand() -> None:
    """Jobs that come one at a time, alternating, each swap the idle model out at once."""
    arrivals = [(index * 10.0, "b" if index % 2 else "a") for index in range(10)]
    swaps, longest, _end = simulate(arrivals, run=1.0, swap=1.0, swap_after=30.0)
    assert swaps == 9
    assert longest <= 1.0


# --- the placement: what fits together, and moving weights ----------------------------------


def _two_engines(tiny_weights: Path) -> list[tuple[ModelSpec, Engine]]:
    second = replace(OVIS_IMAGE, model_id=FT, aliases=())
    return [(spec, Engine.load(str(tiny_weights), device="cpu")) for spec in (OVIS_IMAGE, second)]


def _pixels_of(engine: Engine, seed: int = 5) -> np.ndarray[Any, Any]:
    body = {"prompt": "a red kite", "image_size": {"width": 64, "height": 64}}
    request = OVIS_IMAGE.input_model.model_validate(body | {"num_inference_steps": 2})
    return np.asarray(engine.generate(request.to_generation_request(seed)))


@pytest.mark.parametrize("spare", [0, 1])
def test_models_that_fit_the_budget_together_all_stay_resident(
    tiny_weights: Path, spare: int
) -> None:
    """All resident when every model's weights plus the largest activations fit the plan's
    budget less its margin; one byte more and one stays resident, the other swaps."""
    from ovis_server.engine.memory import GiB, usable_bytes

    models = _two_engines(tiny_weights)
    budget = 2 * GiB
    weights = {spec.model_id: device_bytes(engine) for spec, engine in models}
    activations = usable_bytes(budget) - sum(weights.values()) + 1 - spare
    placement = Placement(lambda spec: pytest.fail("nothing loads again"))
    for spec, engine in models:
        peak = weights[spec.model_id] + activations
        engine.memory = replace(engine.memory, budget_bytes=budget, peak_bytes=peak)
        placement.add(spec, engine, 1)
    placement.settle()
    if spare:
        assert placement.claimable() == [OVIS, FT]
        # Together, each model's batches leave room for the other's weights.
        placed = placement.get(OVIS)
        assert placed is not None
        assert placed.plan.budget_bytes == budget - weights[FT]
    else:
        assert placement.claimable() == [OVIS]
        assert [m.where for m in placement.detail().models or []] == ["device", "host"]


def test_a_swap_copies_weights_through_host_memory_or_loads_them_again(
    tiny_weights: Path,
) -> None:
    models = _two_engines(tiny_weights)
    before = _pixels_of(models[0][1])
    loads: list[str] = []

    def load(spec: ModelSpec) -> Engine:
        loads.append(spec.model_id)
        return Engine.load(str(tiny_weights), device="cpu")

    # Host memory: the weights wait as a copy, and come back the same.
    placement = Placement(load, resident_limit=1, swap_after=30, host_bytes=lambda: None)
    for spec, engine in models:
        placement.add(spec, engine, 1)
    placement.settle()
    assert placement.claimable() == [OVIS]
    assert placement.consider({OVIS: 0.0}) is None  # the other model has no job
    assert placement.consider({FT: 0.0}) == (OVIS, FT)  # the resident one has none
    assert placement.claimable() == [FT]
    assert _pixels_of(placement.engine_of(FT)).shape == (64, 64, 3)
    with pytest.raises(RuntimeError, match="not on the device"):
        placement.engine_of(OVIS)
    assert placement.consider({OVIS: 0.0, FT: 0.0}) is None  # both busy: FT keeps it a while
    assert placement.consider({OVIS: 0.0}) == (FT, OVIS)
    assert np.array_equal(_pixels_of(placement.engine_of(OVIS)), before)
    detail = placement.detail()
    assert detail.swaps == 2
    assert detail.swap_seconds_total is not None
    assert detail.swap_seconds_total >= 0
    assert loads == []

    # No room in host memory: the model leaves the device for disk and is loaded again.
    crowded = Placement(load, resident_limit=1, host_bytes=lambda: 0)
    for spec, engine in _two_engines(tiny_weights):
        crowded.add(spec, engine, 1)
    crowded.settle()
    assert [m.where for m in crowded.detail().models or []] == ["device", "disk"]
    assert crowded.consider({FT: 0.0}) == (OVIS, FT)
    assert loads == [FT]
    assert [m.where for m in crowded.detail().models or []] == ["disk", "device"]
    assert np.array_equal(_pixels_of(crowded.engine_of(FT)), before)  # same tiny weights


# --- queue positions and depths per model ----------------------------------------------------


def test_queue_position_counts_only_the_jobs_own_model(store: JobStore) -> None:
    for request_id, model_id in [("a1", OVIS), ("b1", FT), ("a2", OVIS), ("b2", FT), ("a3", OVIS)]:
        queue_job(store, request_id, model_id)

    def position(request_id: str) -> int:
        job = store.get(request_id)
        assert job is not None
        return store.queue_position(job)

    expected = {"a1": 0, "b1": 0, "a2": 1, "b2": 1, "a3": 2}
    assert {request_id: position(request_id) for request_id in expected} == expected
    assert store.queue_positions(list(expected)) == expected  # the status streams' query
    assert store.queued_by_model() == {OVIS: 3, FT: 2}
    heads = store.queue_heads([OVIS, FT, "nobody/else"])
    assert set(heads) == {OVIS, FT}
    assert heads[OVIS] <= heads[FT]
    # Claiming the first model's head moves up only that model's queue.
    assert store.claim_batch("w", 30, 1, [OVIS])[0].id == "a1"
    assert store.queue_positions(list(expected)) == {"b1": 0, "a2": 0, "b2": 1, "a3": 1}


# --- one serve, two models -------------------------------------------------------------------


def _png_pixels(client: httpx.Client, url: str) -> np.ndarray[Any, Any]:
    answer = client.get(url)
    assert answer.status_code == 200
    return np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"))


def _ready(client: httpx.Client) -> dict[str, Any] | None:
    answer = client.get("/readyz")
    return answer.json() if answer.status_code == 200 else None


def test_one_serve_answers_two_models_in_every_dialect(
    tmp_path: Path, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ovis_server.client import Client

    data_dir = tmp_path / "data"
    token = create_token(data_dir, "t")
    server = start_server(data_dir, "tiny", *TWO_FAMILIES, "--metrics-public", timeout=120)
    cluster.servers.append(server)
    small = {"image_size": "square", "num_inference_steps": 2}
    with server.client(token) as client:
        ready = wait_for(lambda: _ready(client), timeout=400, interval=0.5)
        (worker,) = ready["workers"]
        assert worker["model"] == f"{OVIS},{ZI},{ZI_EDIT},{ZI_LORA}"
        assert held(worker, "resident") == [
            (OVIS, True),
            (ZI, True),
        ]  # two tiny models fit (a CPU has no budget to plan): no swapping
        assert worker["swaps"] == 0

        listed = client.get("/v1/models", params={"include_schema": "true"}).json()
        assert [row["model_id"] for row in listed["models"]] == [OVIS, ZI, ZI_EDIT, ZI_LORA]
        assert [row["id"] for row in listed["data"]] == [OVIS, ZI, ZI_EDIT, ZI_LORA]
        assert all("prompt" in row["input_schema"]["required"] for row in listed["models"])

        # RunComfy's route, for each model.
        for model_id in (OVIS, ZI):
            body = {"prompt": f"a sign that reads {model_id}", **small}
            submitted = client.post(f"/v1/models/{model_id}", json=body)
            assert submitted.status_code == 200, submitted.text
            result = wait_result(client, submitted.json()["request_id"], timeout=300)
            assert result["status"] == "succeeded", result
            assert result["model_id"] == model_id

        # OpenAI's route: an id, and each model's alias.
        for name in (ZI, "z-image-turbo", "ovis-image"):
            answer = client.post(
                "/v1/images/generations",
                json={"model": name, "prompt": "a lighthouse", "size": "64x64", "seed": 3}
                | {"num_inference_steps": 2},
                timeout=300,
            )
            assert answer.status_code == 200, answer.text
            (image,) = answer.json()["data"]
            assert _png_pixels(client, image["url"]).shape == (64, 64, 3)
        refused = client.post("/v1/images/generations", json={"model": "z/none", "prompt": "x"})
        assert refused.status_code == 404
        assert ZI in refused.json()["error"]["message"]

        # The SDK, and the command-line client.
        with Client(server.base_url, token=token) as sdk:
            ran_sdk = sdk.run({"prompt": "a lighthouse", **small}, model_id=ZI)
            assert ran_sdk.status == "succeeded"
            assert client.get(f"/v1/requests/{ran_sdk.request_id}/result").json()["model_id"] == ZI
            assert sdk.status(ran_sdk.request_id).status == "completed"
            # An alias names its model on RunComfy's route too; the job is the model's.
            aliased = sdk.submit({"prompt": "a kite", **small}, model_id="ovis-image")
            assert sdk.wait(aliased.request_id).status == "succeeded"
            assert (
                client.get(f"/v1/requests/{aliased.request_id}/result").json()["model_id"] == OVIS
            )
        output = tmp_path / "cli.png"
        ran = run_cli(
            "run", "a lighthouse", "--model-id", ZI, "--steps", "2", "--image-size", "square",
            "-o", str(output),
            env={"OVIS_SERVER_URL": server.base_url, "OVIS_SERVER_TOKEN": token},
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        with Image.open(output) as written:
            assert written.size == (512, 512)

        metrics = client.get("/metrics").text
        assert f'ovis_model_queue_depth{{model="{ZI}"}} 0.0' in metrics
        assert f'ovis_model_queue_depth{{model="{OVIS}"}} 0.0' in metrics
        resident = [line for line in metrics.splitlines() if "model_resident{" in line]
        assert any(
            f'model="{ZI}",where="device",' in line and line.endswith(" 1.0") for line in resident
        ), resident
        assert "ovis_worker_swaps_total{" in metrics


def _when(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_one_resident_model_twenty_interleaved_jobs(tmp_path: Path, cluster: Cluster) -> None:
    """--resident-models 1 forces swapping: every job completes, swaps come at most once per
    --swap-after (plus the ones a model with no queued job gives way for), and a job at the
    head of its model's queue starts within --swap-after plus two jobs' time and two swaps."""
    swap_after = 2.0
    data_dir = tmp_path / "data"
    token = create_token(data_dir, "t")
    server = start_server(
        data_dir, "tiny", *TWO_FAMILIES, "--resident-models", "1", "--swap-after",
        f"{swap_after}s", "--metrics-public", timeout=120,
    )  # fmt: skip
    cluster.servers.append(server)
    with server.client(token) as client:
        ready = wait_for(lambda: _ready(client), timeout=400, interval=0.5)
        (worker,) = ready["workers"]
        assert held(worker, "where") == [(OVIS, "device"), (ZI, "host")]

        def submit(model_id: str, seed: int) -> str:
            body = {"prompt": "a shop sign", "image_size": "square", "num_inference_steps": 6}
            answer = client.post(f"/v1/models/{model_id}", json=body | {"seed": seed})
            assert answer.status_code == 200, answer.text
            request_id: str = answer.json()["request_id"]
            return request_id

        jobs = [
            (model_id, submit(model_id, index)) for index in range(10) for model_id in (ZI, OVIS)
        ]
        results = {request_id: wait_result(client, request_id, 600) for _, request_id in jobs}
        assert {body["status"] for body in results.values()} == {"succeeded"}, results
        # After all that swapping, the first model's weights are what they were.
        again = submit(OVIS, 1)
        first = results[jobs[3][1]]
        assert jobs[3][0] == OVIS
        repeat = wait_result(client, again, 300)
        assert np.array_equal(
            _png_pixels(client, first["output"]["image"]),
            _png_pixels(client, repeat["output"]["image"]),
        )

        (worker,) = client.get("/readyz").json()["workers"]
        swaps, swap_seconds = worker["swaps"], worker["swap_seconds_total"]
        created = [_when(body["created_at"]) for body in results.values()]
        started = {rid: _when(body["started_at"]) for rid, body in results.items()}
        finished = {rid: _when(body["finished_at"]) for rid, body in results.items()}
        elapsed = max(finished.values()) - min(created)
        # The first model was in first and the second's jobs came first: at least one swap
        # each way, and never more than one per --swap-after beyond the on-demand ones.
        assert swaps >= 2
        assert swaps <= elapsed / swap_after + 3, (swaps, elapsed)
        # Fairness is the bound below: each job starts within --swap-after (plus a job in
        # hand and the swaps) of reaching its model's head. Whether the models alternate more
        # than once depends on the machine: where one model's whole backlog runs inside
        # --swap-after (a loaded machine that queued all twenty during the first swap), the
        # policy rightly finishes it before swapping back.
        run = max(finished[rid] - started[rid] for rid in started)
        swapping = max(swap_seconds, 0.0)  # all the swaps: more than two of them
        for model_id in (OVIS, ZI):
            mine = [rid for mid, rid in jobs if mid == model_id]
            previous_start = 0.0
            for rid in mine:
                at_head = max(_when(results[rid]["created_at"]), previous_start)
                waited = started[rid] - at_head
                assert waited <= swap_after + 2 * run + swapping + 1.5, (model_id, waited, run)
                previous_start = started[rid]

        metrics = client.get("/metrics").text
        assert "ovis_worker_swaps_total{" in metrics
        assert "ovis_worker_swap_seconds_total{" in metrics
        assert "ovis_worker_model_resident{" in metrics


def test_several_models_with_one_plain_weights_are_refused(tmp_path: Path) -> None:
    ran = run_cli(
        "serve", "--data-dir", str(tmp_path), "--model", "/models/ovis", *TWO_MODELS,
        check=False, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 2
    assert "give each model its own weights" in ran.stderr


def test_an_unknown_model_id_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    ran = run_cli(
        "serve", "--data-dir", str(tmp_path), "--model-id", "nobody/this", check=False,
        env={"OVIS_SERVER_EXTRA_MODELS": f"{FT}=tiny"}, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 2
    assert "'nobody/this' is not a model of this server" in ran.stderr
    assert FT in ran.stderr
    assert os.environ.get("OVIS_SERVER_MODEL_ID") is None


# --- download ------------------------------------------------------------------------------


def test_download_fetches_every_served_models_weights_and_names_the_one_that_failed(
    tmp_path: Path, tiny_weights: Path, z_tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    ovis_repo, zi_repo = "AIDC-AI/Ovis-Image-7B", "Tongyi-MAI/Z-Image-Turbo"  # the defaults
    with FakeHub(ovis_repo, tiny_weights, more={zi_repo: z_tiny_weights}) as hub:
        env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": hub.url}
        both = run_cli("download", *TWO_FAMILIES, "--data-dir", str(tmp_path), env=env)
    # Each family's weights once (Z-Image-Turbo's variants load its own), from its own
    # repository, each said where serve with both --model-id finds it.
    for model_id, repo, family in [
        (OVIS, ovis_repo, families.OVIS_IMAGE),
        (ZI, zi_repo, families.Z_IMAGE),
    ]:
        assert len(re.findall(rf"^downloaded {repo}: ", both.stdout, re.M)) == 1, both.stdout
        done = re.search(rf"^done: serve and worker with --model {model_id}={repo} load it "
                         r"from (.+)$", both.stdout, re.M)  # fmt: skip
        assert done is not None, both.stdout
        assert families.family_of_directory(Path(done[1])) == family
        # Asked of the hub once: the variants are not models to download of their own.
        info = re.compile(rf"GET /api/models/{re.escape(repo)}(/revision/[^/]+)?")
        assert len([entry for entry in hub.requests if info.fullmatch(entry)]) == 1
    assert "image-to-image" not in both.stdout

    # A model the hub lacks fails, named at the end, after the others have downloaded.
    with FakeHub(ovis_repo, tiny_weights) as hub:
        env = {"HF_HOME": str(tmp_path / "hf-home-2"), "HF_ENDPOINT": hub.url}
        one = run_cli("download", "--model-id", ZI, "--model-id", OVIS, "--data-dir",
                      str(tmp_path), env=env, check=False)  # fmt: skip
    assert one.returncode == 1, one.stderr
    assert re.search(rf"^downloaded {ovis_repo}: ", one.stdout, re.M), one.stdout
    assert f"failed: {ZI}: there is no model {zi_repo}" in one.stdout  # said at once
    assert "Error: 1 of 2 models did not download:" in one.stderr
    assert f"{ZI}: there is no model {zi_repo} on the Hugging Face hub" in (one.stderr)
    assert "Traceback" not in one.stderr

    # Built and local weights download nothing, each said per model.
    local = run_cli("download", *TWO_FAMILIES, "--model", f"{OVIS}={tiny_weights},{ZI}=tiny",
                    "--data-dir", str(tmp_path))  # fmt: skip
    assert f"{OVIS}: {tiny_weights} is a local directory: nothing to download" in local.stdout
    assert f"{ZI}: the tiny model is now at " in local.stdout
    # Two models on one repository: it is fetched once.
    same = run_cli("download", "--model-id", OVIS, "--model-id", FT, "--extra-models",
                   f"{FT}={ovis_repo}", "--data-dir", str(tmp_path),
                   env={"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert f"{FT}: the same weights as {OVIS}: {ovis_repo}" in same.stdout
    assert same.stdout.count(f"{ovis_repo} is in the cache") == 1, same.stdout
