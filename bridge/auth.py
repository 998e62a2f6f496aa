"""Who may post (CONTRACT §3 `server.auth`): the client's address through trusted proxies, the
allow list, the token and Basic credentials, compared in constant time. The same rules whether
aiohttp or the postback lane read the request."""

from __future__ import annotations

import base64
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from bridge.answers import Reply, refusal
from bridge.config import AuthConfig


class Headers(Protocol):
    """Request headers looked up by any case: aiohttp's CIMultiDictProxy, or the lane's."""

    def get(self, name: str, default: str, /) -> str: ...
    def getall(self, name: str, default: list[str], /) -> list[str]: ...
    def __contains__(self, name: object, /) -> bool: ...


@dataclass(frozen=True, slots=True)
class Caller:
    """Who posts, as auth sees it: from aiohttp's request, or from a head the lane read."""

    remote: str | None
    headers: Headers  # case-insensitive: aiohttp's CIMultiDictProxy, or the lane's
    path_token: str | None = None  # `/postback/{token}`
    query_token: str | None = None  # `?token=`

    @classmethod
    def of(cls, request: web.Request) -> Caller:
        return cls(request.remote, request.headers, request.match_info.get("token"), request.query.get("token"))


def client_ip(request: Caller, auth: AuthConfig) -> str | None:
    """The peer address, or with trusted proxies the right-most X-Forwarded-For hop that is
    not one of them (the left part of the header is whatever the client claims)."""
    peer = request.remote
    if not auth.trusted_proxies or peer is None:
        return peer
    hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", []) for h in v.split(",")]
    chain = [*hops, peer]
    for hop in reversed(chain):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return hop
        if not any(address in net for net in auth.trusted_proxies):
            return hop
    return chain[0]


def _allowed(ip: str | None, auth: AuthConfig) -> bool:
    if not auth.allow_from:
        return True
    address = address_of(ip)
    return address is not None and any(address in net for net in auth.allow_from)


def same(given: str, expected: str) -> bool:
    """Constant-time: how long it takes says nothing of how much of a secret was right."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


def check_auth(request: Caller, auth: AuthConfig) -> Reply | None:
    """None when the request may post; else the 401/403 to answer (with no hint of what was wrong)."""
    if not _allowed(client_ip(request, auth), auth):
        return refusal(403, "forbidden")
    if not (auth.token or auth.basic):
        return None
    if auth.token:
        given = request.path_token or request.query_token
        if given is not None and same(given, auth.token.reveal()):
            return None
    if auth.basic:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except ValueError:  # bad base64 (binascii.Error), non-ASCII header, or not UTF-8
                user, password = "", ""
            user_ok = same(user, auth.basic.username)
            if same(password, auth.basic.password.reveal()) and user_ok:
                return None
        return refusal(401, "unauthorized", **{"WWW-Authenticate": 'Basic realm="postback-bridge", charset="UTF-8"'})
    return refusal(401, "unauthorized")


# ---------------------------------------------------------------------------- the admin API's proxies


# What a reverse proxy adds to a request it passes on. The contract names the first three
# (CONTRACT §4); the others are what Caddy, Traefik, Envoy and Apache add beside them, and a
# client on this machine talking to the bridge directly sends none of them.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP", "X-Forwarded-Host", "X-Forwarded-Proto", "Via")


def address_of(remote: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address (an IPv4-mapped IPv6 one as IPv4, a zone dropped), or None if it is not one."""
    try:
        address = ipaddress.ip_address((remote or "").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def came_through_a_proxy(remote: str | None, headers: Headers, auth: AuthConfig) -> str | None:
    """Why a request is a proxy's (a header it carries, or its peer), or None when nothing says so.

    A reverse proxy on the same host connects from 127.0.0.1: by its address alone a request it
    passes on from the internet looks like the operator's own `curl`. What gives it away is what
    proxies add, or the operator saying which peers are proxies (`trusted_proxies`)."""
    for name in PROXY_HEADERS:
        if name in headers:
            return f"it carries {name}"
    address = address_of(remote)
    if address is not None and any(address in net for net in auth.trusted_proxies):
        return f"its peer {address} is one of server.auth.trusted_proxies"
    return None


def came_over_https(remote: str | None, headers: Headers, auth: AuthConfig) -> bool:
    """Whether the client used HTTPS, as a trusted proxy says (`X-Forwarded-Proto: https`, or
    `Forwarded: proto=https`) on the hop it made to us. A header from any other peer says
    nothing: anyone can send it. (The bridge itself speaks plain HTTP.)"""
    address = address_of(remote)
    if address is None or not any(address in net for net in auth.trusted_proxies):
        return False
    # the last value: the one our proxy set (a client's own header may come before it)
    forwarded_proto = [p.strip().lower() for v in headers.getall("X-Forwarded-Proto", []) for p in v.split(",")]
    if forwarded_proto:
        return forwarded_proto[-1] == "https"
    elements = [e for v in headers.getall("Forwarded", []) for e in v.split(",")]
    if elements:
        pairs = (p.strip().partition("=") for p in elements[-1].split(";"))
        return any(k.strip().lower() == "proto" and v.strip().strip('"').lower() == "https" for k, _, v in pairs)
    return False
