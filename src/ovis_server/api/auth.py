"""Bearer tokens: every /v1 endpoint knows which token calls it."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from ovis_server.api.errors import ApiError, unauthorized
from ovis_server.tokens import TokenStore

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Caller:
    token_id: str


ANONYMOUS_CALLER = Caller(token_id=ANONYMOUS)


def bearer_secret(request: Request) -> str:
    """The secret of the request's ``Authorization: Bearer`` header, or a 401 that says
    what to send."""
    header = request.headers.get("authorization")
    if not header:
        raise unauthorized("missing Authorization header: send 'Authorization: Bearer <token>'")
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise unauthorized("malformed Authorization header: send 'Authorization: Bearer <token>'")
    return secret


async def authenticate(request: Request) -> Caller:
    """The calling token, or a 401 that says what to send (a FastAPI dependency).

    On the event loop: a token verified in the last second (``TokenStore.verified``) costs
    no query and no thread; only the others ask the database, in the thread pool."""
    if not request.app.state.settings.auth:
        return ANONYMOUS_CALLER
    secret = bearer_secret(request)
    tokens: TokenStore = request.app.state.tokens
    token = tokens.verified(secret) or await run_in_threadpool(tokens.authenticate, secret)
    if token is None:
        raise unauthorized("unknown or revoked token: create one with 'ovis-server token create'")
    return Caller(token_id=token.id)


def verified_caller(request: Request) -> Caller | None:
    """The calling token if it is known without a query (auth is off, or the token was
    verified in the last second); None otherwise, for ``authenticate`` to settle."""
    if not request.app.state.settings.auth:
        return ANONYMOUS_CALLER
    try:
        secret = bearer_secret(request)
    except ApiError:
        return None
    tokens: TokenStore = request.app.state.tokens
    token = tokens.verified(secret)
    return None if token is None else Caller(token_id=token.id)


def authorize_metrics(request: Request) -> None:
    """Let a scraper with the metrics token read /metrics (a FastAPI dependency).

    API tokens do not open it: the figures are the whole deployment's. Without a metrics
    token it stays closed unless the operator made it public (``--metrics-public``).
    """
    settings = request.app.state.settings
    if settings.metrics_public:
        return
    expected: str | None = settings.metrics_token
    if not expected:
        raise unauthorized(
            "/metrics is closed: start the server with --metrics-token (and send it as "
            "'Authorization: Bearer <metrics token>') or with --metrics-public"
        )
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        secret.strip().encode(), expected.encode()
    ):
        raise unauthorized("send the metrics token: 'Authorization: Bearer <metrics token>'")
