"""Sending webhook messages: signed, to public addresses only, fairly, retried on a schedule.

Each API process runs one dispatcher. It claims due messages from the database, renders
each body when it sends it (so the file URLs in a late retry are fresh), signs it with the
submitting token's secret, and POSTs it. A 2xx answer delivers the message; anything
else, or no answer within the timeout, schedules the next attempt.

What a receiver can do to the server is bounded:

- Destinations pass the policy of :mod:`ovis_server.webhooks.destinations` after DNS
  resolution, and the request goes to the very address that was checked.
- Of the answer only the status line and headers matter: at most 4 KiB of the body is
  read, raw (``Accept-Encoding: identity``, never decompressed), then the connection is
  closed; 5 s to connect and 10 s for the whole exchange.
- No destination (scheme, host and port) has more than 4 messages in flight, and no
  token more than 8 of the 32 this process sends at once. After 3 failures in a row a
  destination's circuit opens: its messages wait, without a sending slot or a counted
  attempt, for a cool-down (30 s, doubling while probes keep failing, up to 10 min).
- Logs show a webhook URL as scheme://host/path: its query string, where receivers
  tend to put their tokens, is never logged (httpx's own request lines are silenced).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import httpx

from ovis_server import __version__
from ovis_server.jobs.events import utcnow
from ovis_server.jobs.job import Job, JobStatus
from ovis_server.jobs.store import JobStore
from ovis_server.tokens import TokenStore
from ovis_server.webhooks.destinations import (
    DestinationRefusedError,
    outbound_verification,
    redacted,
    resolve,
)
from ovis_server.webhooks.outbox import Delivery, DeliveryStore
from ovis_server.webhooks.signing import sign

logger = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10.0  # the whole exchange: resolving, connecting, sending, the answer
CONNECT_SECONDS = 5.0
MAX_ANSWER_BYTES = 4096  # of a receiver's body, read raw; only the status code matters
# A claimed message is this process's for this long: well over one attempt's timeout.
HOLD_SECONDS = 60.0
POLL_SECONDS = 0.25
ERROR_SECONDS = 2.0  # the pause after the database failed
CONCURRENCY = 32  # messages in flight in this process
PER_TOKEN = 8  # ... of one token's requests
PER_DESTINATION = 4  # ... to one scheme://host:port
BUSY_SECONDS = 1.0  # a message over its token's or destination's limit waits this long
BREAKER_FAILURES = 3  # failures in a row that open a destination's circuit
BREAKER_SECONDS = 30.0  # its first cool-down; doubled after each failed probe, up to
BREAKER_MAX_SECONDS = 600.0
MAX_CIRCUITS = 10_000  # destinations remembered; past this, those not paused are forgotten
MAX_ERROR_LENGTH = 500


class WebhookBodies(Protocol):
    """What renders a message's body (the API's result or status body, with fresh URLs)."""

    def webhook_body(self, job: Job, status: JobStatus, step: int, total: int) -> bytes: ...


def destination_of(url: str) -> str:
    """The unit of fairness and of the circuit breaker: scheme://host:port."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        return url
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"{parsed.scheme}://{parsed.host.lower()}:{port}"


@dataclass
class Circuit:
    """A destination's recent failures: closed (sending), open (cooling down) or
    half-open (one probe message in flight, the others waiting on its outcome)."""

    failures: int = 0
    open_until: float = 0.0  # time.monotonic()
    cooldown: float = BREAKER_SECONDS
    probing: bool = False

    def wait(self, now: float) -> float | None:
        """Seconds a message for this destination should wait, or None to send it now."""
        if self.failures < BREAKER_FAILURES:
            return None
        if now < self.open_until:
            return self.open_until - now
        if self.probing:
            return TIMEOUT_SECONDS
        self.probing = True
        return None

    def record(self, ok: bool, now: float) -> None:
        if ok:
            self.failures, self.cooldown, self.probing = 0, BREAKER_SECONDS, False
            return
        if self.probing:
            self.cooldown = min(self.cooldown * 2, BREAKER_MAX_SECONDS)
            self.probing = False
        self.failures += 1
        if self.failures >= BREAKER_FAILURES:
            self.open_until = now + self.cooldown


def _scrubbed(text: str, url: str) -> str:
    """``text`` (an error) without ``url``'s query string, should it quote the URL."""
    with contextlib.suppress(httpx.InvalidURL, ValueError):
        query = httpx.URL(url).query.decode(errors="replace")
        if query:
            text = text.replace(query, "…")
    return text[:MAX_ERROR_LENGTH]


