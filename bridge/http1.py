"""A small HTTP/1.1 client for webhook POSTs: keep-alive connections per origin, one request at
a time on a connection, no redirects, cookies, proxies or response decompression.

A webhook delivery is one POST, so the client is most of what delivering costs. aiohttp's
ClientSession spends about 120 us of CPU per POST here (timers, tracing hooks, cookie jar,
header merging, payload registry); this spends about 40 us, which is the difference between
the bridge delivering as fast as it takes postbacks in and falling behind (bench/).

Framing follows RFC 9112 section 6: 1xx responses are skipped (at most MAX_INTERIM of them),
204/304 have no body, chunked bodies are decoded, Content-Length is exact, and anything else is
read until the server closes. A head is read as h11 reads it: CRLF or bare-LF line ends (a head
may end in `\n\r\n`), folded header lines joined, and no NUL, bare CR, VT or FF anywhere;
Transfer-Encoding must be `chunked` alone (we decompress nothing) and Content-Length one number.
Chunked framing takes bare LF line ends too. Only what the caller keeps of the body (`keep`
bytes, for an error message) is held in memory; a connection is reused only when its response
was read exactly to its end and nobody said `close`.

The status decides. A 2xx means the receiver has the request: once its status line is in,
nothing after it (headers that are malformed, over MAX_HEAD or never end, a body that breaks
off or never ends) makes it anything but delivered, or the event would go twice. Another
status counts once its head is in whole and well-formed: the body is only the reason. What
comes after the deciding point gets BODY_PATIENCE (and never more than the caller's timeout),
then the connection is dropped and the answer stands with what came of it (`broken`: not all
of it came, for a caller that needs the body whole, as Slack's answers are). Anything malformed
before that point is an HTTPError, which the webhook destination reports as retryable.

One peer must not hold the event loop: heads are searched for their end only in the bytes
that arrived since the last look, and long runs (1xx heads, small chunks) yield to the loop.
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
MAX_INTERIM = 16  # 1xx responses before the final one; past this the attempt fails (retryable)
MAX_DRAIN = 1024 * 1024  # body bytes read (and dropped) to keep a connection; past this it is closed
# An idle connection older than this is closed, not reused: under the 5 s keep-alive of Node and
# uvicorn, so we drop it before the server does (a close that crosses our request in flight
# fails that attempt). A `Keep-Alive: timeout=N` from the server shortens it further.
IDLE_TIMEOUT = 4.0
MAX_IDLE = 64  # idle connections kept per origin
BODY_PATIENCE = 1.0  # seconds the rest of a response may take once its status decides the outcome
YIELD_EVERY = 256  # chunks read in a row before the event loop gets a turn

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(r"[0-9]+")
_KEEP_ALIVE_TIMEOUT = re.compile(r"timeout\s*=\s*([0-9]{1,6})", re.IGNORECASE)
# The blank line that ends a head (or a trailer section): after a CRLF or a bare LF, as h11 has it.
_HEAD_END = re.compile(rb"\n\r?\n")
# RFC 9112's status-line, as h11 reads it (the reason may be missing), for HTTP/1.x only.
_STATUS_LINE = re.compile(r"HTTP/1\.([0-9]) ([0-9]{3})(?: ([^\x00\n\r\x0b\x0c]*))?")
# A chunk-size line, without its line end: h11's (up to 20 hex digits, an extension, spaces).
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*")


class HTTPError(Exception):
    """The exchange failed: the connection broke, or the peer did not speak HTTP/1.1."""


class ConnectError(HTTPError):
    """No connection: DNS, refused, unreachable, or a TLS handshake/certificate failure."""


class Headers(dict[str, str]):
    """Response headers by lower-case name (repeats joined with ', ', except Retry-After, whose
    first value counts); get() and [] ignore case."""

    def get(self, key: str, default: Any = None) -> Any:
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
    # the body (or the head) broke off before its end: the connection ended or went bad, or it
    # took longer than BODY_PATIENCE (or the timeout); `body` is what came of it. The status
    # still stands; a caller that reads the body (Slack's `ok`) knows it did not get all of it.
    broken: bool = False


class _Connection(asyncio.Protocol):
    """Bytes in, kept in a buffer until the parser asks for them."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.lost: BaseException | None = None
        self.idle = False
        self.expires = 0.0  # while idle: monotonic time after which it is not reused
        # once the status decides the outcome: (status, reason, headers, the body kept so far),
        # which is the response whatever breaks from then on
        self.answer: tuple[int, str, Headers, bytearray] | None = None
        self.body_read = False  # the answer's body was read to its end (a chunked one's trailers may follow)
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
        """One line without its CRLF (or bare LF). Each wait looks only at the bytes it brought."""
        start = 0
        while (end := self.buffer.find(b"\n", start)) < 0:
            if len(self.buffer) > limit:
                raise HTTPError(f"{what} too long")
            start = len(self.buffer)
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

    async def post(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        *,
        keep: int = 512,
        timeout: float | None = None,  # noqa: ASYNC109 (ours: past the deciding status it is no error)
    ) -> Response:
        """POST `body`; the response with the first `keep` bytes of its body. `timeout` bounds the
        whole of it, connecting included (TimeoutError), except that a response whose status has
        decided the outcome is returned as far as it came (see the module's docstring)."""
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
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(timeout) as deadline:
                conn = self._checkout(target.origin) or await self._connect(target)
                response, reusable = await self._exchange(conn, request, keep, deadline)
        except (HTTPError, TimeoutError):  # broken, malformed or too slow: this connection is done
            if conn is None:
                raise
            self._discard(conn)
            if conn.answer is None:
                raise
            status, reason, got, kept = conn.answer  # the status had decided: that is the answer
            return Response(status, reason, got, bytes(kept[:keep]), broken=not conn.body_read)
        except BaseException:  # cancelled from outside, or a bug
            if conn is not None:
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
    async def _exchange(
        self, conn: _Connection, request: bytes, keep: int, deadline: asyncio.Timeout
    ) -> tuple[Response, bool]:
        assert conn.transport is not None
        conn.answer, conn.body_read = None, False
        conn.transport.write(request)
        interim = 0
        while True:
            minor, status, reason, headers, length, chunked = await _read_head(conn, deadline)
            if status >= 200:
                break
            if status == 101:
                raise HTTPError("peer switched protocols")
            # 100 Continue, 102, 103 Early Hints: the final response follows, within a limit
            interim += 1
            if interim > MAX_INTERIM:
                raise HTTPError(f"more than {MAX_INTERIM} interim (1xx) responses")
            await asyncio.sleep(0)  # a peer that sends them without end shares the loop
        keep_alive = minor != "0" and not _closes(headers)
        if status in (204, 304):
            # no body, whatever the headers say; one that says otherwise is not trusted again
            return Response(status, reason, headers, b""), keep_alive and not chunked and not length
        if not chunked and length is not None and len(conn.buffer) >= length:
            # the usual case: all of it came with the head
            return Response(status, reason, headers, conn.take(length)[:keep]), keep_alive
        # The status decides from here: the body gets BODY_PATIENCE (within the caller's timeout),
        # and whatever breaks, the answer is this status with the body as far as it came.
        kept = bytearray()
        conn.answer = (status, reason, headers, kept)
        _be_patient(deadline)
        if chunked:
            complete = await _read_chunked(conn, keep, kept)
            # with a Content-Length beside it the framing is ambiguous (smuggling): not reused
            complete = complete and length is None
        elif length is not None:
            complete = await _read_exact(conn, length, keep, kept)
        else:
            complete = await _read_until_close(conn, keep, kept)
        return Response(status, reason, headers, bytes(kept)), keep_alive and complete


