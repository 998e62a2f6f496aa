"""The postback lane (bridge.lane): what it takes, what it gives to aiohttp, and that the answers
are the same either way.

Every test runs the real app on a real 127.0.0.1 socket and a real SQLite file, and speaks HTTP by
hand where a client library would hide what is tested (pipelining, half-close, split bodies).
test_security.py and test_bad_input.py run all of their in-process tests both ways too.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import importlib.metadata
import itertools
import json
import re
import socket
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from packaging.requirements import Requirement
from packaging.version import Version
from prometheus_client.parser import text_string_to_metric_families

import bridge.lane
from bridge.errors import StoreError
from bridge.runtime import RUNTIME
from tests.conftest import ROOT, AppClient, LaneTestServer, connect_to, eventually, read_response, sms
from tests.conftest import exchange as exchange_to
from tests.conftest import raw_request as request

TOKEN = "tok_3kV9qLr8ZpX2"
Serve = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def serve(app_client: AppClient, tmp_path: Path) -> Serve:
    """serve(way="lane" | "aiohttp", **server section) -> a started server of the real app."""
    counter = itertools.count()

    async def make(way: str = "lane", **server: Any) -> TestServer:
        n = next(counter)
        raw = {
            "server": server,
            "store": f"sqlite:///{tmp_path / f'bridge{n}.db'}",
            "destinations": {"audit": {"type": "log", "path": str(tmp_path / f"events{n}.jsonl")}},
            "default": ["audit"],
        }
        return (await app_client(raw, way)).server

    return make


def lane_of(server: TestServer) -> bridge.lane.Lane:
    assert isinstance(server, LaneTestServer) and server.site.lane is not None
    return server.site.lane


def twice(raw: bytes, field: bytes) -> bytes:
    """`raw` with one more header line, before its Host."""
    return raw.replace(b"Host:", field + b"\r\nHost:", 1)


Response = tuple[int, dict[str, str], bytes]


@contextlib.asynccontextmanager
async def connect(server: TestServer) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async with connect_to(server.host, server.port) as streams:
        yield streams


async def exchange(server: TestServer, *requests: bytes) -> list[Response]:
    return await exchange_to(server.host, server.port, *requests)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionResetError:
        return True


async def stored(server: TestServer, event_id: str) -> dict[str, Any] | None:
    store = server.app[RUNTIME].store
    assert store is not None
    return await store.get_event(event_id)


def slow_store(server: TestServer, seconds: float) -> asyncio.Event:
    """Make the store take `seconds` longer over each postback; the event is set when one arrives."""
    store = server.app[RUNTIME].store
    assert store is not None
    ingest, arrived = store.ingest, asyncio.Event()

    async def slow_ingest(*args: Any) -> Any:
        arrived.set()
        await asyncio.sleep(seconds)
        return await ingest(*args)

    store.ingest = slow_ingest  # type: ignore[method-assign]
    return arrived


def comparable(response: Response) -> tuple[int, dict[str, str], Any]:
    """An answer without what differs from run to run (event ids, the date, the length of a body
    that holds an id)."""
    status, headers, body = response
    kept = {k: v for k, v in headers.items() if k not in ("date", "content-length")}
    text = re.sub(r"evt_[0-9A-Z]{26}", "evt_ID", body.decode())
    if kept.get("content-type", "").startswith("application/json"):
        return status, kept, json.loads(text)
    return status, kept, text  # aiohttp's own 400 for a head it refuses is text


# ---------------------------------------------------------------------------- the same answers

GZIPPED = gzip.compress(sms(9))
# (name, server section, requests on one connection): each is sent to a server with the lane and
# to one without, and the answers must be the same
CASES: list[tuple[str, dict[str, Any], list[bytes]]] = [
    ("accepted", {}, [request(sms(1))]),
    ("duplicate", {}, [request(sms(1)), request(sms(1))]),
    ("dropped as not XML", {}, [request(b'{"a": 1}', Content_Type="application/json")]),
    ("empty body", {}, [request(b"")]),
    ("malformed XML", {}, [request(b"<POSTBACK><ORIGIN>SMS_MO</POSTBACK>")]),
    ("no ORIGIN", {}, [request(b"<POSTBACK><TEXT>hi</TEXT></POSTBACK>")]),
    ("form field", {}, [request(b"xml=" + sms(2).replace(b"<", b"%3C").replace(b">", b"%3E"),
                                Content_Type="application/x-www-form-urlencoded")]),
    ("a DTD", {}, [request(b'<!DOCTYPE x [<!ENTITY a "b">]><POSTBACK><ORIGIN>&a;</ORIGIN></POSTBACK>')]),
    ("token in the path", {"auth": {"token": TOKEN}}, [request(sms(3), path=f"/postback/{TOKEN}")]),
    ("wrong token", {"auth": {"token": TOKEN}}, [request(sms(3), path="/postback/nope")]),
    ("no token", {"auth": {"token": TOKEN}}, [request(sms(3))]),
    ("a path token with no token auth", {}, [request(sms(3), path=f"/postback/{TOKEN}")]),
    ("token in the query", {"auth": {"token": TOKEN}}, [request(sms(3), path=f"/postback?token={TOKEN}")]),
    ("basic auth", {"auth": {"basic": {"username": "sky", "password": "core"}}},
     [request(sms(4), Authorization="Basic c2t5OmNvcmU=")]),
    ("wrong basic auth", {"auth": {"basic": {"username": "sky", "password": "core"}}},
     [request(sms(4), Authorization="Basic c2t5Om5vcGU=")]),
    ("allow_from refuses", {"auth": {"allow_from": ["10.0.0.0/8"]}}, [request(sms(5))]),
    ("allow_from through a trusted proxy",
     {"auth": {"allow_from": ["10.0.0.0/8"], "trusted_proxies": ["127.0.0.1/32"]}},
     [request(sms(5), X_Forwarded_For="10.1.2.3")]),
    ("too large", {"max_body_bytes": 100}, [request(sms(6))]),
    ("gzip", {}, [request(GZIPPED, Content_Encoding="gzip")]),
    ("chunked", {}, [request(b"%x\r\n%s\r\n0\r\n\r\n" % (len(sms(7)), sms(7)), Transfer_Encoding="chunked")]),
    ("Connection: close", {}, [request(sms(8), Connection="close")]),
    ("postback, then healthz, then postback", {},
     [request(sms(10)), request(method="GET", path="/healthz"), request(sms(11))]),
    ("another method", {}, [request(sms(12), method="PUT")]),
    ("another path", {}, [request(sms(13), path="/elsewhere/x")]),
    ("POST to healthz", {}, [request(sms(13), path="/healthz")]),
    ("no Host", {}, [request(sms(14)).replace(b"Host: bridge\r\n", b"")]),
    ("two Hosts", {}, [request(sms(14), Host="other")]),
    ("two Content-Types", {}, [twice(request(sms(14), Content_Type="text/xml"), b"Content-Type: a/b")]),
    ("two Connections", {}, [twice(request(sms(14), Connection="keep-alive"), b"Connection: close")]),
    ("Proxy-Connection", {}, [request(sms(14), Proxy_Connection="close")]),
    ("130 headers", {}, [request(sms(14), **{f"X_{n}": "1" for n in range(130)})]),
]  # fmt: skip


@pytest.mark.parametrize(("server_section", "requests"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_the_lane_answers_as_aiohttp_does(serve, server_section, requests):
    with_lane, without = await serve("lane", **server_section), await serve("aiohttp", **server_section)
    got = [comparable(r) for r in await exchange(with_lane, *requests)]
    want = [comparable(r) for r in await exchange(without, *requests)]
    assert got == want
    assert all(status != 500 for status, _, _ in got)


@pytest.mark.parametrize(
    ("raw", "taken"),
    [
        (request(sms(1)), True),
        (request(sms(1), Connection="keep-alive"), True),
        (request(sms(1), Connection="close"), True),
        (request(sms(1), path=f"/postback/{TOKEN}"), True),
        (request(sms(1), path="/postback?token=x"), False),
        (request(sms(1), path="/postback/a%20b"), False),
        (request(sms(1), method="PUT"), False),
        (request(sms(1), Expect="100-continue"), False),
        (request(GZIPPED, Content_Encoding="gzip"), False),
        (request(sms(1), Upgrade="websocket"), False),
        (request(sms(1), Connection="Upgrade"), False),
        (request(sms(1)).replace(b"HTTP/1.1", b"HTTP/1.0"), False),
        (request(sms(1)).replace(b"Host: bridge", b"Host: bridge\r\n folded"), False),
        (request(sms(1)).replace(b"Host: bridge", b"X-Note: caf\xc3\xa9"), False),
        (request(sms(1)).replace(b"Host: bridge", b"Content-Length: 3"), False),
        (request(sms(1), Content_Length="+10"), False),
        (request(sms(1)).replace(b"Host: bridge\r\n", b""), False),
        (request(sms(1), Host="again"), False),
        (twice(request(sms(1), X_Forwarded_For="10.0.0.1"), b"X-Forwarded-For: 10.0.0.2"), False),
        (request(sms(1), **{f"X_{n}": "1" for n in range(100)}), False),
        (request(sms(1), **{f"X_{n}": "1" for n in range(90)}), True),
    ],
    ids=["plain", "keep-alive", "close", "path-token", "query", "escaped-token", "put", "expect", "gzip",
         "upgrade", "connection-upgrade", "http1.0", "folded", "non-ascii", "two-lengths", "signed-length",
         "no-host", "two-hosts", "two-forwarded-for", "100-headers", "90-headers"],
)  # fmt: skip
async def test_what_the_lane_takes_and_what_it_gives_to_aiohttp(serve, raw, taken):
    server = await serve("lane", auth={"token": TOKEN}) if b"token" in raw or TOKEN.encode() in raw else await serve()
    async with connect(server) as (reader, writer):
        writer.write(raw)
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            await asyncio.wait_for(read_response(reader), 5)
    lane = lane_of(server)
    assert (lane.taken, lane.handed_over) == ((1, 0) if taken else (0, 1))


ADMIN = "adm_Q2w9Ztk4"


@pytest.mark.parametrize("postback_path", ["/hooks", "/admin", "/healthz", "/metrics"])
async def test_a_postback_path_beside_other_routes_answers_as_aiohttp_does(serve, postback_path):
    """The lane takes only what aiohttp's router gives the postback handler: with a postback_path
    of /admin, POST /admin/reload is still the admin API's. (Paths under /admin/ are refused by
    the config.)"""
    section = {"postback_path": postback_path, "admin_token": ADMIN}
    targets = [postback_path, postback_path + "/tok", "/admin/reload", "/admin/replay", "/healthz",
               "/admin/events/abc", "/admin/events/abc/replay", "/admin/events/abc/tok", "/hooks/x/y"]  # fmt: skip
    requests = [request(b"{}", path=target, Authorization=f"Bearer {ADMIN}") for target in targets]
    with_lane, without = await serve("lane", **section), await serve("aiohttp", **section)
    for one in requests:  # each on its own connection: one handed to aiohttp takes the rest with it
        assert [comparable(r) for r in await exchange(with_lane, one)] == [
            comparable(r) for r in await exchange(without, one)
        ], one
    assert lane_of(with_lane).taken >= 1


@pytest.mark.slow
async def test_a_client_that_does_not_read_its_answers_is_not_buffered_without_end(serve):
    """Pipelining without reading: the lane stops taking requests while its answers wait to be
    read, and stops reading once one request's worth is buffered, as aiohttp does."""
    server = await serve()
    lane = lane_of(server)
    cheap = request(sms(1), path="/postback/x") * 100  # 404s: no store write, as fast as it gets
    async with connect(server) as (reader, writer):
        sent = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                while True:
                    writer.write(cheap)
                    sent += len(cheap)
                    await writer.drain()
        (connection,) = lane.connections
        assert connection.blocked and connection.paused
        assert len(connection.buffer) <= connection.limit + 2**18
        assert connection.transport is not None and connection.transport.get_write_buffer_size() <= 2**17
        assert sent < 64 * 2**20  # the kernel's buffers and ours, not all that was sent in 3 s
        # and once the client reads, everything it sent is answered
        writer.write_eof()
        answered = 0
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                status, _, _ = await asyncio.wait_for(read_response(reader), 10)
                assert status == 404
                answered += 1
        assert answered * len(cheap) // 100 == sent


