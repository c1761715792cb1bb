"""Fixtures shared by the suite: the tiny checkpoint and a loaded engine."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import pytest

from ovis_server.db.connect import connect, migrate, sqlite_url
from ovis_server.engine.pipeline import Engine
from ovis_server.jobs.store import JobStore

from .helpers import Cluster, run_cli


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint written once per session by ``ovis-server tiny-model``."""
    directory = tmp_path_factory.mktemp("weights") / "tiny"
    run_cli("tiny-model", str(directory))
    return directory


@pytest.fixture(scope="session")
def engine(tiny_weights: Path) -> Engine:
    return Engine.load(str(tiny_weights), device="cpu")


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
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The test runs once on SQLite and once on PostgreSQL."""
    with backend_environment(request.param) as url:
        yield url


@pytest.fixture(scope="module", params=BACKENDS)
def module_database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    with backend_environment(request.param) as url:
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
def cluster() -> Iterator[Cluster]:
    """Servers and workers the test starts, all stopped at its end."""
    started = Cluster()
    yield started
    started.close()
