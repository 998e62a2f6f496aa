"""The delivery loop in process, with a real SQLite store and real peers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import resource
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bridge.carriers import Carriers
from bridge.delivery import Dispatcher
from bridge.destinations.base import Services
from bridge.destinations.webhook import WebhookDestination
from bridge.event import normalize
from bridge.ids import event_id
from bridge.postback import parse
from bridge.retry import RetryPolicy
from bridge.secret import Secret
from bridge.store import DeliveryFilter, NewDelivery
from bridge.store.sqlite import SQLiteStore
from tests.conftest import eventually, sms


def event(n: int) -> dict:
    return {"id": f"evt_{n:04d}", "type": "sms.received", "origin": "SMS_MO", "received_at": "2026-01-01T00:00:00.000Z"}


@pytest.mark.slow
async def test_a_retry_after_pause_gives_back_what_was_claimed_ahead(tmp_path: Path, webhook_client: str):
    """A 429 with Retry-After pauses the destination for longer than the leases of the
    deliveries already claimed ahead: they go back to the queue, and nothing is sent twice."""
    received: collections.Counter[str] = collections.Counter()
    first = True

    async def hook(request: web.Request) -> web.Response:
        nonlocal first
        body = await request.json()
        if first:
            first = False
            return web.Response(status=429, headers={"Retry-After": "4"})
        await asyncio.sleep(0.3)
        received[body["id"]] += 1
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"

    store = SQLiteStore(str(tmp_path / "b.db"))
    await store.open()
    http = aiohttp.ClientSession()
    destination = WebhookDestination("crm", url, timeout=0.5, client=webhook_client)
    destination.attempt_timeout = 1.0  # with lease_margin 0.5: leases of 2.5 s, under the 4 s pause
    destination.concurrency = 4
    destination.retry = RetryPolicy(initial=0.1, max_interval=60, max_age=3600)
    await destination.open(Services(http=http, state=store))
    for n in range(8):
        await store.ingest(event(n), f"k{n}", [NewDelivery("crm", "r", f"c{n}")])
    dispatcher = Dispatcher(store, {"crm": destination}, lease_margin=0.5)
    dispatcher.start()
    try:
        await eventually(lambda: len(received) >= 8, 30, raises=False)  # the assertions below say what is wrong
        await asyncio.sleep(1.0)  # room for a duplicate to show up
    finally:
        await dispatcher.stop()
        await http.close()
        await store.close()
        await runner.cleanup()
    assert set(received) == {event(n)["id"] for n in range(8)}
    assert {k: v for k, v in received.items() if v > 1} == {}


async def test_a_blocked_conversation_does_not_spin_the_loop(tmp_path: Path, sink):
    """Two texts of one conversation to an ordered destination, the first waiting for a retry:
    the second is due but held back, and the loop waits instead of asking the store again and
    again (which would burn a core and slow every postback)."""
    sink.default = 500
    store = SQLiteStore(str(tmp_path / "b.db"))
    await store.open()
    http = aiohttp.ClientSession()
    destination = WebhookDestination("crm", sink.url + "/hook", timeout=2)
    destination.ordered = True
    destination.retry = RetryPolicy(initial=30, max_interval=60, max_age=3600)
    await destination.open(Services(http=http, state=store))
    for n in range(2):
        await store.ingest(event(n), f"k{n}", [NewDelivery("crm", "r", "+15552312102|86717")])
    dispatcher = Dispatcher(store, {"crm": destination})
    dispatcher.start()
    try:
        await sink.wait_for(1)
        before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(2.0)
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await dispatcher.stop()
        await http.close()
        await store.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert len(sink.received) == 1, [(r.body, r.at) for r in sink.received]  # the second waits for the first, in order
    assert cpu < 0.5, f"the loop used {cpu:.2f} s of CPU in 2 s while it had nothing to send"


async def _latin1_smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A mail server that refuses every recipient in Latin-1, as some do."""
    writer.write(b"220 mail.example ESMTP\r\n")
    while line := await reader.readline():
        verb = line[:4].upper()
        if verb == b"EHLO":
            writer.write(b"250 mail.example\r\n")
        elif verb == b"RCPT":
            writer.write(b"550 5.1.1 Empf\xe4nger unbekannt\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            await writer.drain()
            break
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()
    writer.close()


async def test_a_reply_that_is_not_utf8_is_kept_and_spoils_no_other_result(tmp_path: Path, sink):
    """The SMTP reply's Latin-1 byte reaches us as a lone surrogate; the delivery is dead with a
    readable reason, and the webhook deliveries recorded in the same batches each go out once."""
    from bridge.destinations.email import EmailDestination
    from bridge.validate import Reader

    server = await asyncio.start_server(_latin1_smtp, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r = Reader()
    options = EmailDestination.parse(
        {
            "smtp": {"host": "127.0.0.1", "port": port, "security": "none"},
            "from": "b@example.com",
            "to": "c@example.com",
        },
        "destinations.mail",
        r,
    )
    assert options is not None, r.errors
    mail = EmailDestination("mail", options.smtp, options.envelope, subject=options.subject)
    store = SQLiteStore(str(tmp_path / "b.db"))
    await store.open()
    http = aiohttp.ClientSession()
    hook = WebhookDestination("crm", sink.url + "/hook", timeout=2)
    for destination in (mail, hook):
        await destination.open(Services(http=http, state=store))
    carriers = Carriers()
    events = [normalize(parse(sms(n)), event_id=f"evt_{n:04d}", received_at=datetime.now(UTC), carriers=carriers)
              for n in range(6)]  # fmt: skip
    for n, e in enumerate(events):
        await store.ingest(e, f"k{n}", [NewDelivery("mail", "r", f"c{n}"), NewDelivery("crm", "r", f"c{n}")])
    dispatcher = Dispatcher(store, {"mail": mail, "crm": hook})
    dispatcher.start()
    try:
        rows = []

        async def settled() -> bool:
            nonlocal rows
            rows = await store.list_deliveries(DeliveryFilter())
            return all(row.status != "pending" for row in rows)

        await eventually(settled, 20, lambda: f"no delivery pending: {rows}")
    finally:
        await dispatcher.stop()
        await http.close()
        await store.close()
        server.close()
    by_destination = collections.defaultdict(list)
    for row in rows:
        by_destination[row.destination].append(row)
    assert [row.status for row in by_destination["crm"]] == ["delivered"] * 6
    assert collections.Counter(request.json()["id"] for request in sink.received) == {e["id"]: 1 for e in events}
    for row in by_destination["mail"]:
        assert row.status == "dead" and "Empf\\udce4nger unbekannt" in row.last_error, row.last_error


async def test_a_webhook_sends_the_stored_json_as_it_is(tmp_path: Path, sink, webhook_client: str):
    """format: event sends the event as stored (no decoding and encoding again per delivery):
    the same bytes render() makes, signed over those bytes; cloudevents still wraps it."""
    from standardwebhooks import Webhook

    from bridge.destinations.webhook import render

    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    store = SQLiteStore(str(tmp_path / "b.db"))
    await store.open()
    http = aiohttp.ClientSession()
    plain = WebhookDestination("plain", sink.url + "/plain", secrets=[Secret(secret)], client=webhook_client)
    wrapped = WebhookDestination("wrapped", sink.url + "/wrapped", fmt="cloudevents", client=webhook_client)
    stored = normalize(
        parse(sms(1, text='Caf\u00e9 \U0001f600 &lt;ok&gt; &amp; "quoted"')),
        event_id=event_id(),
        received_at=datetime.now(UTC),
        carriers=Carriers(),
    )
    await store.ingest(stored, "k", [NewDelivery("plain", "r", "c"), NewDelivery("wrapped", "r", "c")])
    dispatcher = Dispatcher(store, {"plain": plain, "wrapped": wrapped})
    for destination in (plain, wrapped):
        await destination.open(Services(http=http, state=store))
    dispatcher.start()
    try:
        received = await sink.wait_for(2)
    finally:
        await dispatcher.stop()
        for destination in (plain, wrapped):
            await destination.close()
        await http.close()
        await store.close()
    by_path = {r.path: r for r in received}
    assert by_path["/plain"].body == render(stored, "event")[0]
    assert Webhook(secret).verify(by_path["/plain"].body, by_path["/plain"].headers) == stored
    assert by_path["/plain"].headers["webhook-id"] == stored["id"]
    assert json.loads(by_path["/wrapped"].body)["data"] == stored


class CountingStore(SQLiteStore):
    """The real SQLite store, counting the claims and the writes of attempt results."""

    claims = 0
    completes = 0
    next_dues = 0

    async def claim(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.claims += 1
        return await super().claim(*args, **kwargs)

    async def next_due(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.next_dues += 1
        return await super().next_due(*args, **kwargs)

    async def complete(self, results):  # type: ignore[no-untyped-def]
        self.completes += 1
        return await super().complete(results)


@contextlib.asynccontextmanager
async def delivering(store: SQLiteStore, url: str, *, ordered: bool = False) -> AsyncIterator[Dispatcher]:
    """`store` opened, one webhook destination `crm` to `url` and a running dispatcher for it;
    all stopped and closed afterwards."""
    await store.open()
    http = aiohttp.ClientSession()
    destination = WebhookDestination("crm", url)
    destination.ordered = ordered
    await destination.open(Services(http=http, state=store))
    dispatcher = Dispatcher(store, {"crm": destination})
    dispatcher.start()
    try:
        yield dispatcher
    finally:
        await dispatcher.stop()
        await destination.close()
        await http.close()
        await store.close()


async def test_postbacks_arriving_together_are_claimed_and_recorded_together(tmp_path: Path, sink):
    """A notify per postback, as the server sends: one claim takes the postbacks that came in
    about the same time, and their results are written together, instead of a store round
    trip (and a commit) per postback for each."""
    store = CountingStore(str(tmp_path / "b.db"))
    async with delivering(store, sink.url + "/hook") as dispatcher:
        await asyncio.sleep(0.1)  # the loop is idle, waiting
        for n in range(40):
            await store.ingest(event(n), f"k{n}", [NewDelivery("crm", "r", f"c{n}")])
            dispatcher.notify(["crm"])
        await sink.wait_for(40)
        await asyncio.sleep(0.2)
    assert len(sink.received) == 40
    assert store.claims <= 12, f"{store.claims} claims for 40 postbacks"
    assert store.completes <= 12, f"{store.completes} writes of results for 40 postbacks"


async def test_a_finished_attempt_does_not_make_an_idle_loop_claim_again(tmp_path: Path, sink):
    """Postbacks one at a time (a reply's pace): each is one claim and one look at when the
    next is due, not a second claim and look when its attempt finishes (it finds nothing: the
    claim before it found fewer than it asked for, and nothing was stored since)."""
    store = CountingStore(str(tmp_path / "b.db"))
    async with delivering(store, sink.url + "/hook") as dispatcher:
        await asyncio.sleep(0.1)  # the loop is idle, waiting
        claims, dues, began = store.claims, store.next_dues, time.monotonic()
        for n in range(8):
            await store.ingest(event(n), f"k{n}", [NewDelivery("crm", "r", f"c{n}")])
            dispatcher.notify(["crm"])
            await sink.wait_for(n + 1)
            await asyncio.sleep(0.05)  # recorded, and the loop idle again
        polls = int((time.monotonic() - began) / 1.0) + 1  # IDLE_POLL: it looks once a second anyway
        claims, dues = store.claims - claims, store.next_dues - dues
    assert claims <= 8 + polls, f"{claims} claims for 8 postbacks one at a time"
    assert dues <= 8 + polls, f"{dues} next_due for 8 postbacks one at a time"


class SlowNextDueStore(SQLiteStore):
    """The real SQLite store, answering "when is the next due" late, as a busy store does."""

    async def next_due(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        due = await super().next_due(*args, **kwargs)
        await asyncio.sleep(0.2)
        return due


async def test_a_conversations_next_message_is_not_held_when_its_verdict_comes_while_the_loop_looks(
    tmp_path: Path, sink
):
    """An ordered destination, two messages of one conversation, a fast receiver and a store slow
    to say when the next is due: the first's verdict is recorded while the loop asks, and the
    second is due but was held behind it. The loop claims it at once (a verdict recorded since
    its claim), not after its idle second (review of the replies' change: 1.2 s instead of 0.2)."""
    store = SlowNextDueStore(str(tmp_path / "b.db"))
    async with delivering(store, sink.url + "/hook", ordered=True) as dispatcher:
        await asyncio.sleep(1.3)  # idle, past its first look
        for n in (1, 2):
            await store.ingest(event(n), f"k{n}", [NewDelivery("crm", "r", "one conversation", True)])
        began = time.monotonic()
        dispatcher.notify(["crm"])
        await sink.wait_for(2)
        took = time.monotonic() - began
    assert [json.loads(r.body)["id"] for r in sink.received] == ["evt_0001", "evt_0002"]
    assert took < 0.8, f"the second message waited {took:.2f} s"


@pytest.mark.slow
async def test_a_backlog_to_a_destination_that_stays_down_is_dead_soon_after_max_age(tmp_path: Path, sink):
    """An always-500 destination is soon taken to be down and probed one delivery at a time, so
    most of a backlog waits in the store, unattempted. Past max_age it is dead all the same,
    within about a second, and nothing is tried after that."""
    sink.default = 500
    store = SQLiteStore(str(tmp_path / "b.db"))
    await store.open()
    http = aiohttp.ClientSession()
    destination = WebhookDestination("crm", sink.url + "/hook", timeout=2)
    destination.retry = RetryPolicy(initial=0.2, max_interval=5, max_age=2)
    await destination.open(Services(http=http, state=store))
    for n in range(8):
        await store.ingest(event(n), f"k{n}", [NewDelivery("crm", "r", f"c{n}")])
    created = min(row.created_at for row in await store.list_deliveries(DeliveryFilter()))
    dispatcher = Dispatcher(store, {"crm": destination})
    dispatcher.start()
    try:
        # not eventually(): the wait ends 3.5 s after the deliveries were made, not after it began
        while time.time() < created + 3.5:
            rows = await store.list_deliveries(DeliveryFilter())
            if all(row.status == "dead" for row in rows):
                break
            await asyncio.sleep(0.05)
        all_dead_at = time.time()
        requests = len(sink.received)
        await asyncio.sleep(1.0)  # room for a late attempt to show up
        attempts = {row.event_id: await store.attempts(row.id) for row in rows}
    finally:
        await dispatcher.stop()
        await destination.close()
        await http.close()
        await store.close()
    assert [row.status for row in rows] == ["dead"] * 8, [(r.status, r.attempts, r.last_error) for r in rows]
    assert all_dead_at - created < 3.5
    assert len(sink.received) == requests, "a dead delivery was tried again"
    for row in rows:
        assert "max_age 2s" in row.last_error, row.last_error
        assert all(a.at < row.created_at + 2 + 1.5 for a in attempts[row.event_id]), attempts[row.event_id]
    # every attempt went out once and was recorded: no duplicates, none unaccounted for
    sent = collections.Counter(r.json()["id"] for r in sink.received)
    assert sent == {e: len(a) for e, a in attempts.items() if a}
    assert all(len({a.number for a in a_list}) == len(a_list) for a_list in attempts.values())


async def test_a_destination_down_is_a_warning_and_back_up_is_news(tmp_path: Path, sink, caplog):
    """Five failures in a row take a destination to be down (a warning: someone may need to act);
    its coming back is good news, logged at info, not a second warning."""
    sink.responses = [500] * 5
    store = SQLiteStore(str(tmp_path / "b.db"))
    await store.open()
    http = aiohttp.ClientSession()
    destination = WebhookDestination("crm", sink.url + "/hook", timeout=2)
    destination.retry = RetryPolicy(initial=0.01, max_interval=0.05, max_age=30)
    await destination.open(Services(http=http, state=store))
    await store.ingest(event(1), "k1", [NewDelivery("crm", "r", "c1")])
    dispatcher = Dispatcher(store, {"crm": destination})
    caplog.set_level(logging.INFO, logger="bridge")
    dispatcher.start()
    try:
        await sink.wait_for(6)
        await eventually(  # raises=False: the assertion below says what is wrong
            lambda: any(r.getMessage() == "destination back up" for r in caplog.records),
            waits=100,
            interval=0.02,
            raises=False,
        )
    finally:
        await dispatcher.stop()
        await destination.close()
        await http.close()
        await store.close()
    levels = {r.getMessage(): r.levelno for r in caplog.records if r.getMessage().startswith("destination ")}
    assert levels == {
        "destination down: probing one delivery at a time": logging.WARNING,
        "destination back up": logging.INFO,
    }
