"""``AllowedHosts``: Host headers the server does not answer to get the contract's 400."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ovis_server.api.errors import HOST_REFUSED, ApiError, error_response


class _HostCheckSend:
    """The ``send`` handed to Starlette's check: it holds the real one for the app, and
    notes (instead of sending) the plain-text 400 the check answers a bad Host with."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.refused = False

    async def __call__(self, message: Message) -> None:
        self.refused = True


class AllowedHosts(TrustedHostMiddleware):
    """Starlette's Host check (``*.example.com`` patterns allowed), answering with the
    contract's error body and never redirecting."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        super().__init__(self._allowed, allowed_hosts=list(allowed_hosts) or ["*"])
        self.www_redirect = False
        self.inner = app

    async def _allowed(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert isinstance(send, _HostCheckSend)
        await self.inner(scope, receive, send.send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        checked = _HostCheckSend(send)
        await super().__call__(scope, receive, checked)
        if checked.refused:
            host = Headers(scope=scope).get("host", "")
            error = ApiError(
                400, HOST_REFUSED, f"this server does not answer to the Host {host[:100]!r}"
            )
            await error_response(error)(scope, receive, send)
