"""Webhook signatures, the Standard Webhooks way (https://www.standardwebhooks.com).

The server signs every message with the submitting token's secret (``whsec_…``, shown by
``ovis-server token create``); a receiver checks it with :func:`verify_webhook`::

    body = verify_webhook(request_body_bytes, request_headers, "whsec_...")

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}``, its HMAC-SHA256 under
the secret's key sent base64-encoded as ``webhook-signature: v1,<signature>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

SECRET_PREFIX = "whsec_"
# Messages older or newer than this are refused: a replayed message fails the check.
TOLERANCE_SECONDS = 5 * 60


class WebhookVerificationError(ValueError):
    """The message is not signed with this secret, or is too old or too new."""


def _key(secret: str) -> bytes:
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookVerificationError("the webhook secret is not whsec_ and base64") from None
    if not key:
        raise WebhookVerificationError("the webhook secret is empty")
    return key


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for this message."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_webhook(
    body: bytes,
    headers: Mapping[str, str],
    secret: str,
    *,
    tolerance: float = TOLERANCE_SECONDS,
    now: float | None = None,
) -> Any:
    """The message's parsed JSON body if it carries a valid signature by ``secret``;
    raises WebhookVerificationError otherwise."""
    lowered = {name.lower(): value for name, value in headers.items()}
    message_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (message_id and stamp and signatures):
        raise WebhookVerificationError(
            "missing webhook-id, webhook-timestamp or webhook-signature header"
        )
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp is not a number: {stamp!r}") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError("webhook-timestamp is too far from the current time")
    expected = sign(secret, message_id, timestamp, body).encode()
    # The header may carry several space-separated signatures (during a key rotation).
    if not any(
        hmac.compare_digest(expected, candidate.encode()) for candidate in signatures.split()
    ):
        raise WebhookVerificationError("no signature in webhook-signature matches the secret")
    return json.loads(body)
