"""Claims by model: a worker takes only the queued jobs of the model it has loaded, oldest
first, from an index on (status, model_id, seq) rather than a scan past other models' jobs."""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.create_index("ix_jobs_status_model_id_seq", "jobs", ["status", "model_id", "seq"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_model_id_seq", table_name="jobs")
