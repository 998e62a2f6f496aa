"""Differential fuzzing of the webhook client (bridge.http1) against h11 (issue 17, section 5).

Hypothesis makes a response: 1xx runs, a status line (well-formed or not), header lines (valid,
malformed, folded, huge), a framing (Content-Length right, short, long, listed, conflicting or
bad; chunked with extensions, trailers, bad sizes; both; gzip; none), CRLF or bare-LF line ends,
a cut, stray bytes after it. A real server on 127.0.0.1 sends it to the client in pieces, then
closes the connection or holds it. The client's verdict (delivered / retry / dead, as the
webhook destination classifies it) and whether it keeps the connection for the next request
must be what h11 makes of the same bytes; and no case may hold the event loop for 50 ms.

The oracle is h11 (fed 1 KB at a time, as a socket would, with its head limit set to ours)
with the client's deliberate differences written in, each in `expected`:

- The status decides. A 2xx counts once its status line is in, whatever follows (a malformed
  head, one over 64 KB, one that never ends): h11 sees an error or nothing, the client sees
  the receiver saying it has the event. The status line is judged by h11's own grammar.
  Another status counts once h11 has its head (h11's Response event), whatever the body does.
- At most 16 interim (1xx) responses; h11 takes any number.
- HTTP/1.x only; h11 takes any HTTP/d.d.
- Chunked framing may use bare-LF line ends (RFC 9112 2.2 lets a recipient take them, and the
  client always has); h11 wants CRLF, so it is given the same response with CRLF there.
- A connection is not kept after a 204/304 that announces a body, a Transfer-Encoding beside a
  Content-Length (ambiguous framing), or a `Keep-Alive: timeout=1` (the client keeps an idle
  connection 1 s less than the server says); h11 would keep it.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h11
import pytest
from h11._abnf import status_line as h11_status_line  # h11's own grammar, for the 2xx rule
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from bridge import http1
from bridge.retry import Delivered, classify_http
from tests.conftest import loop_watch

TIMEOUT = 0.3  # the client's, per attempt: a response held open and incomplete costs this
PATIENCE = 0.1  # BODY_PATIENCE here: what follows a deciding status
LAG = 0.05  # the longest the event loop may be held, in CPU seconds

FUZZ = settings(
    max_examples=200,
    deadline=5000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

_H11_STATUS = re.compile(h11_status_line.encode("ascii"))
_BLANK_LINE = re.compile(rb"\n\r?\n")  # where h11 (and the client) end a head


# ---------------------------------------------------------------------------- the responses


@dataclass
class Case:
    data: bytes  # what the server sends
    for_h11: bytes  # the same response as h11 is given it (CRLF in chunked framing)
    closes: bool  # the server closes after sending, else holds the connection
    cuts: list[int] = field(default_factory=list)  # where the data is split across writes
    no_reuse: bool = False  # a rule of the client's own keeps it from reusing the connection

    def __repr__(self) -> str:  # what a failure shows: the start of the bytes, not 500 KB of them
        shown = self.data if len(self.data) <= 400 else self.data[:300] + b"..." + self.data[-60:]
        return f"Case(data={shown!r} ({len(self.data)} bytes), closes={self.closes}, cuts={self.cuts})"

    def pieces(self) -> list[bytes]:
        at = [0, *sorted({c for c in self.cuts if 0 < c < len(self.data)}), len(self.data)]
        return [self.data[a:b] for a, b in itertools.pairwise(at)]


STATUS_CODES = [200, 201, 202, 204, 206, 299, 301, 304, 400, 404, 408, 410, 418, 429, 500, 503, 599, 600, 999]
VERSIONS = [b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/1.2"]
REASONS = [b" OK", b" OK", b"", b" ", b" Caf\xe9", b" with\ttab", b" x\x7f"]
BAD_STATUS_LINES = [
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 20 OK",
    b"HTTP/1.1  200 OK",
    b"HTTP/1.10 200 OK",
    b"HTTP/2.0 200 OK",
    b"HTTP/0.9 200 OK",
    b"http/1.1 200 OK",
    b"HTTP/1.1 200\tOK",
    b"HTTP/1.1 2\xb20 OK",
    b"HTTP/1.1 099 Low",
    b"HTTP/1.1 000 Zero",
    b"HTTP/1.1 101 Switching Protocols",
    b"HTTP/1.1 200 O\x00K",
    b"HTTP/1.1 200 O\rK",
    b" HTTP/1.1 200 OK",
    b"SSH-2.0-OpenSSH_9.6",
    b"",
]
INTERIM = [b"HTTP/1.1 100 Continue", b"HTTP/1.1 102 Processing", b"HTTP/1.1 103 Early Hints", b"HTTP/1.0 100 Continue"]
FIELDS = [
    b"Content-Type: text/plain",
    b"Server: fuzz",
    b"X-A:1",
    b"X-Pad:  v  ",
    b"X-Tab:\tv\t",
    b"X-Empty:",
    b"Vary: a",
    b"Vary: b",
    b"Retry-After: 5",
    b"Retry-After: \xb2",
    b"X-Obs: caf\xe9",
    b"X-Ctl: a\x01b",
    b" folded continuation",
    b"\tfolded too",
]
BAD_FIELDS = [
    b"no colon here",
    b"Bad Name: x",
    b": empty name",
    b"X : spaced",
    b"X: a\x00b",
    b"X: a\rb",
    b"X: a\x0bb",
    b"X: a\x0cb",
    b"X\x80: y",
    b"X-Big: " + b"a" * (70 * 1024),  # a head over MAX_HEAD
]
CONNECTION = [None, None, b"close", b"keep-alive", b"Close", b"keep-alive, close", b"closed", b"upgrade"]
KEEP_ALIVE = [None, None, None, b"timeout=5", b"timeout=1", b"max=10"]
FRAMINGS = [
    "length",
    "length",
    "length",
    "length",
    "length-more",
    "length-less",
    "length-list",
    "length-conflict",
    "length-twice",
    "length-bad",
    "chunked",
    "chunked",
    "chunked",
    "chunked-bad",
    "chunked+length",
    "te-gzip",
    "te-twice",
    "none",
    "none",
]


@st.composite
def chunked(draw: st.DrawFn, body: bytes, *, bad: bool, clean: bool) -> tuple[bytes, bytes, bool]:
    """(as sent, as h11 is given it, whether the chunk framing uses bare LF)."""
    lf = draw(st.sampled_from([False, False, False, True]))
    sizes = draw(st.lists(st.integers(1, 40), max_size=6))
    chunks, rest = [], body
    for size in sizes:
        if rest:
            chunks.append(rest[:size])
            rest = rest[size:]
    if rest:
        chunks.append(rest)
    parts: list[tuple[bytes, bytes]] = []  # (size line, data)
    for chunk in chunks:
        ext = draw(st.sampled_from([b"", b"", b";ext=1", b';q="a b"', b"  "]))
        parts.append((b"%x" % len(chunk) + ext, chunk))
    last = draw(st.sampled_from([b"0", b"0", b"000", b"0;end"]))
    trailers = draw(st.sampled_from([[], [], [b"X-Trailer: t"], [b"X-T: 1", b"X-U: 2"], *([] if clean else [[b"no"]])]))
    if bad:
        where = draw(st.integers(0, len(parts)))
        broken = draw(st.sampled_from([b"zz", b"-3", b"0x5", b" 5", b"1" * 21, b"5\x00"]))
        parts.insert(where, (broken, b"abcde"))

    def render(eol: bytes) -> bytes:
        out = b"".join(size + eol + data + eol for size, data in parts)
        return out + last + eol + b"".join(t + eol for t in trailers) + eol

    return render(b"\n" if lf else b"\r\n"), render(b"\r\n"), lf


@st.composite
def responses(draw: st.DrawFn) -> Case:
    crlf = draw(st.sampled_from([True, True, True, False]))

    def eol() -> bytes:
        return b"\r\n" if crlf or draw(st.booleans()) else b"\n"

    def head(status_line: bytes, lines: list[bytes]) -> bytes:
        out = b"".join(line + eol() for line in [status_line, *lines])
        return out + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))  # `\n\r\n` ends some

    # a well-formed response that keeps its connection, two times in five: so that keeping it is
    # tried as often as each way of breaking it
    clean = draw(st.integers(0, 4)) < 2
    interim_count = draw(st.sampled_from([0, 1, 2] if clean else [0, 0, 0, 0, 1, 2, 16, 17]))
    heads = [head(draw(st.sampled_from(INTERIM)), []) for _ in range(interim_count)]
    if not clean and draw(st.integers(0, 7)) == 0:
        status_line = draw(st.sampled_from(BAD_STATUS_LINES))
        status = 0
    else:
        status = draw(st.sampled_from(STATUS_CODES))
        status_line = draw(st.sampled_from(VERSIONS)) + b" %03d" % status + draw(st.sampled_from(REASONS))
    lines = draw(st.lists(st.sampled_from(FIELDS), max_size=4))
    if not clean and draw(st.integers(0, 3)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(BAD_FIELDS)))
    connection, keep_alive = draw(st.sampled_from(CONNECTION)), draw(st.sampled_from(KEEP_ALIVE))
    if clean:
        connection = draw(st.sampled_from([None, b"keep-alive"]))
        keep_alive = draw(st.sampled_from([None, b"timeout=5"]))
    if connection is not None:
        lines.append(b"Connection: " + connection)
    if keep_alive is not None:
        lines.append(b"Keep-Alive: " + keep_alive)
    body = draw(st.binary(max_size=200))
    framing = draw(st.sampled_from(["length", "length-list", "chunked"] if clean else FRAMINGS))
    sent = for_h11 = body
    lf_chunks = False
    announced = 0  # the body length a 204/304 announces (a body it cannot have)
    if framing in ("length", "length-list", "length-twice"):
        announced = len(body)
        one = b"%d" % len(body)
        lines += {"length": [b"Content-Length: " + one], "length-twice": [b"Content-Length: " + one] * 2}.get(
            framing, [b"Content-Length: " + one + b", " + one]
        )
    elif framing in ("length-more", "length-less"):
        announced = max(0, len(body) + draw(st.integers(1, 50)) * (1 if framing == "length-more" else -1))
        lines.append(b"Content-Length: %d" % announced)
    elif framing == "length-conflict":
        lines.append(b"Content-Length: %d, %d" % (len(body), len(body) + 1))
    elif framing == "length-bad":
        bad = draw(st.sampled_from([b"+%d" % len(body), b"%dx" % len(body), b"0x%x" % len(body), b"", b"1" * 21]))
        lines.append(b"Content-Length: " + bad)
    elif framing.startswith("chunked"):
        lines.append(b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked", b"Chunked", b"chunked "])))
        if framing == "chunked+length":
            lines.append(b"Content-Length: %d" % len(body))
        sent, for_h11, lf_chunks = draw(chunked(body, bad=framing == "chunked-bad", clean=clean))
    elif framing == "te-gzip":
        lines.append(b"Transfer-Encoding: " + draw(st.sampled_from([b"gzip", b"gzip, chunked", b"identity"])))
    elif framing == "te-twice":
        lines += [b"Transfer-Encoding: chunked"] * 2
    final = head(status_line, lines)
    data, h11_data = b"".join(heads) + final + sent, b"".join(heads) + final + for_h11
    if not clean and draw(st.integers(0, 5)) == 0:  # stray bytes after the response
        stray = draw(st.sampled_from([b"HTTP/1.1 200 OK\r\n\r\n", b"x", b"\r\n"]))
        data, h11_data = data + stray, h11_data + stray
    if not clean and not lf_chunks and draw(st.integers(0, 3)) == 0:  # cut short (then closed or held)
        data = h11_data = data[: draw(st.integers(0, len(data)))]
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=4))
    closes = not clean and draw(st.booleans())
    no_reuse = (
        (status in (204, 304) and (announced > 0 or framing.startswith("chunked")))
        or framing == "chunked+length"
        or keep_alive == b"timeout=1"
    )
    return Case(data, h11_data, closes, cuts, no_reuse)


# ---------------------------------------------------------------------------- the oracle


def verdict_of(status: int) -> str:
    """delivered / retry / dead, as the webhook destination classifies an answer."""
    outcome = classify_http(status, {}, time.time())
    if isinstance(outcome, Delivered):
        return "delivered"
    return "retry" if outcome.retryable else "dead"


def status_line_2xx_in(data: bytes, head: int) -> bool:
    """Whether the `head`-th head of `data` (after `head` heads h11 read whole) starts with a whole
    status line, by h11's grammar, of HTTP/1.x and a 2xx status."""
    at = 0
    for _ in range(head):
        match = _BLANK_LINE.search(data, at)
        assert match is not None
        at = match.end()
    end = data.find(b"\n", at)
    if end < 0:
        return False
    line = data[at:end].removesuffix(b"\r")
    match = _H11_STATUS.fullmatch(line)
    return match is not None and match["http_version"][:1] == b"1" and 200 <= int(match["status_code"]) < 300


