"""Fetching one MMS file within the limits (CONTRACT §9): http or https only, one timeout for
the whole fetch, at most `max_bytes` read (a larger file is linked, not kept: reading stops
there), redirects only to the same host, and every connection to an address the guard allows.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

import aiohttp
from yarl import URL

from bridge.destinations.base import USER_AGENT
from bridge.media.guard import AddressRefusedError, GuardedResolver, Policy, check
from bridge.mediatypes import sniff
from bridge.retry import RETRYABLE_STATUSES

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Kept:
    data: bytes
    content_type: str  # sniffed from the bytes


@dataclass(frozen=True)
class TooLarge:
    """More than max_bytes: linked, not kept."""

    reason: str


@dataclass(frozen=True)
class NotFetched:
    reason: str
    retryable: bool


Fetched = Kept | TooLarge | NotFetched


def session(policy: Policy, resolver: GuardedResolver | None = None) -> aiohttp.ClientSession:
    """A client session whose every request goes through the guard: a new connection each time
    (no keep-alive: a redirect is connected, resolved and checked anew), no DNS cache, no proxy
    from the environment, no cookies."""
    connector = aiohttp.TCPConnector(
        resolver=resolver or GuardedResolver(policy), use_dns_cache=False, force_close=True, limit=32
    )
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)


def _refused(reason: str) -> NotFetched:
    return NotFetched(reason, retryable=False)


def _check_url(url: URL, policy: Policy) -> NotFetched | None:
    if url.scheme not in ("http", "https"):
        return _refused(f"not an http or https URL ({url.scheme or 'no scheme'})")
    if not url.raw_host:
        return _refused("no host in the URL")
    try:
        literal = ipaddress.ip_address(url.host.strip("[]").split("%", 1)[0] if url.host else "")
    except ValueError:
        return None  # a name: the resolver checks what it resolves to
    try:
        check(policy, str(url.host), [str(literal)])
    except AddressRefusedError as exc:
        return _refused(str(exc))
    return None


async def fetch(client: aiohttp.ClientSession, url: str, *, policy: Policy, max_bytes: int, within: float) -> Fetched:
    """One file. Never raises for what the origin or the network does."""
    try:
        current = URL(url)
        host = (current.host or "").lower()
    except (ValueError, TypeError) as exc:
        return _refused(f"not a URL: {exc}")
    try:
        async with asyncio.timeout(within):
            for _ in range(MAX_REDIRECTS + 1):
                problem = _check_url(current, policy)
                if problem is not None:
                    return problem
                headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
                async with client.get(current, allow_redirects=False, headers=headers) as response:
                    if response.status in _REDIRECTS:
                        location = response.headers.get("Location")
                        if not location:
                            return _refused(f"HTTP {response.status} without a Location")
                        try:
                            target = current.join(URL(location))
                        except (ValueError, TypeError):
                            return _refused(f"HTTP {response.status} to a Location that is no URL")
                        if (target.host or "").lower() != host:
                            return _refused(f"redirect to another host ({target.host}) refused")
                        current = target
                        continue
                    if response.status != 200:
                        retryable = response.status in RETRYABLE_STATUSES or response.status >= 500
                        return NotFetched(f"HTTP {response.status}", retryable)
                    return await _read(response, max_bytes)
            return _refused(f"more than {MAX_REDIRECTS} redirects")
    except TimeoutError:
        return NotFetched(f"not fetched within {within:g}s", retryable=True)
    except aiohttp.ClientConnectorDNSError as exc:
        if isinstance(exc.os_error, AddressRefusedError):
            return _refused(str(exc.os_error))
        return NotFetched(f"cannot resolve {current.host}: {exc.os_error}", retryable=True)
    except aiohttp.InvalidURL as exc:
        return _refused(f"not a valid URL: {exc}")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return NotFetched(f"{type(exc).__name__}: {exc}", retryable=True)


async def _read(response: aiohttp.ClientResponse, max_bytes: int) -> Fetched:
    if response.content_length is not None and response.content_length > max_bytes:
        return TooLarge(f"{response.content_length} bytes, over max_bytes ({max_bytes})")
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:  # the rest is not read: the connection is closed, not reused
            return TooLarge(f"over max_bytes ({max_bytes})")
        chunks.append(chunk)
    data = b"".join(chunks)
    return Kept(data, sniff(data))
