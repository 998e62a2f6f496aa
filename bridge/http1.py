"""A small HTTP/1.1 client for webhook POSTs: keep-alive connections per origin, one request at
a time on a connection, no redirects, cookies, proxies or response decompression.

A webhook delivery is one POST, so the client is most of what delivering costs. aiohttp's
ClientSession spends about 120 us of CPU per POST here (timers, tracing hooks, cookie jar,
header merging, payload registry); this spends about 40 us, which is the difference between
the bridge delivering as fast as it takes postbacks in and falling behind (bench/).

Framing follows RFC 9112 section 6: 1xx responses are skipped, 204/304 have no body, chunked
bodies are decoded, Content-Length is exact, and anything else is read until the server closes.
Only what the caller keeps of the body (`keep` bytes, for an error message) is held in memory;
a connection is reused only when its response was fully read and nobody said `close`.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from yarl import URL

MAX_HEAD = 64 * 1024  # status line and headers
MAX_DRAIN = 1024 * 1024  # body bytes read (and dropped) to keep a connection; past this it is closed
IDLE_TIMEOUT = 15.0  # an idle connection older than this is closed, not reused
MAX_IDLE = 64  # idle connections kept per origin


class HTTPError(Exception):
    """The exchange failed: the connection broke, or the peer did not speak HTTP/1.1."""


class ConnectError(HTTPError):
    """No connection: DNS, refused, unreachable, or a TLS handshake/certificate failure."""


class Headers(dict[str, str]):
    """Response headers by lower-case name (repeats joined with ', '); get() ignores case."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: Headers
    body: bytes  # the first `keep` bytes of the body


class _Connection(asyncio.Protocol):
    """Bytes in, kept in a buffer until the parser asks for them."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.lost: BaseException | None = None
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: BaseException | None) -> None:
        self.eof = True
        self.lost = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- for the client
    @property
    def usable(self) -> bool:
        return not self.eof and not self.buffer and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.eof = True

    async def more(self) -> None:
        """Wait for bytes beyond what is buffered; HTTPError if the connection ends first."""
        if self.eof:
            raise HTTPError(f"connection closed by peer{f' ({self.lost})' if self.lost else ''}")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def until_close(self) -> None:
        """Wait for more bytes or the end of the connection (a body read until close)."""
        if not self.eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def take(self, n: int) -> bytes:
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


class Client:
    """Keep-alive connections by (scheme, host, port). Cancel-safe: a request cut off by a
    timeout closes its connection instead of returning it to the pool."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._targets: dict[str, tuple[tuple[str, str, int], bytes]] = {}
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()

    def _target(self, url: str) -> tuple[tuple[str, str, int], bytes]:
        """(origin, the request line and Host header) of a URL, parsed once per URL."""
        cached = self._targets.get(url)
        if cached is not None:
            return cached
        u = URL(url)
        if u.scheme not in ("http", "https") or not u.raw_host or u.port is None:
            raise ValueError(f"not an http(s) URL: {u.with_password(None)}")
        host = u.raw_host
        default = 443 if u.scheme == "https" else 80
        authority = (f"[{host}]" if ":" in host else host) + ("" if u.port == default else f":{u.port}")
        head = f"POST {u.raw_path_qs or '/'} HTTP/1.1\r\nHost: {authority}\r\n"
        if u.user is not None:
            token = base64.b64encode(f"{u.user}:{u.password or ''}".encode()).decode()
            head += f"Authorization: Basic {token}\r\n"
        target = ((u.scheme, host, u.port), head.encode("ascii"))
        if len(self._targets) < 1024:
            self._targets[url] = target
        return target

    async def post(self, url: str, body: bytes, headers: dict[str, str], *, keep: int = 512) -> Response:
        if self._closed:
            raise HTTPError("client is closed")
        origin, start = self._target(url)
        lines = [start]
        for name, value in headers.items():
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                raise ValueError(f"header {name!r} has a line break")
            lines.append(f"{name}: {value}\r\n".encode())
        lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
        request = b"".join(lines) + body

        # No second try on another connection if this one turns out closed: the peer may have
        # read the request before closing, and the delivery loop's retry is the honest one.
        # An idle connection the peer closed is seen (EOF) and dropped before it is used.
        conn = self._checkout(origin) or await self._connect(origin)
        try:
            response, reusable = await self._exchange(conn, request, keep)
        except BaseException:  # broken, cancelled (timeout) or a bug: this connection is done
            self._discard(conn)
            raise
        if reusable:
            self._checkin(origin, conn)
        else:
            self._discard(conn)
        return response

    # -- pool
    def _checkout(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: least likely to have been closed
            if conn.usable and now - conn.idle_since < IDLE_TIMEOUT:
                return conn
            self._discard(conn)
        return None

    def _checkin(self, origin: tuple[str, str, int], conn: _Connection) -> None:
        if self._closed:
            self._discard(conn)
            return
        idle = self._idle.setdefault(origin, deque())
        conn.idle_since = time.monotonic()
        idle.append(conn)
        while len(idle) > MAX_IDLE:
            self._discard(idle.popleft())

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    async def _connect(self, origin: tuple[str, str, int]) -> _Connection:
        scheme, host, port = origin
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            tls = self._ssl or _default_tls()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                _Connection, host, port, ssl=tls, server_hostname=host if tls else None, happy_eyeballs_delay=0.25
            )
        except OSError as exc:  # refused, unreachable, DNS (gaierror), certificate (SSLError)
            raise ConnectError(str(exc) or type(exc).__name__) from exc
        self._open.add(conn)
        return conn

    # -- one exchange
    async def _exchange(self, conn: _Connection, request: bytes, keep: int) -> tuple[Response, bool]:
        assert conn.transport is not None
        conn.transport.write(request)
        while True:
            version, status, reason, headers = await _read_head(conn)
            if status >= 200:
                break
            if status == 101:
                raise HTTPError("peer switched protocols")
            # 100 Continue, 102, 103 Early Hints: the final response follows
        keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        if status in (204, 304):
            return Response(status, reason, headers, b""), keep_alive
        body, complete = await _read_body(conn, headers, keep)
        return Response(status, reason, headers, body), keep_alive and complete


