"""The /v1 endpoints: thin handlers over the catalogue pages, submissions and a token's
requests (catalogue.py, submissions.py, requests.py)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ovis_server.api.auth import Caller, authenticate
from ovis_server.api.middleware.token_slots import hold_slot
from ovis_server.api.request_body import read_body
from ovis_server.api.runcomfy.catalogue import CataloguePages
from ovis_server.api.runcomfy.protocol import (
    CancelResponse,
    CatalogueQuery,
    CategoryList,
    ErrorBody,
    ModelDetail,
    ModelList,
    RequestList,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
)
from ovis_server.api.runcomfy.rendering import wire_json
from ovis_server.api.runcomfy.requests import OwnedRequests
from ovis_server.api.runcomfy.submissions import Submissions
from ovis_server.api.state import base_url
from ovis_server.api.stream import StatusHub, status_events, wait_final
from ovis_server.webhooks.params import Webhook

CallerDep = Annotated[Caller, Depends(authenticate)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing, malformed, unknown or revoked token"},
}
_REQUEST_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    403: {"model": ErrorBody, "description": "The request belongs to another token"},
    404: {"model": ErrorBody, "description": "Unknown, deleted or expired request_id"},
}

router = APIRouter(prefix="/v1", tags=["Model API"])
# Every route leaves optional fields out rather than sending null: queue_position only
# while queued, output only when succeeded, error only when failed.


def catalogue(request: Request) -> CataloguePages:
    pages: CataloguePages = request.app.state.catalogue
    return pages


def submissions(request: Request) -> Submissions:
    taker: Submissions = request.app.state.submissions
    return taker


def owned_requests(request: Request) -> OwnedRequests:
    requests: OwnedRequests = request.app.state.requests
    return requests


@router.get("/models", responses=_ERRORS, response_model_exclude_none=True)
def list_models(
    request: Request, _caller: CallerDep, query: Annotated[CatalogueQuery, Query()]
) -> ModelList:
    """The catalogue, filtered and paged as RunComfy's CLI asks; also OpenAI's model list."""
    return catalogue(request).list_models(query)


# Before the model-id route below, which would read "categories" as a model id.
@router.get("/models/categories", responses=_ERRORS)
def list_categories(request: Request, _caller: CallerDep) -> CategoryList:
    return catalogue(request).categories()


@router.get(
    "/models/{model_id:path}",
    responses={**_ERRORS, 404: {"model": ErrorBody, "description": "Unknown model_id"}},
    response_model_exclude_none=True,
)
def get_model(model_id: str, request: Request, _caller: CallerDep) -> ModelDetail:
    return catalogue(request).model(model_id)


@router.post(
    "/models/{model_id:path}",
    responses={
        **_ERRORS,
        404: {"model": ErrorBody, "description": "Unknown model_id"},
        413: {"model": ErrorBody, "description": "The body is over --max-body-size"},
        422: {"model": ErrorBody, "description": "The input does not match the schema"},
        429: {
            "model": ErrorBody,
            "description": "Queue full, rate limited, or too many waits open (Retry-After)",
        },
    },
    # The body: the input schema of the model (document_submit_body).
    response_model_exclude_none=True,
)
async def submit(
    model_id: str,
    request: Request,
    response: Response,
    caller: CallerDep,
    idempotency_key: Annotated[
        str | None,
        Header(description="Repeat a submit with the same key to get the same request_id."),
    ] = None,
    prefer: Annotated[
        str | None,
        Header(
            description="wait=N (N <= 60): answer with the result body if the job finishes "
            "within N seconds, else with the usual submit answer."
        ),
    ] = None,
    cancel_after: Annotated[
        str | None,
        Header(
            description="Seconds, or a duration such as 90s, 5m or 1h30m (1 s to 7 days): "
            "the job ends `cancelled`, with the reason as its `error`, if it has not "
            "completed by then, queued or running."
        ),
    ] = None,
    webhook: Annotated[
        str | None,
        Query(
            max_length=2000,
            description="An http(s) URL that gets the result body, signed, when the job "
            "ends (or send a `webhook` field in the body).",
        ),
    ] = None,
    webhook_intermediate_status: Annotated[
        bool | None,
        Query(description="Also POST the status body on every status change."),
    ] = None,
) -> SubmitResponse | ResultResponse:
    # Settled before anything is queued: a refusal after it would leave a job behind
    # that a client retrying the refused submit would queue again.
    wait = wait_preference(prefer)
    if wait:
        hold_slot(request, caller.token_id)
    # The body is read here rather than declared, so that an unknown model answers 404
    # before its body is judged against a schema it does not have.
    body = await read_body(request)
    submitted = await run_in_threadpool(
        submissions(request).submit,
        token_id=caller.token_id,
        model_id=model_id,
        body=body,
        base_url=base_url(request),
        idempotency_key=idempotency_key,
        webhook=Webhook(webhook, webhook_intermediate_status),
        cancel_after=cancel_after,
    )
    if wait:
        hub: StatusHub = request.app.state.hub
        requests = owned_requests(request)
        finished = await wait_final(
            hub, requests.store, submitted.request_id, wait, caller.token_id
        )
        if finished is not None:
            response.headers["Preference-Applied"] = f"wait={wait}"
            return requests.bodies.result_body(finished, base_url(request))
    return submitted


MAX_WAIT_SECONDS = 60
# wait=N: N in ASCII digits, quoted or not (RFC 7240 allows both), short enough to read.
_WAIT_VALUE = re.compile(r'"?([0-9]{1,9})"?')


def wait_preference(prefer: str | None) -> int:
    """The seconds ``Prefer: wait=N`` asks for (capped at 60); 0 without it, and for a
    value that is not a number (RFC 7240: a preference not understood is ignored)."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.split(";", 1)[0].strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        match = _WAIT_VALUE.fullmatch(value.strip())
        return min(int(match.group(1)), MAX_WAIT_SECONDS) if match else 0
    return 0


