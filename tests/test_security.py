"""Security and hostile input (issue 6): only Skycore gets in, nothing crashes it, no secret leaks.

In-process tests run the real app (create_app, real SQLite) on a real 127.0.0.1 socket through
pytest-aiohttp; the `serve` and secret-leak tests run the real `postback-bridge serve` process.
Raw-socket tests speak HTTP by hand where a well-behaved client library would not misbehave
enough (bodies that never end, trickled headers).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import itertools
import json
import logging
import os
import secrets
import socket
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from bridge.config import build
from bridge.destinations.registry import build as build_destination
from bridge.errors import ConfigError
from bridge.logs import JSONFormatter
from bridge.runtime import RUNTIME
from bridge.secret import Secret, redact
from tests.conftest import POSTBACKS, AppClient, connect_to, eventually, exchange, free_port, post, read_response, sms

TOKEN = "tok_3kV9qLr8ZpX2"
ADMIN = "adm_Q2w9Ztk4"
Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture(params=["aiohttp", "lane"])
def make_client(app_client: AppClient, tmp_path: Path, request: pytest.FixtureRequest) -> MakeClient:
    """The real app with a fresh SQLite file and a `log` file destination; `server` is the
    `server:` section of the config. Served by aiohttp alone, and with the postback lane in front
    as `serve` runs it: every answer here must be the same either way."""
    counter = itertools.count()

    async def make(server: dict[str, Any] | None = None, *, host: str = "127.0.0.1") -> Client:
        n = next(counter)
        raw = {
            "server": server or {},
            "store": f"sqlite:///{tmp_path / f'bridge{n}.db'}",
            "destinations": {"audit": {"type": "log", "path": str(tmp_path / f"events{n}.jsonl")}},
            "default": ["audit"],
        }
        return await app_client(raw, request.param, host=host)

    return make


async def stored(client: Client, event_id: str) -> dict[str, Any] | None:
    store = client.server.app[RUNTIME].store
    assert store is not None
    return await store.get_event(event_id)


# ---------------------------------------------------------------------------- raw HTTP


@contextlib.asynccontextmanager
async def connection(client: Client) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async with connect_to(client.server.host, client.server.port) as streams:
        yield streams


def head(path: str = "/postback", **headers: str | int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: bridge", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def raw_post(client: Client, body: bytes, **headers: str | int) -> tuple[int, dict[str, str], bytes]:
    (answer,) = await exchange(client.server.host, client.server.port, head(Content_Length=len(body), **headers) + body)
    return answer


# ---------------------------------------------------------------------------- auth: token


@pytest.mark.parametrize("path", [f"/postback/{TOKEN}", f"/postback?token={TOKEN}", f"/{TOKEN}"])
async def test_token_in_path_or_query_is_accepted(make_client, path):
    client = await make_client({"auth": {"token": TOKEN}})
    response = await client.post(path, data=sms(1))
    body = await response.json()
    assert response.status == 200 and body["status"] == "accepted"
    assert (await stored(client, body["id"]))["text"] == "HELLO there"


async def test_wrong_or_missing_token_is_401_and_the_answers_do_not_differ(make_client):
    client = await make_client({"auth": {"token": TOKEN}})
    answers = set()
    for path in [
        "/postback",
        "/postback/wrong",
        f"/postback/{TOKEN[:-1]}",
        f"/postback/{TOKEN}x",
        f"/postback/{TOKEN.upper()}",
        "/postback?token=",
        "/postback?token=wrong",
        f"/postback?tok={TOKEN}",
        f"/postback/wrong?token={TOKEN}x",
        "/wrong",
    ]:
        response = await client.post(path, data=sms(1))
        text = await response.text()
        assert response.status == 401, path
        assert TOKEN not in text and TOKEN not in str(response.headers)
        answers.add((text, "WWW-Authenticate" in response.headers))
    assert answers == {('{"error": "unauthorized"}\n', False)}
    metrics = await (await client.get("/metrics")).text()
    assert 'status="accepted"' not in metrics


async def test_token_path_without_a_token_configured_is_not_found(make_client):
    client = await make_client()
    response = await client.post("/postback/anything", data=sms(1))
    assert response.status == 404


@pytest.mark.parametrize("token", [None, "s3cret-token-1234567890"])
async def test_a_path_that_is_not_ours_is_404_for_any_method(make_client, token):
    client = await make_client({"auth": {"token": token}} if token else None)
    for method in ("GET", "PUT", "DELETE", "HEAD"):
        response = await client.request(method, "/nope")
        assert response.status == 404, method
        if method != "HEAD":
            assert await response.json() == {"error": "not found"}
    for method, path, allow in [
        ("GET", "/postback", "POST"),  # ours, but only for POST
        ("GET", "/postback/abc", "POST"),
        ("PUT", "/healthz", "GET, HEAD"),
        ("DELETE", "/metrics", "GET, HEAD"),
        ("PATCH", "/admin/replay", "POST"),
    ]:
        response = await client.request(method, path)
        assert (response.status, response.headers["Allow"]) == (405, allow), (method, path)
    assert (await client.get("/healthz")).status == 200


async def test_a_multipart_boundary_that_is_not_latin_1_is_a_400(make_client):
    client = await make_client()
    body = (
        b'--a\xe2\x82\xac\r\nContent-Disposition: form-data; name="xml"\r\n\r\n' + sms(1) + b"\r\n--a\xe2\x82\xac--\r\n"
    )
    head = b"POST /postback HTTP/1.1\r\nHost: b\r\nConnection: close\r\n"
    head += b"Content-Type: multipart/form-data; boundary=a\xe2\x82\xac\r\nContent-Length: %d\r\n\r\n" % len(body)
    async with connection(client) as (reader, writer):
        writer.write(head + body)
        await writer.drain()
        status, _, answer = await read_response(reader)
    assert status == 200, answer  # the boundary is the bytes sent (it was a 503: a latin-1 encode failed)


async def test_a_postback_path_that_is_also_one_of_ours_still_takes_postbacks(make_client):
    client = await make_client({"postback_path": "/healthz"})
    response = await client.post("/healthz", data=sms(1))
    assert response.status == 200 and (await response.json())["status"] == "accepted"
    assert (await client.get("/healthz")).status == 200
    response = await client.put("/healthz")
    assert (response.status, response.headers["Allow"]) == (405, "GET, HEAD, POST")


async def test_a_small_max_body_bytes_limits_postbacks_only(make_client):
    client = await make_client({"max_body_bytes": 40, "admin_token": "adm"})
    assert (await client.post("/postback", data=sms(1))).status == 413
    replay = {"destination": "audit", "since": "2024-01-01T00:00:00Z"}  # 57 bytes as JSON
    response = await client.post("/admin/replay", json=replay, headers={"Authorization": "Bearer adm"})
    assert (response.status, await response.json()) == (200, {"replayed": []})


async def test_unauthenticated_body_is_never_read(make_client):
    """Auth comes first: a stranger's oversized body is answered 401, not 413."""
    client = await make_client({"auth": {"token": TOKEN}, "max_body_bytes": 1024})
    response = await client.post("/postback", data=b"x" * 100_000)
    assert response.status == 401


