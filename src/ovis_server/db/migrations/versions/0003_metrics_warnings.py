"""Indexes /metrics reads through, and the warnings a job carries for its client."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("warnings", sa.JSON(), nullable=True))
    op.create_index("ix_jobs_finished_at_seq", "jobs", ["finished_at", "seq"])
    op.create_index(
        "ix_webhook_deliveries_finished_at_id", "webhook_deliveries", ["finished_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_finished_at_id", table_name="webhook_deliveries")
    op.drop_index("ix_jobs_finished_at_seq", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("warnings")
