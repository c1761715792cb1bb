"""The rows a guarded UPDATE acts on, picked so that concurrent pickers do not collide."""

from __future__ import annotations

from typing import Any

from sqlalchemy import CTE, Select


def locked_pick(candidates: Select[Any], name: str) -> CTE:
    """``candidates`` as a CTE, named ``name``, for an UPDATE to join on.

    PostgreSQL: rows another transaction is picking are skipped, not waited for, and the
    pick is materialised once (a plain IN (subquery) may be evaluated more than once and
    pick more than its limit). SQLite has one writer at a time and ignores both.
    """
    return (
        candidates.with_for_update(skip_locked=True)
        .cte(name)
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
