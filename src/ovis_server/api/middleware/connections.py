"""``ConnectionLimit``: a cap on the requests in progress server-wide (the probes and
/metrics excepted, so they stay answerable while the server refuses work)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from ovis_server.api.errors import SERVER_BUSY, ApiError, error_response

# Probes stay answerable while the server refuses work.
UNCAPPED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
BUSY_RETRY_SECONDS = 1


class ConnectionLimit:
    """503 with Retry-After for a request beyond ``limit`` in progress at once (the probes
    and /metrics excepted)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.limit <= 0 or scope["path"] in UNCAPPED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            busy = ApiError(
                503,
                SERVER_BUSY,
                f"the server is answering {self.limit} requests already, the most it takes "
                "at once; retry after the Retry-After seconds",
                headers={"Retry-After": str(BUSY_RETRY_SECONDS)},
            )
            await error_response(busy)(scope, receive, send)
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1
