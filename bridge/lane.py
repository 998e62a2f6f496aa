"""The postback lane: plain postbacks answered without aiohttp's per-request machinery.

A postback is one small POST, and for one of them aiohttp's request and response objects, router,
middleware and task cost more CPU than reading, normalizing and routing it. So each connection
starts in the lane. The lane takes a request only when it is a plain postback:

    POST <postback_path>[/<token>] HTTP/1.1 (only where aiohttp's router would give that target
    to the postback handler), with a Host and one Content-Length within max_body_bytes; no
    Transfer-Encoding, Content-Encoding, Expect, Upgrade or Proxy-Connection, and Connection
    absent, keep-alive or close; a head of printable ASCII (no folded lines, no bare CR or LF)
    that names each field once, in at most 100 fields

and answers it with the same functions as aiohttp's handler (`server.admit`, `server.take`,
`server.unexpected`), so the answer, the metrics and the log lines are the same. Anything else (a
query string, a chunked or compressed body, another path or method, a malformed head, a body that
has not all come within a second) goes to aiohttp: the lane hands it the connection with every
byte read so far, and the connection stays with aiohttp from then on.

The lane keeps aiohttp's limits: an idle keep-alive connection is closed after client_timeout; a
request still incomplete after a second is aiohttp's (its 408 and header timeouts); a client that
does not read its answers gets no new ones, no more than one request's worth is read ahead, and
once it has not read for client_timeout its connection is aborted (a write timeout).
On shutdown it stops listening, closes idle connections and lets the postbacks being stored finish.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from bridge.answers import Reply
from bridge.app import postback
from bridge.auth import Caller
from bridge.digits import is_digits
from bridge.ingest import admit, take, unexpected
from bridge.runtime import RUNTIME, Runtime

MAX_HEAD = 8190  # aiohttp's own limit on a request line and its headers
HAND_OVER_AFTER = 1.0  # seconds a request may take to come in whole before aiohttp gets it
SWEEP_EVERY = 0.5

# The heads the lane reads, in one match: the request line, then header lines whose name is an
# RFC 9110 token and whose value is printable ASCII (so no folded line, no bare CR or LF).
_HEAD = re.compile(rb"POST ([!-~]+) HTTP/1\.1((?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*)*)")
_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")  # a path token as sent, with nothing to decode
_REFUSED = frozenset({"transfer-encoding", "content-encoding", "expect", "upgrade", "proxy-connection"})
MAX_FIELDS = 100  # aiohttp refuses more than 128
_AIOHTTP = object()  # what `_Head.read` says of a request the lane does not take
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class _Headers:
    """A head's fields by lowercase name, each once: what `auth.Caller` needs of aiohttp's
    CIMultiDict. (A head that names a field twice is aiohttp's: it refuses some such heads.)"""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, str]) -> None:
        self.fields = fields

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self.fields

    def getall(self, name: str, default: Any = None) -> Any:
        value = self.fields.get(name.lower())
        if value is not None:
            return [value]
        if default is None:
            raise KeyError(name)
        return default


class _Request:
    __slots__ = ("body", "close", "headers", "size", "token")

    def __init__(self, token: str | None, headers: _Headers, body: bytes, size: int, close: bool) -> None:
        self.token, self.headers, self.body, self.size, self.close = token, headers, body, size, close


class Lane:
    """The lane of one app: its connections, the sweep that times them out, and the reading of
    a request head (`read`)."""

    def __init__(self, app: web.Application, aiohttp_protocol: Callable[[], asyncio.Protocol]) -> None:
        self.runtime: Runtime = app[RUNTIME]
        self.path = self.runtime.config.server.postback_path  # the path the app's routes were made with
        self.exact, self.with_token = _postback_forms(app, self.path)
        self.aiohttp_protocol = aiohttp_protocol
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self.taken = self.handed_over = 0  # requests answered here; connections given to aiohttp
        self._date = (0, "")
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="lane-sweep")

    async def close(self, patience: float) -> None:
        """Shutdown: close what is idle, let the postbacks being taken finish (within `patience`)."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.connections):
            if not connection.busy:
                connection.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=patience)
        for connection in list(self.connections):
            connection.close()

    def protocol(self) -> _Connection:
        return _Connection(self)

    def date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def read(self, buffer: bytearray) -> _Request | int | object | None:
        """The request at the start of `buffer` if the lane takes it; while it is not all there
        yet, None, or the size it will have once its head is read; `_AIOHTTP` when it is
        aiohttp's."""
        end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            return _AIOHTTP if len(buffer) >= MAX_HEAD + 4 else None
        head = _HEAD.fullmatch(buffer, 0, end)
        if head is None:
            return _AIOHTTP
        target = head[1].decode("ascii")
        token = None
        if target != self.path or not self.exact:
            token = target[len(self.path) + 1 :]
            if not (self.with_token and target.startswith(self.path + "/") and _SEGMENT.fullmatch(token)):
                return _AIOHTTP
        lines = head[2].decode("ascii").split("\r\n")
        if len(lines) > MAX_FIELDS:
            return _AIOHTTP
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.lower()
            if name in fields:
                return _AIOHTTP
            fields[name] = value.strip(" \t")
        length_text = fields.get("content-length", "")
        if (
            "host" not in fields
            or not is_digits(length_text)
            or len(length_text) > 15
            or not _REFUSED.isdisjoint(fields)
        ):
            return _AIOHTTP
        connection = fields.get("connection", "keep-alive").lower()
        if connection not in ("keep-alive", "close"):
            return _AIOHTTP
        headers = _Headers(fields)
        length = int(length_text)
        if length > self.runtime.config.server.max_body_bytes:
            return _AIOHTTP  # its 413
        size = end + 4 + length
        if len(buffer) < size:
            return size
        return _Request(token, headers, bytes(buffer[end + 4 : size]), size, connection == "close")

    def head(self, reply: Reply, *, close: bool = False) -> bytes:
        lines = [
            f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, '')}",
            "Content-Type: application/json; charset=utf-8",
            f"Content-Length: {len(reply.body)}",
            f"Date: {self.date()}",
            f"Server: {SERVER_SOFTWARE}",
            *(f"{name}: {value}" for name, value in reply.headers),
            *(["Connection: close"] if close else []),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now, keepalive = loop.time(), self.runtime.config.server.client_timeout
            for connection in list(self.connections):
                connection.sweep(now, keepalive)


