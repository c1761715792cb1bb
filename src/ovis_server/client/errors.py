"""Typed errors: every API error carries the server's error_code."""

from __future__ import annotations


class OvisError(Exception):
    """Base of every error the client raises."""


class ApiError(OvisError):
    """The server answered with an error body."""

    def __init__(self, status_code: int, error_code: int | None, message: str) -> None:
        super().__init__(f"{status_code} (error_code {error_code}): {message}")
        self.status_code = status_code
        self.error_code = error_code
        self.message = message


class AuthenticationError(ApiError):
    """401: missing, unknown or revoked token."""


class PermissionDeniedError(ApiError):
    """403: the request belongs to another token."""


class NotFoundError(ApiError):
    """404: unknown request or model."""


class InvalidInputError(ApiError):
    """422: the input does not match the model's schema."""


class RateLimitError(ApiError):
    """429: the queue is full or the token is rate limited (after the client's retries)."""


class ServerError(ApiError):
    """5xx after the client's retries."""


class ApiConnectionError(OvisError):
    """The server could not be reached, or the connection broke off, after the client's
    retries. ``url`` is the address asked (without its query, which may hold a signature)."""

    def __init__(self, url: str, reason: str, retries: int = 0) -> None:
        after = f" (after {retries} {'retry' if retries == 1 else 'retries'})" if retries else ""
        super().__init__(f"cannot reach {url}: {reason}{after}")
        self.url = url
        self.reason = reason


class JobFailedError(OvisError):
    """``run`` waited for a job that ended failed or cancelled."""

    def __init__(self, request_id: str, status: str, message: str) -> None:
        super().__init__(f"request {request_id} {status}: {message}")
        self.request_id = request_id
        self.status = status


class WaitTimeoutError(OvisError):
    """``run`` gave up waiting."""


def error_for(status_code: int, body: object) -> ApiError:
    error_code = None
    message = f"HTTP {status_code}"
    if isinstance(body, dict):
        code = body.get("error_code")
        error_code = code if isinstance(code, int) else None
        message = str(body.get("error_message") or body.get("detail") or message)
    kind: type[ApiError] = {
        401: AuthenticationError,
        403: PermissionDeniedError,
        404: NotFoundError,
        422: InvalidInputError,
        429: RateLimitError,
    }.get(status_code, ServerError if status_code >= 500 else ApiError)
    return kind(status_code, error_code, message)