def is_token(name: str) -> bool:
    """Whether `name` can be a header name (RFC 9110 token)."""
    return _TOKEN.fullmatch(name) is not None


def check_header(name: str, value: str) -> None:
    """A header the client can send as it is: a token name, a value without line breaks."""
    if not is_token(name):
        raise ValueError(f"header name {name!r} is not an HTTP token")
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"header {name!r} has a line break")


def _be_patient(deadline: asyncio.Timeout) -> None:
    """From now on, at most BODY_PATIENCE more (and never past the caller's timeout)."""
    end = asyncio.get_running_loop().time() + BODY_PATIENCE
    when = deadline.when()
    if when is None or end < when:
        deadline.reschedule(end)


async def _read_head(conn: _Connection, deadline: asyncio.Timeout) -> tuple[str, int, str, Headers, int | None, bool]:
    """The next head: (the HTTP/1.x minor version, status, reason, headers, Content-Length,
    chunked). Once a 2xx status line is in, `conn.answer` holds it before anything after it is
    read, so that a head which then breaks (or never ends) is still that 2xx."""
    buffer = conn.buffer
    match = _HEAD_END.search(buffer, 0, MAX_HEAD + 3)
    if match is None:
        match = await _more_head(conn, deadline)
    end = match.start()
    if end > MAX_HEAD:
        _head_broke(conn, buffer[:end])
        raise HTTPError(f"response headers larger than {MAX_HEAD} bytes")
    head = buffer[:end].decode("latin-1")
    del buffer[: match.end()]
    first, _, fields = head.partition("\n")
    status_line = _STATUS_LINE.fullmatch(first[:-1] if first[-1:] == "\r" else first)
    if status_line is None:
        raise HTTPError(f"not an HTTP/1.x response: {first[:80]!r}")
    minor, code, reason = status_line.groups()
    status = int(code)
    if status < 100:
        raise HTTPError(f"not an HTTP/1.x response: status {code}")
    try:
        if _bad_text(head):
            raise HTTPError("malformed response head: a NUL, VT, FF or bare CR in it")
        headers = _fields(fields) if fields else Headers()
        length, chunked = _framing(headers)
    except HTTPError:
        if 200 <= status < 300:
            conn.answer = (status, reason or "", Headers(), bytearray())
        raise
    return minor, status, reason or "", headers, length, chunked


