"""API tokens: created by the operator, stored hashed, presented as ``Bearer`` secrets."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, RowMapping, func, insert, or_, select, update

from ovis_server.db.retry import DEFAULT_RETRY_SECONDS, retried
from ovis_server.db.schema import tokens
from ovis_server.db.shared_secrets import shared_secret

SECRET_PREFIX = "ovis_"
HINT_LENGTH = len(SECRET_PREFIX) + 4
MAX_NAME_LENGTH = 200


class TokenError(ValueError):
    """A token operation could not be done as asked."""


@dataclass(frozen=True)
class TokenInfo:
    """A token as the store describes it: never its secret."""

    id: str
    name: str
    hint: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def new_webhook_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def hash_secret(secret: str) -> str:
    # A token is 256 random bits, so a fast hash cannot be brute-forced back to it.
    return hashlib.sha256(secret.encode()).hexdigest()


def _info(row: RowMapping) -> TokenInfo:
    return TokenInfo(
        id=row["id"],
        name=row["name"],
        hint=row["hint"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


_COLUMNS = (tokens.c.id, tokens.c.name, tokens.c.hint, tokens.c.created_at, tokens.c.revoked_at)


# How long a verified token is trusted without asking the database again: a token revoked
# (by any process) stops working within this long. The API's calls check it on every
# request, so without the cache each one would cost a query.
VERIFIED_FOR_SECONDS = 1.0
# Verified tokens kept at most (a deployment has a few; the cache starts over past this).
MAX_VERIFIED = 10_000


class TokenStore:
    def __init__(
        self,
        engine: Engine,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        verified_for: float = VERIFIED_FOR_SECONDS,
    ) -> None:
        self.engine = engine
        self.retry_seconds = retry_seconds
        self.verified_for = verified_for
        # sha256 of a secret -> (monotonic time it was verified, its token). Only tokens
        # found active are kept: an unknown secret costs a query every time, and fills
        # nothing.
        self._verified: dict[str, tuple[float, TokenInfo]] = {}

    @retried
    def create(self, name: str) -> tuple[TokenInfo, str]:
        """A new token and its secret; the secret is shown now and never again."""
        name = name.strip()
        if not name or len(name) > MAX_NAME_LENGTH:
            raise TokenError(f"a token name must have 1 to {MAX_NAME_LENGTH} characters")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        token_id = "tok_" + secrets.token_hex(8)
        stmt = (
            insert(tokens)
            .values(
                id=token_id,
                name=name,
                secret_hash=hash_secret(secret),
                hint=secret[:HINT_LENGTH],
                created_at=datetime.now(UTC),
            )
            .returning(*_COLUMNS)
        )
        with self.engine.begin() as conn:
            return _info(conn.execute(stmt).mappings().one()), secret

    @retried
    def list(self) -> list[TokenInfo]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(*_COLUMNS).order_by(tokens.c.created_at)).mappings().all()
        return [_info(row) for row in rows]

    @retried
    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(tokens)).scalar_one())

    @retried
    def find(self, id_or_name: str) -> TokenInfo:
        """The token with this id, or the one active token with this name (or, if none is
        active, a revoked one); TokenError if there is none or the name is ambiguous."""
        lookup = select(*_COLUMNS).where(
            or_(tokens.c.id == id_or_name, tokens.c.name == id_or_name)
        )
        with self.engine.connect() as conn:
            matches = [_info(row) for row in conn.execute(lookup).mappings()]
        by_id = [info for info in matches if info.id == id_or_name]
        active = [info for info in matches if info.active]
        if by_id:
            return by_id[0]
        if len(active) == 1:
            return active[0]
        if len(active) > 1:
            ids = ", ".join(info.id for info in active)
            raise TokenError(f"{len(active)} active tokens are named {id_or_name!r}: {ids}")
        if matches:
            return matches[0]
        raise TokenError(f"no token has the id or name {id_or_name!r}")

    def revoke(self, id_or_name: str) -> TokenInfo:
        """Revoke the token with this id, or the one active token with this name."""
        target = self.find(id_or_name)
        if not target.active:
            return target  # already revoked: nothing to do
        with self.engine.begin() as conn:
            revoke = (
                update(tokens)
                .where(tokens.c.id == target.id)
                .values(revoked_at=datetime.now(UTC))
                .returning(*_COLUMNS)
            )
            revoked = _info(conn.execute(revoke).mappings().one())
        # This process stops trusting it at once (others within ``verified_for``).
        for secret_hash, (_, info) in list(self._verified.items()):
            if info.id == revoked.id:
                self._verified.pop(secret_hash, None)
        return revoked

    def webhook_secret(self, token_id: str) -> str:
        """The secret that signs the webhooks of this token's requests (made on first use,
        so tokens older than webhooks have one too)."""
        return shared_secret(self.engine, f"webhook:{token_id}", new_webhook_secret)

    @retried
    def revoked_among(self, token_ids: Collection[str]) -> set[str]:
        """Which of these tokens are revoked (one query per 500)."""
        ids = sorted(token_ids)
        revoked: set[str] = set()
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                stmt = select(tokens.c.id).where(
                    tokens.c.id.in_(ids[start : start + 500]), tokens.c.revoked_at.is_not(None)
                )
                revoked.update(conn.execute(stmt).scalars())
        return revoked

    def verified(self, secret: str) -> TokenInfo | None:
        """The token whose secret this is, if it was found active in the last
        ``verified_for`` seconds; None when the database must be asked (``authenticate``)."""
        seen = self._verified.get(hash_secret(secret))
        if seen is None or time.monotonic() - seen[0] >= self.verified_for:
            return None
        return seen[1]

    def authenticate(self, secret: str) -> TokenInfo | None:
        """The active token whose secret this is, or None: from the cache of tokens
        verified in the last ``verified_for`` seconds, else from the database."""
        return self.verified(secret) or self._authenticate(hash_secret(secret))

    @retried
    def _authenticate(self, secret_hash: str) -> TokenInfo | None:
        stmt = select(*_COLUMNS).where(
            tokens.c.secret_hash == secret_hash, tokens.c.revoked_at.is_(None)
        )
        checked = time.monotonic()
        with self.engine.connect() as conn:
            row = conn.execute(stmt).mappings().first()
        if row is None:
            self._verified.pop(secret_hash, None)
            return None
        if len(self._verified) >= MAX_VERIFIED:
            self._verified.clear()
        info = _info(row)
        self._verified[secret_hash] = (checked, info)
        return info
