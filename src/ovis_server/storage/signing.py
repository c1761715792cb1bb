"""HMAC-signed, expiring file URLs: unguessable, and useless once expired."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from sqlalchemy import Engine

from ovis_server.db.shared_secrets import shared_secret

# The name of the signing key in the server_keys table, shared by every API replica.
URL_SIGNING_KEY = "url_signing"


class UrlSigner:
    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def signature(self, key: str, expires: int) -> str:
        mac = hmac.new(self._key, f"{key}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def query(self, key: str, expires_in: int, now: float | None = None) -> str:
        """The query string that makes ``key`` fetchable for ``expires_in`` seconds."""
        expires = int((time.time() if now is None else now) + expires_in)
        return f"expires={expires}&signature={self.signature(key, expires)}"

    def is_valid(self, key: str, expires: int, signature: str, now: float | None = None) -> bool:
        if expires < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(self.signature(key, expires), signature)


def signer_for(db: Engine) -> UrlSigner:
    """The deployment's signer, with the key every process reads from the database."""
    return UrlSigner(shared_secret(db, URL_SIGNING_KEY))