# ---------------------------------------------------------------------------- auth: basic

BASIC = {"username": "skycore", "password": "pa:ss wörd"}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        basic("skycore", "wrong"),
        basic("other", BASIC["password"]),
        basic("skycore", BASIC["password"] + "x"),
        basic("skycore", ""),
        "Basic not-base64!!",
        "Basic " + base64.b64encode(b"skycore:\xff\xfe").decode(),
        "Basic",
        f"Bearer {BASIC['password']}",
        BASIC["password"],
    ],
)
async def test_basic_missing_or_wrong_is_401_with_www_authenticate(make_client, authorization):
    client = await make_client({"auth": {"basic": BASIC}})
    headers = {"Authorization": authorization} if authorization else {}
    response = await client.post("/postback", data=sms(1), headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith('Basic realm="postback-bridge"')
    assert await response.json() == {"error": "unauthorized"}


@pytest.mark.parametrize("scheme", ["Basic", "basic", "BASIC"])
async def test_basic_right_credentials_are_accepted(make_client, scheme):
    client = await make_client({"auth": {"basic": BASIC}})
    authorization = basic(BASIC["username"], BASIC["password"]).replace("Basic", scheme)
    response = await client.post("/postback", data=sms(1), headers={"Authorization": authorization})
    assert response.status == 200


@pytest.mark.parametrize(
    ("path", "header"),
    [
        ("/postback", b"Authorization: Basic \xff\xfe"),
        ("/postback", b"Authorization: Basic c2t5Y29yZTpw\xc3\xa4"),
        ("/postback", b"Authorization: \xff"),
        ("/postback", b"X-Forwarded-For: \xff\xfe"),
        ("/postback/tok%ff", b"X-Any: 1"),
        ("/postback?token=%ff%fe", b"X-Any: 1"),
        ("/postback?token=%00", b"X-Any: 1"),
        ("/admin/events", b"Authorization: Bearer \xff\xfe"),
        ("/admin/events", b"Authorization: Bearer " + ADMIN.encode() + b"\xff"),
        ("/admin/events", b"Authorization: \xc3\xa4"),
    ],
)
async def test_undecodable_credentials_are_401_not_5xx(make_client, path, header):
    """Header bytes that are not UTF-8 reach us as surrogate escapes; they are just wrong."""
    client = await make_client({"auth": {"token": TOKEN, "basic": BASIC}, "admin_token": ADMIN})
    method = "GET" if path.startswith("/admin") else "POST"
    body = sms(1)
    async with connection(client) as (reader, writer):
        request = f"{method} {path} HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\n".encode()
        writer.write(request + header + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        status, _, answer = await asyncio.wait_for(read_response(reader), 10)
    assert status == 401, answer


# ---------------------------------------------------------------------------- auth: allow_from


@pytest.mark.parametrize(
    ("allow_from", "status"),
    [(["10.0.0.0/8"], 403), (["203.0.113.7"], 403), (["127.0.0.0/8"], 200), (["10.0.0.0/8", "127.0.0.1/32"], 200)],
)
async def test_allow_from_v4(make_client, allow_from, status):
    client = await make_client({"auth": {"allow_from": allow_from}})
    response = await client.post("/postback", data=sms(1))
    assert response.status == status
    if status == 403:
        assert await response.json() == {"error": "forbidden"}


@pytest.mark.parametrize(("allow_from", "status"), [(["2001:db8::/32"], 403), (["::1/128"], 200), (["::1"], 200)])
async def test_allow_from_v6_peer(make_client, allow_from, status):
    client = await make_client({"auth": {"allow_from": allow_from}}, host="::1")
    response = await client.post("/postback", data=sms(1))
    assert response.status == status


async def test_allow_from_is_checked_before_the_token(make_client):
    client = await make_client({"auth": {"token": TOKEN, "allow_from": ["10.0.0.0/8"]}})
    assert (await client.post(f"/postback/{TOKEN}", data=sms(1))).status == 403
    client = await make_client({"auth": {"token": TOKEN, "allow_from": ["127.0.0.1"]}})
    assert (await client.post("/postback", data=sms(1))).status == 401
    assert (await client.post(f"/postback/{TOKEN}", data=sms(1))).status == 200


# ---------------------------------------------------------------------------- X-Forwarded-For

SKYCORE_V4 = "203.0.113.0/24"
SKYCORE_V6 = "2001:db8:5::/48"


@pytest.mark.parametrize(
    ("trusted", "forwarded", "status"),
    [
        # no trusted proxies: the header is the client's word and is ignored
        ([], ["203.0.113.9"], 403),
        # the peer is not a trusted proxy: ignored
        (["10.0.0.0/8"], ["203.0.113.9"], 403),
        # believed from a trusted proxy, v4 and v6
        (["127.0.0.1/32"], ["203.0.113.9"], 200),
        (["127.0.0.1/32"], ["2001:db8:5::77"], 200),
        (["127.0.0.1/32"], ["2001:db8:6::77"], 403),
        (["127.0.0.1/32"], ["::ffff:203.0.113.9"], 200),
        (["127.0.0.1/32"], ["198.51.100.1"], 403),
        # the client prepends a claim; the proxy appends what it saw: the right-most untrusted hop counts
        (["127.0.0.1/32"], ["203.0.113.9, 198.51.100.1"], 403),
        (["127.0.0.1/32"], ["203.0.113.9", "198.51.100.1"], 403),
        (["127.0.0.1/32"], ["198.51.100.1, 203.0.113.9"], 200),
        # two proxies in a row, both trusted
        (["127.0.0.1/32", "10.0.0.0/8"], ["198.51.100.1, 203.0.113.9, 10.1.2.3"], 200),
        (["127.0.0.1/32", "10.0.0.0/8"], ["203.0.113.9, 198.51.100.1, 10.1.2.3"], 403),
        # garbage is not an address to be allowed
        (["127.0.0.1/32"], ["203.0.113.9, unknown"], 403),
        (["127.0.0.1/32"], ["203.0.113.9:4711"], 403),
        (["127.0.0.1/32"], [""], 403),
    ],
)
async def test_forwarded_for_is_believed_only_from_trusted_proxies(make_client, trusted, forwarded, status):
    auth: dict[str, Any] = {"allow_from": [SKYCORE_V4, SKYCORE_V6]}
    if trusted:
        auth["trusted_proxies"] = trusted
    client = await make_client({"auth": auth})
    async with connection(client) as (reader, writer):
        body = sms(1)
        hops = "".join(f"X-Forwarded-For: {hop}\r\n" for hop in forwarded)
        writer.write(head(Content_Length=len(body))[:-2] + hops.encode() + b"\r\n" + body)
        got, _, _ = await asyncio.wait_for(read_response(reader), 10)
    assert got == status


# ---------------------------------------------------------------------------- /admin


@pytest.mark.parametrize(
    "authorization",
    [None, f"Bearer {ADMIN}x", f"Bearer {ADMIN[:-1]}", f"Basic {ADMIN}", ADMIN, f"Bearer {TOKEN}", "Bearer "],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin/events"), ("GET", "/admin/deliveries"), ("POST", "/admin/reload"), ("GET", "/%61dmin/events")],
)
async def test_admin_needs_the_bearer_admin_token(make_client, authorization, method, path):
    client = await make_client({"auth": {"token": TOKEN}, "admin_token": ADMIN})
    headers = {"Authorization": authorization} if authorization else {}
    response = await client.request(method, path, headers=headers)
    assert response.status == 401
    assert ADMIN not in await response.text()


async def test_admin_with_the_token_answers(make_client):
    client = await make_client({"auth": {"token": TOKEN}, "admin_token": ADMIN})
    posted = await (await client.post(f"/postback/{TOKEN}", data=sms(1))).json()
    response = await client.get("/admin/events", headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status == 200
    assert posted["id"] in await response.text()


async def test_admin_without_a_token_is_off_on_a_public_listen(make_client):
    """The app is told it listens on every interface (the socket itself is loopback here)."""
    client = await make_client({"listen": "0.0.0.0:8080", "auth": {"token": TOKEN}})
    for method, path in [("GET", "/admin/events"), ("GET", "/admin/deliveries"), ("POST", "/admin/reload")]:
        response = await client.request(method, path)
        assert response.status == 404, path
    loopback = await make_client({"auth": {"token": TOKEN}})
    assert (await loopback.get("/admin/events")).status == 200


# Without an admin_token, only a request made directly on loopback gets in (CONTRACT §4, issue
# 17): a reverse proxy on the same host connects from 127.0.0.1 too, and through it /admin was on
# the internet. What a proxy adds gives it away; so does its address, when trusted_proxies has it.
PROXY_HEADERS = [
    ("Forwarded", "for=203.0.113.9;proto=https"),
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Real-IP", "203.0.113.9"),
    ("x-forwarded-for", ""),  # any case, even empty: a proxy's mark all the same
    ("X-Forwarded-Host", "sms.example.com"),  # what Caddy, Traefik and Envoy add beside them
    ("X-Forwarded-Proto", "https"),
    ("Via", "1.1 caddy"),
]
ADMIN_CALLS = [
    ("GET", "/admin/events"),
    ("GET", "/admin/deliveries"),
    ("GET", "/admin/openapi.json"),
    ("POST", "/admin/replay?destination=audit"),
]  # fmt: skip


def assert_refused_as_proxied(status: int, answer: Any, why: str) -> None:
    assert status == 403, answer
    assert "came through a proxy" in answer["error"] and why in answer["error"], answer
    assert "server.admin_token" in answer["error"], answer


async def test_admin_without_a_token_lets_in_a_direct_loopback_request(make_client):
    client = await make_client({"auth": {"token": TOKEN}})
    for method, path in ADMIN_CALLS:
        response = await client.request(method, path)
        assert response.status == 200, (method, path, await response.text())


@pytest.mark.parametrize(("name", "value"), PROXY_HEADERS, ids=[f"{n}={v}" for n, v in PROXY_HEADERS])
async def test_admin_without_a_token_refuses_a_request_through_a_proxy(make_client, name, value):
    client = await make_client({"auth": {"token": TOKEN}})
    for method, path in ADMIN_CALLS:
        response = await client.request(method, path, headers={name: value})
        assert_refused_as_proxied(response.status, await response.json(), name if name[0].isupper() else "")
    assert (await client.get("/admin/events")).status == 200  # the same, directly


@pytest.mark.parametrize("header", [b"X-Forwarded-For: 203.0.113.9", b"X-Real-IP: 203.0.113.9", b"Forwarded: for=x"])
async def test_a_proxied_admin_request_the_lane_could_read_is_refused_too(make_client, header):
    """A POST with Host and Content-Length, the head the lane reads, to the admin API: never the
    lane's (it takes postbacks only), and refused the same either way; a postback_path of /admin
    (the admin API's /admin/replay beside it) included."""
    for section in ({}, {"postback_path": "/admin"}):
        client = await make_client({**section, "auth": {"token": TOKEN}})
        async with connection(client) as (reader, writer):
            body = b'{"destination": "audit"}'
            writer.write(head("/admin/replay", Content_Length=len(body))[:-2] + header + b"\r\n\r\n" + body)
            await writer.drain()
            status, _, answer = await asyncio.wait_for(read_response(reader), 10)
        assert_refused_as_proxied(status, json.loads(answer), header.split(b":")[0].decode())
        async with connection(client) as (reader, writer):
            writer.write(head("/admin/replay", Content_Length=len(body)) + body)
            await writer.drain()
            status, _, answer = await asyncio.wait_for(read_response(reader), 10)
        assert (status, json.loads(answer)) == (200, {"replayed": []})


@pytest.mark.parametrize(
    ("listen", "host", "trusted", "status"),
    [
        ("127.0.0.1:8080", "127.0.0.1", ["127.0.0.1/32"], 403),
        ("127.0.0.1:8080", "127.0.0.1", ["127.0.0.0/8", "10.0.0.0/8"], 403),
        ("127.0.0.1:8080", "127.0.0.1", ["10.0.0.0/8"], 200),  # another host's proxy: this peer is not it
        ("[::1]:8080", "::1", ["::1/128"], 403),
        ("[::1]:8080", "::1", ["127.0.0.1/32"], 200),
    ],
)
async def test_admin_without_a_token_refuses_a_trusted_proxy_peer(make_client, listen, host, trusted, status):
    client = await make_client({"listen": listen, "auth": {"token": TOKEN, "trusted_proxies": trusted}}, host=host)
    for method, path in ADMIN_CALLS:
        response = await client.request(method, path)  # no header: a proxy that adds none
        answer = await response.json()
        if status == 403:
            assert_refused_as_proxied(response.status, answer, "trusted_proxies")
        else:
            assert response.status == 200, answer


async def test_admin_without_a_token_refuses_a_proxied_request_on_a_public_listen_too(make_client):
    client = await make_client({"listen": "0.0.0.0:8080", "auth": {"token": TOKEN}})
    response = await client.get("/admin/events", headers={"X-Forwarded-For": "127.0.0.1"})
    assert_refused_as_proxied(response.status, await response.json(), "X-Forwarded-For")
    assert (await client.get("/admin/events")).status == 404  # off, as before


async def test_the_admin_token_works_through_a_proxy(make_client):
    client = await make_client({"auth": {"token": TOKEN, "trusted_proxies": ["127.0.0.1/32"]}, "admin_token": ADMIN})
    proxied = {"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9", "Forwarded": "for=203.0.113.9"}
    for method, path in ADMIN_CALLS:
        response = await client.request(method, path, headers={**proxied, "Authorization": f"Bearer {ADMIN}"})
        assert response.status == 200, (method, path, await response.text())
        response = await client.request(method, path, headers={**proxied, "Authorization": f"Bearer {ADMIN}x"})
        assert (response.status, await response.json()) == (401, {"error": "unauthorized"})
        assert (await client.request(method, path, headers=proxied)).status == 401


# ---------------------------------------------------------------------------- body size and time


async def test_declared_length_over_the_limit_is_413_before_any_body_is_sent(make_client):
    client = await make_client({"max_body_bytes": 4096})
    async with connection(client) as (reader, writer):
        writer.write(head(Content_Length=50_000_000))
        await writer.drain()
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
    assert status == 413
    assert "4096" in json.loads(body)["error"]


async def test_chunked_body_over_the_limit_is_413_while_it_is_still_arriving(make_client):
    client = await make_client({"max_body_bytes": 4096})
    sent = 0
    async with connection(client) as (reader, writer):
        writer.write(head(Transfer_Encoding="chunked"))

        async def trickle() -> None:
            nonlocal sent
            chunk = b"<" * 1000
            with contextlib.suppress(OSError):
                for _ in range(1000):  # never the final 0-size chunk: the body does not end
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
                    sent += len(chunk)
                    await asyncio.sleep(0.01)

        sender = asyncio.create_task(trickle())
        try:
            status, _, _ = await asyncio.wait_for(read_response(reader), 10)
        finally:
            sender.cancel()
    assert status == 413
    assert sent < 500_000  # answered long before the client would have finished (1 MB)


async def test_chunked_body_under_the_limit_is_accepted(make_client):
    client = await make_client({"max_body_bytes": 4096})
    body = sms(1)
    async with connection(client) as (reader, writer):
        writer.write(head(Transfer_Encoding="chunked"))
        for i in range(0, len(body), 10):
            part = body[i : i + 10]
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
        writer.write(b"0\r\n\r\n")
        status, _, answer = await asyncio.wait_for(read_response(reader), 10)
    assert status == 200, answer
    assert (await stored(client, json.loads(answer)["id"]))["text"] == "HELLO there"


async def test_body_at_the_limit_is_accepted_and_one_byte_more_is_413(make_client):
    client = await make_client({"max_body_bytes": 2048})
    base = sms(1, text="{}")
    fill = 2048 - len(base) + 2
    status, _, answer = await raw_post(client, sms(1, text="a" * fill))
    assert status == 200, answer
    status, _, _ = await raw_post(client, sms(2, text="a" * (fill + 1)))
    assert status == 413


async def test_slow_body_times_out_with_408(make_client):
    client = await make_client({"client_timeout": "1s"})
    body = sms(1)
    started = time.monotonic()
    async with connection(client) as (reader, writer):
        writer.write(head(Content_Length=len(body)))

        async def trickle() -> None:
            with contextlib.suppress(OSError):
                for byte in body:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.1)

        sender = asyncio.create_task(trickle())
        try:
            status, _, _ = await asyncio.wait_for(read_response(reader), 10)
        finally:
            sender.cancel()
    elapsed = time.monotonic() - started
    assert status == 408
    assert 0.9 <= elapsed < 5  # the whole body had client_timeout, however steadily it dripped


async def test_slow_headers_are_cut_off_after_client_timeout(make_client):
    client = await make_client({"client_timeout": "1s"})
    started = time.monotonic()
    async with connection(client) as (reader, writer):
        writer.write(b"POST /postback HTTP/1.1\r\nHost: bridge\r\n")
        with contextlib.suppress(OSError):
            for _ in range(30):  # one header line every 0.2 s, never the blank line
                await asyncio.sleep(0.2)
                if reader.at_eof():
                    break
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
        with contextlib.suppress(OSError):
            rest = await asyncio.wait_for(reader.read(), 5)
            assert b"200 OK" not in rest
    elapsed = time.monotonic() - started
    assert elapsed < 4, "the connection was kept open for a client that never finished its headers"


# ---------------------------------------------------------------------------- Content-Encoding


async def test_gzip_body_is_decompressed_and_accepted(make_client):
    client = await make_client()
    status, _, answer = await raw_post(client, gzip.compress(sms(1, text="zipped ✓")), Content_Encoding="gzip")
    assert status == 200, answer
    assert (await stored(client, json.loads(answer)["id"]))["text"] == "zipped ✓"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_the_limit_applies_to_the_decompressed_size(make_client, encoding):
    client = await make_client({"max_body_bytes": 4096})
    padded = sms(1, text="a" * 5000)
    squeezed = gzip.compress(padded) if encoding == "gzip" else zlib.compress(padded)
    assert len(squeezed) < 4096 < len(padded)
    status, _, _ = await raw_post(client, squeezed, Content_Encoding=encoding)
    assert status == 413


async def test_gzip_bomb_is_refused_quickly(make_client):
    client = await make_client()  # max_body_bytes 64 KiB; the bomb is 48 KiB that inflate to 50 MB
    bomb = gzip.compress(b"\0" * 50_000_000, compresslevel=9)
    assert len(bomb) < 65536
    started = time.monotonic()
    status, _, _ = await raw_post(client, bomb, Content_Encoding="gzip")
    assert status == 413
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b"\x1f\x8b\x08\x00not really gzip"),
        ("gzip", gzip.compress(sms(1))[:-12]),  # truncated
        ("deflate", b"not deflate at all"),
        ("br", sms(1)),
        ("zstd", sms(1)),
        ("gzip, gzip", gzip.compress(sms(1))),
    ],
)
async def test_body_that_does_not_decode_is_400(make_client, encoding, body):
    client = await make_client()
    status, _, answer = await raw_post(client, body, Content_Encoding=encoding)
    assert status == 400, answer


