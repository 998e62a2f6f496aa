"""A small HTTP/1.1 client for webhook POSTs: keep-alive connections per origin, one request at
a time on a connection, no redirects, cookies, proxies or response decompression.

A webhook delivery is one POST, so the client is most of what delivering costs. aiohttp's
ClientSession spends about 120 us of CPU per POST here (timers, tracing hooks, cookie jar,
header merging, payload registry); this spends about 40 us, which is the difference between
the bridge delivering as fast as it takes postbacks in and falling behind (bench/).

Framing follows RFC 9112 section 6: 1xx responses are skipped, 204/304 have no body, chunked
bodies are decoded, Content-Length is exact, and anything else is read until the server closes.
Bare-LF line ends and folded header lines are accepted (sections 2.2 and 5.2). Only what the
caller keeps of the body (`keep` bytes, for an error message) is held in memory; a connection
is reused only when its response was read exactly to its end and nobody said `close`.

A 2xx means the receiver has the request: once its status line is in, a body that breaks off or
never ends changes nothing (it gets BODY_PATIENCE, then the connection is dropped). Anything
else malformed is an HTTPError, which the webhook destination reports as retryable.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from yarl import URL

MAX_HEAD = 64 * 1024  # status line and headers
MAX_DRAIN = 1024 * 1024  # body bytes read (and dropped) to keep a connection; past this it is closed
# An idle connection older than this is closed, not reused: under the 5 s keep-alive of Node and
# uvicorn, so we drop it before the server does (a close that crosses our request in flight
# fails that attempt). A `Keep-Alive: timeout=N` from the server shortens it further.
IDLE_TIMEOUT = 4.0
MAX_IDLE = 64  # idle connections kept per origin
BODY_PATIENCE = 1.0  # seconds a 2xx body may take to arrive once the status is in

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(r"[0-9]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_KEEP_ALIVE_TIMEOUT = re.compile(r"timeout\s*=\s*([0-9]{1,6})", re.IGNORECASE)


class HTTPError(Exception):
    """The exchange failed: the connection broke, or the peer did not speak HTTP/1.1."""


class ConnectError(HTTPError):
    """No connection: DNS, refused, unreachable, or a TLS handshake/certificate failure."""


class Headers(dict[str, str]):
    """Response headers by lower-case name (repeats joined with ', ', except Retry-After, whose
    first value counts); get() and [] ignore case."""

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
        self.idle = False
        self.expires = 0.0  # while idle: monotonic time after which it is not reused
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.idle:  # nothing is owed to us between responses: the connection is unusable
            self.close()
            return
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
    def usable(self, now: float) -> bool:
        return (
            not self.eof
            and not self.buffer
            and now < self.expires
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def close(self) -> None:
        """At once: no waiting for a peer that stopped reading to take what is still buffered."""
        if self.transport is not None:
            self.transport.abort()
        self.eof = True

    async def more(self) -> None:
        """Wait for bytes beyond what is buffered; HTTPError if the connection ends first."""
        if self.eof:
            raise HTTPError(f"connection closed by peer{f' ({self.lost})' if self.lost else ''}")
        await self._wait()

    async def until_close(self) -> None:
        """Wait for more bytes or the end of the connection (a body read until close)."""
        if not self.eof:
            await self._wait()

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self, n: int) -> bytes:
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def line(self, limit: int, what: str) -> bytes:
        """One line without its CRLF (or bare LF)."""
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > limit:
                raise HTTPError(f"{what} too long")
            await self.more()
        return self.take(end + 1)[:-1].removesuffix(b"\r")


@dataclass(frozen=True, slots=True)
class _Target:
    origin: tuple[str, str, int]  # scheme, host, port
    start: bytes  # the request line
    host: bytes  # the Host header line
    auth: bytes  # an Authorization header line from the URL's user:password, or b""
    server_hostname: str | None  # for TLS: SNI and the name the certificate must have


def basic_credentials(url: URL) -> str | None:
    """The Basic credentials that `url`'s user:password makes (`Client.post` sends them), or None."""
    if url.user is None:
        return None
    return base64.b64encode(f"{url.user}:{url.password or ''}".encode()).decode()


