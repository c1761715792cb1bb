"""Running the app under uvicorn: the options ``serve`` runs it with, and a server that
ends open status streams as soon as it is told to stop."""

from __future__ import annotations

from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from ovis_server.api.stream import StatusHub
from ovis_server.config import Settings

# Connections still busy this long after the server is told to stop are cut.
GRACEFUL_SHUTDOWN_SECONDS = 30


class ApiServer(uvicorn.Server):
    """uvicorn, ending open status streams as soon as it is told to stop: it waits for
    every connection to close before it shuts down, and a stream would not by itself."""

    def __init__(self, config: uvicorn.Config, hub: StatusHub) -> None:
        super().__init__(config)
        self.hub = hub

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.hub.close_streams_soon()


def server_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """How ``serve`` runs ``app`` under uvicorn (the tests run it so in their own process,
    with ``overrides``)."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "proxy_headers": True,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
        # A backstop under the app's own cap (which answers 503 with the error body):
        # connections, idle ones too, beyond twice it get uvicorn's bare 503.
        "limit_concurrency": 2 * settings.max_connections if settings.max_connections else None,
    }
    return uvicorn.Config(app, **(options | overrides))
