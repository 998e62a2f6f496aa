"""PostgreSQL group commit and wake-up across instances (issue 21): a burst of postbacks goes in
a few transactions and each is answered only after its own commit; one bad row fails only its
postback; a postback stored by one instance is picked up by another's delivery loop at once
(LISTEN/NOTIFY), also after its LISTEN connection was cut; and connections cut in the middle of
batches lose nothing that was answered, and answer nothing before its commit.

Needs BRIDGE_TEST_POSTGRES_URL, as tests/test_store_contract.py. Every connection goes to
127.0.0.1: the proxy here cuts its own connections, never the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest

from bridge.delivery import Dispatcher
from bridge.destinations.base import Services
from bridge.destinations.webhook import WebhookDestination
from bridge.errors import StoreError
from bridge.event import dedup_key
from bridge.retry import Dead, Done, RetryPolicy
from bridge.store import DeliveryFilter, Ingested, NewDelivery
from bridge.store import postgres as postgres_store
from bridge.store.postgres import PostgresStore
from tests import test_store_contract as contract
from tests.conftest import BridgeProcess, eventually, sms
from tests.test_store_contract import hook_config, make_event, via, wait_for_ids

pg_url = contract.pg_url  # the fixture: a fresh schema per test


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


# ---------------------------------------------------------------------------- group commit


async def test_a_burst_is_stored_in_a_few_transactions_and_each_postback_answered(pg_url):
    async with opened(pg_url) as store:
        events = [make_event(n) for n in range(200)]
        repeats = [make_event(n) for n in (3, 150)]  # Skycore's retries, within the burst
        results = await asyncio.gather(
            *(
                store.ingest(e, dedup_key(e), [NewDelivery("crm", "r", f"c{n}")] if n % 10 else [])
                for n, e in enumerate([*events, *repeats])
            )
        )
        assert results[:200] == [Ingested("accepted", e["id"]) for e in events]
        assert results[200:] == [Ingested("duplicate", events[3]["id"]), Ingested("duplicate", events[150]["id"])]
        admin = await asyncpg.connect(pg_url)
        try:
            # xmin: the transaction that inserted a row. One per batch, not one per postback.
            transactions = await admin.fetchval("SELECT count(DISTINCT xmin::text) FROM events")
            assert 1 <= transactions <= 10, transactions
            # each event's deliveries (or its dropped row) committed with it
            apart = await admin.fetchval(
                "SELECT count(*) FROM deliveries AS d JOIN events AS e ON e.id = d.event_id"
                " WHERE d.xmin::text <> e.xmin::text"
            )
            assert apart == 0
            assert await admin.fetchval("SELECT count(*) FROM deliveries") == 180
            assert await admin.fetchval("SELECT count(*) FROM dropped") == 20
        finally:
            await admin.close()
        # ordered deliveries of one conversation keep the order the postbacks came in
        conv = [make_event(1000 + n) for n in range(50)]
        await asyncio.gather(*(store.ingest(e, dedup_key(e), [NewDelivery("slack", "r", "one")]) for e in conv))
        rows = await store.list_deliveries(DeliveryFilter(destination="slack", limit=100))
        assert [r.event_id for r in sorted(rows, key=lambda r: r.id)] == [e["id"] for e in conv]


async def test_a_batch_draws_no_delivery_id_before_it_holds_its_conversations_locks(pg_url):
    """A conversation's delivery ids commit in id order across instances: a batch with an
    ordered delivery waits, in its one statement, for the lock of that conversation before it
    draws an id. Here another instance (an admin connection doing what ingest_batch does) holds
    the lock, and draws its id only after our batch has started waiting: ours comes after it."""
    async with opened(pg_url) as store:
        theirs = make_event(1)
        await store.ingest(theirs, dedup_key(theirs), [])
        admin = await asyncpg.connect(pg_url)
        try:
            other = admin.transaction()
            await other.start()
            await admin.execute("SELECT pg_advisory_xact_lock($1)", postgres_store._key("slack", "one"))
            ours = make_event(2)
            waiting = asyncio.create_task(store.ingest(ours, dedup_key(ours), [NewDelivery("slack", "r", "one")]))
            await asyncio.sleep(0.5)
            assert not waiting.done(), "the batch went on while another held its conversation's lock"
            their_id = await admin.fetchval(
                "INSERT INTO deliveries (event_id, destination, route, conversation, ordered, status, created_at,"
                " next_at, updated_at) VALUES ($1, 'slack', 'r', 'one', true, 'pending', 0, 0, 0) RETURNING id",
                theirs["id"],
            )
            await other.commit()
            assert await asyncio.wait_for(waiting, 10) == Ingested("accepted", ours["id"])
        finally:
            await admin.close()
        rows = await store.list_deliveries(DeliveryFilter(destination="slack"))
        assert [r.event_id for r in sorted(rows, key=lambda r: r.id)] == [theirs["id"], ours["id"]]
        assert {r.event_id: r.id for r in rows}[theirs["id"]] == their_id


async def test_the_text_index_is_merged_off_the_postbacks_path(pg_url, monkeypatch):
    """Migration 0004's trigram index takes new events in its pending list; the store merges the
    list every TEXT_INDEX_MERGE_EVERY seconds while events come, so that no postback's insert
    finds it full and merges it while its postbacks wait. Afterwards nothing is left to merge
    (gin_clean_pending_list, which merges what is left, finds no page), and text search finds
    every event, merged or not."""
    monkeypatch.setattr(postgres_store, "TEXT_INDEX_MERGE_EVERY", 0.2)
    async with opened(pg_url) as store:
        if not store._text_index:
            pytest.skip("pg_trgm is not on this server: no text index to merge")
        events = [make_event(n, text=f"a pizza order number {n}") for n in range(300)]
        await asyncio.gather(*(store.ingest(e, dedup_key(e), []) for e in events))
        found = await store.list_events(contract.EventFilter(text="PIZZA ORDER", limit=500))
        assert len(found) == 300
        conn = await asyncpg.connect(pg_url)
        try:

            async def pending_pages() -> int:
                return int(await conn.fetchval("SELECT gin_clean_pending_list('events_text'::regclass)"))

            await eventually(lambda: store._merging is not None and store._merging.done(), timeout=10)
            assert await pending_pages() == 0
            # and while closed (nobody merging), the inserts' pages stay in the list
        finally:
            await conn.close()
    async with opened(pg_url) as store:
        monkeypatch.setattr(postgres_store, "TEXT_INDEX_MERGE_EVERY", 3600)
        more = [make_event(n, text=f"another pizza {n}") for n in range(300, 400)]
        await asyncio.gather(*(store.ingest(e, dedup_key(e), []) for e in more))
        conn = await asyncpg.connect(pg_url)
        try:
            assert int(await conn.fetchval("SELECT gin_clean_pending_list('events_text'::regclass)")) > 0
        finally:
            await conn.close()


async def test_one_bad_row_fails_only_its_own_postback(pg_url):
    async with opened(pg_url) as store:
        events = [make_event(n) for n in range(30)]
        keys = [dedup_key(e) for e in events]
        keys[17] = "tx\x00NUL"  # PostgreSQL's text refuses a NUL character: this row cannot be stored
        results = await asyncio.gather(
            *(store.ingest(e, k, [NewDelivery("crm", "r", "c")]) for e, k in zip(events, keys, strict=True)),
            return_exceptions=True,
        )
        assert isinstance(results[17], StoreError)
        good = [r for n, r in enumerate(results) if n != 17]
        assert good == [Ingested("accepted", e["id"]) for n, e in enumerate(events) if n != 17]
        assert store.batches_failed >= 1  # the bad row was in a batch with others, which went on alone
        stored = {r.event_id for r in await store.list_deliveries(DeliveryFilter(limit=100))}
        assert stored == {e["id"] for n, e in enumerate(events) if n != 17}


async def test_stored_one_by_one_a_conversation_waits_only_for_its_own(pg_url):
    """After a failed batch, its postbacks go one by one, each in a statement of its own: one
    whose conversation's lock is held elsewhere waits for it; those of other conversations do
    not wait behind it, and a later one of the same conversation comes after it."""
    async with opened(pg_url) as store:
        first, second = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
        try:
            holding = [first.transaction(), second.transaction()]
            for conn, held, talk in zip((first, second), holding, ("zero", "one"), strict=True):
                await held.start()
                await conn.execute("SELECT pg_advisory_xact_lock($1)", postgres_store._key("slack", talk))
            # a batch in flight (waiting for "zero"), so that the next five go in one batch
            zero = make_event(0)
            waiting = asyncio.create_task(store.ingest(zero, dedup_key(zero), [NewDelivery("slack", "r", "zero")]))
            await asyncio.sleep(0.2)
            events = [make_event(n) for n in range(1, 6)]
            keys = [dedup_key(e) for e in events]
            keys[0] = "tx\x00NUL"  # refused before any lock is taken: the batch fails at once
            talks = ["two", "two", "one", "three", "one"]
            ingests = [
                asyncio.create_task(store.ingest(e, k, [NewDelivery("slack", "r", talk)]))
                for e, k, talk in zip(events, keys, talks, strict=True)
            ]
            await asyncio.sleep(0.2)
            await holding[0].commit()
            assert await asyncio.wait_for(waiting, 10) == Ingested("accepted", zero["id"])
            await eventually(lambda: ingests[3].done(), timeout=10)  # "three", after "one": not behind it
            assert store.batches_failed == 1
            assert not ingests[2].done() and not ingests[4].done()  # "one" waits for its lock
            await holding[1].commit()
            results = await asyncio.wait_for(asyncio.gather(*ingests, return_exceptions=True), 10)
        finally:
            await first.close()
            await second.close()
        assert isinstance(results[0], StoreError)
        assert results[1:] == [Ingested("accepted", e["id"]) for e in events[1:]]
        rows = sorted(await store.list_deliveries(DeliveryFilter(destination="slack", limit=10)), key=lambda r: r.id)
        assert [r.event_id for r in rows if r.event_id in {events[2]["id"], events[4]["id"]}] == [
            events[2]["id"],
            events[4]["id"],
        ]


# ---------------------------------------------------------------------------- wake-up across instances


class Sink:
    """A webhook receiver on 127.0.0.1 that notes when each event arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.event = asyncio.Event()

    async def __aenter__(self) -> Sink:
        from aiohttp import web

        async def hook(request: web.Request) -> web.Response:
            body = await request.json()
            self.arrived.setdefault(body["id"], time.monotonic())
            self.event.set()
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    async def wait_for(self, event_id: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while event_id not in self.arrived and time.monotonic() < deadline:
            self.event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self.event.wait()
        return self.arrived.get(event_id, float("inf"))


@contextlib.asynccontextmanager
async def delivering(store: PostgresStore, url: str) -> AsyncIterator[Dispatcher]:
    http = aiohttp.ClientSession()
    destination = WebhookDestination("crm", url, timeout=2)
    destination.retry = RetryPolicy(initial=0.1, max_interval=1, max_age=3600)
    await destination.open(Services(http=http, state=store))
    dispatcher = Dispatcher(store, {"crm": destination})
    dispatcher.start()
    try:
        yield dispatcher
    finally:
        await dispatcher.stop()
        await destination.close()
        await http.close()


async def pickups(one: PostgresStore, sink: Sink, count: int, base: int) -> list[float]:
    """Store `count` postbacks on `one` (whose instance delivers nothing), at random moments,
    and how long each took to reach the sink through the other instance."""
    took = []
    for n in range(count):
        await asyncio.sleep(random.uniform(0.05, 0.3))  # anywhere in the other's 1 s poll
        event = make_event(base + n)
        await one.ingest(event, dedup_key(event), [NewDelivery("crm", "r", f"c{n}")])
        stored = time.monotonic()
        took.append(await sink.wait_for(event["id"], timeout=5) - stored)
    return took


async def test_a_postback_stored_by_one_instance_is_sent_by_another_at_once(pg_url):
    async with Sink() as sink, opened(pg_url) as one, opened(pg_url) as two, delivering(two, sink.url):
        await asyncio.wait_for(two.listening.wait(), 5)
        await asyncio.sleep(0.3)
        took = await pickups(one, sink, 15, 0)
        assert max(took) < 0.2, sorted(took)  # the poll alone would take up to 1 s

        # its LISTEN connection cut: polling meanwhile, then listening again, and at once again
        pid = two.listen_pid
        assert pid is not None
        admin = await asyncpg.connect(pg_url)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        await asyncio.sleep(0.01)
        event = make_event(500)
        await one.ingest(event, dedup_key(event), [NewDelivery("crm", "r", "x")])  # maybe unannounced
        assert await sink.wait_for(event["id"], timeout=3) < float("inf")  # the poll, or the wake on reconnect
        await asyncio.wait_for(two.listening.wait(), 5)
        assert two.listen_pid not in (None, pid)
        took = await pickups(one, sink, 10, 600)
        assert max(took) < 0.2, sorted(took)


async def test_an_instance_notifies_only_while_another_listens(pg_url, monkeypatch):
    """A single instance's NOTIFYs would wake only itself (its loops are woken already): it sends
    them only while another instance's LISTEN connection is seen, which a plain listener (not an
    instance) is not; an instance that does not listen itself always sends them."""
    monkeypatch.setattr(postgres_store, "LISTEN_CHECK", 0.2)
    heard: list[str] = []
    raw = await asyncpg.connect(pg_url)

    async def stored(store: PostgresStore, n: int) -> None:
        event = make_event(n)
        await store.ingest(event, dedup_key(event), [NewDelivery("crm", "r", f"c{n}")])

    try:
        async with opened(pg_url) as one:
            one.listen(lambda names: None)
            await asyncio.wait_for(one.listening.wait(), 5)
            await raw.add_listener(one._channel, lambda *args: heard.append(args[3]))
            await asyncio.sleep(0.5)  # checks that see only the plain listener
            assert not one.others_listen
            await stored(one, 1)
            await asyncio.sleep(0.3)
            assert heard == []
            async with opened(pg_url) as two:
                two.listen(lambda names: None)
                await asyncio.wait_for(two.listening.wait(), 5)
                assert two.others_listen  # it saw one at once
                await eventually(lambda: one.others_listen, 5, "one to see two")
                await stored(one, 2)
                await eventually(lambda: heard == ["crm"], 5, lambda: f"one NOTIFY (heard {heard})")
            await eventually(lambda: not one.others_listen, 5, "one to see two gone")
            async with opened(pg_url) as deaf:  # stores, never listens: cannot tell, so notifies
                await stored(deaf, 3)
                await eventually(lambda: heard == ["crm", "crm"], 5, lambda: f"a second NOTIFY (heard {heard})")
    finally:
        await raw.close()


# ---------------------------------------------------------------------------- connections cut mid-batch


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of PostgreSQL that can cut every connection through it
    at once, as a server restart or a network failure would, whatever is in flight."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.pipes: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.cuts = 0
        self.holding = False  # the server's answers go nowhere (a network failing one way)
        self.refusing = False  # new connections are closed at once (the server still away)

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        self.cut()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        if self.refusing:
            to_client.transport.abort()
            return
        try:
            server, to_server = await asyncio.open_connection(*self.target)
        except OSError:
            to_client.close()
            return
        pipe = (to_client, to_server)
        self.pipes.add(pipe)

        async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(65536):
                    if answers and self.holding:
                        continue
                    writer.write(data)
                    await writer.drain()
            writer.close()

        try:
            await asyncio.gather(copy(client, to_server, False), copy(server, to_client, True))
        except asyncio.CancelledError:  # the proxy closing: asyncio's server would log it as an error
            pass
        finally:
            self.pipes.discard(pipe)
            self.tasks.discard(task)

    def cut(self) -> int:
        """Abort every connection now (RST, no goodbye), both sides; how many."""
        pipes, self.pipes = list(self.pipes), set()
        for pipe in pipes:
            for writer in pipe:
                writer.transport.abort()
        self.cuts += 1
        return len(pipes)


async def test_connections_cut_in_the_middle_of_batches_lose_nothing_answered(pg_url, monkeypatch):
    monkeypatch.setattr(postgres_store, "LISTEN_RETRY_FIRST", 0.05)
    parts = urlsplit(pg_url)
    async with CuttingProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        url = via(pg_url, proxy.port)
        checker = await asyncpg.create_pool(pg_url, min_size=4, max_size=8)  # direct, never cut
        store = PostgresStore(url)
        await store.open()
        accepted: dict[str, int] = {}
        early: list[str] = []  # answered before its commit was visible
        refused = 0
        stop = asyncio.Event()

        async def sender(worker: int) -> None:
            nonlocal refused
            n = 0
            while not stop.is_set():
                n += 1
                event = make_event(worker * 100_000 + n)
                deliveries = [NewDelivery(d, "r", f"c{worker}") for d in ("crm", "slack")[: 1 + n % 2]]
                try:
                    result = await store.ingest(event, dedup_key(event), deliveries)
                except StoreError:
                    refused += 1  # a 503: Skycore sends it again later
                    await asyncio.sleep(0.01)
                    continue
                assert result == Ingested("accepted", event["id"])
                # answered: its event and every delivery must be committed by now
                async with checker.acquire() as conn:
                    stored = await conn.fetchval("SELECT count(*) FROM deliveries WHERE event_id = $1", event["id"])
                if stored != len(deliveries):
                    early.append(event["id"])
                accepted[event["id"]] = len(deliveries)

        try:
            senders = [asyncio.create_task(sender(w)) for w in range(24)]
            cut = 0
            for _ in range(4):
                await asyncio.sleep(random.uniform(0.3, 0.6))
                cut += proxy.cut()  # batches are in flight nearly all the time under this load
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*senders)
        finally:
            await store.close()
        try:
            assert cut >= 4
            assert refused + store.batches_failed > 0  # the cuts did meet work in flight
            assert len(accepted) > 100, (len(accepted), refused, store.batches_failed)
            assert early == []
            # every postback answered 200 is there to be delivered: all of its deliveries pending
            async with checker.acquire() as conn:
                rows = await conn.fetch("SELECT event_id, count(*) FROM deliveries GROUP BY event_id")
            in_store = {row[0]: row[1] for row in rows}
            missing = {e: n for e, n in accepted.items() if in_store.get(e) != n}
            assert missing == {}
        finally:
            await checker.close()

        # and they are delivered: a store behind the (now quiet) proxy sends every one of them
        async with Sink() as sink, opened(url) as again, delivering(again, sink.url):
            crm = set(accepted)
            deadline = time.monotonic() + 30
            while not crm <= set(sink.arrived) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert crm <= set(sink.arrived), len(crm - set(sink.arrived))


