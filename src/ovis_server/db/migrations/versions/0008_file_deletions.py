"""File deletions owed: a deleted request's output files, kept on record until the store
has removed them (a bucket that cannot be reached is tried again, through restarts)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "file_deletions",
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _TIME, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("request_id", name="pk_file_deletions"),
    )
    op.create_index("ix_file_deletions_next_attempt_at", "file_deletions", ["next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_file_deletions_next_attempt_at", table_name="file_deletions")
    op.drop_table("file_deletions")
