"""The store under faults: a locked database, an unwritable files store, racing submits,
and the secrets it keeps at rest."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ovis_server.db.connect import SQLITE_FILE

from .helpers import run_cli


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_data_dir_and_database_are_private_whatever_the_umask(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with umask(0o022):
        run_cli("token", "create", "--name", "a", "--data-dir", str(data_dir))
    database = data_dir / SQLITE_FILE
    assert mode(data_dir) == 0o700
    assert mode(database) == 0o600
    companions = [data_dir / (SQLITE_FILE + suffix) for suffix in ("-wal", "-shm")]
    for path in [*companions, *data_dir.glob("*.lock")]:
        if path.exists():
            assert mode(path) == 0o600, path

    # An existing deployment's looser modes are tightened on the next start.
    data_dir.chmod(0o755)
    database.chmod(0o644)
    with umask(0o022):
        run_cli("token", "list", "--data-dir", str(data_dir))
    assert mode(data_dir) == 0o700
    assert mode(database) == 0o600
    for path in companions:
        if path.exists():
            assert mode(path) == 0o600, path