async def test_a_claim_whose_answer_is_lost_is_given_back_at_once_not_when_its_lease_ends(pg_url):
    """A claim that committed on the server but whose answer never came (the connection was cut
    meanwhile) leased its deliveries to nobody who knows it: they are due again at once, and, if
    the database cannot be reached at that moment, before the next claim."""
    parts = urlsplit(pg_url)
    admin = await asyncpg.connect(pg_url)

    async def leases() -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await admin.fetch("SELECT leased_by, attempts FROM deliveries ORDER BY id")]

    async def all_leased() -> bool:
        return await leases() == [("me", 1)] * 3

    async with (
        CuttingProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy,
        opened(via(pg_url, proxy.port)) as store,
    ):
        try:
            for n in range(3):
                event = make_event(n)
                await store.ingest(event, dedup_key(event), [NewDelivery("crm", "r", f"c{n}")])
            other = await store.claim("slack", limit=5, lease=60, ordered=False, owner="me")  # nothing due
            assert other == []
            for refusing in (False, True):
                proxy.holding = True
                claiming = asyncio.create_task(store.claim("crm", limit=5, lease=60, ordered=False, owner="me"))
                await eventually(all_leased, what="the claim to commit on the server")
                proxy.holding, proxy.refusing = False, refusing
                proxy.cut()
                with pytest.raises(StoreError):
                    await claiming
                if refusing:  # could not be given back yet: it is before the next claim
                    assert await leases() == [("me", 1)] * 3
                    proxy.refusing = False
                else:
                    assert await leases() == [(None, 0)] * 3  # due again, and that claim was not an attempt
                claims = await store.claim("crm", limit=5, lease=60, ordered=False, owner="me")
                assert [c.attempt for c in claims] == [1, 1, 1]
                await store.release(claims, owner="me")
        finally:
            await admin.close()


