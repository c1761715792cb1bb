"""Secrets shared by every process of a deployment, kept in the database."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from ovis_server.db.schema import server_keys


def shared_secret(
    engine: Engine, name: str, make: Callable[[], str] = lambda: secrets.token_urlsafe(48)
) -> str:
    """The secret called ``name``, made by ``make`` (at random) in whichever process asks
    first."""
    query = select(server_keys.c.value).where(server_keys.c.name == name)
    with engine.connect() as conn:
        value = conn.execute(query).scalar_one_or_none()
    if value is not None:
        return str(value)
    try:
        with engine.begin() as conn:
            conn.execute(insert(server_keys).values(name=name, value=make()))
    except IntegrityError:
        pass  # another process created it first; use theirs
    with engine.connect() as conn:
        return str(conn.execute(query).scalar_one())
