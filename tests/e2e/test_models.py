"""Serving several models: the registry built from Settings, claims by model, and a second
model added as one more spec (``--extra-models``), each served by its own worker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from ovis_server.catalogue import OVIS_IMAGE, ModelRegistry, UnknownModelError
from ovis_server.config import Settings
from ovis_server.db.connect import connect, sqlite_url
from ovis_server.jobs.store import JobStore

from .helpers import Cluster, queue_job, start_server, status_of, wait_for, wait_result

SECOND = "acme/ovis-second"


def test_a_worker_claims_only_the_jobs_of_its_models(store: JobStore) -> None:
    for name, model_id in [("b1", SECOND), ("a1", OVIS_IMAGE.model_id), ("b2", SECOND)]:
        queue_job(store, name, model_id)
    assert store.claim_batch("wa", 30, 4, [OVIS_IMAGE.model_id])[0].id == "a1"
    assert store.claim_next("wa", 30, [OVIS_IMAGE.model_id]) is None
    assert [job.id for job in store.claim_batch("wb", 30, 4, [SECOND])] == ["b1", "b2"]
    assert store.claim_next("wc", 30, ["nobody/serves-this"]) is None


def test_the_registry_is_built_from_settings(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        base_price_usd=0.25,
        extra_models=f" {SECOND} = tiny ,acme/other=/models/other",
        model_ids=(SECOND,),
    )
    # The served set is what --model-id names: a worker loads it, the API offers it.
    models = ModelRegistry.from_settings(settings)
    assert models.ids() == [SECOND]
    # By default: the default model and every --extra-models entry, in that order.
    everything = ModelRegistry.from_settings(settings.model_copy(update={"model_ids": ()}))
    assert everything.ids() == [OVIS_IMAGE.model_id, SECOND, "acme/other"]
    assert {spec.base_price_usd for spec in everything} == {0.25}
    second = models.served(settings)
    assert second.model_id == SECOND
    assert second.weights(settings) == "tiny"
    assert second.input_model is OVIS_IMAGE.input_model
    assert everything.resolve("ovis-image") is everything.get(OVIS_IMAGE.model_id)
    # --model, when given, is the weights whatever the model.
    assert second.weights(settings.model_copy(update={"model": "random-full"})) == "random-full"
    with pytest.raises(UnknownModelError, match="acme/missing"):
        ModelRegistry.from_settings(settings.model_copy(update={"model_ids": ("acme/missing",)}))


def test_model_id_repeats_takes_aliases_and_gives_each_model_its_weights(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        extra_models=(f"{SECOND}=/models/second",),
        model_ids=("ovis-image", f"{SECOND},{OVIS_IMAGE.model_id}"),
        model=f"ovis-image=/models/ovis, {SECOND} = /models/tuned",
    )
    models = ModelRegistry.from_settings(settings)
    assert models.ids() == [OVIS_IMAGE.model_id, SECOND]  # an alias and its id are one model
    assert models.served(settings) is models.get(OVIS_IMAGE.model_id)
    weights = {
        spec.model_id: spec.weights(settings.for_model((spec.model_id, *spec.aliases)))
        for spec in models
    }
    assert weights == {OVIS_IMAGE.model_id: "/models/ovis", SECOND: "/models/tuned"}
    # A model the per-model form leaves out gets its own default weights.
    partial = settings.model_copy(update={"model": f"{SECOND}=tiny"})
    assert partial.weights_for((OVIS_IMAGE.model_id, "ovis-image")) is None
    # tiny and random-full build each model's own; other bare weights fit one model only.
    Settings(data_dir=tmp_path, model_ids=("a", "b"), model="tiny")
    with pytest.raises(ValidationError, match="give each model its own weights"):
        Settings(data_dir=tmp_path, model_ids=("a", "b"), model="/models/ovis")
    with pytest.raises(ValidationError, match="give ID=WEIGHTS"):
        Settings(data_dir=tmp_path, model="a=/x,b")


@pytest.mark.parametrize(
    "extra",
    [
        "acme/x",  # no weights
        "acme/x=",
        "bad id=tiny",
        "aidc-ai/ovis-image=tiny",  # the built-in id
        "ovis-image=tiny",  # the built-in alias
        "categories=tiny",  # a route of its own
        "acme/x=tiny,acme/x=/models/x",  # twice
    ],
)
def test_bad_extra_models_are_refused_as_settings(extra: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="extra_models"):
        Settings(data_dir=tmp_path, extra_models=extra)


def _worker_of(store: JobStore, request_id: str) -> int:
    """The pid of the worker that ran a job (worker ids are host:pid:random)."""
    job = store.get(request_id)
    assert job is not None
    assert job.worker_id is not None
    return int(job.worker_id.split(":")[1])


def test_two_models_each_run_by_its_own_worker(
    tmp_path: Path, tiny_weights: Path, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second model is one more spec: the catalogue lists both ids, each worker takes
    only the jobs of the model it loaded, and a job whose model has no live worker waits."""
    data_dir = tmp_path / "data"
    # Every process of the deployment reads the same list (here from the environment).
    monkeypatch.setenv("OVIS_SERVER_EXTRA_MODELS", f"{SECOND}={tiny_weights}")
    server = start_server(data_dir, tiny_weights, "--no-worker", "--no-auth")
    cluster.servers.append(server)
    with server.client() as client:
        listed = client.get("/v1/models").json()
        # Served by default: the default model and the operator's extra ones.
        assert [entry["model_id"] for entry in listed["models"]] == [OVIS_IMAGE.model_id, SECOND]
        assert client.get(f"/v1/models/{SECOND}").json()["model_id"] == SECOND

        def submit(model_id: str) -> str:
            body = {"prompt": "a shop sign that reads OVIS", "num_inference_steps": 2}
            response = client.post(f"/v1/models/{model_id}", json=body)
            assert response.status_code == 200, response.text
            request_id: str = response.json()["request_id"]
            return request_id

        # The second model's job is the oldest in the queue; only the first model has a worker.
        second_job = submit(SECOND)
        first_job = submit(OVIS_IMAGE.model_id)
        first_worker = cluster.worker(data_dir, tiny_weights, "--model-id", OVIS_IMAGE.model_id)
        assert wait_result(client, first_job, timeout=300)["status"] == "succeeded"
        time.sleep(2)  # ten of the idle worker's polls
        assert first_worker.poll() is None, cluster.worker_logs()
        assert status_of(client, second_job)["status"] == "in_queue"

        second_worker = cluster.worker(data_dir, tiny_weights, "--model-id", SECOND)
        result = wait_result(client, second_job, timeout=300)
        assert result["status"] == "succeeded", result
        assert result["model_id"] == SECOND
        db = connect(sqlite_url(data_dir))
        try:
            store = JobStore(db)
            assert _worker_of(store, first_job) == first_worker.pid
            assert _worker_of(store, second_job) == second_worker.pid
        finally:
            db.dispose()