@router.get("/requests", responses=_ERRORS, response_model_exclude_none=True)
def list_requests(
    request: Request,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Requests per page.")] = 20,
    cursor: Annotated[
        str | None,
        Query(pattern=r"^[0-9]{1,18}$", description="next_cursor of the previous page."),
    ] = None,
) -> RequestList:
    """The calling token's requests, newest first (the playground's gallery)."""
    return owned_requests(request).list_requests(caller.token_id, limit, cursor, base_url(request))


@router.get(
    "/requests/{request_id}/status",
    responses=_REQUEST_ERRORS,
    response_model=StatusResponse,
    response_model_exclude_none=True,
)
def get_status(
    request_id: str,
    request: Request,
    caller: CallerDep,
    logs: Annotated[bool, Query(description="Add the job's timestamped log lines.")] = False,
) -> Response:
    # What clients call most: the body is rendered once, by pydantic-core, rather than
    # validated again and encoded by FastAPI (the same JSON).
    body = owned_requests(request).status(caller.token_id, request_id, base_url(request), logs)
    return Response(wire_json(body), media_type="application/json")


@router.get(
    "/requests/{request_id}/result", responses=_REQUEST_ERRORS, response_model_exclude_none=True
)
def get_result(request_id: str, request: Request, caller: CallerDep) -> ResultResponse:
    return owned_requests(request).result(caller.token_id, request_id, base_url(request))


@router.get(
    "/requests/{request_id}/stream",
    response_class=StreamingResponse,
    responses={
        **_REQUEST_ERRORS,
        429: {"model": ErrorBody, "description": "This token holds too many streams open"},
        200: {
            "description": "Server-sent events: `status` (the status body) on every change, "
            "then `result` (the result body) once final, then the stream ends; a "
            "`: keep-alive` comment every 15 s of quiet.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
)
async def stream_status(request_id: str, request: Request, caller: CallerDep) -> StreamingResponse:
    requests = owned_requests(request)
    await run_in_threadpool(requests.owned_job, caller.token_id, request_id)
    hold_slot(request, caller.token_id)
    hub: StatusHub = request.app.state.hub
    events = status_events(
        requests.bodies, requests.store, hub, request_id, base_url(request), caller.token_id
    )
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        # Proxies must pass each event on as it comes (nginx buffers unless told not to).
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/requests/{request_id}/cancel",
    status_code=202,
    responses=_REQUEST_ERRORS,
    response_model_exclude_none=True,
)
def cancel(request_id: str, request: Request, caller: CallerDep) -> CancelResponse:
    return owned_requests(request).cancel(caller.token_id, request_id)


@router.delete("/requests/{request_id}", status_code=204, responses=_REQUEST_ERRORS)
def delete_request(request_id: str, request: Request, caller: CallerDep) -> Response:
    """Remove the request and its output files at once (their URLs stop working); a running
    job stops. Later calls about it answer 404."""
    owned_requests(request).delete(caller.token_id, request_id)
    return Response(status_code=204)


def document_submit_body(openapi: dict[str, Any], input_names: list[str]) -> None:
    """Say in the OpenAPI document that a submit's body is one of the served models'
    input schemas (``input_names``: components/schemas entries): ``anyOf``, since a body
    of only a prompt fits every model's (the path's model_id says which one judges it)."""
    refs = [{"$ref": f"#/components/schemas/{name}"} for name in input_names]
    openapi["paths"]["/v1/models/{model_id}"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}},
    }