class WebhookDispatcher:
    def __init__(
        self,
        deliveries: DeliveryStore,
        store: JobStore,
        bodies: WebhookBodies,
        tokens: TokenStore,
        schedule: Sequence[float],
        *,
        allow_private: bool = False,
    ) -> None:
        self.deliveries = deliveries
        self.store = store
        self.bodies = bodies
        self.tokens = tokens
        self.schedule = tuple(schedule)
        self.allow_private = allow_private
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._per_token: Counter[str] = Counter()
        self._per_destination: Counter[str] = Counter()
        self._circuits: dict[str, Circuit] = {}
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        # httpx logs each request's URL at INFO, query string and all.
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(TIMEOUT_SECONDS, connect=CONNECT_SECONDS),
            follow_redirects=False,
            trust_env=False,  # no proxy from the environment: connect where was checked
            verify=outbound_verification(),
            # A fresh connection each time: one made for a name is never reused for
            # another name on the same address.
            limits=httpx.Limits(max_keepalive_connections=0),
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
                waiting: list[tuple[Delivery, datetime]] = []
                for message in due:
                    wait = self._wait(message)
                    if wait is None:
                        self._start(message)
                    else:
                        waiting.append((message, utcnow() + timedelta(seconds=wait)))
                if waiting:
                    await asyncio.to_thread(self.deliveries.postpone, waiting)
            except Exception:
                logger.exception("webhook dispatcher failed to claim messages; trying again")
                await asyncio.sleep(ERROR_SECONDS)
            await asyncio.sleep(POLL_SECONDS)

    def _wait(self, message: Delivery) -> float | None:
        """How long ``message`` must wait for its destination or token, or None: send it."""
        destination = destination_of(message.url)
        if self._per_destination[destination] >= PER_DESTINATION:
            return BUSY_SECONDS
        if self._per_token[message.token_id] >= PER_TOKEN:
            return BUSY_SECONDS
        circuit = self._circuits.get(destination)
        return None if circuit is None else circuit.wait(time.monotonic())

    def _start(self, message: Delivery) -> None:
        destination = destination_of(message.url)
        self._per_destination[destination] += 1
        self._per_token[message.token_id] += 1
        task = asyncio.create_task(self._send(message), name=f"webhook {message.id}")
        self._inflight[message.id] = task

        def finished(_: asyncio.Task[None]) -> None:
            self._inflight.pop(message.id, None)
            # No keys left at zero: the counts do not grow with every URL ever seen.
            for counts, key in (
                (self._per_destination, destination),
                (self._per_token, message.token_id),
            ):
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]

        task.add_done_callback(finished)

    def _record(self, destination: str, ok: bool) -> None:
        """Feed a delivery's outcome to its destination's circuit."""
        if len(self._circuits) >= MAX_CIRCUITS and destination not in self._circuits:
            self._circuits = {
                key: kept
                for key, kept in self._circuits.items()
                if kept.failures >= BREAKER_FAILURES
            }
        circuit = self._circuits.setdefault(destination, Circuit())
        was_open = circuit.failures >= BREAKER_FAILURES
        circuit.record(ok, time.monotonic())
        if circuit.failures == 0:
            del self._circuits[destination]
        elif circuit.failures >= BREAKER_FAILURES and not was_open:
            logger.warning(
                "webhooks to %s failed %d times in a row: pausing them for %g s",
                destination, circuit.failures, circuit.cooldown,
            )  # fmt: skip

    async def _send(self, message: Delivery) -> None:
        error: str | None
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
            self._record(destination_of(message.url), error is None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("webhook %s could not be sent", message.id)
            error = _scrubbed(f"could not be sent: {type(exc).__name__}: {exc}", message.url)
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
                message.id, redacted(message.url), message.attempts + 1, error, state,
            )  # fmt: skip

    def _render(self, message: Delivery) -> bytes | None:
        """The body of the message, made now: None if its job is gone."""
        job = self.store.get(message.request_id)
        if job is None:
            return None
        return self.bodies.webhook_body(job, message.status, message.step, message.total)

    async def _post(self, message: Delivery, body: bytes, secret: str) -> str | None:
        """POST the message once; None if the receiver took it, else what went wrong."""
        assert self._http is not None
        url = httpx.URL(message.url)
        timestamp = int(time.time())
        headers = {
            "host": url.netloc.decode("ascii"),
            "accept-encoding": "identity",
            "content-type": "application/json",
            "webhook-id": message.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, message.id, timestamp, body),
        }
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):  # for the whole exchange
                address = await resolve(url, allow_private=self.allow_private)
                # To the address just checked, under the URL's own name: in the Host
                # header and, for https, in TLS's server name, which the certificate is
                # verified against.
                request = self._http.build_request(
                    "POST",
                    url.copy_with(host=str(address)),
                    content=body,
                    headers=headers,
                    extensions={"sni_hostname": url.host} if url.scheme == "https" else {},
                )
                response = await self._http.send(request, stream=True)
                try:
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read >= MAX_ANSWER_BYTES:
                            break
                finally:
                    await response.aclose()
        except DestinationRefusedError as exc:
            return f"not sent: {exc}"[:MAX_ERROR_LENGTH]
        except (TimeoutError, httpx.TimeoutException):
            return f"no answer within {TIMEOUT_SECONDS:g} s"
        except httpx.HTTPError as exc:
            return _scrubbed(f"{type(exc).__name__}: {exc}", message.url)
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"
