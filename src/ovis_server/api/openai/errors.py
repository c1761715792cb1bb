"""Errors on OpenAI's routes in OpenAI's shape: ``{"error": {"message", "type", "param",
"code"}}`` with OpenAI's status codes, so that the official SDKs raise their usual
exceptions; our RunComfy-dialect errors and FastAPI's validation errors, told so."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from ovis_server.api.errors import MODEL_NOT_FOUND, ApiError
from ovis_server.api.openai.protocol import OpenAIErrorBody, OpenAIErrorDetail

ErrorType = Literal["invalid_request_error", "requests", "server_error"]


@dataclass(eq=False)
class OpenAIError(Exception):
    status_code: int
    message: str
    _: KW_ONLY
    type: ErrorType = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def response(self) -> JSONResponse:
        body = OpenAIErrorBody(
            error=OpenAIErrorDetail(
                message=self.message, type=self.type, param=self.param, code=self.code
            )
        )
        return JSONResponse(
            body.model_dump(),
            status_code=self.status_code,
            headers=dict(self.headers) if self.headers else None,
        )


def _param(loc: Sequence[Any], model_input: bool = False) -> str | None:
    """The request parameter an error location points at (in the model's input, which is
    built from the request, image_size comes from ``size``)."""
    names = [str(part) for part in loc if part != "body"]
    if not names:
        return None
    return "size" if model_input and names[0] == "image_size" else names[0]


def from_api_error(exc: ApiError) -> OpenAIError:
    """Our RunComfy-dialect error, told in OpenAI's words and codes."""
    if exc.status_code == 401:
        return OpenAIError(401, exc.message, code="invalid_api_key", headers=exc.headers)
    if exc.status_code == 404 and exc.error_code == MODEL_NOT_FOUND:
        return OpenAIError(404, exc.message, param="model", code="model_not_found")
    if exc.status_code == 422:
        param = _param(exc.detail[0]["loc"], model_input=True) if exc.detail else None
        return OpenAIError(400, exc.message, param=param, code="invalid_value")
    if exc.status_code == 429:
        return OpenAIError(
            429, exc.message, type="requests", code="rate_limit_exceeded", headers=exc.headers
        )
    if exc.status_code >= 500:
        return OpenAIError(exc.status_code, exc.message, type="server_error", headers=exc.headers)
    return OpenAIError(exc.status_code, exc.message, headers=exc.headers)


def from_validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    param = _param(first.get("loc", ()))
    if first.get("type") == "json_invalid" or param is None:
        return OpenAIError(
            400,
            "the body is not a JSON object of parameters: send JSON with a prompt",
            code="invalid_json",
        )
    if first.get("type") == "missing":
        return OpenAIError(
            400,
            f"Missing required parameter: {param!r}.",
            param=param,
            code="missing_required_parameter",
        )
    if first.get("type") == "extra_forbidden":
        return OpenAIError(
            400, f"Unknown parameter: {param!r}.", param=param, code="unknown_parameter"
        )
    problems = "; ".join(f"{_param(e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)
    return OpenAIError(400, problems, param=param, code="invalid_value")


class OpenAIRoute(APIRoute):
    """A route whose every failure (token, body, model, limits) answers in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except ApiError as exc:
                return from_api_error(exc).response()
            except RequestValidationError as exc:
                return from_validation_error(exc).response()
            except StarletteHTTPException as exc:  # a body FastAPI could not read at all
                return OpenAIError(
                    exc.status_code,
                    f"the body could not be read: {exc.detail}",
                    type="server_error" if exc.status_code >= 500 else "invalid_request_error",
                    headers=exc.headers,
                ).response()

        return answer