def expected(case: Case) -> tuple[str, bool]:
    """(verdict, reused) by h11, with the client's own rules (see the module's docstring)."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=http1.MAX_HEAD)
    conn.send(h11.Request(method="POST", target="/hook", headers=[("Host", "127.0.0.1"), ("Content-Length", "1")]))
    conn.send(h11.Data(data=b"1"))
    conn.send(h11.EndOfMessage())
    data, fed, eof = case.for_h11, 0, False
    heads: list[h11.InformationalResponse | h11.Response] = []
    ended = failed = False
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if fed < len(data):
                    conn.receive_data(data[fed : fed + 1024])
                    fed += 1024
                elif case.closes and not eof:
                    conn.receive_data(b"")
                    eof = True
                else:
                    break
            elif isinstance(event, h11.InformationalResponse | h11.Response):
                heads.append(event)
                if len(heads) > http1.MAX_INTERIM + 1:
                    break
            elif isinstance(event, h11.EndOfMessage):
                ended = True
                break
            elif isinstance(event, h11.ConnectionClosed):
                break
    except h11.RemoteProtocolError:
        failed = True
    for n, response in enumerate(heads):
        if response.http_version[:1] != b"1":  # HTTP/1.x only
            return "retry", False
        if isinstance(response, h11.Response):
            break
        if n + 1 > http1.MAX_INTERIM:  # at most 16 interim responses
            return "retry", False
    final = heads[-1] if heads and isinstance(heads[-1], h11.Response) else None
    if final is None:  # no head h11 read whole: a 2xx status line is enough; else retried
        return ("delivered" if status_line_2xx_in(data, len(heads)) else "retry"), False
    rest = conn.trailing_data[0] if ended else b""
    reused = (
        ended
        and not failed
        and not case.closes
        and conn.their_state is h11.DONE
        and not rest
        and fed >= len(data)
        and not case.no_reuse
    )
    return verdict_of(final.status_code), reused


# ---------------------------------------------------------------------------- the client, for real


class Stage:
    """One server on 127.0.0.1 for every example: each connection is sent the current case."""

    def __init__(self) -> None:
        self.case: Case | None = None
        self.sent = asyncio.Event()
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        case = self.case
        assert case is not None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
            for piece in case.pieces():
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)
            self.sent.set()
            if not case.closes:
                await self.release.wait()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.sent.set()
        finally:
            writer.close()


@pytest.fixture
async def stage() -> AsyncIterator[Stage]:
    s = Stage()
    server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    s.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    yield s
    s.release.set()
    server.close()


async def observed(stage: Stage, case: Case) -> tuple[str, bool, float]:
    """(verdict, whether the connection is kept for the next request, the longest loop hold)."""
    stage.case, stage.sent, stage.release = case, asyncio.Event(), asyncio.Event()
    client = http1.Client()
    try:
        async with loop_watch(gc_off=True) as longest:
            try:
                verdict = verdict_of((await client.post(stage.url, b"1", {}, timeout=TIMEOUT)).status)
            except (http1.HTTPError, TimeoutError):
                verdict = "retry"
            await asyncio.wait_for(stage.sent.wait(), 5)
            await asyncio.sleep(0.02)  # stray bytes or the end of the connection, if any, arrive
            now = time.monotonic()
            kept = any(conn.usable(now) for idle in client._idle.values() for conn in idle)
    finally:
        stage.release.set()
        await client.close()
    return verdict, kept, longest[0]


def case_of(data: bytes, *, closes: bool = True, no_reuse: bool = False) -> Case:
    return Case(data, data, closes, [], no_reuse)


@FUZZ
@given(case=responses())
@example(case=case_of(b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
@example(case=case_of(b"HTTP/1.1 100 Continue\r\n\r\n" * 16 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
@example(case=case_of(b"HTTP/1.1 100 Continue\r\n\r\n" * 20000, closes=False))
@example(case=case_of(b"HTTP/1.1 500 No\r\nContent-Length: 2\n\r\nok", closes=False))
@example(case=case_of(b"HTTP/1.1 200 OK\r\nno colon\r\nContent-Length: 2\r\n\r\nok"))
@example(case=case_of(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", closes=False))
@example(case=case_of(b"HTTP/1.1 410 Gone\r\nContent-Length: 9\r\n\r\ngone", closes=False))
@example(case=case_of(b"HTTP/1.1 099 Odd\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
@example(case=case_of(b"HTTP/1.1 503 Busy\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n", closes=False))
@example(case=case_of(b"HTTP/1.1 500 No\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\na\r\n" * 5000 + b"0\r\n\r\n"))
async def test_the_client_reads_a_response_as_h11_does(stage, monkeypatch, case):
    monkeypatch.setattr(http1, "BODY_PATIENCE", PATIENCE)
    want = expected(case)
    verdict, kept, longest = await observed(stage, case)
    event(f"{verdict}, {'kept' if kept else 'not kept'}")  # --hypothesis-show-statistics
    assert (verdict, kept) == want, (case.data[:300], case.closes, case.pieces()[:3])
    assert longest < LAG, f"the event loop was held {longest * 1000:.0f} ms"


def test_the_oracle_itself():
    """h11 as read here, on cases whose answer is known (so a broken oracle cannot agree with a
    broken client)."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert expected(case_of(ok, closes=False)) == ("delivered", True)
    assert expected(case_of(ok)) == ("delivered", False)  # the server closed
    assert expected(case_of(ok + b"x", closes=False)) == ("delivered", False)  # stray bytes
    assert expected(case_of(b"HTTP/1.1 410 Gone\r\nContent-Length: 9\r\n\r\ngone", closes=False)) == ("dead", False)
    assert expected(case_of(b"HTTP/1.1 500 No\r\nContent-Length: 0\r\n\r\n", closes=False)) == ("retry", True)
    assert expected(case_of(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n")) == ("delivered", False)
    assert expected(case_of(b"HTTP/1.1 500 OK\r\nno colon\r\n\r\n")) == ("retry", False)
    assert expected(case_of(b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + ok)) == ("retry", False)
    assert expected(case_of(b"HTTP/1.1 100 Continue\r\n\r\n" * 16 + ok, closes=False)) == ("delivered", True)
    assert expected(case_of(b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")) == ("retry", False)
    assert expected(case_of(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n")) == ("delivered", False)
    assert expected(case_of(b"HTTP/1.1 204 No\r\nContent-Length: 3\r\n\r\n", no_reuse=True)) == ("delivered", False)
    assert expected(case_of(b"HTTP/1.1 201 Cre", closes=False)) == ("retry", False)  # no whole status line
    assert expected(case_of(b"HTTP/1.1 301 Moved\r\nContent-Length: 0\r\n\r\n", closes=False)) == ("dead", True)