@pytest.mark.parametrize("encoding", ["identity", "x-unknown", "gzip;q=1", "a" * 4000])
async def test_odd_content_encodings_never_5xx(make_client, encoding):
    client = await make_client()
    status, _, answer = await raw_post(client, sms(1), Content_Encoding=encoding)
    assert status in (200, 400, 415), answer


# ---------------------------------------------------------------------------- Content-Type and charset


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "image/png",
        "multipart/form-data; boundary=----x",
        "application/x-www-form-urlencoded",
        "text/xml; charset=ISO-8859-1",
        "text/xml; charset=utf-16",
        'text/xml; charset="utf-8"; charset=ascii',
        "text/xml; charset=",
        "text/xml; " + "; ".join(f"p{i}=v{i}" for i in range(500)),
        "x" * 7000,
        ";;;===",
    ],
)
async def test_absurd_content_types_do_not_change_how_the_body_is_read(make_client, content_type):
    client = await make_client()
    status, _, answer = await raw_post(client, sms(1, text="héllo"), Content_Type=content_type)
    assert status == 200, answer
    assert (await stored(client, json.loads(answer)["id"]))["text"] == "héllo"


async def test_body_is_utf8_whatever_the_charset_parameter_says(make_client):
    client = await make_client()
    latin1 = sms(1, text="héllo").decode().encode("latin-1")
    status, _, answer = await raw_post(client, latin1, Content_Type="text/xml; charset=ISO-8859-1")
    assert status == 400
    assert "UTF-8" in json.loads(answer)["error"]
    utf16 = sms(1).decode().encode("utf-16")
    status, _, _ = await raw_post(client, utf16, Content_Type="text/xml; charset=utf-16")
    assert status == 400


