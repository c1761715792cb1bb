"""The deployment files parse, use only settings the code has, and their SQL runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner
from sqlalchemy import text

from ovis_server.cli import main
from ovis_server.db.connect import connect, migrate, sqlite_url

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def known_env_vars() -> set[str]:
    names: set[str] = set()
    for command in (["serve"], ["worker"]):
        help_text = CliRunner().invoke(main, [*command, "--help"], terminal_width=200).output
        names |= set(re.findall(r"OVIS_SERVER_[A-Z0-9_]+", help_text))
    return names


def test_compose_file() -> None:
    (compose,) = documents(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"postgres", "minio", "create-bucket", "api", "worker"} <= set(services)
    assert services["api"]["command"][:2] == ["serve", "--no-worker"]
    assert services["worker"]["command"][0] == "worker"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    env = services["api"]["environment"]
    assert env["OVIS_SERVER_DATABASE_URL"].startswith("postgresql://")
    assert env["OVIS_SERVER_STORAGE"].startswith("s3://")


def test_kubernetes_manifests() -> None:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in documents(path):
            assert doc["apiVersion"]
            assert doc["metadata"]["name"]
            kinds.setdefault(doc["kind"], []).append(doc)
    assert {"Secret", "StatefulSet", "Service", "Deployment", "ScaledObject"} <= set(kinds)
    deployments = {doc["metadata"]["name"]: doc for doc in kinds["Deployment"]}
    api = deployments["ovis-api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["args"][:2] == ["serve", "--no-worker"]
    offered = option_values(api["args"], "--model-id")
    workers = {name: doc for name, doc in deployments.items() if name.startswith("ovis-worker")}
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in kinds["ScaledObject"]}
    # A worker Deployment per model, each scaled by its own ScaledObject, every model offered
    # by the API and no model offered without a worker.
    served = []
    for name, doc in workers.items():
        worker = doc["spec"]["template"]["spec"]["containers"][0]
        assert worker["args"][0] == "worker"
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        (model_id,) = option_values(worker["args"], "--model-id")
        served.append(model_id)
        query = scaled[name]["spec"]["triggers"][0]["metadata"]["query"]
        assert f"model_id = '{model_id}'" in query
    assert len(workers) >= 2
    assert set(scaled) == set(workers)
    assert sorted(served) == sorted(offered)


def option_values(args: list[str], option: str) -> list[str]:
    """The values of a repeated option in a container's args (``--x=v`` or ``--x v``)."""
    values = []
    for index, arg in enumerate(args):
        if arg.startswith(option + "="):
            values.append(arg.partition("=")[2])
        elif arg == option:
            values.append(args[index + 1])
    return values


def test_deployment_files_use_only_settings_the_code_has() -> None:
    used: set[str] = set()
    for path in [DEPLOY / "compose.yaml", *sorted((DEPLOY / "k8s").glob("*.yaml"))]:
        used |= set(re.findall(r"OVIS_SERVER_[A-Z0-9_]+", path.read_text()))
    used |= set(re.findall(r"OVIS_SERVER_[A-Z0-9_]+", (ROOT / "docs" / "deploy.md").read_text()))
    assert used, "the files configure ovis-server through its environment"
    assert used <= known_env_vars(), used - known_env_vars()


def test_each_autoscaling_query_counts_its_own_models_queue(tmp_path: Path) -> None:
    queries = {
        doc["metadata"]["name"]: doc["spec"]["triggers"][0]["metadata"]["query"]
        for doc in documents(DEPLOY / "k8s" / "keda.yaml")
        if doc["kind"] == "ScaledObject"
    }
    guide = (ROOT / "docs" / "deploy.md").read_text()
    engine = connect(sqlite_url(tmp_path))
    migrate(engine)
    models = ["aidc-ai/ovis-image", "tongyi-mai/z-image/turbo", "acme/other"]
    with engine.begin() as conn:
        rows = [("queued", 0), ("running", 0), ("succeeded", 0), ("queued", 0), ("queued", 1)]
        rows += [("running", 1), ("cancelled", 1), ("queued", 2), ("queued", 2), ("queued", 2)]
        for seq, (status, model) in enumerate(rows):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, token_id, model_id, input, seed, batch_key, status,"
                    " cancel_requested, progress_step, progress_total, attempts, created_at)"
                    " VALUES (:id, 't', :model, '{}', 1, 'k', :status, false, 0, 1, 0,"
                    " '2026-01-01 00:00:00')"
                ),
                {"id": f"job-{seq}", "status": status, "model": models[model]},
            )
        counts = {name: conn.execute(text(query)).scalar_one() for name, query in queries.items()}
    assert counts == {"ovis-worker-ovis-image": 3, "ovis-worker-z-image-turbo": 2}
    assert queries["ovis-worker-ovis-image"] in guide


def test_prometheus_sends_the_metrics_token() -> None:
    """/metrics answers 401 without the metrics token: the ServiceMonitor sends it from the
    Secret the API reads, and the documented scrape config sends one too."""
    (monitor,) = documents(DEPLOY / "k8s" / "servicemonitor.yaml")
    assert monitor["kind"] == "ServiceMonitor"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["type"] == "Bearer"
    credentials = endpoint["authorization"]["credentials"]
    (secret,) = documents(DEPLOY / "k8s" / "secret.yaml")
    assert credentials["name"] == secret["metadata"]["name"]
    assert credentials["key"] == "OVIS_SERVER_METRICS_TOKEN"
    assert credentials["key"] in secret["stringData"]
    (api_doc, service) = documents(DEPLOY / "k8s" / "api.yaml")
    api = api_doc["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in api["envFrom"]
    assert monitor["spec"]["selector"]["matchLabels"] == service["metadata"]["labels"]
    assert endpoint["port"] in [port["name"] for port in service["spec"]["ports"]]
    (compose,) = documents(DEPLOY / "compose.yaml")
    assert "OVIS_SERVER_METRICS_TOKEN" in compose["services"]["api"]["environment"]
    guide = (ROOT / "docs" / "deploy.md").read_text()
    assert "authorization:\n      type: Bearer\n      credentials_file:" in guide
