"""Webhook signatures: the server's signing (webhooks/signing.py) checked by the SDK's
verify_webhook, and every way a message can fail the check."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest

from ovis_server.client import WebhookVerificationError, verify_webhook
from ovis_server.client.webhook_verify import TOLERANCE_SECONDS
from ovis_server.client.webhook_verify import sign as client_sign
from ovis_server.tokens import new_webhook_secret
from ovis_server.webhooks.signing import sign

NOW = 1_760_000_000
BODY = json.dumps({"request_id": "r1", "status": "succeeded"}).encode()


@pytest.fixture
def secret() -> str:
    return new_webhook_secret()


def headers(
    secret: str, body: bytes = BODY, stamp: int = NOW, msg: str = "msg_1"
) -> dict[str, str]:
    return {
        "webhook-id": msg,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(secret, msg, stamp, body),
    }


def test_new_secrets_are_whsec_and_24_random_bytes(secret: str) -> None:
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24
    assert new_webhook_secret() != secret


def test_a_signed_message_verifies_to_its_body(secret: str) -> None:
    assert verify_webhook(BODY, headers(secret), secret, now=NOW) == {
        "request_id": "r1",
        "status": "succeeded",
    }


def test_server_and_client_sign_alike(secret: str) -> None:
    value = sign(secret, "msg_1", NOW, BODY)
    assert value.startswith("v1,")
    assert value == client_sign(secret, "msg_1", NOW, BODY)


def test_header_names_are_case_insensitive(secret: str) -> None:
    upper = {name.upper(): value for name, value in headers(secret).items()}
    assert verify_webhook(BODY, upper, secret, now=NOW)["request_id"] == "r1"


def test_another_secret_fails(secret: str) -> None:
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify_webhook(BODY, headers(secret), new_webhook_secret(), now=NOW)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda b: b.replace(b"succeeded", b"failed"),
        lambda b: b + b" ",
        lambda b: b"",
    ],
)
def test_a_changed_body_fails(secret: str, tamper: Callable[[bytes], bytes]) -> None:
    with pytest.raises(WebhookVerificationError):
        verify_webhook(tamper(BODY), headers(secret), secret, now=NOW)


def test_a_changed_id_or_timestamp_fails(secret: str) -> None:
    signed = headers(secret)
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify_webhook(BODY, signed | {"webhook-id": "msg_2"}, secret, now=NOW)
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify_webhook(BODY, signed | {"webhook-timestamp": str(NOW + 1)}, secret, now=NOW)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_missing_header_fails(secret: str, missing: str) -> None:
    signed = headers(secret)
    del signed[missing]
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify_webhook(BODY, signed, secret, now=NOW)


def test_a_non_numeric_timestamp_fails(secret: str) -> None:
    with pytest.raises(WebhookVerificationError, match="not a number"):
        verify_webhook(BODY, headers(secret) | {"webhook-timestamp": "soon"}, secret, now=NOW)


@pytest.mark.parametrize("offset", [-TOLERANCE_SECONDS - 1, TOLERANCE_SECONDS + 1])
def test_a_message_too_old_or_too_new_fails(secret: str, offset: int) -> None:
    with pytest.raises(WebhookVerificationError, match="too far"):
        verify_webhook(BODY, headers(secret), secret, now=NOW + offset)


@pytest.mark.parametrize("offset", [-TOLERANCE_SECONDS, TOLERANCE_SECONDS])
def test_a_message_at_the_tolerance_passes(secret: str, offset: int) -> None:
    assert verify_webhook(BODY, headers(secret), secret, now=NOW + offset)


def test_tolerance_is_adjustable(secret: str) -> None:
    with pytest.raises(WebhookVerificationError):
        verify_webhook(BODY, headers(secret), secret, now=NOW + 10, tolerance=5)


def test_one_of_several_signatures_matching_passes(secret: str) -> None:
    signed = headers(secret)
    rotated = f"v1,{base64.b64encode(b'0' * 32).decode()} {signed['webhook-signature']}"
    assert verify_webhook(BODY, signed | {"webhook-signature": rotated}, secret, now=NOW)


@pytest.mark.parametrize("bad", ["", "whsec_", "whsec_!!!not-base64!!!", "nope"])
def test_a_malformed_secret_is_a_verification_error(secret: str, bad: str) -> None:
    with pytest.raises(WebhookVerificationError):
        verify_webhook(BODY, headers(secret), bad, now=NOW)


def test_a_non_utf8_body_fails(secret: str) -> None:
    with pytest.raises(WebhookVerificationError, match="UTF-8"):
        verify_webhook(b"\xff\xfe", headers(secret), secret, now=NOW)