async def test_xml_encoding_declaration_cannot_turn_utf8_into_mojibake(make_client):
    client = await make_client()
    xml = b'<?xml version="1.0" encoding="ISO-8859-1"?>' + sms(1, text="héllo 日本")
    status, _, answer = await raw_post(client, xml)
    assert status == 200, answer
    assert (await stored(client, json.loads(answer)["id"]))["text"] == "héllo 日本"


@pytest.mark.parametrize(
    "body",
    [
        sms(1).replace(b"HELLO", b"H\xffLLO"),
        sms(1).replace(b"HELLO", b"H\xc0\xafLLO"),  # overlong '/'
        sms(1).replace(b"HELLO", b"H\xed\xa0\x80LLO"),  # an encoded surrogate
        sms(1).replace(b"HELLO", b"H\xf4\x90\x80\x80LLO"),  # above U+10FFFF
        sms(1) + b"\xe2\x82",  # truncated at the end
        b"\xfe\xff" + sms(1),
    ],
)
async def test_invalid_utf8_is_400(make_client, body):
    client = await make_client()
    status, _, answer = await raw_post(client, body)
    assert status == 400
    assert "UTF-8" in json.loads(answer)["error"]


# ---------------------------------------------------------------------------- XML: DTDs, entities, depth


class Listener:
    """A TCP socket on 127.0.0.1 that records every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with contextlib.suppress(OSError):
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nFETCHED-MARKER")
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    peer = Listener()
    yield peer
    peer.close()


class FifoWatch:
    """A named pipe; opening it for reading (what a parser fetching it would do) is noticed.

    A thread keeps trying a non-blocking open for writing, which succeeds only while someone
    has the pipe open for reading; it then writes a marker so such a reader never hangs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path, 0o600)
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.002)
                continue
            self.opened += 1
            with contextlib.suppress(OSError):
                os.write(fd, b"FIFO-MARKER")
            os.close(fd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def doctype(internal: str) -> bytes:
    return (
        f'<?xml version="1.0"?>\n<!DOCTYPE POSTBACK [\n{internal}\n]>\n'
        "<POSTBACK><ORIGIN>SMS_MO</ORIGIN><FROM>15552312102</FROM><TO>86717</TO><TEXT>&x;</TEXT></POSTBACK>"
    ).encode()


def external_references(target: str) -> dict[str, bytes]:
    """Every way XML has to make a parser read `target`."""
    tail = b"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><TEXT>&x;</TEXT></POSTBACK>"
    return {
        "general entity": doctype(f'<!ENTITY x SYSTEM "{target}">'),
        "public entity": doctype(f'<!ENTITY x PUBLIC "-//X//EN" "{target}">'),
        "parameter entity": doctype(f'<!ENTITY % p SYSTEM "{target}"> %p; <!ENTITY x "y">'),
        "external DTD": f'<!DOCTYPE POSTBACK SYSTEM "{target}">'.encode() + tail,
        "external DTD, public": f'<!DOCTYPE POSTBACK PUBLIC "-//X//EN" "{target}">'.encode() + tail,
        "unparsed entity": doctype(f'<!NOTATION n SYSTEM "{target}"><!ENTITY x SYSTEM "{target}" NDATA n>'),
    }


REFERENCE_KINDS = list(external_references("file:///x"))


@pytest.mark.parametrize("kind", REFERENCE_KINDS)
async def test_external_entity_to_a_file_is_refused_and_never_opened(make_client, tmp_path, kind):
    client = await make_client()
    watch = FifoWatch(tmp_path / "secret.pipe")
    plain = tmp_path / "secret.txt"
    plain.write_text("FILE-MARKER")
    try:
        for target in (watch.path.as_uri(), str(watch.path), plain.as_uri(), str(plain)):
            status, _, answer = await raw_post(client, external_references(target)[kind])
            assert status == 400, answer
            assert b"MARKER" not in answer
        await asyncio.sleep(0.1)
    finally:
        watch.close()
    assert watch.opened == 0, "the parser opened the file named by an external reference"


@pytest.mark.parametrize("kind", REFERENCE_KINDS)
async def test_external_entity_over_http_is_refused_and_never_fetched(make_client, listener, kind):
    client = await make_client()
    status, _, answer = await raw_post(client, external_references(f"http://127.0.0.1:{listener.port}/x.dtd")[kind])
    assert status == 400, answer
    assert b"MARKER" not in answer
    await asyncio.sleep(0.2)
    assert listener.connections == 0


async def test_references_without_a_dtd_are_never_fetched(make_client, listener):
    """XInclude, stylesheets, xsi:schemaLocation: plain data to us, never followed."""
    url = f"http://127.0.0.1:{listener.port}/x"
    client = await make_client()
    bodies = [
        f'<?xml-stylesheet type="text/xsl" href="{url}"?>'.encode() + sms(1),
        sms(2).replace(
            b"<TEXT>", f'<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="{url}"/><TEXT>'.encode()
        ),
        sms(3).replace(
            b"<POSTBACK>",
            f'<POSTBACK xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="x {url}">'.encode(),
        ),
    ]
    for body in bodies:
        status, _, answer = await raw_post(client, body)
        assert status in (200, 400), answer
        assert b"MARKER" not in answer
    await asyncio.sleep(0.2)
    assert listener.connections == 0


@pytest.mark.parametrize(
    "body",
    [
        doctype('<!ENTITY x "expanded">'),
        doctype(
            '<!ENTITY a "aaaaaaaaaa">'
            + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(9))
            + '<!ENTITY x "&j;">'
        ),  # billion laughs
        doctype('<!ENTITY x "y"><!ATTLIST POSTBACK a CDATA "default">'),
        b"<!DOCTYPE POSTBACK>" + sms(1),
        b"<!DOCTYPE POSTBACK []>" + sms(1),
        sms(1).replace(b"HELLO", b"&x;"),  # an undeclared entity
        sms(1).replace(b"HELLO", b"&#0;"),  # a NUL character reference
    ],
)
async def test_dtds_and_entities_are_400(make_client, body):
    client = await make_client()
    started = time.monotonic()
    status, _, answer = await raw_post(client, body)
    assert status == 400, answer
    assert b"expanded" not in answer and b"aaaa" not in answer
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("depth", [17, 100, 5000])
async def test_absurd_nesting_is_400(make_client, depth):
    client = await make_client()
    inner = "<A>" * depth + "x" + "</A>" * depth
    body = f"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><TEXT>hi</TEXT><X>{inner}</X></POSTBACK>".encode()
    status, _, answer = await raw_post(client, body)
    assert status == 400
    assert "nested" in json.loads(answer)["error"]