def batches_failed(bridge: BridgeProcess) -> int:
    """How many group commits `bridge` has logged as failed (each then went on one by one)."""
    return sum(line.get("msg", "").startswith("group commit failed") for line in bridge.log_lines())


@pytest.mark.slow
async def test_serve_with_its_connections_cut_mid_batch_answers_200_only_for_what_is_committed(
    pg_url, sink, bridge_factory
):
    """The real `serve`, its PostgreSQL behind a proxy that cuts every connection (the pools',
    the LISTEN one) four times while 24 senders post flat out, each sending a postback again
    after a 503 as Skycore does: every answer is a 200 or a 503; a 200's event and its delivery
    are committed when it arrives (read on a connection of our own, never cut); and every
    event answered 200 reaches the webhook."""
    parts = urlsplit(pg_url)
    async with CuttingProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        config = hook_config(via(pg_url, proxy.port), sink.url)
        config["destinations"]["crm"]["timeout"] = (
            "1s"  # a claim whose answer was cut is sent when its lease (42 s) ends
        )
        bridge = bridge_factory(config, env={"BRIDGE_LOG_LEVEL": "warning"})
        await asyncio.to_thread(bridge.start)
        checker = await asyncpg.create_pool(pg_url, min_size=4, max_size=8)
        answered: dict[int, str] = {}  # postback -> the event id of its 200
        early: list[str] = []  # answered 200 before its event and delivery were committed
        statuses: Counter[int] = Counter()
        stop = asyncio.Event()

        async def sender(session: aiohttp.ClientSession, worker: int) -> None:
            n = worker * 100_000
            while not stop.is_set():
                n += 1
                while True:  # Skycore sends it again until it has a 200
                    async with session.post(bridge.url + "/postback", data=sms(n)) as r:
                        statuses[r.status] += 1
                        body = await r.json()
                    if r.status == 200:
                        break
                    await asyncio.sleep(0.02)
                assert body["status"] in ("accepted", "duplicate"), body  # duplicate: a 503'd try was committed
                async with checker.acquire() as conn:
                    stored = await conn.fetchval(
                        "SELECT count(*) FROM events AS e JOIN deliveries AS d ON d.event_id = e.id WHERE e.id = $1",
                        body["id"],
                    )
                if stored != 1:
                    early.append(body["id"])
                answered[n] = body["id"]

        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=24)) as session:
                senders = [asyncio.create_task(sender(session, w)) for w in range(1, 25)]
                cut: list[int] = []
                # at random moments, at least four times and until a cut has met a batch being
                # committed (nearly always at once: under this load one is in flight nearly always)
                while len(cut) < 4 or (not batches_failed(bridge) and len(cut) < 12):
                    await asyncio.sleep(random.uniform(0.2, 0.5))
                    cut.append(proxy.cut())
                await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*senders)
            assert set(statuses) <= {200, 503}, statuses
            assert min(cut) >= 2 and batches_failed(bridge) > 0, (cut, statuses)
            assert len(answered) > 100, statuses
            assert early == []
            assert len(set(answered.values())) == len(answered)
            await wait_for_ids(sink, set(answered.values()), timeout=60)
            print(f"\n{len(answered)} answered 200, answers {dict(statuses)}, connections cut {cut}")
        finally:
            await checker.close()
        # in a thread: on its way out the bridge talks to PostgreSQL through this loop's proxy
        assert await asyncio.to_thread(bridge.stop) == 0


