"""What the tests share: the in-process app (`app_client`), waiting for something to happen
(`eventually`), HTTP spoken by hand (`raw_request`, `exchange`, `read_response`, `read_request`),
a recording HTTP sink, and the real `postback-bridge serve` process (`bridge_factory`).

Markers (pyproject.toml): `process` is put on every test that uses `bridge_factory` (below, in
`pytest_collection_modifyitems`); `slow` is put by hand on the tests that take more than ~3 s.
`pytest -m "not slow"` is the fast inner loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from bridge.app import create_app
from bridge.config import build
from bridge.destinations.base import Services
from bridge.lane import LaneSite
from bridge.store import Store
from bridge.store.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
# Skycore's documentation as the product was built from it, copied from the project's shared
# reference so that a clone of the repository tests on its own.
DATA = ROOT / "tests" / "data"
POSTBACKS = DATA / "postbacks"
SEEDS = DATA / "seeds"
SPID_TABLE = DATA / "skycore-spid.csv"


# Nested entities that would expand to a billion "lol"s: refused at the DOCTYPE, never expanded.
BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
]>
<POSTBACK><ORIGIN>SMS_MO</ORIGIN><TEXT>&lol6;</TEXT></POSTBACK>"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`process`: the tests that start the real `postback-bridge serve` (with `bridge_factory`)."""
    for item in items:
        if "bridge_factory" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.process)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sms(n: int | str = 1, *, text: str = "HELLO there", sender: str = "15552312102", to: str = "86717") -> bytes:
    """A distinct SMS_MO postback (TRANSACTIONID from n)."""
    return (
        f"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><CODE>N211</CODE><FROM>{sender}</FROM><TO>{to}</TO>"
        f"<TEXT>{text}</TEXT><RECEIVED>2024-05-01T12:00:00-04:00</RECEIVED>"
        f"<TRANSACTIONID>tx-{n}</TRANSACTIONID></POSTBACK>"
    ).encode()


def dedup_key_v1(event: dict[str, Any]) -> str:
    """The dedup key of the bridge before issue 17 (bridge/event.py then), to make stores as
    that version left them: ORIGIN plus TRANSACTIONID, else TRACKINGID, else FROM, TO, TEXT
    and time; no CODE, and the rest of the fields ignored."""
    fields = event["fields"]
    if event["transaction_id"]:
        parts = ["tx", event["transaction_id"]]
    elif event["tracking_id"]:
        parts = ["trk", event["tracking_id"]]
    else:
        sent_at = next(
            (v.strip() for v in (fields.get("RECEIVED"), fields.get("TIMESTAMP")) if isinstance(v, str) and v.strip()),
            "",
        )
        parts = ["msg", event["from"] or "", event["to"] or "", event["text"] or "", sent_at]
    raw = "\x1f".join([event["origin"], *parts])
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


# ---------------------------------------------------------------------------- waiting


async def eventually(
    check: Callable[[], Any],
    timeout: float | None = None,
    what: str | Callable[[], str] = "",
    *,
    interval: float = 0.1,
    waits: int | None = None,
    raises: bool = True,
) -> Any:
    """Until `check()` (a function, sync or async) returns something truthy; returns that.

    `check` is called at once, then again after each sleep of `interval` seconds: until
    `timeout` seconds have passed (10 if neither is given), or, with `waits=n` instead, after n
    sleeps (the loop `for _ in range(n): if check(): break; sleep(interval)` followed by an
    assertion of the check). Then it raises an AssertionError naming what was awaited: `what`,
    a string or a function that says it when called (to show what was seen by then), else the
    name of `check`. With `raises=False` it returns the last falsy value instead, for a wait
    whose own assertions come after it."""
    if timeout is not None and waits is not None:
        raise TypeError("eventually() takes a timeout or a number of waits, not both")
    if timeout is None and waits is None:
        timeout = 10.0
    deadline = time.monotonic() + timeout if timeout is not None else None
    slept = 0
    while True:
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if (deadline is not None and time.monotonic() > deadline) or (waits is not None and slept >= waits):
            if not raises:
                return got
            said = what() if callable(what) else what
            said = said or getattr(check, "__qualname__", repr(check))
            after = f"{timeout:g}s" if timeout is not None else f"{waits} waits of {interval:g}s"
            raise AssertionError(f"timed out after {after} waiting for {said}")
        await asyncio.sleep(interval)
        slept += 1