def _postback_forms(app: web.Application, path: str) -> tuple[bool, bool]:
    """Whether aiohttp's router gives `POST <path>`, and `POST <path>/<token>` whatever the token,
    to the postback handler: the lane takes only what aiohttp would. (A postback_path of /admin
    shares /admin/reload with the admin API, and aiohttp gives that one to the admin API.) The
    router tries its resources in order; the first that matches the path and has a POST route (or
    a catch-all one) decides. A dynamic resource that might match under `path/` counts as one that
    does."""
    exact: bool | None = None
    with_token: bool | None = None
    under = path + "/"
    for resource in app.router.resources():
        handlers = [route.handler for route in resource if route.method in ("POST", "*")]
        if not handlers:
            continue
        ours = handlers[0] is postback
        info = resource.get_info()
        pattern = info.get("pattern")
        if exact is None and (pattern.fullmatch(path) if pattern is not None else info.get("path") == path):
            exact = ours
        if with_token is None:
            if resource.canonical == under + "{token}":
                with_token = ours
            elif pattern is None:
                plain = info.get("path", "")
                with_token = False if plain.startswith(under) and "/" not in plain[len(under) :] else None
            else:
                fixed = resource.canonical.split("{", 1)[0]
                with_token = False if fixed.startswith(under) or under.startswith(fixed) else None
    return bool(exact), bool(with_token)


