"""The HTTP API: RunComfy's Model API contract, served by FastAPI."""

from ovis_server.api.app import create_app

__all__ = ["create_app"]
