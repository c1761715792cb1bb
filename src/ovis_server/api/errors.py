"""The error table: every failure a client can cause is a JSON body with an error_code."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ovis_server.api.runcomfy.protocol import ErrorBody
from ovis_server.catalogue import field_problems

logger = logging.getLogger(__name__)

UNAUTHORIZED = 400004
FORBIDDEN = 403001
LINK_REFUSED = 403002
REQUEST_NOT_FOUND = 404001
MODEL_NOT_FOUND = 400001
INVALID_INPUT = 422001
TOO_MANY = 429001
STORE_UNAVAILABLE = 503001
# A locked database or a PostgreSQL failover is usually over within seconds.
STORE_RETRY_AFTER_SECONDS = 5
# The HTTP edge (api/middleware/). 503002 is ours: the contract's 503001 means the job store
# is briefly unavailable, while this is the server refusing more requests at once.
HOST_REFUSED = 400000
BODY_TOO_LARGE = 413001
SERVER_BUSY = 503002


@dataclass(eq=False)
class ApiError(Exception):
    status_code: int
    error_code: int
    message: str
    _: KW_ONLY
    detail: list[dict[str, Any]] | None = None
    headers: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


def too_many(message: str, retry_after: int) -> ApiError:
    return ApiError(429, TOO_MANY, message, headers={"Retry-After": str(max(1, retry_after))})


def store_unavailable() -> ApiError:
    """503 for a database that stayed locked or unreachable through the store's retries:
    the same generic words whatever the error, never its SQL, parameters or ids."""
    return ApiError(
        503,
        STORE_UNAVAILABLE,
        "the job store is briefly unavailable (its database is locked or unreachable); "
        "retry after the Retry-After seconds",
        headers={"Retry-After": str(STORE_RETRY_AFTER_SECONDS)},
    )


def request_not_found(request_id: str) -> ApiError:
    return ApiError(
        404,
        REQUEST_NOT_FOUND,
        f"no request {request_id!r}: it never existed, or it has been deleted or has expired",
    )


def validation_failed(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """422 naming each offending field, with pydantic's errors as ``detail``."""
    detail = [
        {
            "loc": [str(part) for part in error.get("loc", ())],
            "msg": error["msg"],
            "type": error["type"],
        }
        for error in errors
    ]
    return ApiError(
        422,
        INVALID_INPUT,
        "the input does not match the model's schema: " + "; ".join(field_problems(errors)),
        detail=detail,
    )


def error_response(exc: ApiError) -> JSONResponse:
    body = ErrorBody(error_code=exc.error_code, error_message=exc.message, detail=exc.detail)
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=exc.status_code,
        headers=dict(exc.headers) if exc.headers else None,
    )


def database_error_response(request: Request, exc: Exception) -> JSONResponse:
    """The 503 for a database error that outlasted the store's retries."""
    # The error's text carries the SQL and its parameters (secrets among them): the
    # log gets the driver's own words, the client generic ones.
    cause = getattr(exc, "orig", None) or exc.__class__.__name__
    logger.warning("database error on %s %s: %s", request.method, request.url.path, cause)
    return error_response(store_unavailable())


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_failed(list(exc.errors())))

    async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = exc.status_code * 1000
        message = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(
            exc.status_code, str(exc.detail)
        )
        return error_response(ApiError(exc.status_code, code, message, headers=exc.headers))

    async def on_database_error(request: Request, exc: Exception) -> JSONResponse:
        return database_error_response(request, exc)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, 500000, "internal server error; see the server log"))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(SQLAlchemyError, on_database_error)
    app.add_exception_handler(Exception, on_unexpected)
