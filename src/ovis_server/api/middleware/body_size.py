"""``BodySizeLimit``: a body over its cap answers 413, judged on the raw byte stream before
any route parses (nothing is buffered to judge it)."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ovis_server.api.errors import BODY_TOO_LARGE, ApiError, error_response


class BodyTooLargeError(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            BODY_TOO_LARGE,
            f"the request body is larger than {limit} bytes, the most this server takes",
            # The rest of the body is never read, so the connection cannot carry another.
            headers={"Connection": "close"},
        )


class BodySizeLimit:
    """413 for a body over ``limit`` bytes: at once on its Content-Length, else (chunked)
    as soon as the bytes received pass it, when reading stops and the connection closes."""

    def __init__(self, app: ASGIApp, limit: int, wider: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        # Paths whose bodies have caps of their own (submits to models with image inputs,
        # whose data URIs are large): still hard caps, read the same way.
        self.wider = dict(wider or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit
        if scope["type"] == "http" and scope["path"] in self.wider:
            limit = self.wider[scope["path"]]
        if scope["type"] != "http" or limit <= 0:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            await error_response(BodyTooLargeError(limit))(scope, receive, send)
            return
        received = 0
        over = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLargeError(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # whatever the app made of the refusal, the 413 below is sent
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await error_response(BodyTooLargeError(self.limit))(scope, receive, send)