# ---------------------------------------------------------------------------- the app, in process

Client = TestClient[web.Request, web.Application]
AppClient = Callable[..., Awaitable[Client]]


class LaneTestServer(TestServer):
    """aiohttp's TestServer with the postback lane in front, as `serve` runs the app
    (bridge.lane.LaneSite instead of aiohttp's own site)."""

    async def start_server(self, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        if self.runner:
            return
        self._loop = loop
        self.runner = await self._make_runner(**kwargs)
        await self.runner.setup()
        self.site = LaneSite(self.runner, self.host, 0)
        await self.site.start()
        assert self.site._server is not None
        self.port = self.site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.scheme = "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._root = URL(f"http://{host}:{self.port}")


def served(app: web.Application, way: str, host: str = "127.0.0.1") -> TestServer:
    """`app` served the way a test asks: by aiohttp alone, or with the lane (as `serve` does)."""
    return LaneTestServer(app, host=host) if way == "lane" else TestServer(app, host=host)


@pytest.fixture
def app_client(aiohttp_client: Any) -> AppClient:
    """app_client(raw config, way="aiohttp" | "lane", store=None, host="127.0.0.1") -> a started
    TestClient of the real app: create_app on the config dict (no environment, so no `${VAR}`),
    served by aiohttp alone or with the postback lane in front as `serve` runs it, on a real
    socket. `store` replaces the store the config names. Closed at the end of the test."""

    async def make(
        raw: dict[str, Any], way: str = "aiohttp", *, store: Store | None = None, host: str = "127.0.0.1"
    ) -> Client:
        app = create_app(build(raw, environ={}), store=store)
        return await aiohttp_client(served(app, way, host))

    return make


# ---------------------------------------------------------------------------- sink


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Sink:
    """An HTTP server on 127.0.0.1 that records requests and answers from a script.

    `responses` is consumed one per request: an int status, a (status, headers) tuple, or a
    callable(request) -> awaitable Response; when empty it answers `default`.
    """

    url: str = ""
    received: list[Received] = field(default_factory=list)
    responses: list[Any] = field(default_factory=list)
    default: int = 200
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path, dict(request.headers), body, time.time()))
        self.arrived.set()
        script = self.responses.pop(0) if self.responses else self.default
        if callable(script):
            return await script(request)
        status, headers = script if isinstance(script, tuple) else (script, {})
        return web.Response(status=status, headers=headers, text="ok" if status < 300 else "nope")

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        # woken by each request as it arrives rather than polled, so not eventually()
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"sink got {len(self.received)} requests, expected {count}")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(remaining, 0.2))
        return self.received


@contextlib.asynccontextmanager
async def serving(app: web.Application, *, shutdown_timeout: float = 0.1) -> AsyncIterator[str]:
    """`app` on 127.0.0.1, on a port of its own, while the block runs: its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def start_sink(port: int | None = None) -> tuple[Sink, web.AppRunner]:
    sink = Sink()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", sink.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port or 0)
    await site.start()
    bound = runner.addresses[0][1]
    sink.url = f"http://127.0.0.1:{bound}"
    return sink, runner


@pytest.fixture(params=["builtin", "aiohttp"])
def webhook_client(request: pytest.FixtureRequest) -> str:
    """A webhook destination's `client:`: a test that takes this runs once with each."""
    return request.param


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s, runner = await start_sink()
    yield s
    await runner.cleanup()


# ---------------------------------------------------------------------------- raw HTTP