async def _more_head(conn: _Connection, deadline: asyncio.Timeout) -> re.Match[bytes]:
    """Wait for the end of a head that is not all in yet. Each look covers only the bytes that
    came since the last one (a head's end is at most 3 bytes: it may have begun before them)."""
    buffer = conn.buffer
    start = 0
    seen_status = False  # the first line (the status line) is in
    while True:
        if len(buffer) >= MAX_HEAD + 3:
            _head_broke(conn, buffer)
            raise HTTPError(f"response headers larger than {MAX_HEAD} bytes")
        if not seen_status and buffer.find(b"\n", start) >= 0:
            seen_status = True
            if _head_broke(conn, buffer):
                _be_patient(deadline)  # a 2xx is in: the rest of its head gets BODY_PATIENCE
        start = max(0, len(buffer) - 2)
        await conn.more()  # an end of the connection here: HTTPError (with conn.answer for a 2xx)
        match = _HEAD_END.search(buffer, start, MAX_HEAD + 3)
        if match is not None:
            return match


def _head_broke(conn: _Connection, head: bytes | bytearray) -> bool:
    """For a head that will not be read whole: when it starts with a 2xx status line, that is the
    answer (`conn.answer`; True)."""
    first = bytes(head[: head.find(b"\n")]) if b"\n" in head else b""
    status_line = _STATUS_LINE.fullmatch(first.removesuffix(b"\r").decode("latin-1"))
    if status_line is None or not 200 <= int(status_line[2]) < 300:
        return False
    conn.answer = (int(status_line[2]), status_line[3] or "", Headers(), bytearray())
    return True


def _bad_text(text: str) -> bool:
    """Whether a head (or trailer section) holds what none may (h11's field-vchar is [^\\x00\\s]):
    NUL, VT, FF, or a CR that does not end a line. `text` stops before the head's last LF, so
    it may end in a CR. (Plain scans: a regex for this costs four times as much.)"""
    return (
        "\x00" in text
        or "\x0b" in text
        or "\x0c" in text
        or text.count("\r") != text.count("\r\n") + text.endswith("\r")
    )


def _fields(text: str) -> Headers:
    """Header (or trailer) lines -> Headers: names are tokens, repeats are joined with ', ' (a
    repeated Retry-After keeps its first value: a date has a comma in it), folded lines are
    joined to the one before with a space. Linear in the size of the head, however it repeats."""
    lines = text.split("\n")
    if "\n " in text or "\n\t" in text or text[:1] in (" ", "\t"):
        lines = _unfold(lines)
    headers = Headers()
    repeated: dict[str, list[str]] | None = None
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HTTPError(f"malformed response header: {line[:80]!r}")
        key, value = name.lower(), value.strip(" \t\r")
        if dict.__contains__(headers, key):
            if key == "retry-after":
                continue
            if repeated is None:
                repeated = {}
            repeated.setdefault(key, [dict.__getitem__(headers, key)]).append(value)
            continue
        dict.__setitem__(headers, key, value)
    if repeated:
        for key, values in repeated.items():
            dict.__setitem__(headers, key, ", ".join(values))
    return headers


