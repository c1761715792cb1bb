"""Sending webhook messages: signed, with a 10 s timeout, retried on a schedule.

Each API process runs one dispatcher. It claims due messages from the database, renders
each body when it sends it (so the file URLs in a late retry are fresh), signs it with the
submitting token's secret, and POSTs it. A 2xx answer delivers the message; anything
else, or no answer within the timeout, schedules the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import replace

import httpx

from ovis_server import __version__
from ovis_server.api.serving import RequestService
from ovis_server.client.webhooks import sign
from ovis_server.jobs.deliveries import Delivery, DeliveryStore
from ovis_server.jobs.job import JobStatus
from ovis_server.tokens import TokenStore

logger = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10.0
# A claimed message is this process's for this long: well over one attempt's timeout.
HOLD_SECONDS = 60.0
POLL_SECONDS = 0.25
ERROR_SECONDS = 2.0  # the pause after the database failed
CONCURRENCY = 16
MAX_ERROR_LENGTH = 500


class WebhookDispatcher:
    def __init__(
        self,
        deliveries: DeliveryStore,
        service: RequestService,
        tokens: TokenStore,
        schedule: Sequence[float],
    ) -> None:
        self.deliveries = deliveries
        self.service = service
        self.tokens = tokens
        self.schedule = tuple(schedule)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._http = httpx.AsyncClient(
            timeout=TIMEOUT_SECONDS,
            follow_redirects=False,
            headers={"User-Agent": f"ovis-server/{__version__} (webhooks)"},
        )
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        unsent = list(self._inflight)
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Whatever was cut off goes out again from the next process, at once (failing
        # that, when its hold runs out).
        try:
            await asyncio.to_thread(self.deliveries.release, unsent)
        except Exception:
            logger.exception("could not release %d webhook message(s)", len(unsent))
        if self._http is not None:
            await self._http.aclose()

    async def _run(self) -> None:
        while True:
            try:
                room = CONCURRENCY - len(self._inflight)
                due = await asyncio.to_thread(self.deliveries.claim_due, room, HOLD_SECONDS)
                for message in due:
                    task = asyncio.create_task(self._send(message), name=f"webhook {message.id}")
                    self._inflight[message.id] = task
                    task.add_done_callback(self._finished)
            except Exception:
                logger.exception("webhook dispatcher failed to claim messages; trying again")
                await asyncio.sleep(ERROR_SECONDS)
            await asyncio.sleep(POLL_SECONDS)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task.get_name().removeprefix("webhook "), None)

    async def _send(self, message: Delivery) -> None:
        try:
            body = await asyncio.to_thread(self._render, message)
            if body is None:
                await asyncio.to_thread(
                    self.deliveries.give_up, message.id, "the request no longer exists"
                )
                logger.warning(
                    "webhook %s dropped: request %s is gone", message.id, message.request_id
                )
                return
            secret = await asyncio.to_thread(self.tokens.webhook_secret, message.token_id)
            error = await self._post(message, body, secret)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("webhook %s could not be sent", message.id)
            error = f"could not be sent: {type(exc).__name__}: {exc}"[:MAX_ERROR_LENGTH]
        try:
            state = await asyncio.to_thread(
                self.deliveries.record_attempt, message, error, self.schedule
            )
        except Exception:
            logger.exception("webhook %s: attempt not recorded; its hold will run out", message.id)
            return
        if error is not None:
            logger.info(
                "webhook %s to %s, attempt %d: %s (now %s)",
                message.id, message.url, message.attempts + 1, error, state,
            )  # fmt: skip

    def _render(self, message: Delivery) -> bytes | None:
        """The body: the result body for a final state, else the status body then."""
        job = self.service.store.get(message.request_id)
        if job is None:
            return None
        base_url = job.base_url or self.service.settings.public_url or ""
        if message.status.is_final:
            return (
                self.service.result_body(job, base_url).model_dump_json(exclude_none=True).encode()
            )
        then = replace(
            job,
            status=message.status,
            progress_step=message.step,
            progress_total=message.total,
            started_at=job.started_at if message.status == JobStatus.RUNNING else None,
            finished_at=None,
        )
        return (
            self.service.status_body(then, base_url, None)
            .model_dump_json(exclude_none=True)
            .encode()
        )

    async def _post(self, message: Delivery, body: bytes, secret: str) -> str | None:
        """POST the message once; None if the receiver took it, else what went wrong."""
        assert self._http is not None
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": message.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, message.id, timestamp, body),
        }
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):  # for the whole exchange
                response = await self._http.post(message.url, content=body, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            return f"no answer within {TIMEOUT_SECONDS:g} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LENGTH]
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"
