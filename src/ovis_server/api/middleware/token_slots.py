"""``TokenSlots``: a cap on the calls one token holds open (status streams, ``Prefer:
wait``); a route takes a slot with ``hold_slot``."""

from __future__ import annotations

from collections import Counter

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ovis_server.api.errors import too_many

SLOT_RETRY_SECONDS = 5
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
