"""The status call's short path: what clients call most (they poll it until the job
ends), answered without FastAPI's routing and dependency resolution.

``GET /v1/requests/{id}/status`` with no query string, from a token verified within the
last second (``TokenStore.verified``), is answered here: the one database read made on
the event loop (SQLite through the engine; PostgreSQL through db/loop_reads.py), or else
in the thread pool, the body rendered once by pydantic-core. Every other call (a query string, a
token not verified lately, no token, any other path) goes on to the FastAPI route, which
answers the same call with the same body; that route is what /openapi.json documents.
It runs inside the HTTP edge's middleware (connection cap, Host check, body limit,
security headers), which judge it as any other call.
"""

from __future__ import annotations

import contextlib
import re

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Receive, Scope, Send

from ovis_server.api.auth import verified_caller
from ovis_server.api.errors import ApiError, database_error_response, error_response
from ovis_server.api.runcomfy.rendering import wire_json
from ovis_server.api.runcomfy.requests import OwnedRequests
from ovis_server.api.state import base_url
from ovis_server.db.loop_reads import LoopReadError

STATUS_PATH = re.compile(r"/v1/requests/([^/]+)/status")


class StatusShortPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "GET" and not scope["query_string"]:
            match = STATUS_PATH.fullmatch(scope["path"])
        caller = verified_caller(request := Request(scope)) if match else None
        if match is None or caller is None:
            await self.app(scope, receive, send)
            return
        requests: OwnedRequests = request.app.state.requests
        request_id, url = match.group(1), base_url(request)
        response: Response
        try:
            body = None
            if requests.store.reads_at_once():
                # SQLite: the read here, on the event loop, tried once. In a thread it cost
                # a hop and, more, the wait to take the GIL back after each SQLite call
                # (py-spy: a third of the call's time). A busy database, or no idle
                # connection, goes on below, to a thread and the store's retries.
                with contextlib.suppress(SQLAlchemyError):
                    body = requests.status(caller.token_id, request_id, url, once=True)
            elif requests.loop_reads is not None:
                # PostgreSQL: the read on the event loop too (db/loop_reads.py), tried once.
                with contextlib.suppress(LoopReadError):
                    body = await requests.status_on_loop(caller.token_id, request_id, url)
            if body is None:
                body = await run_in_threadpool(requests.status, caller.token_id, request_id, url)
        except ApiError as exc:
            response = error_response(exc)
        except SQLAlchemyError as exc:
            response = database_error_response(request, exc)
        else:
            response = Response(wire_json(body), media_type="application/json")
        await response(scope, receive, send)
