"""A malicious webhook receiver (issue 17, section 5): one receiver cannot freeze the bridge, and
what it echoes back of the request does not leak a secret into the reason.

The receivers are raw asyncio servers on 127.0.0.1; the bridge is the real `postback-bridge
serve` process where the issue saw the harm (/healthz and postbacks stalled for seconds), and the
webhook destination itself where every offset of a secret against the cut is tried.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from bridge.destinations.base import Attempt, Services
from bridge.destinations.webhook import REASON_BYTES, WebhookDestination
from bridge.retry import Failed
from bridge.secret import Secret
from tests.conftest import eventually, post, raw_receiver, read_request, sms

ADMIN = "adm_Q2w9Ztk4"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


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


@pytest.mark.slow
async def test_a_receiver_that_answers_100_continue_without_end_does_not_freeze_the_bridge(bridge_factory):
    """Issue 17: 512 KB of 1xx heads held the event loop 5.8 s; with 8 such deliveries a postback
    took over 10 s (Skycore gives up at 10 s). Eight deliveries retry against it all along here,
    and /healthz and postbacks must stay fast, each attempt ending well within its timeout.
    (The builtin client only: aiohttp's reads 1xx heads without a cap or a turn for the loop, and
    held it 1.7 s here; docs/destinations/webhook.md says so.)"""
    async with raw_receiver(endless_continue) as url:
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


# ---------------------------------------------------------------------------- echoed secrets

API_KEY = "k3y_Vq8RtZ2mW9xLp4Hs7Nc1"  # 24 characters
PASSWORD = "Pa55w0rd-Sekret-99"
SIGNING = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BASIC = "Y3JtOlBhNTV3MHJkLVNla3JldC05OQ=="  # crm:Pa55w0rd-Sekret-99


def leaks(text: str) -> list[str]:
    """Any 6 characters in a row of a secret that are in `text`."""
    found = []
    for secret in (API_KEY, PASSWORD, BASIC, SIGNING.removeprefix("whsec_")):
        found += [secret[i : i + 6] for i in range(len(secret) - 5) if secret[i : i + 6] in text]
    return found


def echoing(pads: list[bytes]) -> Handler:
    """Answers 400 with the next of `pads`, then the request as it came (head and body)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            body = pads.pop(0) + request
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

    return handle


def paddings() -> list[bytes]:
    """Four-byte characters (so the cut at 512 bytes falls within the 200 characters the reason
    keeps) and 0-3 ASCII bytes: each offset of each secret against byte 512 comes up."""
    return ["😀".encode() * m + b"a" * j for m in range(95, 128) for j in range(4)]


async def test_a_secret_the_receiver_echoes_across_the_cut_is_masked_whole(webhook_client):
    """Masking ran after the cut to 512 bytes: a secret straddling it (17 of 24 characters of an
    X-Api-Key, the start of a Basic password) was left in the reason, the admin API and the log."""
    pads = paddings()
    async with raw_receiver(echoing(list(pads))) as url:
        destination = WebhookDestination(
            "crm",
            url.replace("http://", f"http://crm:{PASSWORD}@") + "/hook",
            headers={"X-Api-Key": Secret(API_KEY)},
            secrets=[Secret(SIGNING)],
            client=webhook_client,
        )
        http = aiohttp.ClientSession()  # what `client: aiohttp` sends with; the builtin one needs none
        await destination.open(Services(http=http, state=None))  # type: ignore[arg-type]  (no state either)
        try:
            for n, pad in enumerate(pads):
                outcome = await destination.send_stored('{"id":"evt_1"}', Attempt(n, 1, "c", "evt_1"))
                assert isinstance(outcome, Failed) and outcome.status == 400
                assert not leaks(outcome.reason), (len(pad), outcome.reason)
                assert outcome.reason.startswith("HTTP 400: 😀😀😀")  # the start of the answer is kept
        finally:
            await destination.close()
            await http.close()


def straddling(within: list[bool]) -> Handler:
    """Answers 400 with padding, then the request as it came: the padding is worked out from the
    request so that, in turn, the X-Api-Key and the Basic credentials straddle byte 512 at
    several points. `within` says of each whether the secret starts early enough in the masked
    answer for 6 of its characters to be in the 200 the reason keeps."""
    targets = [(secret, k) for k in (1, 7, 13, 19) for secret in (API_KEY.encode(), BASIC.encode())]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while True:
            request = await read_request(reader)
            secret, k = targets[n % len(targets)]
            n += 1
            size = REASON_BYTES - request.index(secret) - k  # the secret's first k bytes fit in 512
            pad = "😀".encode() * (size // 4) + b"a" * (size % 4)
            before = request[: request.index(secret)].replace(BASIC.encode(), b"*" * 10)  # as masked
            within.append(size // 4 + size % 4 + len(before) + 6 <= 200)
            body = pad + request
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

    return handle


async def test_the_stored_reason_the_admin_api_and_the_log_hold_no_part_of_an_echoed_secret(
    bridge_factory, webhook_client
):
    within: list[bool] = []
    async with raw_receiver(straddling(within)) as url:
        bridge = bridge_factory(
            {
                "server": {"admin_token": ADMIN},
                "destinations": {
                    "crm": {
                        "type": "webhook",
                        "url": url.replace("http://", f"http://crm:{PASSWORD}@") + "/hook",
                        "headers": {"X-Api-Key": API_KEY},
                        "secret": SIGNING,
                        "client": webhook_client,
                    }
                },
                "default": ["crm"],
            }
        )
        bridge.start()
        status, body = await post(bridge.url + "/postback", sms(1))
        assert status == 200
        # a 400 is dead at once: one attempt, then a replay for the next, 8 in all
        for n in range(8):

            async def dead_after(attempts: int = n + 1) -> Any:
                event = await admin(bridge.url, f"/admin/events/{body['id']}")
                delivery = event["deliveries"][0]
                return event if delivery["status"] == "dead" and len(delivery["attempt_log"]) == attempts else None

            event = await eventually(dead_after, waits=200, interval=0.02, what=f"dead after {n + 1} attempts")
            delivery = event["deliveries"][0]
            if n < 7:
                async with aiohttp.ClientSession() as session:
                    replay = bridge.url + f"/admin/deliveries/{delivery['id']}/replay"
                    async with session.post(replay, headers={"Authorization": f"Bearer {ADMIN}"}) as response:
                        assert response.status == 200
        assert bridge.stop() == 0
    assert within == [True] * 8
    shown = json.dumps(event, ensure_ascii=False)
    errors = [attempt["error"] for attempt in event["deliveries"][0]["attempt_log"]]
    assert len(errors) == 8 and all(error.startswith("HTTP 400: 😀😀😀") for error in errors)  # the start is kept
    assert not leaks(shown), leaks(shown)
    assert not leaks(bridge.stderr() + bridge.stdout()), leaks(bridge.stderr())