async def _read_head(conn: _Connection) -> tuple[str, int, str, Headers]:
    while True:
        end = conn.buffer.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(conn.buffer) > MAX_HEAD:
            raise HTTPError(f"response headers larger than {MAX_HEAD} bytes")
        await conn.more()
    head = conn.take(end + 4)[:end].decode("latin-1")
    status_line, *fields = head.split("\r\n")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise HTTPError(f"not an HTTP/1.x response: {status_line[:80]!r}")
    headers = Headers()
    for field in fields:
        name, sep, value = field.partition(":")
        if not sep or not name or name != name.strip():
            raise HTTPError(f"malformed response header: {field[:80]!r}")
        key, value = name.lower(), value.strip()
        headers[key] = f"{dict.__getitem__(headers, key)}, {value}" if dict.__contains__(headers, key) else value
    return version, int(code), reason, headers


async def _read_body(conn: _Connection, headers: Headers, keep: int) -> tuple[bytes, bool]:
    """(the first `keep` bytes, whether the body was read to its end so the connection is reusable)."""
    codings = [c.strip().lower() for c in headers.get("transfer-encoding", "").split(",") if c.strip()]
    if codings:
        if codings[-1] == "chunked":
            return await _read_chunked(conn, keep)
        return await _read_until_close(conn, keep), False
    length = headers.get("content-length")
    if length is not None:
        values = {v.strip() for v in length.split(",")}
        if len(values) != 1 or not (n := values.pop()).isdigit():
            raise HTTPError(f"bad Content-Length: {length[:40]!r}")
        return await _read_exact(conn, int(n), keep)
    return await _read_until_close(conn, keep), False


async def _read_exact(conn: _Connection, n: int, keep: int) -> tuple[bytes, bool]:
    if n > MAX_DRAIN:  # not worth reading to keep the connection
        while len(conn.buffer) < min(n, keep):
            await conn.more()
        return conn.take(min(n, keep)), False
    while len(conn.buffer) < n:
        await conn.more()
    return conn.take(n)[:keep], True


async def _read_chunked(conn: _Connection, keep: int) -> tuple[bytes, bool]:
    kept, total = bytearray(), 0
    while True:
        while (end := conn.buffer.find(b"\r\n")) < 0:
            if len(conn.buffer) > 4096:
                raise HTTPError("chunk size line too long")
            await conn.more()
        size_text = conn.take(end + 2)[:end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HTTPError(f"bad chunk size: {size_text[:20]!r}") from None
        if size == 0:
            break
        total += size
        if total > MAX_DRAIN:
            return bytes(kept[:keep]), False
        while len(conn.buffer) < size + 2:
            await conn.more()
        chunk = conn.take(size + 2)
        if chunk[-2:] != b"\r\n":
            raise HTTPError("chunk not followed by CRLF")
        if len(kept) < keep:
            kept += chunk[: min(size, keep - len(kept))]
    while True:  # trailer fields, up to the empty line
        while (end := conn.buffer.find(b"\r\n")) < 0:
            if len(conn.buffer) > MAX_HEAD:
                raise HTTPError("response trailers too long")
            await conn.more()
        if not conn.take(end + 2)[:end]:
            return bytes(kept), True


async def _read_until_close(conn: _Connection, keep: int) -> bytes:
    kept, total = bytearray(), 0
    while True:
        data = conn.take(len(conn.buffer))
        total += len(data)
        if len(kept) < keep:
            kept += data[: keep - len(kept)]
        if conn.eof or total > MAX_DRAIN:
            return bytes(kept)
        await conn.until_close()


_TLS: ssl.SSLContext | None = None


def _default_tls() -> ssl.SSLContext:
    global _TLS
    if _TLS is None:
        _TLS = ssl.create_default_context()
    return _TLS
