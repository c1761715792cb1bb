"""Tables, written once for SQLite and PostgreSQL through SQLAlchemy Core."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.expression import false
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        # SQLite keeps text; without the offset the text sorts in time order.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only gives an auto-incrementing rowid to a column declared INTEGER.
SequenceId = BigInteger().with_variant(Integer(), "sqlite")

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    # sha256 of the secret: tokens are long random strings, so a plain hash is enough.
    Column("secret_hash", String(64), nullable=False, unique=True),
    # The first characters of the secret, to tell tokens apart in `token list`.
    Column("hint", String(16), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("revoked_at", UtcDateTime),
)

jobs = Table(
    "jobs",
    metadata,
    # Queue order: a job's position is the number of queued jobs with a smaller seq.
    Column("seq", SequenceId, primary_key=True, autoincrement=True),
    Column("id", String(128), nullable=False, unique=True),
    Column("token_id", String(32), nullable=False),
    Column("model_id", String(200), nullable=False),
    Column("input", JSON, nullable=False),
    Column("seed", BigInteger, nullable=False),
    # Jobs with the same batch key (model, size, steps, guidance) can run in one call.
    Column("batch_key", String(200), nullable=False),
    Column("status", String(16), nullable=False),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("progress_step", Integer, nullable=False, default=0),
    Column("progress_total", Integer, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("worker_id", String(200)),
    Column("lease_expires_at", UtcDateTime),
    Column("created_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime),
    Column("finished_at", UtcDateTime),
    Column("error_type", String(100)),
    Column("error_message", Text),
    Column("outputs", JSON),
    # Idempotent submits: a repeat of (token, key) within a day returns the same job;
    # the hash tells a true repeat from a different body sent under the same key.
    Column("idempotency_key", String(200)),
    Column("request_hash", String(64)),
    # Where the final result (and, if asked, every status change) is POSTed, and the base
    # of the absolute URLs in those bodies (what the submitting client called).
    Column("webhook_url", Text),
    Column("webhook_intermediate", Boolean, nullable=False, server_default=false()),
    Column("base_url", String(2000)),
    # When an unfinished job is cancelled (the submit's Cancel-After); None: never.
    Column("deadline", UtcDateTime),
    Index("ix_jobs_status_seq", "status", "seq"),
    # A worker claims the oldest queued job of its model (jobs of others may wait long).
    Index("ix_jobs_status_model_id_seq", "status", "model_id", "seq"),
    Index("ix_jobs_deadline", "deadline"),
    # Notes for the client that are not errors (the prompt was cut to what the model reads).
    Column("warnings", JSON),
    # /metrics reads only the jobs finished since its last scrape (seq: from the index alone).
    Index("ix_jobs_finished_at_seq", "finished_at", "seq"),
    Index("ix_jobs_token_id_created_at", "token_id", "created_at"),
    UniqueConstraint("token_id", "idempotency_key"),
    sqlite_autoincrement=True,
)

# Every state change of every job, appended in the transaction that makes it: status
# streams tail this log (one query per API process, however many streams are open).
job_events = Table(
    "job_events",
    metadata,
    Column("seq", SequenceId, primary_key=True, autoincrement=True),
    Column("request_id", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("step", Integer, nullable=False),
    Column("total", Integer, nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Index("ix_job_events_request_id_seq", "request_id", "seq"),
    sqlite_autoincrement=True,
)

# Webhook messages owed to clients, written with the state change they announce, so that a
# crash or restart loses none; delivered at least once, retried on a schedule.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    # The webhook-id header: receivers deduplicate on it.
    Column("id", String(40), primary_key=True),
    Column("request_id", String(128), nullable=False),
    Column("token_id", String(32), nullable=False),
    Column("url", Text, nullable=False),
    # The job's state when the message was made: a final one sends the result body.
    Column("status", String(16), nullable=False),
    Column("step", Integer, nullable=False),
    Column("total", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # pending, delivered or failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UtcDateTime, nullable=False),
    # A dispatcher holds a message while it sends it; a dead one's hold runs out.
    Column("claimed_until", UtcDateTime),
    Column("last_error", Text),
    Column("created_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime),
    Index("ix_webhook_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
    Index("ix_webhook_deliveries_request_id", "request_id"),
    Index("ix_webhook_deliveries_finished_at_id", "finished_at", "id"),
)

# Workers announce themselves and beat while alive: /readyz counts the living.
workers = Table(
    "workers",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("host", String(200), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("model", String(500), nullable=False),
    Column("device", String(50), nullable=False),
    Column("ready", Boolean, nullable=False, default=False),
    # Device memory in use: CUDA allocations on a GPU, the process's resident set on a CPU.
    Column("memory_bytes", BigInteger),
    Column("started_at", UtcDateTime, nullable=False),
    Column("heartbeat_at", UtcDateTime, nullable=False),
    # Why an alive worker takes no jobs (its files store refuses writes); None when well.
    Column("problem", String(500)),
    # What the worker is doing before it takes jobs (downloading, loading, warming, ready),
    # and the details /readyz shows: progress, memory profile, the sizes it can run.
    Column("phase", String(20)),
    Column("detail", JSON),
)

# Secrets the whole deployment shares (the URL signing key), so that every API replica
# signs and checks file URLs alike.
server_keys = Table(
    "server_keys",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)

# Output files owed a deletion: a request deleted (its row gone in the same transaction)
# whose files the store has not yet confirmed removed, tried again with backoff until it
# has (jobs/deletions.py); a restart loses none.
file_deletions = Table(
    "file_deletions",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UtcDateTime, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_file_deletions_next_attempt_at", "next_attempt_at"),
)
