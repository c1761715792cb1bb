"""Connecting to the database and bringing its schema up to date."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.exc import DisconnectionError

if TYPE_CHECKING:
    from alembic.config import Config

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# The newest migration's revision: a database at it needs nothing, and is not handed to
# alembic (tests/unit/test_migrations.py checks this is the head of migrations/versions/).
HEAD_REVISION = "0008"
SQLITE_FILE = "ovis-server.db"
# Any fixed number works: it names the lock every process takes before migrating.
_PG_MIGRATION_LOCK = 0x0_715_5E7


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / SQLITE_FILE).resolve()}"


# The database holds the URL-signing key and every webhook secret: only the server's
# user may read it, whatever the umask.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")
SQLITE_BUSY_MS = 2000


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) if need be, and make it 0700."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != PRIVATE_DIR_MODE:
        path.chmod(PRIVATE_DIR_MODE)


def make_private_file(path: Path) -> None:
    """Create ``path`` empty if it is missing (so that no other mode is ever seen), and
    make it 0600."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, PRIVATE_FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)


def _secure_sqlite(database: str) -> None:
    """The data directory 0700; the database and its WAL, shared-memory and journal
    files 0600 (SQLite gives them the database's mode, but older ones may exist)."""
    path = Path(database)
    make_private_dir(path.parent)
    make_private_file(path)
    for suffix in SQLITE_COMPANIONS:
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            companion.chmod(PRIVATE_FILE_MODE)


def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while the worker writes; NORMAL keeps commits cheap and is
    # still crash-safe in WAL mode (a power cut may lose the last commits, not corrupt).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # A short wait per statement: the stores retry whole transactions (db/retry.py), so
    # that a long lock ends in a 503 for a client rather than a 30 s hang.
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# PostgreSQL: how long one connection attempt may take before it counts as a failure
# (retried like any lost connection, db/retry.py).
PG_CONNECT_TIMEOUT_SECONDS = 5
# The API's statements on PostgreSQL: a lock held by another session (a migration, a
# backup, an operator's LOCK TABLE) is waited for this long, then the statement fails
# with lock_not_available, which the stores retry (db/retry.py) and the API turns into
# its 503 (503001, Retry-After) once their retry window is over: a blocked call answers
# within about DEFAULT_RETRY_SECONDS + API_LOCK_TIMEOUT_MS, never without bound.
API_LOCK_TIMEOUT_MS = 2000
# ... and no statement of the API's runs longer than this (a runaway query, a lock
# that lock_timeout does not cover).
API_STATEMENT_TIMEOUT_MS = 15000


# Connections kept open: as many as the API's thread pool has threads (anyio's 40), so
# that under load none is opened and closed per call.
POOL_SIZE = 40
PG_POOL_SIZE = 30
# A pooled PostgreSQL connection unused this long is tested before use (the server may
# have restarted meanwhile); a busy one is not, so that a call costs one round trip. A
# connection that breaks in use is replaced by the stores' retries (db/retry.py).
PING_AFTER_IDLE_SECONDS = 5.0
_CHECKED_IN = "ovis_checked_in"


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info[_CHECKED_IN] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """SQLAlchemy's pessimistic disconnect handling, for idle connections only: a dead
    one raises DisconnectionError, and the pool hands out a fresh connection instead."""
    idle_since = record.info.get(_CHECKED_IN)
    if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
        return
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        dbapi_connection.rollback()
    except Exception as exc:
        raise DisconnectionError(f"a pooled connection was lost: {type(exc).__name__}") from exc


def pg_options(lock_timeout_ms: int | None, statement_timeout_ms: int | None) -> str | None:
    """The session settings a PostgreSQL connection starts with (libpq's ``options``)."""
    options = [
        f"-c {name}={value}"
        for name, value in (
            ("lock_timeout", lock_timeout_ms),
            ("statement_timeout", statement_timeout_ms),
        )
        if value
    ]
    return " ".join(options) or None


def connect(
    url: str, *, lock_timeout_ms: int | None = None, statement_timeout_ms: int | None = None
) -> Engine:
    """An engine for ``url`` (``sqlite:///…`` or ``postgresql://…``), tuned for this use.

    On PostgreSQL, ``lock_timeout_ms`` and ``statement_timeout_ms`` bound how long any
    statement on its connections may wait for a lock, and run (the API's: see
    ``API_LOCK_TIMEOUT_MS``); by default they are unbounded, as workers and migrations
    need (``migrate`` lifts them for its own transaction). SQLite waits at most
    ``SQLITE_BUSY_MS`` per statement whatever they say.
    """
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            _secure_sqlite(database)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_MS / 1000},
            pool_size=POOL_SIZE,
            max_overflow=20,
        )
        event.listen(engine, "connect", _tune_sqlite)
        return engine
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("postgresql"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ValueError(
                "--database-url postgresql://… needs psycopg: pip install 'ovis-server[postgresql]'"
            ) from None
        connect_args: dict[str, Any] = {"connect_timeout": PG_CONNECT_TIMEOUT_SECONDS}
        if options := pg_options(lock_timeout_ms, statement_timeout_ms):
            connect_args["options"] = options
        # Fewer kept than on SQLite: a PostgreSQL server's connections are shared by every
        # API replica and worker (max_connections is 100 by default).
        engine = create_engine(
            url, pool_size=PG_POOL_SIZE, max_overflow=10, connect_args=connect_args
        )
        event.listen(engine, "checkin", _note_checkin)
        event.listen(engine, "checkout", _ping_if_idle)
        return engine
    raise ValueError(f"--database-url must be sqlite:///PATH or postgresql://…, not {url!r}")


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Let one process at a time migrate: API replicas and workers all start by migrating."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            # Another process's migration may hold the lock for long: wait for it.
            lift_timeouts(conn)
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_MIGRATION_LOCK})
                conn.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).with_suffix(".migrate.lock")
    make_private_file(lock_path)
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def lift_timeouts(conn: Connection) -> None:
    """No lock or statement timeout for the rest of ``conn``'s transaction (PostgreSQL;
    nothing elsewhere): a migration waits for its locks, however long they are held."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SET LOCAL lock_timeout = 0"))
        conn.execute(text("SET LOCAL statement_timeout = 0"))


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


@contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Alembic's INFO lines (seven on a new database) only at --log-level debug.

    On a first start they would bury the token block; warnings and errors still show.
    """
    alembic_logger = logging.getLogger("alembic")
    if alembic_logger.isEnabledFor(logging.DEBUG):
        yield
        return
    previous = alembic_logger.level
    alembic_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        alembic_logger.setLevel(previous)


def migrate(engine: Engine) -> None:
    """Apply every migration the database lacks; safe to run from many processes at once.

    Every process that uses the database starts here, and nearly always it is up to date:
    that is read first, and alembic (0.1 to 0.2 s of CPU to import, on the 2-core machine)
    is imported only for a database that needs it."""
    if current_revisions(engine) == [HEAD_REVISION]:
        return
    with _migration_lock(engine), _quiet_alembic():
        from alembic import command  # quieted too: importing it logs its plug-ins at INFO

        command.upgrade(alembic_config(engine), "head")


def current_revisions(engine: Engine) -> list[str]:
    """The revisions alembic has recorded in the database: none for a new one."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return []
        return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
