"""Signing webhook messages, the Standard Webhooks way (https://www.standardwebhooks.com).

Each message is signed with the submitting token's secret (``whsec_`` and base64, made by
``tokens.new_webhook_secret``): the HMAC-SHA256 of ``{webhook-id}.{webhook-timestamp}.{body}``,
made by the ``standardwebhooks`` reference library, sent as ``webhook-signature: v1,<sig>``.
Receivers check it with ``ovis_server.client.verify_webhook``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from standardwebhooks import Webhook


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for this message (``body`` is UTF-8 JSON)."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return Webhook(secret).sign(message_id, moment, body.decode())
