"""Running the real server for tests: ``ovis-server serve`` on a free loopback port."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import numpy as np
from PIL import Image

from ovis_server.api.app import create_app
from ovis_server.api.middleware.access_log import redact_access_log
from ovis_server.api.server import ApiServer, server_config
from ovis_server.config import Settings
from ovis_server.db.connect import connect, migrate
from ovis_server.jobs.events import utcnow
from ovis_server.jobs.job import NewJob, StoredOutput
from ovis_server.jobs.stats import StatsReader
from ovis_server.jobs.store import JobStore
from ovis_server.storage.base import FileStore, output_key
from ovis_server.tokens import TokenStore
from ovis_server.worker.supervisor import worker_command, worker_environment

T = TypeVar("T")

FINAL_RESULT_STATES = {"succeeded", "failed", "cancelled"}

# httpx makes a TLS context for every client (reading certifi's whole CA bundle: 29 ms of
# CPU on the 2-core machine), and httpx.get and its kin make a client a call. The servers
# the tests start speak plain HTTP on loopback: the tests' clients share this one context.
TLS = httpx.create_ssl_context()


def http_get(url: str, **kwargs: Any) -> httpx.Response:
    """``httpx.get``, with the tests' shared TLS context."""
    return httpx.get(url, verify=TLS, **kwargs)


def http_request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """``httpx.request``, with the tests' shared TLS context."""
    return httpx.request(method, url, verify=TLS, **kwargs)


def loopback_client(base_url: str, token: str | None, **kwargs: Any) -> httpx.Client:
    """A client of the server at ``base_url``, sending ``token`` as its bearer token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=60, verify=TLS, **kwargs)


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
    """A new token's secret, made as ``token create`` makes it (tests/e2e/test_cli.py runs that
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
        return loopback_client(self.base_url, token, **kwargs)

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
            return http_get(f"{server.base_url}/healthz", timeout=2).status_code == 200
        return False

    try:
        wait_for(healthy, timeout=timeout, interval=0.2)
    except BaseException:
        server.kill()
        raise
    return server


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # serve's


class LogRecorder(logging.Handler):
    """Keeps what this process logs, formatted as ``serve`` writes it to stderr."""

    def __init__(self, level: str) -> None:
        super().__init__(level.upper())
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        with self.lock or contextlib.nullcontext():
            return "".join(line + "\n" for line in self.lines)


