"""Deadlines: a job's Cancel-After, as the moment it is cancelled if still unfinished."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("deadline", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_deadline", "jobs", ["deadline"])


def downgrade() -> None:
    op.drop_index("ix_jobs_deadline", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("deadline")
