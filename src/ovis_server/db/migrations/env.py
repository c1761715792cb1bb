"""Alembic environment: runs on the engine ovis_server.db.migrate hands it."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from ovis_server.db.connect import lift_timeouts
from ovis_server.db.schema import metadata

engine = context.config.attributes["engine"]
assert isinstance(engine, Engine)

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        lift_timeouts(connection)  # the API's engine bounds lock waits; a migration waits
        context.run_migrations()
