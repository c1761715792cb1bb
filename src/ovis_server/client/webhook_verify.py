"""Webhook signatures, the Standard Webhooks way (https://www.standardwebhooks.com).

The server signs every message with the submitting token's secret (``whsec_…``, shown by
``ovis-server token create``); a receiver checks it with :func:`verify_webhook`::

    body = verify_webhook(request_body_bytes, request_headers, "whsec_...")

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}``, its HMAC-SHA256 under
the secret's key sent base64-encoded as ``webhook-signature: v1,<signature>``; the
signature itself is made by the ``standardwebhooks`` reference library. This module's
check differs from the library's ``Webhook.verify`` only in taking ``now`` and
``tolerance``.
"""

from __future__ import annotations

import binascii
import hmac
import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

SECRET_PREFIX = "whsec_"
# Messages older or newer than this are refused: a replayed message fails the check.
TOLERANCE_SECONDS = 5 * 60


class WebhookVerificationError(ValueError):
    """The message is not signed with this secret, or is too old or too new."""


def _signer(secret: str) -> Webhook:
    try:
        return Webhook(secret)
    except (binascii.Error, ValueError, EmptyWebhookSecretError):
        raise WebhookVerificationError("the webhook secret is not whsec_ and base64") from None


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for this message (``body`` is UTF-8 JSON)."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return _signer(secret).sign(message_id, moment, body.decode())


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
    try:
        expected = sign(secret, message_id, timestamp, body).encode()
    except UnicodeDecodeError:
        raise WebhookVerificationError("the body is not UTF-8") from None
    # The header may carry several space-separated signatures (during a key rotation).
    if not any(
        hmac.compare_digest(expected, candidate.encode()) for candidate in signatures.split()
    ):
        raise WebhookVerificationError("no signature in webhook-signature matches the secret")
    return json.loads(body)