@contextlib.asynccontextmanager
async def connect_to(host: str, port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A plain TCP connection to speak HTTP over by hand; closed at the end."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response, read by hand: (status, headers by lowercase name, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def raw_request(body: bytes = b"", *, path: str = "/postback", method: str = "POST", **headers: str) -> bytes:
    """An HTTP/1.1 request as bytes: the request line, `Host: bridge`, `headers` (`Content_Type`
    is sent as `Content-Type`), and a Content-Length unless the headers frame the body."""
    lines = [f"{method} {path} HTTP/1.1", "Host: bridge"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    framed = any(k.lower() in ("content_length", "transfer_encoding") for k in headers)
    if (method == "POST" or body) and not framed:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def exchange(host: str, port: int, *requests: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send `requests` on one connection, each after the answer to the one before (10 s each)."""
    answers = []
    async with connect_to(host, port) as (reader, writer):
        for raw in requests:
            writer.write(raw)
            await writer.drain()
            answers.append(await asyncio.wait_for(read_response(reader), 10))
    return answers


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 request with a Content-Length, read by hand by a peer: head and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], timeout: float, name: str, output: Callable[[], str]
) -> None:
    """Until something listens on 127.0.0.1:`port` (blocking: for a process being started). An
    AssertionError with `output()` if `proc` (called `name`) exits first, or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{output()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{name} did not listen on {port} within {timeout}s:\n{output()}")


# ---------------------------------------------------------------------------- the real process


@dataclass
class BridgeProcess:
    config_path: Path
    workdir: Path
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    stdout_path: Path | None = None
    stderr_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        n = len(list(self.workdir.glob("stdout*.log")))
        self.stdout_path = self.workdir / f"stdout{n}.log"
        self.stderr_path = self.workdir / f"stderr{n}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", "-c", str(self.config_path)],
            cwd=self.workdir,
            env=self.env,
            stdout=self.stdout_path.open("wb"),
            stderr=self.stderr_path.open("wb"),
        )
        wait_for_port(self.port, self.proc, timeout, "bridge", self.stderr)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("bridge did not exit in time") from None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def stdout(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("stdout*.log")))

    def stderr(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("stderr*.log")))

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.stderr().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "bridge", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done


@pytest.fixture
def bridge_factory(tmp_path: Path) -> Iterator[Callable[..., BridgeProcess]]:
    """Makes a BridgeProcess from a config dict (server.listen is filled in); not started."""
    made: list[BridgeProcess] = []

    def make(config: dict[str, Any], env: dict[str, str] | None = None) -> BridgeProcess:
        port = free_port()
        config = json.loads(json.dumps(config))
        config.setdefault("server", {})["listen"] = f"127.0.0.1:{port}"
        config.setdefault("store", f"sqlite:///{tmp_path / 'bridge.db'}")
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        bridge = BridgeProcess(path, tmp_path, port, full_env)
        made.append(bridge)
        return bridge

    yield make
    for bridge in made:
        if bridge.proc is not None and bridge.proc.poll() is None:
            bridge.proc.kill()
            bridge.proc.wait()


async def post(url: str, body: bytes, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body, **kwargs) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


# ---------------------------------------------------------------------------- hostile peers


@contextlib.asynccontextmanager
async def raw_receiver(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A raw TCP server on 127.0.0.1 running `handle` for each connection; yields its base URL."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await handle(reader, writer)
        writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@contextlib.asynccontextmanager
async def loop_watch(*, gc_off: bool = False) -> AsyncIterator[list[float]]:
    """[the longest the event loop went without giving a probe task a turn], in CPU seconds of
    this thread: what callbacks held it for (wall time would also count other processes on a
    shared machine). With `gc_off` the garbage collector is off meanwhile: a full collection of
    a big test process's heap (Hypothesis, pytest) takes tens of ms wherever it falls."""
    longest = [0.0]
    if gc_off:
        gc.disable()

    async def probe() -> None:
        while True:
            before = time.thread_time()
            await asyncio.sleep(0.001)
            longest[0] = max(longest[0], time.thread_time() - before)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0.01)
    try:
        yield longest
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if gc_off:
            gc.enable()


# ---------------------------------------------------------------------------- destinations


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    """What a destination opens with: an HTTP session and a real SQLite store for its
    conversation state (a test module with a store of its own overrides this)."""
    store = SQLiteStore(str(tmp_path / "state.db"))
    await store.open()
    async with aiohttp.ClientSession() as http:
        yield Services(http=http, state=store)
    await store.close()


async def wait_for_arrivals(items: list[Any], arrived: asyncio.Event, count: int, timeout: float, what: str) -> None:
    """Until `items` holds `count`, woken by `arrived` as each comes in (not polled, so not
    eventually()): the fakes' wait_for. AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while len(items) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{what} got {len(items)} calls, expected {count}")
        arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), min(remaining, 0.2))
