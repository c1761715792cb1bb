"""What the synchronous and asynchronous clients share: their settings and __init__, how
a call becomes an HTTP request, and when to retry it (sans I/O: each client only sends,
sleeps and reads)."""

from __future__ import annotations

import functools
import os
import ssl
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from ovis_server.client._calls import Call, Outcome

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_DELAY = 30.0
# Longer than the server's 15 s keep-alive, whatever the client's own timeout.
STREAM_READ_TIMEOUT = 45.0


def verification() -> ssl.SSLContext:
    """The TLS context httpx makes for a client by default (certifi's CA bundle, or the file
    ``SSL_CERT_FILE`` or the folder ``SSL_CERT_DIR`` names), made once per process for each
    value of those two rather than once per client: making one reads the whole bundle, 29 ms
    of CPU on a 2-core machine, and the SDK makes a client for each Client, AsyncClient and
    download. Like any kept context, it keeps the CAs it read until the process restarts."""
    return _verification(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=4)
def _verification(_cert_file: str | None, _cert_dir: str | None) -> ssl.SSLContext:
    # httpx reads the two variables itself: they are only what the cache tells apart.
    return httpx.create_ssl_context(verify=True, trust_env=True)


@dataclass(frozen=True)
class ClientSettings:
    base_url: str
    token: str | None
    timeout: float
    max_retries: int
    backoff: float

    @classmethod
    def resolve(
        cls,
        base_url: str | None,
        token: str | None,
        timeout: float,
        max_retries: int,
        backoff: float,
    ) -> ClientSettings:
        """Arguments first, then OVIS_SERVER_URL / RUNCOMFY_MODEL_API_BASE and
        OVIS_SERVER_TOKEN from the environment."""
        url = (
            base_url
            or os.environ.get("OVIS_SERVER_URL")
            or os.environ.get("RUNCOMFY_MODEL_API_BASE")
            or DEFAULT_URL
        ).rstrip("/")
        # RunComfy's base includes /v1; paths here start with it.
        url = url.removesuffix("/v1")
        return cls(url, token or os.environ.get("OVIS_SERVER_TOKEN"), timeout, max_retries, backoff)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def stream_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, read=max(self.timeout, STREAM_READ_TIMEOUT))


class Attempts:
    """One call's retries: told how each attempt went, says how long to pause before the
    next, or None where that attempt was the last (its answer, or its error, is final).
    Retried: connection errors, 429 and 5xx, up to ``max_retries`` times."""

    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings
        self._retries = 0

    @property
    def retries(self) -> int:
        """How many retries were made so far."""
        return self._retries

    def pause_after(self, outcome: Outcome) -> float | None:
        response = outcome if isinstance(outcome, httpx.Response) else None
        if self._retries >= self._settings.max_retries:
            return None
        if response is not None and response.status_code not in RETRY_STATUSES:
            return None
        pause = self._delay(response)
        self._retries += 1
        return pause

    def _delay(self, response: httpx.Response | None) -> float:
        """Retry-After when the server gives one, else exponential backoff."""
        if response is not None and "retry-after" in response.headers:
            try:
                return min(float(response.headers["retry-after"]), MAX_DELAY)
            except ValueError:
                pass
        return float(min(self._settings.backoff * 2**self._retries, MAX_DELAY))


HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)


class BaseClient(Generic[HttpT]):
    """Settings from the arguments and the environment, and one connection pool (``_http``)
    of the kind ``_http_class`` names."""

    _http_class: type[HttpT]

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport``: the httpx transport to send through (an ``httpx.BaseTransport``
        for Client, an ``httpx.AsyncBaseTransport`` for AsyncClient; downloads too), e.g.
        an ``httpx.MockTransport`` in tests; None sends over the network."""
        self.settings = ClientSettings.resolve(base_url, token, timeout, max_retries, backoff)
        self._transport = transport  # downloads' plain client sends through it too
        self._http: HttpT = self._http_class(
            base_url=self.settings.base_url,
            timeout=timeout,
            transport=transport,  # type: ignore[arg-type]
            verify=verification(),
        )

    def _request(self, call: Call[Any]) -> httpx.Request:
        """The HTTP request that makes ``call``: with the token, and a stream's long read
        timeout."""
        return self._http.build_request(
            call.method,
            call.path,
            headers={**self.settings.headers(), **call.headers},
            json=call.json,
            params=call.params,
            timeout=self.settings.stream_timeout() if call.streams else httpx.USE_CLIENT_DEFAULT,
        )