async def test_many_siblings_and_attributes_within_the_limit_are_handled_quickly(make_client):
    client = await make_client()
    attributes = " ".join(f"a{i}='{i}'" for i in range(4000))
    for body in [
        sms(1).replace(b"<TEXT>", b"<E/>" * 15000 + b"<TEXT>"),
        sms(2).replace(b"<POSTBACK>", f"<POSTBACK {attributes}>".encode()),
        sms(3).replace(b"<POSTBACK>", b"<POSTBACK>" + b"<!-- c -->" * 6000),
    ]:
        started = time.monotonic()
        status, _, answer = await raw_post(client, body)
        assert status in (200, 400), answer
        assert time.monotonic() - started < 3


# ---------------------------------------------------------------------------- secrets: types and files


def test_secret_never_shows_itself():
    secret = Secret("s3cr3t-value")
    config = build(
        {
            "server": {
                "auth": {"token": "s3cr3t-value", "basic": {"username": "u", "password": "s3cr3t-value"}},
                "admin_token": "s3cr3t-value",
            },
            "destinations": {
                "crm": {
                    "type": "webhook",
                    "url": "http://127.0.0.1:9/hook",
                    "secret": "whsec_czNjcjN0LXZhbHVl",
                    "headers": {"Authorization": "Bearer s3cr3t-value"},
                }
            },
            "default": ["crm"],
        },
        environ={},
    )
    shown = [
        str(secret),
        repr(secret),
        f"{secret}",
        f"{secret!r}",
        "%s" % secret,  # noqa: UP031 (old-style formatting is one of the ways it must stay hidden)
        json.dumps({"v": secret}, default=str),
        repr(config),
        repr(config.server),
        repr(config.destinations["crm"]),
        repr(build_destination(config.destinations["crm"])),
    ]
    for text in shown:
        assert "s3cr3t-value" not in text and "czNjcjN0" not in text, text
    record = logging.makeLogRecord({"msg": "x %s", "args": (secret,), "token": secret})
    assert "s3cr3t-value" not in JSONFormatter().format(record)