def _unfold(lines: list[str]) -> list[str]:
    """obs-fold (RFC 9112 5.2): a line that starts with a space or tab continues the one before."""
    out: list[list[str]] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not out:
                raise HTTPError(f"malformed response header: {line[:80]!r}")
            out[-1].append(line.strip(" \t\r"))
        else:
            out.append([line.removesuffix("\r")])
    return [" ".join(parts) for parts in out]


def _framing(headers: Headers) -> tuple[int | None, bool]:
    """(Content-Length or None, chunked). Anything but `Transfer-Encoding: chunked` is refused:
    a coding we would have to undo (gzip), or chunked twice, is not a body we can frame."""
    coding = dict.get(headers, "transfer-encoding")
    if coding is not None and coding.lower() != "chunked":
        raise HTTPError(f"unsupported Transfer-Encoding: {coding[:40]!r}")
    length = dict.get(headers, "content-length")
    if length is None:
        return None, coding is not None
    n = length
    if "," in n:  # repeated (or a list): all the same number, or it is no length at all
        values = {v.strip(" \t") for v in n.split(",")}
        n = values.pop() if len(values) == 1 else ""
    if len(n) > 20 or not _DIGITS.fullmatch(n):
        raise HTTPError(f"bad Content-Length: {length[:40]!r}")
    return int(n), coding is not None


def _closes(headers: Headers) -> bool:
    """Whether `Connection` names `close` (a list of tokens, any case)."""
    value = dict.get(headers, "connection")
    if value is None or "close" not in (value := value.lower()):
        return False
    return "close" in (token.strip(" \t") for token in value.split(","))


async def _read_exact(conn: _Connection, n: int, keep: int, kept: bytearray) -> bool:
    """A Content-Length body into `kept` (its first `keep` bytes); whether it was read to its end.
    One past MAX_DRAIN is not worth reading to keep the connection: it stops at `keep`."""
    remaining = n
    while remaining:
        if not conn.buffer:
            await conn.more()
        data = conn.take(min(remaining, len(conn.buffer)))
        remaining -= len(data)
        if len(kept) < keep:
            kept += data[: keep - len(kept)]
        if n > MAX_DRAIN and len(kept) >= min(n, keep):
            return False
    return True


async def _read_chunked(conn: _Connection, keep: int, kept: bytearray) -> bool:
    total = chunks = 0
    while True:
        size_line = await conn.line(4096, "chunk size line")
        size_match = _CHUNK_SIZE.fullmatch(size_line)
        if size_match is None:
            raise HTTPError(f"bad chunk size: {size_line[:20]!r}")
        size = int(size_match[1], 16)
        if size == 0:
            conn.body_read = True  # what follows (trailers) is no part of the body
            break
        total += size
        if total > MAX_DRAIN:
            return False
        while len(conn.buffer) < size:
            await conn.more()
        chunk = conn.take(size)
        if await conn.line(2, "chunk end"):
            raise HTTPError("chunk not followed by a line end")
        if len(kept) < keep:
            kept += chunk[: keep - len(kept)]
        chunks += 1
        if chunks % YIELD_EVERY == 0:  # many small chunks, all buffered: the loop gets a turn
            await asyncio.sleep(0)
    # trailer fields, to the empty line: read as header lines are
    buffer = conn.buffer
    start = 0
    while not (buffer[:1] == b"\n" or buffer[:2] == b"\r\n"):
        match = _HEAD_END.search(buffer, start, MAX_HEAD + 3)
        if match is not None:
            text = buffer[: match.start()].decode("latin-1")
            del buffer[: match.end()]
            if _bad_text(text):
                raise HTTPError("malformed response trailers")
            _fields(text)
            return True
        if len(buffer) >= MAX_HEAD + 3:
            raise HTTPError("response trailers too long")
        start = max(0, len(buffer) - 2)
        await conn.more()
    del buffer[: 1 if buffer[:1] == b"\n" else 2]
    return True


async def _read_until_close(conn: _Connection, keep: int, kept: bytearray) -> bool:
    """A body framed by the end of the connection: never reusable (False)."""
    total = 0
    while True:
        data = conn.take(len(conn.buffer))
        total += len(data)
        if len(kept) < keep:
            kept += data[: keep - len(kept)]
        if conn.eof or total > MAX_DRAIN:
            return False
        await conn.until_close()


_TLS: ssl.SSLContext | None = None


def _default_tls() -> ssl.SSLContext:
    global _TLS
    if _TLS is None:
        _TLS = ssl.create_default_context()
    return _TLS