def test_the_channel_is_per_store() -> None:
    one = postgres_store._channel("test.bridge_a")
    assert one == postgres_store._channel("test.bridge_a")
    assert one != postgres_store._channel("test.bridge_b")
    assert len(one.encode()) < 64


async def test_postbacks_wait_for_the_flush_and_only_bookkeeping_does_not(pg_url):
    """A postback's commit is flushed before its 200 (synchronous_commit on, the server's
    default); only claims and results, on their own pool, skip the wait."""
    async with opened(pg_url) as store:
        assert store._pool is not None and store._bookkeeping is not None
        async with store._pool.acquire() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
        async with store._bookkeeping.acquire() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "off"


async def test_deaths_and_follow_ups_are_bookkeeping_and_never_wait_for_the_postbacks_pool(pg_url):
    """A verdict that takes several statements (a death; one that adds follow-ups, as a reply's
    SMS adds its feedback in the thread) is bookkeeping like any other: recorded on the
    bookkeeping pool, without waiting for a flush, and never queued behind the postbacks'
    connections. With every connection of the postbacks' pool held, it is still recorded, and a
    point read (a reply's ledger) then works as soon as one is free."""
    async with opened(pg_url) as store:
        assert store._pool is not None
        for n in (1, 2):
            event = make_event(n)
            await store.ingest(event, dedup_key(event), [NewDelivery("crm", "r", f"c{n}")])
        sent, died = await store.claim("crm", limit=2, lease=30, ordered=False, owner="a")
        up = (NewDelivery("~feedback", "sent", "c", False),)
        results = [
            dataclasses.replace(contract.finished(sent, Done()), follow_ups=up),
            contract.finished(died, Dead("E713: billing")),
        ]
        held = [await store._pool.acquire() for _ in range(postgres_store.POOL_SIZE)]
        try:
            async with asyncio.timeout(5):  # a wait for the postbacks' pool lasts CONNECT_TIMEOUT (10 s)
                assert [r.claim.id for r in await store.complete(results)] == [died.id]
        finally:
            for conn in held:
                await store._pool.release(conn)
        feedback = await store.list_deliveries(DeliveryFilter(destination="~feedback"))
        assert [(row.event_id, row.route) for row in feedback] == [(sent.event_id, "sent")]
        assert await store.opted_out("15550000001", "60856") is False
        await store._pool.close()
        with pytest.raises(StoreError):  # a driver's error leaves a read as the store's
            await store.opted_out("15550000001", "60856")


