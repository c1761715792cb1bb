"""The SQL database behind the job queue and the tokens: schema, connections, migrations."""

from ovis_server.db.connect import connect, migrate, sqlite_url

__all__ = ["connect", "migrate", "sqlite_url"]
