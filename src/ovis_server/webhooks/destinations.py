"""Where webhooks may go: public http(s) addresses only, checked after DNS resolution.

A webhook URL is the client's to choose, and the server POSTs to it: left unchecked, any
token holder could make the server reach what only it can reach (loopback services, the
private network, a cloud's metadata address at 169.254.169.254). So:

- at submit, :func:`url_problem` refuses what the URL alone gives away: a scheme other
  than http or https, a user name or password, an IP literal in a refused range in any
  notation (``2130706433``, ``0x7f.1``, ``017700000001``, ``[::ffff:127.0.0.1]``...), and
  ``localhost``-style names;
- at send time, :func:`resolve` looks the host name up, refuses it if any of its
  addresses is in a refused range, and returns the address to connect to, so nothing can
  change between the check and the connection (no second lookup: DNS rebinding).

``--allow-private-webhooks`` lifts the address and name rules (not the scheme and
user-name ones) for servers whose receivers live on the internal network.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH: Final = 2000
# Names that mean this machine without asking DNS (RFC 6761, and common /etc/hosts ones).
LOCAL_NAMES: Final = frozenset(
    {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
)
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
# Lookups run in threads of their own: a name server made slow on purpose then ties up
# these, not the threads the status streams and the dispatcher's database work share.
_LOOKUPS: Final = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook-dns")
_PART: Final = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


class DestinationRefusedError(Exception):
    """The webhook may not be sent there; the message says why (no query string in it)."""


def refused_address(address: IPAddress) -> str | None:
    """Why a webhook may not go to ``address`` (loopback, private...), or None if public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            inner = refused_address(embedded)
            if inner is not None:
                return inner
        if address.is_site_local:
            return "a site-local address"
    for kind, hit in (
        ("an unspecified", address.is_unspecified),
        ("a loopback", address.is_loopback),
        ("a link-local", address.is_link_local),
        ("a multicast", address.is_multicast),
        ("a private", address.is_private),
        ("a reserved", address.is_reserved),
        ("a non-public", not address.is_global),
    ):
        if hit:
            return f"{kind} address"
    return None


def _number(part: str) -> int:
    if part[:2].lower() == "0x":
        return int(part, 16)
    return int(part, 8) if part.startswith("0") else int(part)


def ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` spells, in any notation a resolver takes: dotted IPv4 with
    one to four decimal, octal (``0177``) or hex (``0x7f``) parts (``127.1``,
    ``2130706433``), or IPv6 (a zone such as ``%eth0`` dropped); None for a name."""
    host = host.rstrip(".") if not host.startswith("[") else host.strip("[]")
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return None
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_PART.fullmatch(part) for part in parts):
        return None
    numbers = [_number(part) for part in parts]
    *leading, last = numbers
    if any(number > 255 for number in leading) or last >= 256 ** (4 - len(leading)):
        return None
    value = last
    for index, number in enumerate(leading):
        value |= number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def url_problem(url: str, *, allow_private: bool = False) -> str | None:
    """What makes ``url`` no webhook destination, judged from the URL alone; None if
    nothing does (its host name may still resolve to a refused address)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        return "must be an absolute http or https URL"
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters"
    if parsed.userinfo:
        return "must not carry a user name or password"
    host = parsed.host.lower()
    if "%" in host and ":" not in host:
        return "must name its host plainly (no %-escapes)"
    if allow_private:
        return None
    address = ip_literal(host)
    if address is not None:
        why = refused_address(address)
        if why is not None:
            return f"must not point at {why} ({address})"
    elif host.rstrip(".") in LOCAL_NAMES or host.rstrip(".").endswith(".localhost"):
        return "must not point at this machine (localhost)"
    return None


def redacted(url: str) -> str:
    """``url`` as logs may show it: scheme, host, port and path; no user name, query or
    fragment, where tokens tend to live."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        return "<not a URL>"
    port = f":{parsed.port}" if parsed.port is not None else ""
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    return f"{parsed.scheme}://{host}{port}{parsed.path}"


async def resolve(url: httpx.URL, *, allow_private: bool = False) -> IPAddress:
    """The address to send ``url``'s request to: its host's, once every address the name
    resolves to has passed the policy; raises DestinationRefusedError otherwise."""
    # The URL's own form; its host is judged below, by the addresses it stands for.
    problem = url_problem(str(url), allow_private=True)
    if problem is not None:
        raise DestinationRefusedError(f"the URL {problem}")
    host = url.host
    literal = ip_literal(host)
    if literal is not None:
        why = None if allow_private else refused_address(literal)
        if why is not None:
            raise DestinationRefusedError(f"{host} is {why} ({literal})")
        return literal
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        lookup = functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        found = await asyncio.get_running_loop().run_in_executor(_LOOKUPS, lookup)
    except OSError as exc:
        raise DestinationRefusedError(f"{host} does not resolve: {exc}") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in found:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        why = None if allow_private else refused_address(address)
        if why is not None:
            raise DestinationRefusedError(f"{host} resolves to {why} ({address})")
        addresses.append(address)
    if not addresses:
        raise DestinationRefusedError(f"{host} resolves to no address")
    return addresses[0]


@functools.cache
def outbound_verification() -> ssl.SSLContext:
    """The TLS context of the server's own calls out (webhooks, fetched images and LoRAs):
    httpx's default with the environment ignored (certifi's CA bundle), made once per
    process rather than once per client: making one reads the whole bundle, 29 ms of CPU on
    a 2-core machine, and each fetch makes a client. It keeps the CAs it read until the
    process restarts, as the certifi package itself does."""
    return httpx.create_ssl_context(verify=True, trust_env=False)