async def test_a_sweep_never_waits_for_a_row_another_transaction_holds(pg_url):
    """The sweep of removed destinations skips rows locked elsewhere (an instance recording
    their verdict) instead of waiting: a sweep that waits can be the one PostgreSQL picks to end
    a deadlock, and an aborted sweep leaves every delivery to a removed destination pending until
    the next one. What it skipped, the next sweep takes."""
    async with opened(pg_url) as store:
        held, free = make_event(1), make_event(2)
        await store.ingest(held, dedup_key(held), [NewDelivery("gone", "r", "a")])
        await store.ingest(free, dedup_key(free), [NewDelivery("gone", "r", "b")])
        other = await asyncpg.connect(pg_url)
        try:
            async with other.transaction():
                await other.execute("SELECT id FROM deliveries WHERE event_id = $1 FOR UPDATE", held["id"])
                async with asyncio.timeout(5):  # waiting would take until the transaction ends
                    assert await store.abandon_unknown({"crm"}, "destination removed") == {"gone": 1}
            statuses = {r.event_id: r.status for r in await store.list_deliveries(DeliveryFilter())}
            assert statuses == {held["id"]: "pending", free["id"]: "dead"}
            assert await store.abandon_unknown({"crm"}, "destination removed") == {"gone": 1}
        finally:
            await other.close()
