"""A Python client for RunComfy's Model API, on ovis-server or on RunComfy itself.

Base URL and token come from the arguments, or ``OVIS_SERVER_URL`` (or
``RUNCOMFY_MODEL_API_BASE``) and ``OVIS_SERVER_TOKEN``. Calls retry with backoff on 429,
5xx and connection errors (a server that stays unreachable is one ApiConnectionError
naming the URL; submits carry an Idempotency-Key, so a retry never queues a
second job); errors are typed and carry the server's ``error_code``.
"""

from ovis_server.client.aio import AsyncClient
from ovis_server.client.errors import (
    ApiConnectionError,
    ApiError,
    AuthenticationError,
    InvalidInputError,
    JobFailedError,
    NotFoundError,
    OvisError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    WaitTimeoutError,
)
from ovis_server.client.models import Cancellation, Progress, Result, Status, Submission
from ovis_server.client.sync import Client
from ovis_server.client.webhook_verify import WebhookVerificationError, verify_webhook

__all__ = [
    "ApiConnectionError",
    "ApiError",
    "AsyncClient",
    "AuthenticationError",
    "Cancellation",
    "Client",
    "InvalidInputError",
    "JobFailedError",
    "NotFoundError",
    "OvisError",
    "PermissionDeniedError",
    "Progress",
    "RateLimitError",
    "Result",
    "ServerError",
    "Status",
    "Submission",
    "WaitTimeoutError",
    "WebhookVerificationError",
    "verify_webhook",
]
