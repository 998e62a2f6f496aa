"""A malicious webhook receiver (issue 17, section 5): one receiver cannot freeze the bridge.

The receivers are raw asyncio servers on 127.0.0.1; the bridge is the real `postback-bridge
serve` process, where the issue saw the harm (/healthz and postbacks stalled for seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import post, sms

ADMIN = "adm_Q2w9Ztk4"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def receiver(handle: Handler) -> AsyncIterator[str]:
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


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


async def admin(url: str, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + path, headers={"Authorization": f"Bearer {ADMIN}"}) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


# ---------------------------------------------------------------------------- 1xx without end


async def endless_continue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """`100 Continue` over and over, 512 KB at a time, for as long as the bridge reads."""
    await read_request(reader)
    block = CONTINUE * (512 * 1024 // len(CONTINUE))
    while True:
        writer.write(block)
        await writer.drain()


async def timed(request: Awaitable[Any]) -> float:
    started = time.monotonic()
    await request
    return time.monotonic() - started


async def test_a_receiver_that_answers_100_continue_without_end_does_not_freeze_the_bridge(bridge_factory):
    """Issue 17: 512 KB of 1xx heads held the event loop 5.8 s; with 8 such deliveries a postback
    took over 10 s (Skycore gives up at 10 s). Eight deliveries retry against it all along here,
    and /healthz and postbacks must stay fast, each attempt ending well within its timeout."""
    async with receiver(endless_continue) as url:
        bridge = bridge_factory(
            {
                "server": {"admin_token": ADMIN},
                "retry": {"initial": "50ms", "max_interval": "100ms", "max_age": "1h"},
                "destinations": {"evil": {"type": "webhook", "url": url + "/hook", "timeout": "2s"}},
                "default": ["evil"],
            }
        )
        bridge.start()
        ids = []
        for n in range(8):
            status, body = await post(bridge.url + "/postback", sms(n))
            assert status == 200
            ids.append(body["id"])
        slowest = 0.0
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 3
            n = 100
            while time.monotonic() < deadline:
                slowest = max(slowest, await timed(session.get(bridge.url + "/healthz")))
                slowest = max(slowest, await timed(post(bridge.url + "/postback", sms(n := n + 1))))
                await asyncio.sleep(0.05)
        assert slowest < 1.0, f"a request took {slowest:.2f} s while the receiver flooded the bridge"
        attempts = []
        for event_id in ids:
            (delivery,) = (await admin(bridge.url, f"/admin/events/{event_id}"))["deliveries"]
            assert delivery["status"] == "pending"  # retried, never delivered nor dead
            attempts += delivery["attempt_log"]
        assert len(attempts) >= 16  # the receiver was tried all along
        for attempt in attempts:
            assert attempt["outcome"] == "retry" and "more than 16 interim (1xx) responses" in attempt["error"]
            assert attempt["duration_ms"] < 2000 + 500
        assert bridge.stop() == 0
