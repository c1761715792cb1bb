"""uvicorn's access log without secrets: file URL signatures and webhook URLs redacted."""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

ACCESS_LOGGER = "uvicorn.access"
REDACTED = "REDACTED"
# Query parameters whose values are secrets or lead to one: our file links' signatures,
# S3 presigned URLs' credentials, and a submit's webhook URL (which may carry its own).
SECRET_PARAMETERS = frozenset(
    {
        "sig",
        "signature",
        "webhook",
        "webhook_url",
        "token",
        "access_token",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
    }
)
_PAIR = re.compile(r"([^&=]*)(=?)([^&]*)")


def redact_query(path: str) -> str:
    """``path`` with the value of every secret query parameter replaced by REDACTED."""
    route, question, query = path.partition("?")
    if not question:
        return path

    def redact(pair: re.Match[str]) -> str:
        name, equals, value = pair.groups()
        if value and unquote_plus(name).strip().lower() in SECRET_PARAMETERS:
            return f"{name}{equals}{REDACTED}"
        return pair.group(0)

    return f"{route}?{_PAIR.sub(redact, query)}"


class RedactingFilter(logging.Filter):
    """Rewrites the request path of uvicorn's access records (its third argument)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def redact_access_log() -> None:
    """Install the filter on uvicorn's access logger (once; after uvicorn configured it)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(existing, RedactingFilter) for existing in logger.filters):
        logger.addFilter(RedactingFilter())
