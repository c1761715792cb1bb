"""Deleting a request: its row at once, its output files as soon as the store allows.

``DELETE /v1/requests/{id}`` removes the job's rows and records its files as owed a
deletion, in one transaction: from then on the request answers 404 and the local file
route refuses its files (it serves only files of requests that exist). The API then asks
the store to remove the files; when the store cannot be reached (a bucket down, a refused
call), the record stays and ``DeletionSweeper`` tries again with backoff, on whichever API
process runs first, after restarts too, until the store confirms. Until then a presigned
S3 URL handed out earlier still fetches the object: the bucket, not the API, serves it.
Retention (jobs/retention.py) deletes expired requests the same way, a batch at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import Engine, delete, insert, select, update

from ovis_server.db.retry import DEFAULT_RETRY_SECONDS, retried
from ovis_server.db.schema import file_deletions, jobs
from ovis_server.jobs.events import utcnow
from ovis_server.jobs.queue import delete_rows
from ovis_server.jobs.sweeper import Sweeper
from ovis_server.storage.base import FileStore

logger = logging.getLogger(__name__)

# The wait before attempt n + 1 is FIRST_RETRY_SECONDS * 2**(n - 1), at most this.
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 60.0
# How often each API process looks for deletions due.
SWEEP_SECONDS = 1.0
# At most this many deletions per pass (the rest wait for the next pass).
MAX_PER_PASS = 200


def retry_delay(attempts: int) -> float:
    """Seconds between attempt ``attempts`` (1 for the first) and the next."""
    return min(FIRST_RETRY_SECONDS * 2.0 ** max(attempts - 1, 0), MAX_RETRY_SECONDS)


class FileDeletions:
    """The record of output files owed a deletion (table ``file_deletions``)."""

    def __init__(self, engine: Engine, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.engine = engine
        self.retry_seconds = retry_seconds

    def delete_request(self, request_id: str) -> bool:
        """Delete the request's rows and record its files as owed a deletion, in one
        transaction, counting the attempt the caller makes next; False when there is no
        such request."""
        return self.delete_requests([request_id]) == 1

    @retried
    def delete_requests(self, request_ids: Sequence[str]) -> int:
        """``delete_request`` for several requests in one transaction; returns how many
        there were (only those get a record)."""
        if not request_ids:
            return 0
        now = utcnow()
        table = file_deletions.c
        with self.engine.begin() as conn:
            present = list(
                conn.execute(select(jobs.c.id).where(jobs.c.id.in_(request_ids))).scalars()
            )
            if not present:
                return 0
            removed = delete_rows(conn, present)
            conn.execute(delete(file_deletions).where(table.request_id.in_(present)))
            conn.execute(
                insert(file_deletions),
                [
                    {
                        "request_id": request_id,
                        "attempts": 1,
                        "next_attempt_at": now + timedelta(seconds=retry_delay(1)),
                        "created_at": now,
                    }
                    for request_id in present
                ],
            )
        return removed

    @retried
    def claim_next(self) -> tuple[str, int] | None:
        """The deletion due longest, with its attempt number, moved to its next attempt's
        time (so that no other API process tries it meanwhile, and a crash in the middle
        only delays it); None when none is due."""
        now = utcnow()
        table = file_deletions.c
        with self.engine.begin() as conn:
            row = conn.execute(
                select(table.request_id, table.attempts)
                .where(table.next_attempt_at <= now)
                .order_by(table.next_attempt_at)
                .limit(1)
            ).first()
            if row is None:
                return None
            attempt = row.attempts + 1
            claimed = conn.execute(
                update(file_deletions)
                .where(table.request_id == row.request_id, table.next_attempt_at <= now)
                .values(
                    attempts=attempt,
                    next_attempt_at=now + timedelta(seconds=retry_delay(attempt)),
                )
            ).rowcount
        return (str(row.request_id), attempt) if claimed else None

    @retried
    def done(self, *request_ids: str) -> None:
        """The store confirmed these requests' files gone: nothing is owed any more."""
        if not request_ids:
            return
        with self.engine.begin() as conn:
            conn.execute(delete(file_deletions).where(file_deletions.c.request_id.in_(request_ids)))

    @retried
    def owed(self) -> list[str]:
        """The requests whose files are still owed a deletion, oldest first."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(file_deletions.c.request_id).order_by(file_deletions.c.created_at)
                ).scalars()
            )


def remove_files(files: FileStore, request_id: str, attempt: int) -> int | None:
    """Ask the store to remove the request's files; how many there were, or None (logged,
    with the store's own words, which no client sees) when it cannot now."""
    try:
        removed = files.delete_request(request_id)
    except Exception as exc:  # the store's errors are many (OSError, botocore's): all wait
        logger.warning(
            "the files of deleted request %s could not be removed (attempt %d: %s: %s); "
            "trying again in %.0fs",
            request_id,
            attempt,
            type(exc).__name__,
            exc,
            retry_delay(attempt),
        )
        return None
    if attempt > 1:
        logger.info("removed the files of deleted request %s (attempt %d)", request_id, attempt)
    return removed


class DeletionSweeper(Sweeper):
    """Carries out the file deletions owed, each with backoff until the store confirms;
    a pass stops at the first failure (the store is down: the others wait their turn)."""

    name = "file-deletions"

    def __init__(
        self, deletions: FileDeletions, files: FileStore, interval_seconds: float = SWEEP_SECONDS
    ) -> None:
        super().__init__(interval_seconds)
        self.deletions = deletions
        self.files = files

    def sweep(self) -> int:
        """One pass: returns how many requests' files were removed."""
        removed = 0
        for _ in range(MAX_PER_PASS):
            due = self.deletions.claim_next()
            if due is None or remove_files(self.files, *due) is None:
                break
            self.deletions.done(due[0])
            removed += 1
        return removed