@pytest.mark.parametrize(
    ("echo", "shown"),
    [
        ('{"Authorization": "Bearer crm_4f9Qx2LmZ"}', '{"Authorization": "**********"}'),
        ("bad token crm_4f9Qx2LmZ, go away", "bad token **********, go away"),
        ("whsec_c2VjcmV0LWtleS0x is not valid", "********** is not valid"),
        ("Bearer nothing to hide", "Bearer nothing to hide"),
    ],
)
def test_redact_masks_what_a_peer_echoes_back(echo, shown):
    assert redact(echo, [Secret("Bearer crm_4f9Qx2LmZ"), Secret("whsec_c2VjcmV0LWtleS0x"), None]) == shown


async def test_sqlite_file_and_log_files_are_created_0600(app_client, tmp_path):
    raw = {
        "store": f"sqlite:///{tmp_path / 'bridge.db'}",
        "destinations": {"audit": {"type": "log", "path": str(tmp_path / "events.jsonl")}},
        "default": ["audit"],
    }
    old = os.umask(0)  # what a careless service manager might hand us
    try:
        client = await app_client(raw)
        assert (await client.post("/postback", data=sms(1))).status == 200
        events = tmp_path / "events.jsonl"
        await eventually(lambda: events.exists() and events.stat().st_size, waits=100, interval=0.05, raises=False)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.iterdir() if p.name.startswith(("bridge.db", "events"))]
    assert {p.name for p in files} >= {"bridge.db", "bridge.db-wal", "events.jsonl"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


# ---------------------------------------------------------------------------- serve: refusing to be public


def public_config(bridge_factory: Callable[..., Any], config: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    bridge = bridge_factory(config, env)
    raw = yaml.safe_load(bridge.config_path.read_text())
    raw["server"]["listen"] = f"0.0.0.0:{bridge.port}"
    bridge.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return bridge


def test_serve_refuses_a_public_listen_without_auth_and_says_how_to_fix_it(bridge_factory):
    bridge = public_config(bridge_factory, {"server": {"auth": {"trusted_proxies": ["10.0.0.0/8"]}}})
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "-c", str(bridge.config_path)],
        cwd=bridge.workdir,
        env=bridge.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    for hint in ("0.0.0.0", "server.auth.token", "allow_unauthenticated: true", "127.0.0.1"):  # noqa: S104 (a message, not a bind)
        assert hint in done.stderr, hint
    assert not (bridge.workdir / "bridge.db").exists()


async def test_serve_starts_public_with_allow_unauthenticated(bridge_factory):
    bridge = public_config(bridge_factory, {"server": {"auth": {"allow_unauthenticated": True}}})
    bridge.start()
    status, body = await post(bridge.url + "/postback", sms(1))
    assert status == 200 and body["status"] == "accepted"
    assert bridge.stop() == 0


async def test_serve_public_with_a_token_guards_postbacks_and_keeps_admin_off(bridge_factory):
    bridge = public_config(
        bridge_factory, {"server": {"auth": {"token": "${POSTBACK_TOKEN}"}}}, {"POSTBACK_TOKEN": TOKEN}
    )
    bridge.start()
    assert (await post(bridge.url + "/postback", sms(1)))[0] == 401
    assert (await post(bridge.url + f"/postback/{TOKEN}", sms(1)))[0] == 200
    async with aiohttp.ClientSession() as session:
        for method, path in [("GET", "/admin/events"), ("GET", "/admin/openapi.json"), ("POST", "/admin/reload")]:
            async with session.request(method, bridge.url + path) as response:
                assert response.status == 404, path
    assert bridge.stop() == 0


@pytest.mark.slow
async def test_serve_warns_of_trusted_proxies_without_an_admin_token_at_start_and_reload(bridge_factory):
    """The real `serve`: one JSON warning line when the config has a proxy in front and no
    admin_token; and the admin API through it, with the token and then without."""
    bridge = bridge_factory({"server": {"auth": {"trusted_proxies": ["127.0.0.1/32"]}, "admin_token": ADMIN}})
    bridge.start()
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(bridge.url + "/admin/events", headers={"X-Forwarded-For": "203.0.113.9", **bearer}) as r:
            assert r.status == 200
        async with session.get(bridge.url + "/admin/events") as r:
            assert r.status == 401
        raw = yaml.safe_load(bridge.config_path.read_text())
        del raw["server"]["admin_token"]
        bridge.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with session.post(bridge.url + "/admin/reload", headers=bearer) as r:
            assert (r.status, (await r.json())["status"]) == (200, "reloaded")
        async with session.get(bridge.url + "/admin/events") as r:  # from 127.0.0.1, a trusted proxy
            assert r.status == 403 and "trusted_proxies" in (await r.json())["error"]
    assert bridge.stop() == 0
    messages = [line["msg"] for line in bridge.log_lines()]
    assert messages.index("config reloaded") + 1 == messages.index("config warning"), messages
    assert messages.count("config warning") == 1  # not at start: there was a token then

    bridge.start()  # with the file as it is now
    assert bridge.stop() == 0
    assert bridge.stderr_path is not None
    lines = [json.loads(line) for line in bridge.stderr_path.read_text().splitlines()]  # this run's
    messages = [line["msg"] for line in lines]
    assert messages.count("config warning") == 1 and messages.index("config warning") < messages.index("listening")
    (warning,) = [line for line in lines if line["msg"] == "config warning"]
    assert warning["level"] == "warning"
    assert warning["warning"].startswith("server.admin_token: not set, while server.auth.trusted_proxies")
    assert "this machine" in warning["warning"]


async def test_the_watchers_notice_access(tmp_path, listener):
    """The two detectors above can fail: opening the pipe and connecting are both noticed."""
    watch = FifoWatch(tmp_path / "probe.pipe")
    try:
        data = await asyncio.to_thread((tmp_path / "probe.pipe").read_bytes)
    finally:
        watch.close()
    assert data.startswith(b"FIFO-MARKER") and watch.opened >= 1
    async with connect_to("127.0.0.1", listener.port) as (reader, _):
        assert b"FETCHED-MARKER" in await reader.read()
    assert listener.connections == 1


def test_a_url_refused_by_the_config_is_quoted_without_its_password():
    with pytest.raises(ConfigError) as refused:
        build({"destinations": {"crm": {"type": "webhook", "url": "ftp://bridge:pw_Secret99@crm.example.com/x"}}}, {})
    problems = "\n".join(refused.value.problems)
    assert "destinations.crm.url" in problems and "bridge:****@crm.example.com" in problems
    assert "pw_Secret99" not in problems


# ---------------------------------------------------------------------------- secrets: a full e2e run


def hostile_echo(hits: dict[str, int]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Downstream peers that fail and echo every request header back in their error body: the
    worst case for a bridge that keeps response bodies in its error messages."""

    async def answer(request: web.Request) -> web.Response:
        echo = json.dumps(dict(request.headers))
        hits[request.path] = hits.get(request.path, 0) + 1
        if request.path == "/hook":
            return web.Response(status=500 if hits["/hook"] <= 2 else 400, text=echo)
        if request.path.startswith("/slack/"):
            return web.json_response({"ok": False, "error": "invalid_auth", "echo": echo})
        return web.Response(status=403, text="invalid_token " + echo)

    return answer


@pytest.mark.slow
async def test_no_configured_secret_appears_in_any_output_of_a_full_run(sink, bridge_factory, tmp_path):
    env = {
        "POSTBACK_TOKEN": "tok_" + secrets.token_urlsafe(16),
        "POSTBACK_PASSWORD": "pw_" + secrets.token_urlsafe(16),
        "ADMIN_TOKEN": "adm_" + secrets.token_urlsafe(16),
        "CRM_WEBHOOK_SECRET": "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
        "CRM_TOKEN": "crm_" + secrets.token_urlsafe(16),
        "SLACK_BOT_TOKEN": "xoxb-" + secrets.token_hex(12),
        "SLACK_WEBHOOK_URL": f"{sink.url}/services/T0/B0/{secrets.token_hex(12)}",
        "SMTP_PASSWORD": "smtp_" + secrets.token_urlsafe(16),
        "VAULT_PASSWORD": "vault_" + secrets.token_urlsafe(16),
    }
    hits: dict[str, int] = {}
    sink.responses = [hostile_echo(hits)] * 1000
    events_file = tmp_path / "events.jsonl"
    config = {
        "server": {
            "auth": {
                "token": "${POSTBACK_TOKEN}",
                "basic": {"username": "skycore", "password": "${POSTBACK_PASSWORD}"},
            },
            "admin_token": "${ADMIN_TOKEN}",
        },
        "retry": {"initial": "50ms", "max_interval": "200ms", "max_age": "1h"},
        "destinations": {
            "crm": {
                "type": "webhook",
                "url": sink.url + "/hook",
                "secret": "${CRM_WEBHOOK_SECRET}",
                "headers": {"Authorization": "Bearer ${CRM_TOKEN}"},
            },
            "inbox": {
                "type": "slack",
                "token": "${SLACK_BOT_TOKEN}",
                "channel": "#sms",
                "api_url": sink.url + "/slack/",
            },
            "hook": {"type": "slack", "webhook_url": "${SLACK_WEBHOOK_URL}"},
            # credentials in the URL: sent as Basic auth, echoed back by the peer's 403
            "vault": {"type": "webhook", "url": sink.url.replace("://", "://bridge:${VAULT_PASSWORD}@") + "/vault"},
            "compliance": {
                "type": "email",
                "smtp": {
                    "host": "127.0.0.1",
                    "port": free_port(),  # nobody listens: every attempt fails to connect
                    "security": "none",
                    "username": "bridge",
                    "password": "${SMTP_PASSWORD}",
                },
                "from": "bridge@example.com",
                "to": ["compliance@example.com"],
            },
            "audit": {"type": "log", "path": str(events_file)},
        },
        "routes": [{"name": "opt-out", "match": {"keyword": "STOP"}, "to": ["crm", "compliance"]}],
        "default": ["crm", "inbox", "hook", "vault", "audit"],
    }
    bridge = bridge_factory(config, env)
    bridge.start()
    seen: list[str] = []  # every answer the bridge gave, over HTTP or on a terminal
    token, password, admin = env["POSTBACK_TOKEN"], env["POSTBACK_PASSWORD"], env["ADMIN_TOKEN"]
    url = bridge.url

    async with aiohttp.ClientSession() as http:

        async def call(method: str, path: str, expect: int, **kwargs: Any) -> Any:
            async with http.request(method, url + path, **kwargs) as response:
                text = await response.text()
                seen.append(f"{response.status} {dict(response.headers)} {text}")
                assert response.status == expect, (path, text)
                return json.loads(text) if response.content_type == "application/json" else text

        bearer = {"Authorization": f"Bearer {admin}"}
        await call("POST", f"/postback/{token}", 200, data=sms(1))
        await call("POST", f"/postback?token={token}", 200, data=sms(2, text="STOP"))
        await call("POST", "/postback", 200, data=sms(3), headers={"Authorization": basic("skycore", password)})
        await call("POST", f"/postback/{token}x", 401, data=sms(4))
        await call("POST", "/postback", 401, data=sms(4), headers={"Authorization": basic("skycore", password + "x")})
        await call("POST", f"/postback/{token}", 400, data=b"<!DOCTYPE x><POSTBACK/>")
        await call("GET", "/admin/events", 401, headers={"Authorization": f"Bearer {admin}x"})

        async def given_up() -> bool:  # the failing peers have been tried and given up on
            dead = await call("GET", "/admin/deliveries?status=dead", 200, headers=bearer)
            return len(dead["deliveries"] if isinstance(dead, dict) else dead) >= 6 and hits.get("/hook", 0) >= 4

        await eventually(given_up, waits=150, what=lambda: f"deliveries to die (peers hit: {hits})")

        events = await call("GET", "/admin/events", 200, headers=bearer)
        deliveries = await call("GET", "/admin/deliveries", 200, headers=bearer)
        for row in deliveries["deliveries"] if isinstance(deliveries, dict) else deliveries:
            await call("GET", f"/admin/deliveries/{row['id']}", 200, headers=bearer)
        for event in events["events"] if isinstance(events, dict) else events:
            await call("GET", f"/admin/events/{event['id']}", 200, headers=bearer)
        await call("GET", "/admin/openapi.json", 200, headers=bearer)
        await call("POST", "/admin/reload", 200, headers=bearer)
        await call("GET", "/metrics", 200)
        await call("GET", "/readyz", 200)

    postback_file = tmp_path / "stop.xml"
    postback_file.write_bytes(sms(5, text="STOP now"))
    for args in [
        ("check-config", "-c", str(bridge.config_path)),
        ("route", "-c", str(bridge.config_path), str(postback_file)),
        ("route", "-c", str(bridge.config_path), "--json", str(postback_file), str(POSTBACKS / "mms_mo_v1.3.xml")),
        ("deliveries", "-c", str(bridge.config_path), "--json"),
        ("deliveries", "-c", str(bridge.config_path), "--status", "dead"),
    ]:
        done = bridge.cli(*args)
        seen.append(done.stdout + done.stderr)
    assert bridge.stop() == 0

    for name in ("bridge.db", "bridge.db-wal", "events.jsonl"):
        if (tmp_path / name).exists():
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    outputs = {
        "bridge stdout": bridge.stdout(),
        "bridge stderr": bridge.stderr(),
        "HTTP answers and CLI output": "\n".join(seen),
        "log destination file": events_file.read_text(),
        "SQLite files": b"".join(p.read_bytes() for p in tmp_path.glob("bridge.db*")).decode("latin-1"),
    }
    assert "sms.received" in outputs["log destination file"]
    assert '"invalid_auth"' in outputs["HTTP answers and CLI output"] or "invalid_auth" in outputs["bridge stderr"]
    forms = dict(env)
    forms["the basic Authorization value"] = base64.b64encode(f"skycore:{password}".encode()).decode()
    forms["the webhook signing key"] = env["CRM_WEBHOOK_SECRET"].removeprefix("whsec_")
    forms["the Basic value of a webhook URL's user:password"] = base64.b64encode(
        f"bridge:{env['VAULT_PASSWORD']}".encode()
    ).decode()
    assert hits.get("/vault"), "the URL's credentials were never sent"
    leaks = [
        f"{secret_name} in {where}"
        for secret_name, value in forms.items()
        for where, text in outputs.items()
        if value in text
    ]
    assert not leaks, leaks