class _Connection(asyncio.Protocol):
    """One client connection while it is in the lane: one request at a time, in order."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.buffer = bytearray()
        self.busy = False  # a postback of this connection is being taken
        self.paused = False  # reading, because the buffer is over `limit`
        self.blocked = False  # writing, because the client does not read its answers
        self.blocked_since = 0.0  # since when: the sweep's clock for a client that never reads
        self.limit = MAX_HEAD + 4 + lane.runtime.config.server.max_body_bytes  # the largest request taken
        self.eof = False
        self.awaited = 0  # the size of the request coming in, once its head is read
        self.since = 0.0  # when it connected, last answered or a request began: the sweep's clock

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        self.since = asyncio.get_running_loop().time()
        self.lane.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lane.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if not self.buffer and not self.busy:
            self.since = asyncio.get_running_loop().time()  # a request starts
        self.buffer += data
        self._flow()

    def eof_received(self) -> bool:
        self.eof = True
        self._flow()
        return True  # a postback being taken is still answered; then the connection closes

    def pause_writing(self) -> None:
        self.blocked = True
        self.blocked_since = asyncio.get_running_loop().time()

    def resume_writing(self) -> None:
        self.blocked = False
        self._flow()

    def _flow(self) -> None:
        """Take the next request when nothing is being taken and the client reads its answers;
        read on only while what is buffered is within `limit` (one request's worth)."""
        if not self.busy and not self.blocked:
            self._next()
        transport = self.transport
        if transport is None:
            return  # closed, or aiohttp's now
        over = len(self.buffer) > self.limit
        if over != self.paused:
            self.paused = over
            if over:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _next(self) -> None:
        if self.transport is None or self.lane.closing:
            return
        request: _Request | int | object | None = None
        if self.buffer and len(self.buffer) >= self.awaited:  # (a body still coming needs no new look at its head)
            request = self.lane.read(self.buffer)
        if isinstance(request, int):
            self.awaited, request = request, None
        if request is _AIOHTTP:
            self._hand_over()
        elif request is None:
            if self.eof:
                self.close()
        else:
            assert isinstance(request, _Request)
            self.awaited = 0
            del self.buffer[: request.size]
            self.busy = True
            self.lane.taken += 1
            self.lane.runtime.metrics.lane_postbacks.inc()
            task = asyncio.get_running_loop().create_task(self._take(request))
            self.lane.tasks.add(task)
            task.add_done_callback(self.lane.tasks.discard)

    async def _take(self, request: _Request) -> None:
        lane = self.lane
        try:
            caller = Caller(self.remote, request.headers, request.token)
            reply = admit(lane.runtime, caller)
            if reply is None:
                content_type = request.headers.get("content-type", "")
                reply = await take(lane.runtime, request.body, content_type, self.remote)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            path = lane.path + "/{token}" if request.token is not None else lane.path
            reply = unexpected(exc, path, "POST")
        self.busy = False
        transport = self.transport
        if transport is None:
            return  # the client went away; the postback is stored all the same
        transport.write(lane.head(reply, close=request.close) + reply.body)
        self.since = asyncio.get_running_loop().time()
        if lane.closing or request.close:
            self.close()
        else:
            self._flow()

    def _hand_over(self) -> None:
        """aiohttp takes this connection over, from the request at the start of the buffer on."""
        transport = self.transport
        assert transport is not None and not self.busy
        self.lane.connections.discard(self)
        self.lane.handed_over += 1
        self.transport = None
        protocol = self.lane.aiohttp_protocol()
        if self.paused:
            transport.resume_reading()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buffer:
            protocol.data_received(bytes(self.buffer))
            self.buffer.clear()
        if self.eof and not protocol.eof_received():
            transport.close()  # what asyncio does when a protocol's eof_received says so

    def sweep(self, now: float, keepalive: float) -> None:
        """Time a connection out. One whose client has not read its answers for client_timeout
        (the write buffer over its high-water mark all along) is aborted: it would otherwise
        hold its socket, and what it pipelined, for as long as the client likes."""
        if self.transport is None:
            return
        if self.blocked:
            if now - self.blocked_since >= keepalive:
                self.close(abort=True)
            return
        if self.busy:
            return
        if self.buffer and now - self.since >= HAND_OVER_AFTER:
            self._hand_over()  # a slow request: aiohttp answers 408 or closes, as it would have
        elif not self.buffer and now - self.since >= keepalive:
            # idle; answers it has not read would keep a plain close waiting for ever
            self.close(abort=self.transport.get_write_buffer_size() > 0)

    def close(self, *, abort: bool = False) -> None:
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
            self.transport = None
            self.lane.connections.discard(self)


class LaneSite(web.BaseSite):
    """aiohttp's TCPSite, with the lane in front of aiohttp's protocol."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, shutdown_timeout: float = 10.0) -> None:
        super().__init__(runner)
        self._host, self._port, self._drain_timeout = host, port, shutdown_timeout
        self.lane: Lane | None = None

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        runner = self._runner
        assert isinstance(runner, web.AppRunner) and runner.server is not None
        self.lane = Lane(runner.app, runner.server)
        self.lane.start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.lane.protocol, self._host, self._port, reuse_address=True, backlog=self._backlog
        )

    async def stop(self) -> None:
        await super().stop()  # stop listening
        if self.lane is not None:
            await self.lane.close(self._drain_timeout)
