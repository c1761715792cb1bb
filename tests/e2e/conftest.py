"""The server tier's fixtures: the tiny checkpoints, loaded engines, job stores on both
databases, moto's S3, and the server: in this process (``shared_server``,
``fresh_server``) wherever the process boundary is not what a test is about. Request
bodies more than one module sends are in ``bodies.py``, helpers in ``helpers.py``.

Every test here is marked ``slow``; those that run on PostgreSQL ``postgres`` and those
that drive Chromium ``browser`` (``pytest -m "not postgres"`` and the like pick them)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import httpx
import pytest

from ovis_server.config import Settings
from ovis_server.db.connect import connect, migrate, sqlite_url
from ovis_server.engine.pipeline import Engine
from ovis_server.jobs.store import JobStore

from .bodies import Z_IMAGE_ID
from .faults import install_hooks
from .helpers import Cluster, InProcessServer, MotoS3, Server, ServerFactory, run_cli, wait_for

# Every worker the tests start loads the tests' hooks (faults.py): a job whose prompt is
# marked slow (bodies.SLOW) waits at each step, and a test's use_faults adds its faults.
# Any other job runs as it would without them.
install_hooks(os.environ)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here not in item.path.parents:
            continue
        item.add_marker(pytest.mark.slow)
        fixtures = getattr(item, "fixturenames", ())
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        if any(value == "postgresql" for value in params.values() if isinstance(value, str)):
            item.add_marker(pytest.mark.postgres)
        if "browser" in fixtures:
            item.add_marker(pytest.mark.browser)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, *options: str) -> Path:
    """A tiny checkpoint written by ``ovis-server tiny-model DIRECTORY *options``, once for
    the whole run: pytest-xdist's processes share the run's temporary folder (the parent of
    each one's own), and the first to get there builds it while the others wait."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the parent holds earlier runs' folders
        directory = tmp_path_factory.mktemp(name) / "tiny"
        run_cli("tiny-model", str(directory), *options)
        return directory
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent
    directory = shared / name / "tiny"
    with FileLock(str(shared / f"{name}.lock")):
        if not directory.exists():
            building = shared / name / "building"
            run_cli("tiny-model", str(building), *options)
            building.rename(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint written once per run by ``ovis-server tiny-model``."""
    return built_once(tmp_path_factory, "weights")


@pytest.fixture(scope="session")
def engine(tiny_weights: Path) -> Engine:
    return Engine.load(str(tiny_weights), device="cpu")


@pytest.fixture(scope="session")
def z_tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Z-Image checkpoint written once per run by ``ovis-server tiny-model``."""
    return built_once(tmp_path_factory, "z-weights", "--model-id", Z_IMAGE_ID)


@pytest.fixture(scope="module")
def z_engine(z_tiny_weights: Path) -> Engine:
    """The tiny Z-Image engine in float32, one per module (LoRA tests load adapters in it)."""
    return Engine.load(str(z_tiny_weights), device="cpu", dtype="float32")


# An admin URL of a PostgreSQL server the tests may create databases on; .ci/run starts
# Debian's PostgreSQL and sets it.
POSTGRES_URL_ENV = "OVIS_TEST_POSTGRES_URL"
BACKENDS = ["sqlite", "postgresql"]


def fresh_postgres_database() -> tuple[str, Callable[[], None]]:
    """A new, empty database: its URL, and how to drop it."""
    admin = os.environ.get(POSTGRES_URL_ENV)
    if not admin:
        message = f"no PostgreSQL to test on: set {POSTGRES_URL_ENV} (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    import psycopg

    name = "ovis_test_" + uuid4().hex[:12]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(admin)._replace(path="/" + name))

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return url, drop


@contextmanager
def backend_environment(backend: str) -> Iterator[str | None]:
    """Point every ovis-server process started inside at ``backend`` (through the
    environment they inherit); yields the database URL, None for SQLite."""
    with pytest.MonkeyPatch.context() as patch:
        if backend == "sqlite":
            patch.delenv("OVIS_SERVER_DATABASE_URL", raising=False)
            yield None
            return
        url, drop = fresh_postgres_database()
        patch.setenv("OVIS_SERVER_DATABASE_URL", url)
        try:
            yield url
        finally:
            drop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The test runs once on SQLite and once on PostgreSQL."""
    return str(request.param)


@pytest.fixture
def database_url(backend: str) -> Iterator[str | None]:
    """The test runs once on SQLite and once on PostgreSQL, each a new database."""
    with backend_environment(backend) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    """A migrated job store, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        db = connect(sqlite_url(tmp_path))
        migrate(db)
        yield JobStore(db)
        db.dispose()
        return
    url, drop = fresh_postgres_database()
    db = connect(url)
    migrate(db)
    try:
        yield JobStore(db)
    finally:
        db.dispose()
        drop()


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Made-up AWS credentials in the environment, for moto's S3."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3(aws_credentials: None) -> Iterator[MotoS3]:
    """moto's S3 server on loopback with an empty bucket (``s3.bucket``), stopped at the end."""
    import boto3

    server = MotoS3()
    server.start()
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=server.bucket)
    yield server
    server.stop()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Servers and workers the test starts, all stopped at its end."""
    started = Cluster()
    yield started
    started.close()


def tiny_settings(tiny_weights: Path, data_dir: Path, **options: Any) -> Settings:
    """``serve --model TINY --data-dir DATA_DIR`` with ``options`` (Settings' field names);
    the environment counts as it does for ``serve``."""
    return Settings(model=str(tiny_weights), data_dir=data_dir, **options)


def nothing() -> None:
    pass


class SharedServers:
    """``shared_server``'s servers: the in-process server (and its worker process, unless
    ``no_worker=True``) for each backend and Settings a test asks for, started the first
    time and handed out again to later tests asking for the same. The default one
    (SQLite, no options: the ``server`` fixture's, which most modules use) lives for the
    session; every other only until the end of the module that started it (``end_module``):
    few modules ask for each, and idle, a server and its worker still poll their database,
    about 2 s of CPU a minute between them."""

    DEFAULT = ("sqlite",)

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.tiny_weights = tiny_weights
        self.started: dict[tuple[Any, ...], tuple[InProcessServer, Callable[[], None]]] = {}

    def __call__(self, backend: str = "sqlite", **options: Any) -> InProcessServer:
        key = (backend, *sorted(options.items()))
        if key not in self.started:
            database_url: str | None = None
            drop: Callable[[], None] = nothing
            if backend == "postgresql":
                database_url, drop = fresh_postgres_database()
            settings = tiny_settings(
                self.tiny_weights,
                self.tmp_path_factory.mktemp("shared"),
                database_url=database_url,
                **options,
            )
            try:
                started = InProcessServer(settings)
            except BaseException:
                drop()
                raise
            self.started[key] = (started, drop)
            if started.worker is not None:
                started.wait_until_ready()
        server = self.started[key][0]
        if server.worker is not None:
            wait_for(lambda: server.unfinished_jobs() == 0, timeout=600, interval=0.2)
        return server

    def stop(self, keep: tuple[Any, ...] | None = None) -> None:
        """Stop every server but ``keep``'s, and drop their databases."""
        for key in [key for key in self.started if key != keep]:
            server, drop = self.started.pop(key)
            try:
                server.stop()
            finally:
                drop()

    def end_module(self) -> None:
        self.stop(keep=self.DEFAULT)


@pytest.fixture(scope="session")
def shared_servers(
    tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path
) -> Iterator[SharedServers]:
    servers = SharedServers(tmp_path_factory, tiny_weights)
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def shared_server(shared_servers: SharedServers) -> Iterator[ServerFactory]:
    """``shared_server(backend="sqlite", **options)``: the in-process server (and its worker
    process, unless ``no_worker=True``) with these Settings, started the first time a test
    asks for it and handed out to every later test of the module that asks for the same
    (the default one, to every later test of the session: ``SharedServers``). With a
    worker, it is handed out ready and with no job queued or running. Tests keep to tokens
    of their own; state that is not per token (counters, the queue) they read as changes."""
    yield shared_servers
    shared_servers.end_module()


@pytest.fixture(scope="module")
def server(shared_server: ServerFactory) -> InProcessServer:
    """The shared in-process server with its defaults (SQLite, a worker)."""
    return shared_server()


@pytest.fixture(scope="module")
def bob(server: InProcessServer) -> Iterator[httpx.Client]:
    """A client of ``server`` with a token of its own, named bob."""
    with server.client(server.token("bob")) as client:
        yield client


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers (processes) a test starts, killed at its end whatever happened."""
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


@pytest.fixture
def fresh_server(tmp_path: Path, tiny_weights: Path) -> Iterator[ServerFactory]:
    """``fresh_server(data_dir=tmp_path, **options)``: a new in-process server (see
    ``shared_server``) for this test alone, stopped at its end; the database is the
    environment's (``database_url``), as for ``serve``."""
    started: list[InProcessServer] = []

    def start(data_dir: Path = tmp_path, **options: Any) -> InProcessServer:
        server = InProcessServer(tiny_settings(tiny_weights, data_dir, **options))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
