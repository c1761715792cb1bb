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

ROOT = Path(__file__).resolve().parent.parent
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
    worker = deployments["ovis-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert api["args"][:2] == ["serve", "--no-worker"]
    assert worker["args"][0] == "worker"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    (scaled,) = kinds["ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "ovis-worker"


def test_deployment_files_use_only_settings_the_code_has() -> None:
    used: set[str] = set()
    for path in [DEPLOY / "compose.yaml", *sorted((DEPLOY / "k8s").glob("*.yaml"))]:
        used |= set(re.findall(r"OVIS_SERVER_[A-Z0-9_]+", path.read_text()))
    used |= set(re.findall(r"OVIS_SERVER_[A-Z0-9_]+", (ROOT / "docs" / "deploy.md").read_text()))
    assert used, "the files configure ovis-server through its environment"
    assert used <= known_env_vars(), used - known_env_vars()


def test_the_autoscaling_query_counts_the_queue(tmp_path: Path) -> None:
    (scaled,) = [d for d in documents(DEPLOY / "k8s" / "keda.yaml") if d["kind"] == "ScaledObject"]
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert query in (ROOT / "docs" / "deploy.md").read_text()
    engine = connect(sqlite_url(tmp_path))
    migrate(engine)
    with engine.begin() as conn:
        for seq, status in enumerate(["queued", "running", "succeeded", "queued"]):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, token_id, model_id, input, seed, batch_key, status,"
                    " cancel_requested, progress_step, progress_total, attempts, created_at)"
                    " VALUES (:id, 't', 'm', '{}', 1, 'k', :status, false, 0, 1, 0,"
                    " '2026-01-01 00:00:00')"
                ),
                {"id": f"job-{seq}", "status": status},
            )
        assert conn.execute(text(query)).scalar_one() == 3


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
