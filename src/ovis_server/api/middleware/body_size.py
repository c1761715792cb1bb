"""The HTTP edge: what one client may send and hold open, judged before any route parses.

Pure ASGI middleware (they see the raw byte stream, so nothing is buffered to judge it):
``ConnectionLimit`` caps requests in progress server-wide, ``AllowedHosts`` refuses Host
headers the server does not answer to, ``BodySizeLimit`` stops reading a body at its cap
and ``TokenSlots`` caps the calls one token holds open (status streams, ``Prefer: wait``).
``check_json_depth`` bounds nesting before a client's JSON reaches ``json.loads``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import accumulate

from fastapi import Request
from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ovis_server.api.errors import (
    BODY_TOO_LARGE,
    HOST_REFUSED,
    INVALID_INPUT,
    SERVER_BUSY,
    ApiError,
    error_response,
    too_many,
)

# Deeper than any input this API takes (image_size is 2), shallow enough that no parser
# on the way recurses into trouble.
MAX_JSON_DEPTH = 32
# Probes stay answerable while the server refuses work.
UNCAPPED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
BUSY_RETRY_SECONDS = 1
SLOT_RETRY_SECONDS = 5


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


_SCOPE_KEY = "ovis_server.token_slots"


class TokenSlots:
    """At most ``per_token`` calls held open per token: a route takes a slot with
    ``hold_slot``, and it is given back when the exchange ends, however it ends."""

    def __init__(self, app: ASGIApp, per_token: int) -> None:
        self.app = app
        self.per_token = per_token
        self.held: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        taken: list[str] = []
        scope[_SCOPE_KEY] = (self, taken)
        try:
            await self.app(scope, receive, send)
        finally:
            for token_id in taken:
                self.held[token_id] -= 1
                if self.held[token_id] <= 0:
                    del self.held[token_id]

    def take(self, taken: list[str], token_id: str) -> None:
        if self.per_token > 0 and self.held[token_id] >= self.per_token:
            raise too_many(
                f"this token holds {self.held[token_id]} status streams and waiting submits "
                "open, the most allowed; close one or retry later",
                SLOT_RETRY_SECONDS,
            )
        self.held[token_id] += 1
        taken.append(token_id)


def hold_slot(request: Request, token_id: str) -> None:
    """Hold one of ``token_id``'s slots until this request ends; 429 when none is free."""
    found = request.scope.get(_SCOPE_KEY)
    if found is not None:  # an app assembled without TokenSlots has no cap
        slots, taken = found
        slots.take(taken, token_id)


# JSON strings (with their escapes, up to the end if unterminated), which may hold
# brackets that nest nothing. Possessive: one pass, whatever the input.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NESTING = [0] * 256
for _open, _close in (b"[]", b"{}"):
    _NESTING[_open], _NESTING[_close] = 1, -1


def json_depth(body: bytes | bytearray) -> int:
    """How deep ``body``'s arrays and objects nest, read without parsing it (for malformed
    JSON, an estimate; the parser refuses it after)."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_NESTING.__getitem__, brackets)), default=0)


def check_json_depth(body: bytes | bytearray, limit: int = MAX_JSON_DEPTH) -> None:
    """422 for JSON nested deeper than ``limit``, before a recursive parser meets it."""
    if json_depth(body) > limit:
        raise ApiError(
            422,
            INVALID_INPUT,
            f"the JSON body nests arrays and objects deeper than {limit} levels",
        )


async def read_body(request: Request) -> bytearray:
    """The request's body, grown in one buffer as it arrives: no list of pieces joined
    into a second copy (a submit's body may be 16 MiB, and several arrive at once)."""
    body = bytearray()
    async for piece in request.stream():
        body += piece
    return body
