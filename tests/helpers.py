"""Running the real server for tests: ``ovis-server serve`` on a free loopback port."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import numpy as np
from PIL import Image

from ovis_server.config import Settings
from ovis_server.db.connect import connect, migrate
from ovis_server.tokens import TokenStore

T = TypeVar("T")

FINAL_RESULT_STATES = {"succeeded", "failed", "cancelled"}


def run_cli(
    *args: str, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``ovis-server ARGS`` as a user would, in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "ovis_server", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(check: Callable[[], T | None], timeout: float = 120, interval: float = 0.1) -> T:
    """Call ``check`` until it returns something other than None (or False), or time out."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


def create_token(data_dir: Path, name: str) -> str:
    """A new token's secret, made as ``token create`` makes it (tests/test_cli.py runs that
    command itself)."""
    return create_token_with_webhook_secret(data_dir, name)[0]


def create_token_with_webhook_secret(data_dir: Path, name: str) -> tuple[str, str]:
    """A new token's secret and its webhook signing secret: on its own connection to the
    database of ``data_dir`` (or of ``OVIS_SERVER_DATABASE_URL``), as ``token create`` does,
    without the cost of starting that command."""
    return new_token(Settings(data_dir=data_dir).db_url, name)


def new_token(db_url: str, name: str) -> tuple[str, str]:
    """A new token in the database at ``db_url``: its secret and webhook signing secret."""
    db = connect(db_url)
    try:
        migrate(db)
        store = TokenStore(db)
        info, secret = store.create(name)
        return secret, store.webhook_secret(info.id)
    finally:
        db.dispose()


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    data_dir: Path
    log_path: Path

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as a service manager stops it; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def start_server(
    data_dir: Path, model: str | Path, *extra: str, timeout: float = 60, port: int | None = None
) -> Server:
    """``ovis-server serve`` on a free port (or ``port``); returns once /healthz answers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = data_dir / f"serve-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "ovis_server", "serve",
                "--host", "127.0.0.1", "--port", str(port),
                "--model", str(model), "--data-dir", str(data_dir),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Server(process, f"http://127.0.0.1:{port}", data_dir, log_path)

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{server.base_url}/healthz", timeout=2).status_code == 200
        return False

    try:
        wait_for(healthy, timeout=timeout, interval=0.2)
    except BaseException:
        server.kill()
        raise
    return server


@dataclass
class Cluster:
    """Processes a test starts, all stopped at its end whatever happened."""

    servers: list[Server] = field(default_factory=list)
    workers: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)

    def worker(self, data_dir: Path, model: Path, *extra: str) -> subprocess.Popen[bytes]:
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = data_dir / f"worker-{len(self.workers)}.log"
        log = log_path.open("wb")
        self.logs.append(log)
        command = [sys.executable, "-m", "ovis_server", "worker"]
        command += ["--model", str(model), "--data-dir", str(data_dir), *extra]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.workers.append((process, log_path))
        return process

    def worker_logs(self) -> str:
        return "".join(path.read_text(errors="replace") for _, path in self.workers)

    def close(self) -> None:
        for process, _ in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in self.workers:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        for server in self.servers:
            server.kill()
        for log in self.logs:
            log.close()


def submit(client: httpx.Client, **fields: Any) -> str:
    body = {"prompt": "a shop sign that reads OVIS", "num_inference_steps": 2, **fields}
    response = client.post("/v1/models/aidc-ai/ovis-image", json=body)
    assert response.status_code == 200, response.text
    request_id: str = response.json()["request_id"]
    return request_id


def wait_result(client: httpx.Client, request_id: str, timeout: float = 180) -> dict[str, Any]:
    """Poll /result until the job reaches a final state."""

    def final() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/requests/{request_id}/result").json()
        return body if body["status"] in FINAL_RESULT_STATES else None

    return wait_for(final, timeout=timeout, interval=0.1)


def status_of(client: httpx.Client, request_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/requests/{request_id}/status")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def download(url: str) -> Image.Image:
    """Fetch an output URL as a client does: a plain GET, no Authorization header."""
    response = httpx.get(url, timeout=60)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray[Any, Any]:
    return np.asarray(image.convert("RGB"), dtype=np.int16)
