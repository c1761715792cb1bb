"""Fetching what a request names from outside (an input image, a LoRA file), safely.

A request's URL is the client's to choose and the server fetches it: left unchecked, any
token holder could make the server read what only it can reach. Every fetch follows the
webhook sender's destination rules (:mod:`ovis_server.webhooks.destinations`):

- the URL must be ``https`` (``http`` only with the operator's opt-in), with no user name
  or password, and no IP literal or local name in a refused range, in any notation;
- the host name is resolved once, every address it resolves to must be public, and the
  connection goes to the checked address (TLS still verifies the URL's own name);
- a redirect is followed only after its target passes the same checks, at most
  ``MAX_REDIRECTS`` times;
- 5 s to connect and a total time limit for the whole fetch, redirects included;
- at most ``max_bytes`` are read, raw: the answer is never decompressed (a
  ``Content-Encoding`` other than identity is refused), so its size on the wire is its
  size in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from ovis_server import __version__
from ovis_server.webhooks.destinations import (
    DestinationRefusedError,
    IPAddress,
    outbound_verification,
    resolve,
    url_problem,
)

CONNECT_SECONDS = 5.0
TOTAL_SECONDS = 30.0
MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

# (url, allow_private) -> the address to connect to; a test seam (the default is resolve).
Resolver = Callable[[httpx.URL, bool], Awaitable[IPAddress]]
# Takes the body a chunk at a time.
Sink = Callable[[bytes], object]


class FetchError(Exception):
    """The fetch failed or was refused; the message says why in words a client may see
    (no address the server resolved, no query string)."""


@dataclass(frozen=True)
class FetchPolicy:
    """What the operator allows a fetch to do."""

    max_bytes: int
    allow_private: bool = False
    allow_http: bool = False
    total_seconds: float = TOTAL_SECONDS
    connect_seconds: float = CONNECT_SECONDS


async def _default_resolve(url: httpx.URL, allow_private: bool) -> IPAddress:
    return await resolve(url, allow_private=allow_private)


def check_url(url: str, policy: FetchPolicy) -> None:
    """Refuse what the URL alone gives away (FetchError): scheme, credentials, a refused
    address literal or local name."""
    try:
        scheme = httpx.URL(url).scheme
    except (httpx.InvalidURL, ValueError):
        raise FetchError("is not a valid URL") from None
    if scheme == "http" and not policy.allow_http:
        raise FetchError("must be an https URL (this server does not fetch http URLs)")
    problem = url_problem(url, allow_private=policy.allow_private)
    if problem is not None:
        raise FetchError(problem)


async def fetch_into(
    url: str, policy: FetchPolicy, sink: Sink, resolver: Resolver | None = None
) -> int:
    """The body at ``url``, under ``policy``, handed to ``sink`` a chunk at a time (a
    buffer's extend; a file's write, for what is too large to hold in memory); the number
    of bytes it was given. FetchError if it cannot be had or is refused."""
    check_url(url, policy)
    lookup = resolver or _default_resolve
    timeout = httpx.Timeout(policy.total_seconds, connect=policy.connect_seconds)
    async with httpx.AsyncClient(
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        verify=outbound_verification(),
    ) as http:
        try:
            async with asyncio.timeout(policy.total_seconds):
                return await _follow(http, httpx.URL(url), policy, lookup, sink)
        except TimeoutError:
            raise FetchError(f"no complete answer within {policy.total_seconds:g} s") from None


async def _follow(
    http: httpx.AsyncClient, url: httpx.URL, policy: FetchPolicy, lookup: Resolver, sink: Sink
) -> int:
    for _hop in range(MAX_REDIRECTS + 1):
        try:
            address = await lookup(url, policy.allow_private)
        except DestinationRefusedError as exc:
            raise FetchError(f"refused: {_public_reason(exc)}") from None
        request = http.build_request(
            "GET",
            url.copy_with(host=str(address)),
            headers={
                "host": url.netloc.decode("ascii"),
                "accept-encoding": "identity",
                "user-agent": f"ovis-server/{__version__}",
            },
            extensions={"sni_hostname": url.host} if url.scheme == "https" else {},
        )
        try:
            response = await http.send(request, stream=True)
        except httpx.TimeoutException:
            raise FetchError("the server did not answer in time") from None
        except httpx.HTTPError:
            raise FetchError("could not be reached") from None
        try:
            if response.status_code in _REDIRECTS:
                location = response.headers.get("location")
                if not location:
                    raise FetchError(f"answered {response.status_code} with no Location")
                target = url.join(location)
                check_url(str(target), policy)
                url = target
                continue
            if response.status_code != 200:
                raise FetchError(f"answered HTTP {response.status_code}")
            return await _read(response, policy.max_bytes, sink)
        finally:
            await response.aclose()
    raise FetchError(f"redirected more than {MAX_REDIRECTS} times")


async def _read(response: httpx.Response, limit: int, sink: Sink) -> int:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise FetchError(f"answered with Content-Encoding {encoding[:20]}: send it uncompressed")
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise FetchError(f"is larger than {limit} bytes")
    read = 0
    try:
        async for chunk in response.aiter_raw():
            read += len(chunk)
            if read > limit:
                raise FetchError(f"is larger than {limit} bytes")
            sink(chunk)
    except httpx.TimeoutException:
        raise FetchError("the server stopped sending") from None
    except httpx.HTTPError:
        raise FetchError("the answer broke off") from None
    return read


def _public_reason(exc: DestinationRefusedError) -> str:
    """The refusal without the address the name resolved to (the client needn't learn our
    DNS view) and without resolver error text."""
    text = str(exc)
    for marker in (" resolves to ", " does not resolve"):
        host, found, rest = text.partition(marker)
        if found:
            if marker == " does not resolve":
                return f"{host} does not resolve"
            return f"{host} resolves to {rest.split(' (', 1)[0]}"
    return text
