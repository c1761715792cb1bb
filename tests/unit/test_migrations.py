"""The schema's migrations: the head revision the code knows without asking alembic."""

from __future__ import annotations

from alembic.script import ScriptDirectory

from ovis_server.db.connect import HEAD_REVISION, MIGRATIONS


def test_the_head_revision_is_the_newest_migration() -> None:
    """A new migration moves HEAD_REVISION with it: otherwise every start would go through
    alembic (a database at the old head), or skip the new migration's upgrade."""
    assert ScriptDirectory(str(MIGRATIONS)).get_heads() == [HEAD_REVISION]
