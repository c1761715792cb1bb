"""What the benchmarks that start ``ovis-server`` or queue jobs share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from ovis_server.catalogue import ModelInput, ModelSpec
from ovis_server.catalogue.registry import BUILT_IN

# httpx makes a TLS context for every client (reading certifi's whole CA bundle: 29 ms of
# CPU on a 2-core machine), and httpx.get makes a client a call: polled five times a second,
# that is a sixth of a core taken from the server being waited for. Ours speak plain HTTP.
TLS = httpx.create_ssl_context()

PROMPTS = [
    'A neon sign that reads "OVIS" above a rainy street at night',
    "A chalkboard menu listing coffee prices in neat handwriting",
    "A vintage travel poster for the Alps with bold title lettering",
    "A birthday cake with 'HAPPY 30TH' piped in blue icing",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def create_token(data_dir: Path, env: Mapping[str, str] | None = None) -> str:
    """A new API token's secret, made by ``ovis-server token create`` in ``data_dir`` (its
    database: ``env``'s OVIS_SERVER_DATABASE_URL, else the data directory's SQLite)."""
    created = subprocess.run(
        [sys.executable, "-m", "ovis_server", "token", "create", "--name", "bench",
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, check=True, env=None if env is None else dict(env),
    )  # fmt: skip
    return created.stdout.strip().splitlines()[-1]  # the secret is alone on the last line


def proc_stat(pid: int) -> list[str] | None:
    """The fields of Linux's /proc/PID/stat after the command's name (the state first), or
    None where there is no such process (or no /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (Linux's /proc; 0 elsewhere)."""
    fields = proc_stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ready(base: str) -> bool:
    """Whether the server at ``base`` answers /readyz with 200 (a worker has loaded)."""
    try:
        return httpx.get(f"{base}/readyz", timeout=5, verify=TLS).status_code == 200
    except httpx.HTTPError:
        return False


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not exited within two minutes."""
    process.terminate()
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def model_spec(model_id: str) -> ModelSpec:
    """The built-in catalogue entry ``model_id``; SystemExit naming the ones there are."""
    for spec in BUILT_IN:
        if spec.model_id == model_id:
            return spec
    names = ", ".join(spec.model_id for spec in BUILT_IN)
    raise SystemExit(f"--model-id {model_id!r}: the built-in models are {names}")


def default_steps(spec: ModelSpec) -> int:
    """The model's own default ``num_inference_steps`` (Ovis-Image's 28)."""
    return int(spec.input_schema()["properties"]["num_inference_steps"]["default"])


def model_input(
    spec: ModelSpec,
    prompt: str,
    image_size: str | dict[str, int],
    steps: int,
    seed: int,
    guidance: float | None = None,
) -> ModelInput:
    """An input of the model's own schema (validated as a submit would be); ``guidance``
    only where the model has a ``guidance_scale``."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "image_size": image_size,
        "num_inference_steps": steps,
        "seed": seed,
    }
    if guidance is not None and "guidance_scale" in spec.input_schema()["properties"]:
        body["guidance_scale"] = guidance
    return spec.input_model.model_validate(body)