class InProcessServer:
    """What ``serve`` runs, with its API in this process: ``create_app`` under uvicorn, as
    ``serve`` configures it, on a free loopback port, in a thread; and (unless
    ``settings.no_worker``) its worker as a real ``ovis-server worker`` process, started as
    ``serve`` starts it. Tests of crashes, kills and restarts use ``start_server`` instead."""

    def __init__(self, settings: Settings) -> None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        port: int = listening.getsockname()[1]
        self.settings = settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
        self.data_dir = settings.data_dir
        self.base_url = f"http://127.0.0.1:{port}"
        try:
            self.app = create_app(settings)
        except BaseException:
            listening.close()
            raise
        # The test run's logging stays as it is: uvicorn's loggers are not configured, and
        # what the server logs is recorded as well as shown by pytest.
        config = server_config(self.app, settings, log_config=None)
        redact_access_log()
        self._recorder = LogRecorder(settings.log_level)
        for name in ("ovis_server", "uvicorn"):
            logger = logging.getLogger(name)
            logger.setLevel(min(logger.getEffectiveLevel(), self._recorder.level))
        logging.getLogger().addHandler(self._recorder)
        self._uvicorn = ApiServer(config, self.app.state.hub)
        self._thread = threading.Thread(
            target=self._uvicorn.run, args=([listening],), name=f"api-{port}", daemon=True
        )
        self._thread.start()
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_log_path = self.data_dir / f"worker-{port}.log"
        try:
            wait_for(self._started, timeout=60, interval=0.02)
            if not settings.no_worker:
                with self.worker_log_path.open("wb") as log:
                    self.worker = subprocess.Popen(
                        worker_command(),
                        env=worker_environment(settings),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
        except BaseException:
            self.stop()
            listening.close()
            raise

    def _started(self) -> bool:
        if not self._thread.is_alive():
            raise RuntimeError(f"the API did not start:\n{self.log()}")
        return bool(self._uvicorn.started)

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        return loopback_client(self.base_url, token, **kwargs)

    def token(self, name: str) -> str:
        """A new token's secret (see ``create_token``)."""
        return new_token(self.settings.db_url, name)[0]

    def token_with_webhook_secret(self, name: str) -> tuple[str, str]:
        return new_token(self.settings.db_url, name)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ovis-server ARGS`` on this server's data directory and database."""
        env = {"OVIS_SERVER_DATABASE_URL": self.settings.database_url or ""}
        return run_cli(*args, "--data-dir", str(self.data_dir), check=check, env=env)

    def log(self) -> str:
        """What this process logged while the server ran (all of it: other servers in this
        process too), then its worker's log."""
        worker = self.worker_log_path.read_text(errors="replace") if self.worker else ""
        return self._recorder.text() + worker

    def unfinished_jobs(self) -> int:
        with self.app.state.db.connect() as conn:
            return sum(StatsReader(self.app.state.db).unfinished_counts(conn).values())

    def wait_until_ready(self, timeout: float = 120) -> None:
        """Until /readyz answers 200: a worker has loaded the model."""

        def ready() -> bool:
            if self.worker is not None and self.worker.poll() is not None:
                code = self.worker.returncode
                raise RuntimeError(f"the worker exited with {code}:\n{self.log()}")
            return http_get(f"{self.base_url}/readyz", timeout=10).status_code == 200

        wait_for(ready, timeout=timeout, interval=0.1)

    def stop(self) -> None:
        """As ``serve`` stops: the API, then its worker (SIGTERM: it puts its job back)."""
        if self._thread.is_alive():
            self._uvicorn.handle_exit(signal.SIGTERM, None)
            self._thread.join(60)
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(60)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait(30)
        logging.getLogger().removeHandler(self._recorder)
        self.app.state.db.dispose()


# The fixtures ``shared_server`` and ``fresh_server`` (tests/e2e/conftest.py).
ServerFactory = Callable[..., InProcessServer]


class MotoS3:
    """moto's S3 server on a fixed loopback port, with one bucket, that a test can take
    away and bring back (the objects stay: moto keeps them in this process, for every
    server it starts; hence a bucket of its own for each)."""

    def __init__(self) -> None:
        self.bucket = f"ovis-test-{uuid.uuid4().hex[:12]}"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server: Any = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def objects(self) -> list[str]:
        """The keys in the bucket."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        listing = client.list_objects_v2(Bucket=self.bucket)
        return [item["Key"] for item in listing.get("Contents", [])]


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


def complete_with_file(store: JobStore, files: FileStore, request_id: str) -> str:
    """Play the worker: claim the next job (it must be ``request_id``), store a file for it
    and record it completed; returns the file's key."""
    claimed = store.claim_next("test-worker", 30)
    assert claimed is not None
    assert claimed.id == request_id
    key = output_key(request_id, 0, "png")
    files.put(key, b"not really a png", "image/png")
    store.complete(request_id, "test-worker", [StoredOutput(key, "image/png", 64, 64)])
    return key


def queue_job(
    store: JobStore,
    request_id: str,
    model_id: str = "aidc-ai/ovis-image",
    deadline_in: float | None = None,
) -> None:
    """A four-step job of ``model_id`` straight into ``store``'s queue (no API), ending
    ``deadline_in`` seconds from now if given."""
    store.submit(
        NewJob(
            id=request_id,
            token_id="tok",
            model_id=model_id,
            input={"prompt": request_id},
            seed=1,
            progress_total=4,
            batch_key=f"{model_id}:k",
            deadline=None if deadline_in is None else utcnow() + timedelta(seconds=deadline_in),
        )
    )


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
    response = http_get(url, timeout=60)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


TOLERANCE = 2  # out of 255: how far our engine's image may be from stock diffusers'


def max_diff(a: Image.Image | None, b: Image.Image | None) -> int:
    """The largest difference of one channel of one pixel between two images."""
    assert a is not None
    assert b is not None
    assert a.size == b.size
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def pixels(image: Image.Image) -> np.ndarray[Any, Any]:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# URLs no outbound call may reach (webhooks, input images, LoRA downloads): every
# notation of loopback, private, link-local, metadata and reserved addresses, and
# credentials or schemes that are not http(s).
REFUSED_URLS = [
    "http://127.0.0.1/h",
    "http://127.0.0.2:8080/h",
    "http://localhost/h",
    "http://LOCALHOST./h",
    "http://api.localhost/h",
    "http://0.0.0.0/h",
    "http://0/h",
    "http://2130706433/h",  # decimal
    "http://0x7f000001/h",  # hex
    "http://017700000001/h",  # octal
    "http://0x7f.1/h",
    "http://0177.0.0.1/h",
    "http://127.1/h",
    "http://[::1]/h",
    "http://[::]/h",
    "http://[::ffff:127.0.0.1]/h",  # IPv4-mapped
    "http://[::ffff:a9fe:a9fe]/h",
    "http://[64:ff9b::a9fe:a9fe]/h",  # NAT64 of 169.254.169.254
    "http://[2002:c0a8:101::]/h",  # 6to4 of 192.168.1.1
    "http://10.1.2.3/h",
    "http://172.16.0.1/h",
    "http://192.168.1.1/h",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/h",  # carrier-grade NAT
    "http://[fe80::1]/h",
    "http://[fc00::1]/h",
    "http://[fd12:3456::1]/h",
    "http://224.0.0.1/h",
    "http://[ff02::1]/h",
    "http://240.0.0.1/h",
    "http://255.255.255.255/h",
    "http://user:pass@example.com/h",
    "http://user@example.com/h",
    "ftp://example.com/h",
    "file:///etc/passwd",
    "gopher://example.com/h",
    "http://%6c%6fcalhost/h",
]
