"""What a token may do with the requests it submitted: read their status and result, list
them, cancel and delete them. Another token's request is a 403, an unknown one a 404."""

from __future__ import annotations

import logging

from sqlalchemy.exc import SQLAlchemyError

from ovis_server.api.errors import FORBIDDEN, INVALID_INPUT, ApiError, request_not_found
from ovis_server.api.runcomfy.protocol import (
    STATUS_WORDS,
    CancelResponse,
    RequestList,
    ResultResponse,
    StatusResponse,
)
from ovis_server.api.runcomfy.rendering import BodyRenderer
from ovis_server.db.loop_reads import LoopReadError, LoopReads
from ovis_server.jobs.deletions import FileDeletions, remove_files
from ovis_server.jobs.job import Job, JobState
from ovis_server.jobs.store import JobStore
from ovis_server.storage.base import REQUEST_ID_PATTERN

logger = logging.getLogger(__name__)


def check_owner(job: Job | JobState, token_id: str) -> None:
    """403 unless ``token_id`` submitted ``job``."""
    if job.token_id != token_id:
        raise ApiError(403, FORBIDDEN, f"request {job.id!r} belongs to another token")


class OwnedRequests:
    def __init__(
        self,
        store: JobStore,
        bodies: BodyRenderer,
        deletions: FileDeletions,
        loop_reads: LoopReads | None = None,
    ) -> None:
        self.store = store
        self.bodies = bodies
        self.deletions = deletions
        # PostgreSQL: the status call's read on the event loop (db/loop_reads.py).
        self.loop_reads = loop_reads

    def owned_job(self, token_id: str, request_id: str) -> Job:
        job = self.store.get(request_id) if REQUEST_ID_PATTERN.fullmatch(request_id) else None
        if job is None:
            raise request_not_found(request_id)
        check_owner(job, token_id)
        return job

    def status(
        self,
        token_id: str,
        request_id: str,
        base_url: str,
        logs: bool = False,
        *,
        once: bool = False,
    ) -> StatusResponse:
        """The status body, from one read of the database (``once``: not retried after a
        transient error, which is raised)."""
        read = self.store.get_with_position_once if once else self.store.get_with_position
        found = read(request_id) if REQUEST_ID_PATTERN.fullmatch(request_id) else None
        return self._status_body(found, token_id, request_id, base_url, logs)

    async def status_on_loop(self, token_id: str, request_id: str, base_url: str) -> StatusResponse:
        """``status``, its read made through ``loop_reads`` on the event loop;
        ``LoopReadError`` if it was not made (or there are no loop reads: SQLite)."""
        if self.loop_reads is None:
            raise LoopReadError("no reads on the event loop for this database")
        found = None
        if REQUEST_ID_PATTERN.fullmatch(request_id):
            found = await self.store.get_with_position_on_loop(self.loop_reads, request_id)
        return self._status_body(found, token_id, request_id, base_url)

    def _status_body(
        self,
        found: tuple[JobState, int | None] | None,
        token_id: str,
        request_id: str,
        base_url: str,
        logs: bool = False,
    ) -> StatusResponse:
        if found is None:
            raise request_not_found(request_id)
        job, position = found
        check_owner(job, token_id)
        return self.bodies.status_body(job, base_url, position, logs)

    def result(self, token_id: str, request_id: str, base_url: str) -> ResultResponse:
        return self.bodies.result_body(self.owned_job(token_id, request_id), base_url)

    def list_requests(
        self, token_id: str, limit: int, cursor: str | None, base_url: str
    ) -> RequestList:
        before = None
        if cursor is not None:
            if not cursor.isdigit():
                raise ApiError(422, INVALID_INPUT, "cursor: not a cursor this API handed out")
            before = int(cursor)
        page = self.store.list_for_token(token_id, limit + 1, before)
        more = len(page) > limit
        page = page[:limit]
        return RequestList(
            requests=[self.bodies.result_body(job, base_url) for job in page],
            next_cursor=str(page[-1].seq) if more else None,
        )

    def cancel(self, token_id: str, request_id: str) -> CancelResponse:
        """Cancel a queued job at once; flag a running one for its worker and answer at
        once with ``cancellation_requested`` (the client reads the final state from status:
        waiting here would hold a server thread for up to a step)."""
        self.owned_job(token_id, request_id)
        answer = self.store.request_cancel(request_id)
        if answer is None:
            raise request_not_found(request_id)
        job, outcome = answer
        return CancelResponse(request_id=job.id, status=STATUS_WORDS[job.status], outcome=outcome)

    def delete(self, token_id: str, request_id: str) -> None:
        """Remove a request at once and its files as soon as the store allows (see
        jobs/deletions.py). A running job loses its row, so its worker stops at the next
        step (and removes a file it stores after this)."""
        self.owned_job(token_id, request_id)
        # The row first, with the record of the files owed a deletion: a worker that
        # stores the file after this finds its job gone and removes the file itself; one
        # that stored it before has it removed here, or by the sweeper if the store is down.
        if not self.deletions.delete_request(request_id):
            raise request_not_found(request_id)
        if remove_files(self.bodies.files, request_id, attempt=1) is None:
            return  # recorded: DeletionSweeper tries again once the store is back
        try:
            self.deletions.done(request_id)
        except SQLAlchemyError:
            # The files are gone; the record left behind costs the sweeper one more
            # (harmless) removal, while a 503 here would tell the client to retry a
            # delete that has been done.
            logger.warning("request %s: could not clear its file deletion record", request_id)