class Client:
    """Keep-alive connections by (scheme, host, port). Cancel-safe: a request cut off by a
    timeout closes its connection instead of returning it to the pool."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._targets: dict[str, _Target] = {}
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()

    def _target(self, url: str) -> _Target:
        """What a URL means for a request, worked out once per URL."""
        cached = self._targets.get(url)
        if cached is not None:
            return cached
        try:
            u = URL(url)
            port = u.port
            host = u.raw_host
        except (ValueError, TypeError) as exc:
            raise HTTPError(f"bad URL: {exc}") from None
        if u.scheme not in ("http", "https") or not host or port is None:
            raise HTTPError(f"not an http(s) URL: {u.with_password(None)}")
        default = 443 if u.scheme == "https" else 80
        authority = (f"[{host}]" if ":" in host else host) + ("" if port == default else f":{port}")
        token = basic_credentials(u)
        auth = f"Authorization: Basic {token}\r\n".encode("ascii") if token else b""
        target = _Target(
            origin=(u.scheme, host, port),
            start=f"POST {u.raw_path_qs or '/'} HTTP/1.1\r\n".encode("ascii"),
            host=f"Host: {authority}\r\n".encode("ascii"),
            auth=auth,
            # a trailing dot is a fully qualified name, but certificates never carry it
            server_hostname=host.rstrip(".") if u.scheme == "https" else None,
        )
        if len(self._targets) < 1024:
            self._targets[url] = target
        return target

    async def post(self, url: str, body: bytes, headers: dict[str, str], *, keep: int = 512) -> Response:
        if self._closed:
            raise HTTPError("client is closed")
        target = self._target(url)
        lines = [target.start]
        given = {name.lower() for name in headers}
        if "host" not in given:  # a Host of the caller's own replaces ours (virtual hosts)
            lines.append(target.host)
        if target.auth:
            if "authorization" in given:
                raise ValueError("an Authorization header and a user:password in the URL: use one")
            lines.append(target.auth)
        for name, value in headers.items():
            check_header(name, value)
            lines.append(f"{name}: {value}\r\n".encode())
        lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
        request = b"".join(lines) + body

        # No second try on another connection if this one turns out closed: the peer may have
        # read the request before closing, and the delivery loop's retry is the honest one.
        # An idle connection the peer closed is seen (EOF) and dropped before it is used.
        conn = self._checkout(target.origin) or await self._connect(target)
        try:
            response, reusable = await self._exchange(conn, request, keep)
        except BaseException:  # broken, cancelled (timeout) or a bug: this connection is done
            self._discard(conn)
            raise
        if reusable:
            self._checkin(target.origin, conn, response.headers)
        else:
            self._discard(conn)
        return response

    # -- pool
    def _checkout(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used
            if conn.usable(now):
                conn.idle = False
                return conn
            self._discard(conn)
        return None

    def _checkin(self, origin: tuple[str, str, int], conn: _Connection, headers: Headers) -> None:
        if self._closed:
            self._discard(conn)
            return
        now = time.monotonic()
        keep_for = IDLE_TIMEOUT
        match = _KEEP_ALIVE_TIMEOUT.search(headers.get("keep-alive", ""))
        if match:  # the server's own idea of how long it keeps the connection, with a margin
            keep_for = min(keep_for, int(match.group(1)) - 1.0)
        if keep_for <= 0:
            self._discard(conn)
            return
        conn.idle, conn.expires = True, now + keep_for
        idle = self._idle.setdefault(origin, deque())
        idle.append(conn)
        # the oldest are at the left: those past their time (or over the cap) are closed now
        while idle and (len(idle) > MAX_IDLE or not idle[0].usable(now)):
            self._discard(idle.popleft())

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    async def _connect(self, target: _Target) -> _Connection:
        scheme, host, port = target.origin
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            tls = self._ssl or _default_tls()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                _Connection,
                host,
                port,
                ssl=tls,
                server_hostname=target.server_hostname,
                happy_eyeballs_delay=0.25,
            )
        except (OSError, ValueError) as exc:  # refused, unreachable, DNS, certificate; a bad name
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
            # no body, whatever the headers say; one that says otherwise is not trusted again
            framed = "transfer-encoding" in headers or headers.get("content-length", "0").strip() != "0"
            return Response(status, reason, headers, b""), keep_alive and not framed
        if not 200 <= status < 300:
            body, complete = await _read_body(conn, headers, keep)
            return Response(status, reason, headers, body), keep_alive and complete
        fast = _buffered_body(conn, headers, keep)
        if fast is not None:  # the usual case: all of it came with the head
            return Response(status, reason, headers, fast), keep_alive
        try:
            async with asyncio.timeout(BODY_PATIENCE):
                body, complete = await _read_body(conn, headers, keep)
        except (HTTPError, TimeoutError):  # delivered all the same; this connection is done
            return Response(status, reason, headers, b""), False
        return Response(status, reason, headers, body), keep_alive and complete


def is_token(name: str) -> bool:
    """Whether `name` can be a header name (RFC 9110 token)."""
    return _TOKEN.fullmatch(name) is not None


def check_header(name: str, value: str) -> None:
    """A header the client can send as it is: a token name, a value without line breaks."""
    if not is_token(name):
        raise ValueError(f"header name {name!r} is not an HTTP token")
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"header {name!r} has a line break")


async def _read_head(conn: _Connection) -> tuple[str, int, str, Headers]:
    while True:
        end, size = conn.buffer.find(b"\r\n\r\n"), 4
        bare = conn.buffer.find(b"\n\n")
        if bare >= 0 and (end < 0 or bare < end):
            end, size = bare, 2
        if end >= 0:
            break
        if len(conn.buffer) > MAX_HEAD:
            raise HTTPError(f"response headers larger than {MAX_HEAD} bytes")
        await conn.more()
    if end > MAX_HEAD:
        raise HTTPError(f"response headers larger than {MAX_HEAD} bytes")
    head = conn.take(end + size)[:end].decode("latin-1")
    status_line, *fields = [line.removesuffix("\r") for line in head.split("\n")]
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not _DIGITS.fullmatch(code):
        raise HTTPError(f"not an HTTP/1.x response: {status_line[:80]!r}")
    headers = Headers()
    last = ""
    for field in fields:
        if field[:1] in (" ", "\t") and last:  # obs-fold: a continuation of the last header
            dict.__setitem__(headers, last, f"{dict.__getitem__(headers, last)} {field.strip()}")
            continue
        name, sep, value = field.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HTTPError(f"malformed response header: {field[:80]!r}")
        key, value = name.lower(), value.strip()
        if dict.__contains__(headers, key):
            if key == "retry-after":
                continue  # a date has a comma in it: joining would break it; the first counts
            value = f"{dict.__getitem__(headers, key)}, {value}"
        dict.__setitem__(headers, key, value)
        last = key
    return version, int(code), reason, headers


def _content_length(headers: Headers) -> int | None:
    length = headers.get("content-length")
    if length is None:
        return None
    values = {v.strip() for v in length.split(",")}
    n = values.pop() if len(values) == 1 else ""
    if not _DIGITS.fullmatch(n):
        raise HTTPError(f"bad Content-Length: {length[:40]!r}")
    return int(n)


def _buffered_body(conn: _Connection, headers: Headers, keep: int) -> bytes | None:
    """The body when it is framed by Content-Length and already here in full, else None."""
    if "transfer-encoding" in headers:
        return None
    try:
        n = _content_length(headers)
    except HTTPError:
        return None
    if n is None or len(conn.buffer) < n:
        return None
    return conn.take(n)[:keep]


async def _read_body(conn: _Connection, headers: Headers, keep: int) -> tuple[bytes, bool]:
    """(the first `keep` bytes, whether the body was read to its end so the connection is reusable)."""
    codings = [c.strip().lower() for c in headers.get("transfer-encoding", "").split(",") if c.strip()]
    if codings:
        if codings[-1] != "chunked":
            return await _read_until_close(conn, keep), False
        body, complete = await _read_chunked(conn, keep)
        # with a Content-Length beside it the framing is ambiguous (smuggling): not reused
        return body, complete and "content-length" not in headers
    n = _content_length(headers)
    if n is not None:
        return await _read_exact(conn, n, keep)
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
        size_line = await conn.line(4096, "chunk size line")
        size_text = size_line.split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_text):
            raise HTTPError(f"bad chunk size: {size_text[:20]!r}")
        size = int(size_text, 16)
        if size == 0:
            break
        total += size
        if total > MAX_DRAIN:
            return bytes(kept[:keep]), False
        while len(conn.buffer) < size:
            await conn.more()
        chunk = conn.take(size)
        if await conn.line(2, "chunk end"):
            raise HTTPError("chunk not followed by a line end")
        if len(kept) < keep:
            kept += chunk[: keep - len(kept)]
    trailers = 0
    while line := await conn.line(MAX_HEAD, "response trailers"):  # trailer fields, to the empty line
        trailers += len(line)
        if trailers > MAX_HEAD:
            raise HTTPError("response trailers too long")
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