async def not_reading(server: TestServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose client will not read: a small receive buffer, so that what the lane
    answers fills the kernel's buffers soon."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
    return await asyncio.open_connection(sock=sock)


async def pipeline_until_blocked(lane: bridge.lane.Lane, writer: asyncio.StreamWriter) -> None:
    """Pipeline cheap requests (404s) and never read the answers, until the lane is blocked on
    this connection: its answers wait over the high-water mark. (The lane's end of the
    connection gets a small kernel send buffer too, so that they back up within a second.)"""
    port = writer.get_extra_info("sockname")[1]
    cheap = request(sms(1), path="/postback/x") * 50
    async with asyncio.timeout(20):
        while not (
            ours := [c for c in lane.connections if c.transport and c.transport.get_extra_info("peername")[1] == port]
        ):
            await asyncio.sleep(0.01)
        (connection,) = ours
        assert connection.transport is not None
        connection.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        while not connection.blocked:
            writer.write(cheap)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(writer.drain(), 0.1)


async def test_connections_that_pipeline_and_never_read_are_cut_after_client_timeout(serve):
    """A write timeout: 20 clients that pipeline and never read their answers each held a
    connection (and what they pipelined) for as long as they liked (11 of 20 were still open 25 s
    past a client_timeout of 1 s). The lane aborts them once they have not read for it."""
    server = await serve(client_timeout="1s")
    lane = lane_of(server)
    clients = [await not_reading(server) for _ in range(20)]
    await asyncio.gather(*(pipeline_until_blocked(lane, writer) for _, writer in clients))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert len(lane.connections) == 20 and all(c.blocked for c in lane.connections)
    transports = [c.transport for c in lane.connections]
    while lane.connections and loop.time() - started < 5:
        await asyncio.sleep(0.05)
    assert not lane.connections and loop.time() - started < 1 + bridge.lane.SWEEP_EVERY + 1
    # closed, not waiting for ever to hand over what it holds: abort() closes the socket on the
    # loop's next turn (asyncio calls connection_lost soon), after the lane has let it go
    assert all(transport is not None for transport in transports)
    await eventually(
        lambda: all(t.get_extra_info("socket").fileno() == -1 for t in transports if t is not None), timeout=1
    )
    for _, writer in clients:
        writer.close()
    # the lane goes on: a new client is answered
    assert [s for s, _, _ in await exchange(server, request(sms(2)))] == [200]


async def test_an_idle_connection_with_answers_unread_is_aborted_not_left_closing(serve):
    """Idle for client_timeout with answers still waiting to go out (the client stopped reading,
    but not so much came back as to pass the high-water mark): a plain close would wait for ever
    to send them, holding the socket."""
    server = await serve(client_timeout="1s")
    lane = lane_of(server)
    _, writer = await not_reading(server)
    while not lane.connections:
        await asyncio.sleep(0.01)
    (connection,) = lane.connections
    transport = connection.transport
    assert transport is not None
    transport.set_write_buffer_limits(high=2**30)  # never "blocked": the idle sweep's case
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    async with asyncio.timeout(10):
        while transport.get_write_buffer_size() == 0:  # until answers wait in the lane itself
            writer.write(request(sms(1), path="/postback/x") * 50)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(writer.drain(), 0.1)
        while connection.buffer or connection.busy:  # every request answered: idle from here
            await asyncio.sleep(0.01)
    assert transport.get_write_buffer_size() > 0 and not connection.blocked
    loop = asyncio.get_running_loop()
    started = loop.time()
    while transport.get_extra_info("socket").fileno() != -1 and loop.time() - started < 4:
        await asyncio.sleep(0.05)
    assert transport.get_extra_info("socket").fileno() == -1, "still open, waiting to send what nobody reads"
    assert not lane.connections
    writer.close()


async def test_a_client_library_post_goes_through_the_lane(serve):
    server = await serve()
    url = f"http://{server.host}:{server.port}/postback"
    async with aiohttp.ClientSession() as session, session.post(url, data=sms(1)) as response:
        assert response.status == 200
        body = await response.json()
    assert body["status"] == "accepted" and (await stored(server, body["id"]))["text"] == "HELLO there"
    assert lane_of(server).taken == 1


# ---------------------------------------------------------------------------- connections


async def test_pipelined_postbacks_are_answered_in_order_and_all_stored(serve):
    server = await serve()
    async with connect(server) as (reader, writer):
        writer.write(b"".join(request(sms(n)) for n in range(5)))
        await writer.drain()
        answers = [await asyncio.wait_for(read_response(reader), 10) for _ in range(5)]
    ids = [json.loads(body)["id"] for _, _, body in answers]
    assert [status for status, _, _ in answers] == [200] * 5 and ids == sorted(ids)
    for n, event_id in enumerate(ids):
        assert (await stored(server, event_id))["transaction_id"] == f"tx-{n}"
    assert lane_of(server).taken == 5


async def test_a_body_in_pieces_is_waited_for(serve):
    server = await serve()
    raw = request(sms(1))
    async with connect(server) as (reader, writer):
        for piece in (raw[:20], raw[20:-30], raw[-30:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
    assert status == 200 and json.loads(body)["status"] == "accepted"
    assert (lane_of(server).taken, lane_of(server).handed_over) == (1, 0)


async def test_a_body_in_many_pieces_has_its_head_read_once(serve, monkeypatch):
    server = await serve()
    reads = []
    read = bridge.lane.Lane.read

    def counted(lane: bridge.lane.Lane, buffer: bytearray) -> Any:
        reads.append(len(buffer))
        return read(lane, buffer)

    monkeypatch.setattr(bridge.lane.Lane, "read", counted)
    raw = request(sms(1))
    head_size = raw.index(b"\r\n\r\n") + 4
    async with connect(server) as (reader, writer):
        writer.write(raw[:head_size])
        await writer.drain()
        await asyncio.sleep(0.05)
        for n in range(head_size, len(raw), 5):
            writer.write(raw[n : n + 5])
            await writer.drain()
            await asyncio.sleep(0.002)
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
    assert status == 200 and json.loads(body)["status"] == "accepted"
    assert len(reads) == 2  # once for its head, once when its body was all there


async def test_a_body_that_stops_coming_gets_aiohttps_408(serve):
    server = await serve(client_timeout="1s")
    raw = request(sms(1))
    async with connect(server) as (reader, writer):
        writer.write(raw[:-10])
        await writer.drain()
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, _, body = await asyncio.wait_for(read_response(reader), 10)
        elapsed = loop.time() - started
    assert status == 408 and "not received within 1s" in json.loads(body)["error"]
    # a second in the lane, then client_timeout with aiohttp
    assert 1.5 <= elapsed < 4 and lane_of(server).handed_over == 1


async def test_an_idle_connection_is_closed_after_client_timeout(serve):
    server = await serve(client_timeout="1s")
    async with connect(server) as (reader, writer):
        writer.write(request(sms(1)))
        await writer.drain()
        assert (await read_response(reader))[0] == 200
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await closed_by_peer(reader, timeout=5)
        assert 0.9 <= loop.time() - started < 3
    assert not lane_of(server).connections


async def test_a_half_closed_connection_still_gets_its_answer(serve):
    server = await serve()
    async with connect(server) as (reader, writer):
        writer.write(request(sms(1)))
        writer.write_eof()
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        assert await closed_by_peer(reader)
    assert status == 200 and await stored(server, json.loads(body)["id"])


async def test_a_half_close_after_a_request_for_aiohttp_closes_the_connection(serve):
    """aiohttp alone closes a connection when the client half-closes; so does one it took over
    (it would otherwise hold it until client_timeout, never hearing of the end)."""
    server = await serve()
    async with connect(server) as (reader, writer):
        writer.write(request(sms(1)) + request(method="GET", path="/healthz"))
        writer.write_eof()
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await asyncio.wait_for(read_response(reader), 3)  # the healthz answer may be lost, as without the lane
        assert await closed_by_peer(reader, timeout=3)
    assert lane_of(server).handed_over == 1


async def test_the_largest_request_the_lane_takes_is_read_whole(serve):
    """A head of MAX_HEAD and a body of max_body_bytes: however it comes in, the lane reads on
    until it has all of it (it once stopped reading 4 bytes short, until aiohttp took over)."""
    server = await serve(max_body_bytes=100)
    body = b"x" * 100
    raw = request(body, X_Pad="")
    raw = raw.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (bridge.lane.MAX_HEAD + 4 - (len(raw) - len(body))))
    assert len(raw) - len(body) == bridge.lane.MAX_HEAD + 4  # the head, its blank line included
    loop = asyncio.get_running_loop()
    async with connect(server) as (reader, writer):
        writer.write(raw[:-3])
        await writer.drain()
        await asyncio.sleep(0.1)
        started = loop.time()
        writer.write(raw[-3:])
        status, _, _ = await asyncio.wait_for(read_response(reader), 5)
    assert status == 400 and loop.time() - started < 0.5  # "not XML", from the lane, not a second later
    assert (lane_of(server).taken, lane_of(server).handed_over) == (1, 0)


async def test_connection_close_is_honoured(serve):
    server = await serve()
    async with connect(server) as (reader, writer):
        writer.write(request(sms(1), Connection="close") + request(sms(2)))
        await writer.drain()
        status, headers, _ = await asyncio.wait_for(read_response(reader), 5)
        assert status == 200 and headers["connection"] == "close"
        assert await closed_by_peer(reader)  # the second request is not read


async def test_a_client_that_hangs_up_before_the_answer_still_has_its_postback_stored(serve):
    server = await serve()
    arrived = slow_store(server, 0.3)
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(request(sms(1)))
    await asyncio.wait_for(arrived.wait(), 5)
    sock.close()
    await eventually(lambda: not lane_of(server).tasks, waits=50, what="the lane's tasks to end")
    # Skycore's retry finds it stored
    assert json.loads((await exchange(server, request(sms(1))))[0][2])["status"] == "duplicate"


@pytest.mark.parametrize(
    ("failure", "status", "retry_after"),
    [(RuntimeError("a bug"), 503, None), (StoreError("disk on fire"), 503, "30")],
    ids=["bug", "store"],
)
async def test_an_unexpected_error_in_the_lane_is_a_503_never_a_500(serve, monkeypatch, caplog, failure, status,
                                                                     retry_after):  # fmt: skip
    server = await serve()

    async def broken(*args: Any) -> Any:
        raise failure

    monkeypatch.setattr(bridge.lane, "take", broken)
    (got_status, headers, body), (after, _, _) = await exchange(server, request(sms(1)), request(sms(1)))
    assert got_status == status and headers.get("retry-after") == retry_after
    assert "retry later" in json.loads(body)["error"]
    assert after == status  # the connection goes on
    assert lane_of(server).taken == 2


# ---------------------------------------------------------------------------- shutdown


async def test_shutdown_answers_the_postbacks_being_stored_and_closes_idle_connections(serve):
    server = await serve()
    arrived = slow_store(server, 0.5)
    async with connect(server) as (idle_reader, _), connect(server) as (reader, writer):
        writer.write(request(sms(1)))
        await writer.drain()
        await asyncio.wait_for(arrived.wait(), 5)
        closing = asyncio.create_task(server.close())
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        assert status == 200 and json.loads(body)["status"] == "accepted"
        assert await closed_by_peer(reader)
        assert await closed_by_peer(idle_reader)
        await asyncio.wait_for(closing, 10)
    with pytest.raises(OSError):
        socket.create_connection((server.host, server.port), timeout=1).close()


async def test_serve_exits_cleanly_with_the_lane(bridge_factory, tmp_path):
    """The real process: postbacks through the lane on a kept-alive connection, then SIGTERM."""
    proc = bridge_factory(
        {"store": f"sqlite:///{tmp_path / 'b.db'}", "destinations": {"log": {"type": "log"}}, "default": ["log"]}
    )
    proc.start()
    answers = await exchange_to("127.0.0.1", proc.port, *(request(sms(n)) for n in range(3)))
    assert [json.loads(body)["status"] for _, _, body in answers] == ["accepted"] * 3
    assert proc.stop() == 0
    received = [line for line in proc.log_lines() if line.get("msg") == "postback accepted"]
    assert len(received) == 3


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp-alone"])
async def test_serve_with_and_without_the_lane(bridge_factory, tmp_path, lane):
    """`server.lane: false` is the way back to aiohttp alone: the real process answers postbacks,
    health and the admin API as with the lane, and stops cleanly on SIGTERM. The lane's counter
    says which answered the postbacks (a setting that `serve` ignored would fail here), and a
    reload that would change it is refused, as one that changes server.listen is."""
    admin_token = "adm_Q2w9Ztk4"
    proc = bridge_factory(
        {
            "server": {"lane": lane, "admin_token": admin_token},
            "store": f"sqlite:///{tmp_path / 'b.db'}",
            "destinations": {"log": {"type": "log"}},
            "default": ["log"],
        }
    )
    proc.start()
    answers = await exchange_to("127.0.0.1", proc.port, *(request(sms(n)) for n in range(3)))
    assert [json.loads(body)["status"] for _, _, body in answers] == ["accepted"] * 3
    bearer = {"Authorization": f"Bearer {admin_token}"}
    async with aiohttp.ClientSession(proc.url) as session:
        for path in ("/healthz", "/readyz"):
            async with session.get(path) as response:
                assert response.status == 200, path
        async with session.get("/admin/events", headers=bearer) as response:
            assert response.status == 200 and len((await response.json())["events"]) == 3
        async with session.get("/metrics") as response:
            metrics = {
                sample.name: sample.value
                for family in text_string_to_metric_families(await response.text())
                for sample in family.samples
                if sample.labels.get("outcome") in (None, "accepted")
            }
        assert metrics["bridge_postbacks_received_total"] == 3
        assert metrics["bridge_lane_postbacks_total"] == (3 if lane else 0)
        config = yaml.safe_load(proc.config_path.read_text())
        config["server"]["lane"] = not lane
        proc.config_path.write_text(yaml.safe_dump(config))
        async with session.post("/admin/reload", headers=bearer) as response:
            assert response.status == 422
            running, wanted = str(lane).lower(), str(not lane).lower()
            assert (await response.json())["errors"] == [
                f"server.lane: cannot change while running ({running}, file says {wanted}); restart"
            ]
    (answer,) = await exchange_to("127.0.0.1", proc.port, request(sms(9)))
    assert answer[0] == 200
    assert proc.stop() == 0
    messages = [line.get("msg") for line in proc.log_lines()]
    assert messages.count("postback accepted") == 4 and messages[-1] == "stopped"
    assert [line["lane"] for line in proc.log_lines() if line.get("msg") == "listening"] == [lane]


def test_the_installed_aiohttp_is_one_the_lane_is_tested_with():
    """The lane uses aiohttp's internals, so pyproject allows aiohttp up to the next minor version
    only (`<3.N`, not `<4`), and the suite runs with a version in that range: CI's fresh venv
    installs the newest allowed, so the upper bound is what CI tests."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [Requirement(d) for d in dependencies if Requirement(d).name == "aiohttp"]
    uppers = [spec for spec in pin.specifier if spec.operator == "<"]
    assert len(uppers) == 1 and len(Version(uppers[0].version).release) == 2, f"no next-minor bound: {pin}"
    assert pin.specifier.contains(importlib.metadata.version("aiohttp")), f"aiohttp {aiohttp.__version__}, not {pin}"