def test_a_worker_for_a_model_the_server_lacks_refuses_to_start(
    tmp_path: Path, tiny_weights: Path, cluster: Cluster
) -> None:
    worker = cluster.worker(tmp_path / "data", tiny_weights, "--model-id", SECOND)
    assert wait_for(lambda: worker.poll(), timeout=120) == 2  # click's usage error
    assert f"--model-id {SECOND!r} is not a model of this server" in cluster.worker_logs()


def test_the_openai_route_and_the_catalogue_read_the_same_registry(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from ovis_server.api.app import create_app

    settings = Settings(data_dir=tmp_path, no_auth=True, extra_models=(f"{SECOND}=tiny",))
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/models/categories").json() == {"categories": ["text-to-image"]}
        found = client.get("/v1/models", params={"search": "second"}).json()
        assert [entry["id"] for entry in found["data"]] == [SECOND]
        refused = client.post("/v1/images/generations", json={"prompt": "x", "model": "nope"})
        assert refused.status_code == 404
        assert SECOND in refused.json()["error"]["message"]
        unknown = client.post("/v1/models/acme/nope", json={"prompt": "x"})
        assert unknown.status_code == 404
        assert SECOND in unknown.json()["error_message"]


def test_no_registry_global_is_left(tmp_path: Path) -> None:
    """Two apps with different settings offer different models, side by side."""
    from fastapi.testclient import TestClient

    from ovis_server.api.app import create_app

    plain = create_app(Settings(data_dir=tmp_path / "a", no_auth=True))
    extended = create_app(
        Settings(data_dir=tmp_path / "b", no_auth=True, extra_models=(f"{SECOND}=tiny",))
    )
    with TestClient(plain) as first, TestClient(extended) as second:
        assert first.get(f"/v1/models/{SECOND}").status_code == 404
        assert second.get(f"/v1/models/{SECOND}").status_code == 200
