"""Which addresses the media fetch may connect to (CONTRACT §9, the SSRF rules), and the
resolver that holds every connection to them.

A file's URL comes from a postback, so from anyone who can text the short code a link: without
these rules it could make the bridge fetch from the machine itself (`http://127.0.0.1:8080/admin`),
the cloud's metadata service (`169.254.169.254`) or the office network. Unless
`media.allow_private: true`, an address is refused when it is not a public unicast one:
private, loopback, link-local, unspecified, multicast, reserved, shared (CGNAT 100.64/10),
documentation and benchmark ranges, IPv6 unique-local, and IPv6 forms that carry an IPv4 address
(mapped, NAT64, 6to4, Teredo) when that address would be refused. `media.allow_networks` lets
named networks through anyway (an internal MMS gateway).

The check is made on the address the connection goes to, not on the name: `GuardedResolver`
resolves the name itself, refuses the answer if any address in it is refused, and aiohttp
connects to exactly the addresses it returned (the name still goes in the Host header and in
TLS's SNI). There is no second lookup to race, and a redirect is a new connection that is
resolved and checked again. IP literals in URLs do not go through a resolver: `fetch` checks
them with `refused` first.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# is_global leaves some of these to chance across Python versions: named here as well
_ALWAYS_REFUSED: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
        "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96",
        "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10",
        "fec0::/10", "ff00::/8",
    )
)  # fmt: skip
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4, Teredo's client), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


@dataclass(frozen=True)
class Policy:
    allow_private: bool = False
    allow_networks: tuple[Network, ...] = ()

    def refused(self, ip: Address) -> str | None:
        """Why the fetch may not connect to `ip`, or None when it may."""
        if self.allow_private or any(ip in net for net in self.allow_networks if net.version == ip.version):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            inner = _embedded(ip)
            if inner is not None and self.refused(inner) is not None:
                return f"{ip} carries {inner}, which is not a public address"
            if ip.ipv4_mapped is not None:
                return f"{ip} is an IPv4-mapped address"
        if any(ip in net for net in _ALWAYS_REFUSED if net.version == ip.version) or not ip.is_global:
            return f"{ip} is not a public address ({_kind(ip)})"
        if ip.is_multicast:
            return f"{ip} is not a public address (multicast)"
        return None


def _kind(ip: Address) -> str:
    for kind in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return "special use"


class AddressRefusedError(OSError):
    """A name resolved to an address the policy refuses: aiohttp reports it as a DNS error
    carrying this (`ClientConnectorDNSError.os_error`)."""


class GuardedResolver(AbstractResolver):
    """Resolves with `inner` (the system's resolver by default) and refuses an answer holding
    any address the policy refuses."""

    def __init__(self, policy: Policy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self.inner.resolve(host, port, family)
        check(self.policy, host, [answer["host"] for answer in answers])
        return answers

    async def close(self) -> None:
        await self.inner.close()


def check(policy: Policy, host: str, addresses: Sequence[str]) -> None:
    """Raise AddressRefusedError when any of `host`'s addresses is refused."""
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])  # fe80::1%eth0: its zone is no part of it
        except ValueError:
            raise AddressRefusedError(f"{host} resolved to {text!r}, not an address") from None
        why = policy.refused(ip)
        if why is not None:
            name = "" if host.strip("[]") == text else f"{host} is {text}: "
            raise AddressRefusedError(f"{name}{why}; refused (media.allow_private or allow_networks would let it in)")
