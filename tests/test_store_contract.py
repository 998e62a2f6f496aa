"""The Store contract, held by every backend: one set of tests over a fresh SQLite store and a
fresh PostgreSQL store (a schema of its own per test), then what only several instances on one
PostgreSQL database can show: concurrent claims, and two real `serve` processes sharing work.

PostgreSQL tests need BRIDGE_TEST_POSTGRES_URL (postgresql://postgres@127.0.0.1:5432/test in CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from bridge.carriers import Carriers
from bridge.errors import StoreError
from bridge.event import KEY_VERSION, Event, dedup_key, normalize
from bridge.ids import event_id
from bridge.postback import parse
from bridge.retry import Dead, Decision, Done, RetryAt
from bridge.store import (
    AttemptResult,
    Claim,
    ClaimFor,
    DeliveryFilter,
    EventFilter,
    ExpiryFollowUp,
    Ingested,
    NewDelivery,
    OptOutRow,
    Store,
    open_store,
)
from bridge.store import postgres as postgres_store
from bridge.store.postgres import PostgresStore
from tests.conftest import POSTBACKS, BridgeProcess, Sink, dedup_key_v1, eventually, sms

PG_URL = os.environ.get("BRIDGE_TEST_POSTGRES_URL")
NO_PG = (
    "BRIDGE_TEST_POSTGRES_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/test): PostgreSQL store untested"
)
NODE = os.uname().nodename


# ---------------------------------------------------------------------------- fixtures


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A URL whose search_path is a fresh schema, dropped afterwards. Tests ask for it before
    bridge_factory, so their bridges are stopped before the schema goes."""
    if not PG_URL:
        pytest.skip(NO_PG)
    schema = f"bridge_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        yield with_query(PG_URL, search_path=schema)
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = open_store(store_url)
    await s.open()
    yield s
    await s.close()


def make_event(n: int, *, sender: str = "15552312102", to: str = "86717", text: str = "HELLO there") -> Event:
    fields = parse(sms(n, text=text, sender=sender, to=to))
    return normalize(fields, event_id=event_id(), received_at=datetime.now(UTC), carriers=Carriers({}))


async def put(
    store: Store, n: int, *, destinations: tuple[str, ...] = ("crm",), conversation: str = "c", **kw: str
) -> str:
    event = make_event(n, **kw)
    result = await store.ingest(event, dedup_key(event), [NewDelivery(d, "r", conversation) for d in destinations])
    assert result == Ingested("accepted", event["id"])
    return event["id"]


def finished(claim: Claim, decision: Decision) -> AttemptResult:
    label = {Done: "delivered", RetryAt: "retry", Dead: "dead"}[type(decision)]
    error = None if isinstance(decision, Done) else decision.reason
    return AttemptResult(claim, time.time(), 0.01, label, 200 if label == "delivered" else 500, error, decision)


async def claim(store: Store, owner: str = "a", *, limit: int = 100, lease: float = 30, ordered: bool = False):
    return await store.claim("crm", limit=limit, lease=lease, ordered=ordered, owner=owner)


def dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


# ---------------------------------------------------------------------------- ingest


async def test_ingest_stores_event_and_deliveries_and_a_duplicate_gets_the_first_id(store):
    event = make_event(1)
    first = await store.ingest(event, dedup_key(event), [NewDelivery("crm", "r", "c"), NewDelivery("log", "r", "c")])
    assert first == Ingested("accepted", event["id"])
    again = make_event(1)  # Skycore's retry: same postback, a new id drawn for it
    assert again["id"] != event["id"]
    assert await store.ingest(again, dedup_key(again), [NewDelivery("crm", "r", "c")]) == Ingested(
        "duplicate", event["id"]
    )
    stored = await store.get_event(event["id"])
    assert stored == event and list(stored) == list(event)  # the body as sent, key order too
    assert await store.get_event(again["id"]) is None
    rows = await store.event_deliveries(event["id"])
    assert [(r.destination, r.status, r.attempts, r.next_at is not None) for r in rows] == [
        ("crm", "pending", 0, True),
        ("log", "pending", 0, True),
    ]
    assert len(await store.list_deliveries(DeliveryFilter())) == 2


async def test_unicode_text_round_trips(store):
    event = make_event(1, text="Olá 👋 ‏שלום &lt;&amp;&gt; \\ \" '")
    assert event["text"].endswith("<&> \\ \" '")
    await store.ingest(event, dedup_key(event), [NewDelivery("crm", "r", "c")])
    assert (await store.get_event(event["id"]))["text"] == event["text"]
    (c,) = await claim(store)
    assert c.event == event


async def test_ping_writes(store):
    await store.ping()
    await store.ping()


# Postbacks that the key before issue 17 took for one another (CONTRACT §6, revised): a message's
# "sent" and "delivered" reports share a TRACKINGID; EMAIL_SUBs have no FROM, TO or TEXT; SUBs
# that differ only in MOBILE or CAMPAIGNID. Each is an event of its own.
_DELIVERED = (POSTBACKS / "sms_mt_n202_delivered.xml").read_bytes()
_OPT_IN = (POSTBACKS / "sub_n301_subscribed.xml").read_bytes()
_EMAIL_IN = (
    b"<POSTBACK><ORIGIN>EMAIL_SUB</ORIGIN><CODE>N303</CODE><EMAIL>ann@example.com</EMAIL>"
    b"<CAMPAIGNID>1478</CAMPAIGNID><TIMESTAMP>2014-07-02T14:32:23-04</TIMESTAMP><SOURCE>WEB</SOURCE></POSTBACK>"
)
DISTINCT = {
    "sent": _DELIVERED.replace(b"N202", b"N201").replace(b"Sent/Delivered", b"Sent"),
    "delivered": _DELIVERED,
    "email ann": _EMAIL_IN,
    "email bob": _EMAIL_IN.replace(b"ann@", b"bob@"),
    "sub": _OPT_IN,
    "sub other mobile": _OPT_IN.replace(b"16501112222", b"16501113333"),
    "sub other campaign": _OPT_IN.replace(b"<CAMPAIGNID>1478", b"<CAMPAIGNID>1479"),
}


def event_from(body: bytes) -> Event:
    return normalize(parse(body), event_id=event_id(), received_at=datetime.now(UTC), carriers=Carriers({}))


async def test_postbacks_the_old_key_took_for_one_another_are_events_of_their_own(store):
    assert len({dedup_key_v1(event_from(body)) for body in DISTINCT.values()}) < len(DISTINCT)  # they were
    firsts = {}
    for name, body in DISTINCT.items():
        event = event_from(body)
        assert await store.ingest(event, dedup_key(event), [NewDelivery("crm", "r", name)]) == Ingested(
            "accepted", event["id"]
        ), name
        firsts[name] = event["id"]
    for name, body in DISTINCT.items():  # Skycore's retry of each, byte for byte
        again = event_from(body)
        assert await store.ingest(again, dedup_key(again), [NewDelivery("crm", "r", name)]) == Ingested(
            "duplicate", firsts[name]
        ), name
    assert {r.event_id for r in await store.list_deliveries(DeliveryFilter())} == set(firsts.values())


@contextlib.asynccontextmanager
async def writes_held(store: Store, store_url: str) -> AsyncIterator[None]:
    """What is written inside goes in one commit: for SQLite, another connection holds the
    file's write lock while the store's writer waits behind a ping, and the writes queue up
    behind it; PostgreSQL's group commit takes writes that arrive together as they come."""
    if not store_url.startswith("sqlite"):
        yield
        return
    lock = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        plug = asyncio.ensure_future(store.ping())
        await asyncio.sleep(0.2)  # the writer has taken the ping and waits for the lock
        yield
        await asyncio.sleep(0.2)  # what was started inside is queued behind it
        lock.execute("ROLLBACK")
        await plug
    finally:
        lock.close()


async def test_retries_committed_with_new_postbacks_are_duplicates_and_every_delivery_is_claimable(store, store_url):
    """Skycore's retries of stored postbacks in one commit with as many new ones (after a
    restart, or a timeout under load): each retry is `duplicate` with the first id and adds no
    delivery; the new ones are stored; every delivery can be claimed. (SQLite took the rows its
    text-index trigger adds for new events as the retries' own, stored their deliveries under
    ids that have no event, and every claim of that destination failed from then on.)"""
    firsts = [await put(store, n) for n in (1, 2)]
    retries, news = [make_event(n) for n in (1, 2)], [make_event(n) for n in (3, 4)]
    async with writes_held(store, store_url):
        pending = asyncio.gather(
            *(store.ingest(e, dedup_key(e), [NewDelivery("crm", "r", "c")]) for e in [*retries, *news])
        )
    results = await pending
    assert results == [
        Ingested("duplicate", firsts[0]),
        Ingested("duplicate", firsts[1]),
        Ingested("accepted", news[0]["id"]),
        Ingested("accepted", news[1]["id"]),
    ]
    expected = {*firsts, news[0]["id"], news[1]["id"]}
    assert {r.event_id for r in await store.list_deliveries(DeliveryFilter())} == expected
    claims = await claim(store)
    assert {c.event_id for c in claims} == expected
    assert {c.event["id"] for c in claims} == expected


async def test_two_copies_of_a_new_postback_in_one_commit_are_one_event(store, store_url):
    """Skycore's retry of a postback still waiting for its commit (it gave up waiting), in the
    same commit: the first copy is the event, with its deliveries; the second is `duplicate`
    with the first's id. (SQLite stored the first's event with no delivery, and the deliveries
    under the second's id, which has no event.)"""
    first, again = make_event(1), make_event(1)
    async with writes_held(store, store_url):
        pending = asyncio.gather(
            *(store.ingest(e, dedup_key(e), [NewDelivery("crm", "r", "c")]) for e in (first, again))
        )
    assert await pending == [Ingested("accepted", first["id"]), Ingested("duplicate", first["id"])]
    assert [r.event_id for r in await store.list_deliveries(DeliveryFilter())] == [first["id"]]
    (claimed,) = await claim(store)
    assert claimed.event == first


# ---------------------------------------------------------------------------- claims and leases


async def test_claim_leases_oldest_first_and_never_twice(store):
    ids = [await put(store, n) for n in range(3)]
    first = await claim(store, "a", limit=2)
    assert [c.event_id for c in first] == ids[:2]
    assert [c.attempt for c in first] == [1, 1]
    assert first[0].event["id"] == ids[0] and first[0].destination == "crm" and first[0].conversation == "c"
    second = await claim(store, "b")
    assert [c.event_id for c in second] == ids[2:]
    assert await claim(store, "c") == []
    assert await store.claim("other", limit=10, lease=30, ordered=False, owner="a") == []
    # leased: due again only when the lease runs out
    assert await store.next_due("crm") > time.time() + 20
    assert await store.next_due("other") is None


async def test_expired_lease_is_reclaimed_and_late_completions_are_harmless(store):
    await put(store, 1)
    (first,) = await claim(store, "a", lease=0.3, ordered=True)
    assert await claim(store, "b", ordered=True) == [], "a leased delivery was handed out twice"
    await asyncio.sleep(0.5)
    (second,) = await claim(store, "b", ordered=True)
    assert (second.id, second.attempt) == (first.id, 2)

    await store.complete([finished(first, RetryAt(time.time(), "HTTP 500"))])  # late and stale
    assert await claim(store, "c") == [], "a stale completion freed a delivery another worker holds"

    await store.complete([finished(second, Done())])
    await store.complete([finished(second, Done())])  # twice
    await store.complete([finished(first, Dead("late and wrong"))])
    (row,) = await store.list_deliveries(DeliveryFilter())
    assert (row.status, row.attempts, row.last_error, row.next_at) == ("delivered", 2, None, None)
    assert [(a.number, a.outcome) for a in await store.attempts(row.id)] == [(1, "retry"), (2, "delivered")]
    assert await claim(store, "c") == []

    # a late "delivered" from an expired lease is the truth: the peer has it
    await put(store, 2)
    (old,) = await claim(store, "a", lease=0.3)
    await asyncio.sleep(0.5)
    (new,) = await claim(store, "b")
    await store.complete([finished(old, Done())])
    await store.complete([finished(new, RetryAt(time.time(), "timeout"))])
    assert [r.status for r in await store.list_deliveries(DeliveryFilter(event_id=old.event_id))] == ["delivered"]


async def test_retry_is_due_at_its_time_and_dead_keeps_the_reason(store):
    await put(store, 1)
    await put(store, 2)
    c1, c2 = await claim(store)
    await store.complete([finished(c1, RetryAt(time.time() + 0.3, "HTTP 503")), finished(c2, Dead("HTTP 400"))])
    assert await claim(store) == []
    due = await store.next_due("crm")
    assert abs(due - (time.time() + 0.3)) < 0.3
    await asyncio.sleep(0.4)
    (again,) = await claim(store)
    assert (again.id, again.attempt) == (c1.id, 2)
    (dead,) = await store.list_deliveries(DeliveryFilter(status="dead"))
    assert (dead.id, dead.last_error, dead.next_at) == (c2.id, "HTTP 400", None)


async def test_ordered_claims_give_only_the_oldest_pending_of_each_conversation(store):
    a = [await put(store, n, conversation="alice") for n in range(3)]
    b = [await put(store, n, conversation="bob") for n in range(10, 12)]
    got = await claim(store, ordered=True)
    assert {c.event_id for c in got} == {a[0], b[0]}
    assert await claim(store, "b", ordered=True) == []
    first_a = next(c for c in got if c.event_id == a[0])
    first_b = next(c for c in got if c.event_id == b[0])
    await store.complete([finished(first_a, Done())])
    (next_a,) = await claim(store, ordered=True)
    assert next_a.event_id == a[1]
    # a retry keeps its place: the conversation waits for it, even once later ones are due
    await store.complete([finished(next_a, RetryAt(time.time() + 60, "HTTP 500"))])
    assert await claim(store, ordered=True) == []
    # dead lets the conversation go on
    await store.complete([finished(first_b, Dead("HTTP 400"))])
    (next_b,) = await claim(store, ordered=True)
    assert next_b.event_id == b[1]


async def test_unordered_claims_take_every_due_delivery(store):
    ids = [await put(store, n, conversation="alice") for n in range(3)]
    assert [c.event_id for c in await claim(store)] == ids


async def test_deliveries_of_unordered_destinations_do_not_hold_a_conversation_back(store):
    """`NewDelivery.ordered` is the destination's: only ordered deliveries queue behind each other
    (and only they go into the conversation index)."""
    event = make_event(1)
    loose = [NewDelivery("crm", "r", "alice", ordered=False)]
    await store.ingest(event, dedup_key(event), loose)
    later = make_event(2)
    await store.ingest(later, dedup_key(later), loose)
    got = await claim(store, ordered=True)
    assert [c.event_id for c in got] == [event["id"], later["id"]]


async def test_order_pending_puts_what_was_queued_unordered_in_line(store):
    """A reload that makes a destination ordered (Slack `thread_by_sender` turned on): what was
    queued before goes in conversation order too, and the first new one waits behind it."""
    before = make_event(1)
    await store.ingest(before, dedup_key(before), [NewDelivery("crm", "r", "alice", ordered=False)])
    other = make_event(2)
    await store.ingest(other, dedup_key(other), [NewDelivery("log", "r", "alice", ordered=False)])
    after = make_event(3)
    await store.ingest(after, dedup_key(after), [NewDelivery("crm", "r", "alice", ordered=True)])
    assert await store.order_pending(["crm"]) == 1
    assert await store.order_pending(["crm"]) == 0
    assert await store.order_pending([]) == 0
    (first,) = await claim(store, ordered=True)
    assert first.event_id == before["id"]
    await store.complete([finished(first, Done())])
    assert [c.event_id for c in await claim(store, ordered=True)] == [after["id"]]
    (loose,) = await store.claim("log", limit=10, lease=30, ordered=True, owner="a")
    assert loose.event_id == other["id"]  # not named: left as it was


async def _make_it_a_store_from_before_ordered(store_url: str) -> None:
    """Turn the schema back into what stores made before `deliveries.ordered` (and before
    `deliveries.came_in_at`, and before versioned migrations: no `schema_version`) have."""
    old_index = (
        "CREATE INDEX deliveries_conversation ON deliveries (destination, conversation, id) WHERE status = 'pending'"
    )
    if store_url.startswith("sqlite"):
        conn = sqlite3.connect(store_url.removeprefix("sqlite:///"))
        with conn:
            conn.execute("DROP INDEX deliveries_ordered")
            conn.execute("ALTER TABLE deliveries DROP COLUMN ordered")
            conn.execute("ALTER TABLE deliveries DROP COLUMN came_in_at")
            conn.execute(old_index)
            conn.execute("DELETE FROM meta WHERE key = 'schema_version'")
        conn.close()
        return
    conn = await asyncpg.connect(store_url)
    try:
        await conn.execute("DROP INDEX deliveries_ordered")
        await conn.execute("ALTER TABLE deliveries DROP COLUMN ordered")
        await conn.execute("ALTER TABLE deliveries DROP COLUMN came_in_at")
        await conn.execute(old_index)
        await conn.execute("DELETE FROM meta WHERE key = 'schema_version'")
    finally:
        await conn.close()


async def test_a_store_from_before_ordered_deliveries_is_upgraded_and_keeps_its_order(store_url):
    first = open_store(store_url)
    await first.open()
    queued = [await put(first, n, conversation="alice") for n in range(3)]
    await first.close()
    await _make_it_a_store_from_before_ordered(store_url)

    upgraded = open_store(store_url)  # a new version of the bridge opening the old store
    await upgraded.open()
    try:
        (oldest,) = await claim(upgraded, ordered=True)  # what was queued counts as ordered
        assert oldest.event_id == queued[0]
        await upgraded.complete([finished(oldest, Done())])
        assert [c.event_id for c in await claim(upgraded, ordered=True)] == [queued[1]]
        event = make_event(9)
        await upgraded.ingest(event, dedup_key(event), [NewDelivery("crm", "r", "bob", ordered=False)])
        (late,) = await claim(upgraded, "b", ordered=True)
        assert late.event_id == event["id"]
        await upgraded.complete([finished(late, Dead("HTTP 400"))])
        assert await upgraded.replay(DeliveryFilter(ids=(late.id,))) == [late.id]  # sets came_in_at
        (replayed,) = await claim(upgraded, "c", ordered=True)
        assert replayed.id == late.id and replayed.created_at > late.created_at
        (row,) = await upgraded.list_deliveries(DeliveryFilter(ids=(late.id,)))
        assert row.created_at == late.created_at
    finally:
        await upgraded.close()
    again = open_store(store_url)  # and opening it once more changes nothing
    await again.open()
    await again.close()


async def _stored_keys(store_url: str) -> dict[str, str]:
    """Event id -> dedup key, as the rows hold them."""
    query = "SELECT id, dedup_key FROM events"
    if store_url.startswith("sqlite"):
        conn = sqlite3.connect(store_url.removeprefix("sqlite:///"))
        try:
            return dict(conn.execute(query).fetchall())
        finally:
            conn.close()
    pg = await asyncpg.connect(store_url)
    try:
        return {row[0]: row[1] for row in await pg.fetch(query)}
    finally:
        await pg.close()


async def test_events_stored_under_the_old_key_keep_it_and_the_store_works_on(store_url):
    """A store the previous version filled (its keys: dedup_key_v1) opens, keeps every row as
    it was, delivers what it holds, and takes new events under the new key."""
    before = open_store(store_url)
    await before.open()
    old = {}
    for name in ("sent", "email ann", "sub"):
        event = event_from(DISTINCT[name])
        assert (await before.ingest(event, dedup_key_v1(event), [NewDelivery("crm", "r", name)])).status == "accepted"
        old[event["id"]] = dedup_key_v1(event)
    sms_event = make_event(1)
    await before.ingest(sms_event, dedup_key_v1(sms_event), [NewDelivery("crm", "r", "c")])
    old[sms_event["id"]] = dedup_key_v1(sms_event)
    await before.close()

    upgraded = open_store(store_url)
    await upgraded.open()
    try:
        assert await _stored_keys(store_url) == old  # no row rewritten
        claims = await claim(upgraded)
        assert {c.event_id for c in claims} == set(old)
        await upgraded.complete([finished(c, Done()) for c in claims])
        # what the old key dropped now gets in, beside the old events that it took them for
        new = {}
        for name in ("delivered", "email bob", "sub other mobile", "sub other campaign"):
            event = event_from(DISTINCT[name])
            result = await upgraded.ingest(event, dedup_key(event), [NewDelivery("crm", "r", name)])
            assert result == Ingested("accepted", event["id"]), name
            new[name] = event["id"]
            again = event_from(DISTINCT[name])
            assert await upgraded.ingest(again, dedup_key(again), []) == Ingested("duplicate", event["id"]), name
        assert {c.event_id for c in await claim(upgraded)} == set(new.values())
        # A retry, after the upgrade, of a postback stored before it has a key of the new kind,
        # which no old row can hold: it is stored again, once (README, Guarantees: "A Skycore
        # retry across an upgrade"). Its own retries are duplicates of that one.
        retry = make_event(1)
        assert (await upgraded.ingest(retry, dedup_key(retry), [])).status == "accepted"
        late = make_event(1)
        assert await upgraded.ingest(late, dedup_key(late), []) == Ingested("duplicate", retry["id"])
        keys = await _stored_keys(store_url)
        assert {k: v for k, v in keys.items() if k in old} == old
        assert all(v.startswith(KEY_VERSION) for k, v in keys.items() if k not in old)
    finally:
        await upgraded.close()


async def test_opening_an_up_to_date_postgresql_store_does_not_wait_for_writes_in_flight(pg_url):
    """A new instance starting beside running ones: CREATE INDEX IF NOT EXISTS would wait for every
    write in flight, and hold every new postback back while it waits."""
    first = open_store(pg_url)
    await first.open()
    writer = await asyncpg.connect(pg_url)
    try:
        async with writer.transaction():
            await writer.execute("LOCK TABLE deliveries IN ROW EXCLUSIVE MODE")  # as an ingest holds it
            second = open_store(pg_url)
            await asyncio.wait_for(second.open(), 5)
            await second.close()
    finally:
        await writer.close()
        await first.close()


async def test_a_schema_change_waits_for_a_running_reader_only_briefly(pg_url):
    """A new version adding a column to a store that running instances are reading: the open
    gives up after a moment (StoreError: serve tries again later), instead of holding every
    running instance's postbacks back behind it for as long as the reader takes."""
    first = open_store(pg_url)
    await first.open()
    await first.close()
    await _make_it_a_store_from_before_ordered(pg_url)
    reader = await asyncpg.connect(pg_url)
    try:
        async with reader.transaction():
            await reader.fetch("SELECT count(*) FROM deliveries")  # a long report, still open
            started = time.monotonic()
            with pytest.raises(StoreError, match="LockNotAvailable"):
                await open_store(pg_url).open()
            assert time.monotonic() - started < 5
    finally:
        await reader.close()
    upgraded = open_store(pg_url)  # the report is over: the next try goes through
    await upgraded.open()
    await upgraded.close()


async def _stalls_at_the_first_query(client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
    """A PostgreSQL that lets a client connect and log in, then never answers its first query:
    passes both ways until the client sends a simple query ('Q'), then holds it."""
    parts = urlsplit(PG_URL or "")
    server, to_server = await asyncio.open_connection(parts.hostname, parts.port or 5432)

    async def back() -> None:
        with contextlib.suppress(ConnectionError):
            while data := await server.read(65536):
                to_client.write(data)
                await to_client.drain()

    backwards = asyncio.create_task(back())
    try:
        untyped = True  # the SSLRequest and the StartupMessage have no type byte
        while True:
            head = await client.readexactly(1 if not untyped else 0)
            length = int.from_bytes(await client.readexactly(4), "big")
            body = await client.readexactly(length - 4)
            if head == b"Q":
                await client.read()  # held: until the client goes away
                return
            to_server.write(head + length.to_bytes(4, "big") + body)
            if untyped and int.from_bytes(body[:4], "big") != 80877103:  # past the SSLRequest
                untyped = False
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    finally:
        backwards.cancel()
        to_server.close()
        to_client.close()


@contextlib.contextmanager
def stalling_postgresql() -> Iterator[int]:
    """A port where PostgreSQL lets clients log in and then never answers their first query
    (`_stalls_at_the_first_query`), served from a thread of its own so that blocking test code
    (starting a `serve` process) does not stall it too."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    serving = asyncio.start_server(_stalls_at_the_first_query, "127.0.0.1", 0)
    server = asyncio.run_coroutine_threadsafe(serving, loop).result(5)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:

        async def shut() -> None:
            server.close()
            for task in asyncio.all_tasks():  # the connections it is holding
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shut(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def via(url: str, port: int, **params: str) -> str:
    """`url` with its host and port replaced by 127.0.0.1:`port`."""
    parts = urlsplit(with_query(url, **params))
    return urlunsplit(parts._replace(netloc=f"{parts.netloc.rpartition('@')[0]}@127.0.0.1:{port}"))


async def test_an_open_that_hangs_after_login_fails_and_leaves_no_connection(pg_url, monkeypatch):
    """A database that takes the login and then hangs: the open gives up after asyncpg's
    timeout (StoreError: `serve` tries again later), and closes what it opened, or every retry
    would leave a connection open on the server."""
    monkeypatch.setattr(postgres_store, "CONNECT_TIMEOUT", 1.0)
    monkeypatch.setattr(postgres_store, "COMMAND_TIMEOUT", 1.0)
    name = f"stalled-{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_url)
    try:
        with stalling_postgresql() as port, pytest.raises(StoreError):
            await asyncio.wait_for(open_store(via(pg_url, port, application_name=name)).open(), 20)

        async def none_left() -> bool:
            count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            return await admin.fetchval(count, name) == 0

        await eventually(none_left, waits=50, what="the stalled connection to be closed on the server")
    finally:
        await admin.close()


async def test_a_sqlite_store_in_a_directory_not_made_yet_makes_it_private(tmp_path):
    path = tmp_path / "var" / "lib" / "postback-bridge" / "bridge.db"
    store = open_store(f"sqlite:///{path}")
    await store.open()
    try:
        await store.ping()
    finally:
        await store.close()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_an_old_sqlite_store_opened_by_several_at_once_is_upgraded_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    first = open_store(url)
    await first.open()
    await put(first, 1)
    await first.close()
    for _ in range(10):
        await _make_it_a_store_from_before_ordered(url)
        stores = [open_store(url) for _ in range(4)]  # the server and `deliveries`, say
        try:
            await asyncio.gather(*(s.open() for s in stores))
        finally:
            for s in stores:
                await s.close()


async def test_opening_a_postgres_store_does_not_stop_the_running_ones_behind_a_reader(pg_url):
    """Opening runs the schema script; in steady state it must take no lock that waits for a
    long report on `deliveries`, since everyone's postbacks would queue behind that wait."""
    running = PostgresStore(pg_url)
    await running.open()
    reader = await asyncpg.connect(pg_url)
    try:
        await put(running, 1)
        report = reader.transaction()
        await report.start()
        await reader.fetchval("SELECT count(*) FROM deliveries")  # holds a read lock until done
        starting = PostgresStore(pg_url)
        opening = asyncio.create_task(starting.open())
        await asyncio.sleep(0.3)
        async with asyncio.timeout(3):
            await put(running, 2)  # a postback at the running instance meanwhile
        await report.rollback()
        await opening
        await starting.close()
    finally:
        await reader.close()
        await running.close()


async def test_release_gives_back_unattempted_only_while_the_claim_is_ours(store):
    await put(store, 1)
    await put(store, 2)
    c1, c2 = await claim(store, "a", lease=0.3)
    await store.release([c1], owner="a")
    (again,) = await claim(store, "b")
    assert (again.id, again.attempt) == (c1.id, 1)  # the released claim was not an attempt
    # a gives c1 back a second time (late): b holds it now at the same attempt number
    await store.release([c1], owner="a")
    await asyncio.sleep(0.5)
    (taken,) = await claim(store, "c")  # c2's lease ran out; c holds it now
    assert (taken.id, taken.attempt) == (c2.id, 2)
    await store.release([c2], owner="a")  # a's late release must not free c's claim
    assert await claim(store, "d") == []
    await store.release([again], owner="b")  # b's own release does
    (back,) = await claim(store, "d")
    assert (back.id, back.attempt) == (c1.id, 1)


async def test_opening_recovers_only_leases_of_dead_processes_on_this_host(store_url):
    first = open_store(store_url)
    await first.open()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        owners = [
            f"{NODE}:{dead_pid()}:gone",
            f"{NODE}:{alive.pid}:live",
            f"elsewhere.example:{dead_pid()}:other-host",
            f"{NODE}:{os.getpid()}:earlier-life",  # PID 1 in a restarted container
        ]
        held = {}
        for n, owner in enumerate(owners):
            await put(first, n, conversation=str(n))
            (c,) = await claim(first, owner, limit=1)
            held[owner] = c.event_id
        await first.close()
        second = open_store(store_url)  # as `deliveries` or a restarted server would
        await second.open()
        try:
            back = await claim(second, "new")
            assert {c.event_id for c in back} == {held[owners[0]], held[owners[3]]}
            assert {c.attempt for c in back} == {2}
        finally:
            await second.close()
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------------------- operations


async def test_replay_makes_dead_pending_and_delivered_only_with_force(store):
    for n in range(3):
        await put(store, n)
    c0, c1, _leased = await claim(store)
    await store.complete([finished(c0, Dead("HTTP 400")), finished(c1, Done())])
    assert await store.replay(DeliveryFilter()) == [c0.id]
    (row,) = await store.list_deliveries(DeliveryFilter(ids=(c0.id,)))
    assert (row.status, row.last_error) == ("pending", None)
    assert row.next_at <= time.time()
    assert await store.replay(DeliveryFilter()) == []  # nothing dead left; c2 (leased) untouched
    assert await store.replay(DeliveryFilter(), force=True) == [c1.id]
    got = await claim(store)
    assert {c.id for c in got} == {c0.id, c1.id}
    assert {c.attempt for c in got} == {2}


async def test_a_replay_keeps_when_a_delivery_came_in_and_restarts_its_max_age(store):
    """The time range of `deliveries` and `replay` is when a delivery came in, replayed or not:
    "replay what died in last night's outage" finds it again. max_age counts from the replay."""
    await put(store, 1)
    (c,) = await claim(store)
    await store.complete([finished(c, Dead("HTTP 400"))])
    (before,) = await store.list_deliveries(DeliveryFilter(ids=(c.id,)))
    await asyncio.sleep(0.3)
    replayed_at = time.time()
    assert await store.replay(DeliveryFilter(until=replayed_at)) == [c.id]
    (row,) = await store.list_deliveries(DeliveryFilter(ids=(c.id,)))
    assert (row.status, row.created_at) == ("pending", before.created_at)
    assert [r.id for r in await store.list_deliveries(DeliveryFilter(until=before.created_at + 0.1))] == [c.id]
    assert await store.list_deliveries(DeliveryFilter(since=before.created_at + 0.1)) == []
    # 0.2 s of max_age: past it counted from when it came in, not counted from the replay
    assert await store.expire("crm", max_age=0.2) == 0
    (again,) = await claim(store)
    assert again.attempt == 2 and replayed_at <= again.created_at <= time.time()  # max_age's clock
    assert (await store.list_deliveries(DeliveryFilter(ids=(c.id,))))[0].created_at == before.created_at
    await store.complete([finished(again, Dead("HTTP 400"))])
    assert await store.replay(DeliveryFilter(ids=(c.id,))) == [c.id]  # a second replay keeps it too
    assert [r.created_at for r in await store.event_deliveries(c.event_id)] == [before.created_at]


async def test_failed_deliveries_are_listed_and_replayed_now_with_the_dead(store):
    """CONTRACT §2: `replay` requeues dead or failed ones. Failed: pending after a failed attempt,
    waiting for its retry; not one being sent, nor one never tried."""
    failed, dead, sending, fresh = [await put(store, n) for n in range(4)]
    c_failed, c_dead, c_sending = await claim(store, limit=3)
    await store.complete([finished(c_failed, RetryAt(time.time() + 3600, "HTTP 503")), finished(c_dead, Dead("no"))])
    assert [c.event_id for c in (c_failed, c_dead, c_sending)] == [failed, dead, sending]
    listed = await store.list_deliveries(DeliveryFilter(status="failed"))
    assert [(r.event_id, r.status, r.last_error) for r in listed] == [(failed, "pending", "HTTP 503")]
    assert await store.replay(DeliveryFilter(status="failed")) == [c_failed.id]
    (row,) = await store.list_deliveries(DeliveryFilter(ids=(c_failed.id,)))
    assert (row.status, row.last_error) == ("pending", None) and row.next_at <= time.time()  # due now, not in 1h
    assert await store.list_deliveries(DeliveryFilter(status="failed")) == []
    again = {c.event_id: c for c in await claim(store)}  # the replayed one, and the one never tried
    assert set(again) == {failed, fresh}
    await store.complete([finished(again[failed], RetryAt(time.time() + 3600, "HTTP 503"))])  # failed again
    await store.release([again[fresh]], owner="a")
    assert await store.replay(DeliveryFilter()) == sorted([c_failed.id, c_dead.id])  # both kinds, by default
    pending = {r.event_id for r in await store.list_deliveries(DeliveryFilter(status="pending"))}
    assert pending == {failed, dead, sending, fresh}
    assert [c.event_id for c in await claim(store)] == [failed, dead, fresh]  # c_sending is still leased


async def test_replay_filters(store):
    await put(store, 1, destinations=("crm", "log"))
    await put(store, 2)
    claims = await claim(store) + await store.claim("log", limit=10, lease=30, ordered=False, owner="a")
    await store.complete([finished(c, Dead("no")) for c in claims])
    by = {(c.event_id, c.destination): c.id for c in claims}
    log_id = next(i for (e, d), i in by.items() if d == "log")
    assert await store.replay(DeliveryFilter(destination="log")) == [log_id]
    some = sorted(by.values())[:1]
    assert await store.replay(DeliveryFilter(ids=tuple(some))) == ([] if some == [log_id] else some)
    assert len(await store.replay(DeliveryFilter(since=time.time() + 60))) == 0
    rest = await store.replay(DeliveryFilter(limit=1))
    assert len(rest) == 1


async def test_complete_says_which_results_made_their_delivery_dead_once(store):
    """What bridge_deliveries_died_total counts: a dead verdict that applied; not one recorded
    twice, one from an attempt whose lease ran out, nor one beaten by `delivered` in its batch."""
    for n in range(3):
        await put(store, n, conversation=f"c{n}")
    c0, c1, c2 = sorted(await claim(store), key=lambda c: c.id)
    refused = finished(c0, Dead("HTTP 400"))
    batch = [refused, finished(c1, RetryAt(time.time() + 60, "HTTP 500")), finished(c2, Done())]
    assert await store.complete(batch) == [refused]
    assert await store.complete([refused]) == []  # recorded again (the commit went through, its answer did not)
    await put(store, 3, conversation="c3")
    (old,) = await claim(store, lease=0.3)
    await asyncio.sleep(0.5)
    (new,) = await claim(store)  # the lease ran out: claimed again
    assert (new.id, new.attempt) == (old.id, 2)
    assert await store.complete([finished(old, Dead("late"))]) == []
    # a dead and a delivered verdict for one delivery in one batch: the peer has it
    assert await store.complete([finished(new, Dead("HTTP 400")), finished(new, Done())]) == []
    rows = {r.id: r.status for r in await store.list_deliveries(DeliveryFilter())}
    assert rows == {c0.id: "dead", c1.id: "pending", c2.id: "delivered", new.id: "delivered"}


async def test_a_successful_attempt_keeps_its_detail_as_its_reason(store):
    """A success with something to say (a file the media step did not keep, a Slack upload
    refused) says it in the attempt's record; the delivery itself has no last error."""
    for n in range(2):
        await put(store, n)
    said, plain = sorted(await claim(store), key=lambda c: c.id)
    noted = dataclasses.replace(finished(said, Done()), detail="https://x/1.jpg: HTTP 404")
    await store.complete([noted, finished(plain, Done())])
    assert [a.error for a in await store.attempts(said.id)] == ["https://x/1.jpg: HTTP 404"]
    assert [a.error for a in await store.attempts(plain.id)] == [None]
    rows = {r.id: r for r in await store.list_deliveries(DeliveryFilter())}
    assert (rows[said.id].status, rows[said.id].last_error) == ("delivered", None)


async def test_abandon_unknown_kills_pending_deliveries_of_removed_destinations(store):
    await put(store, 1, destinations=("crm", "gone", "also-gone"))
    assert await store.abandon_unknown({"crm", "slack"}, "destination removed") == {"gone": 1, "also-gone": 1}
    rows = {r.destination: r for r in await store.list_deliveries(DeliveryFilter())}
    assert (rows["gone"].status, rows["gone"].last_error) == ("dead", "destination removed")
    assert rows["crm"].status == "pending"
    assert await store.abandon_unknown({"crm"}, "x") == {}
    assert await store.abandon_unknown(set(), "no destinations at all") == {"crm": 1}  # crm too


async def test_abandon_unknown_adds_the_follow_up_of_the_deliveries_of_its_route(store):
    """A reply's SMS whose destination left the config gets its feedback delivery with its death,
    in the same transaction (`follow_up`), whatever that destination was; other routes'
    deliveries, and those of its route to a destination that is kept, do not. The count stays
    by destination, and a follow-up to a destination not kept itself is not added."""
    reply = make_event(1)
    other = make_event(2)
    await store.ingest(reply, dedup_key(reply), [NewDelivery("old-sms", "replies", "alice")])
    await store.ingest(
        other, dedup_key(other), [NewDelivery("old-sms", "r", "bob"), NewDelivery("crm", "replies", "bob")]
    )
    up = ExpiryFollowUp("replies", "~feedback", "dead")
    kept = {"crm", "~feedback"}
    assert await store.abandon_unknown(kept, "destination removed", follow_up=up) == {"old-sms": 2}
    (row,) = await store.list_deliveries(DeliveryFilter(destination="~feedback"))
    assert (row.event_id, row.route, row.status) == (reply["id"], "dead", "pending")
    (taken,) = await store.claim("~feedback", limit=5, lease=30, ordered=False, owner="a")
    assert taken.conversation == "alice" and json.loads(taken.body) == reply
    (crm,) = await store.list_deliveries(DeliveryFilter(destination="crm"))
    assert crm.status == "pending"
    assert await store.abandon_unknown(kept, "destination removed", follow_up=up) == {}  # dead already: nothing more
    assert len(await store.list_deliveries(DeliveryFilter(destination="~feedback"))) == 1
    # replies no longer taken: `~feedback` is not kept, so nothing is added for it
    late = make_event(3)
    await store.ingest(late, dedup_key(late), [NewDelivery("old-sms", "replies", "carol")])
    assert await store.abandon_unknown({"crm"}, "destination removed", follow_up=up) == {"old-sms": 1, "~feedback": 1}
    assert [r.status for r in await store.list_deliveries(DeliveryFilter(destination="~feedback"))] == ["dead"]


async def test_abandon_unknown_can_leave_what_is_leased_to_its_attempt(store):
    """With `leave_leased` (a reload, while the old config's loops still run), a delivery leased
    right now is left pending, to its attempt's verdict; one whose lease ran out (nobody is
    sending it) dies with its follow-up. Given back unsent (as a stopping loop does), the next
    sweep makes it dead with its follow-up too. Without it, both die at once."""
    sending, lapsed = make_event(1), make_event(2)
    await store.ingest(sending, dedup_key(sending), [NewDelivery("old-sms", "replies", "alice")])
    (held,) = await store.claim("old-sms", limit=5, lease=30, ordered=False, owner="a")
    await store.ingest(lapsed, dedup_key(lapsed), [NewDelivery("old-sms", "replies", "bob")])
    await store.claim("old-sms", limit=5, lease=0.05, ordered=False, owner="b")
    await asyncio.sleep(0.1)  # b's lease ran out
    up = ExpiryFollowUp("replies", "~feedback", "dead")
    kept = {"~feedback"}
    assert await store.abandon_unknown(kept, "destination removed", follow_up=up, leave_leased=True) == {"old-sms": 1}
    feedback = await store.list_deliveries(DeliveryFilter(destination="~feedback"))
    assert [row.event_id for row in feedback] == [lapsed["id"]]
    statuses = {r.event_id: r.status for r in await store.list_deliveries(DeliveryFilter(destination="old-sms"))}
    assert statuses == {sending["id"]: "pending", lapsed["id"]: "dead"}
    await store.release([held], owner="a")  # the old loop stops without sending it
    assert await store.abandon_unknown(kept, "destination removed", follow_up=up, leave_leased=True) == {"old-sms": 1}
    feedback = await store.list_deliveries(DeliveryFilter(destination="~feedback"))
    assert sorted(row.event_id for row in feedback) == sorted([sending["id"], lapsed["id"]])
    # without leave_leased, what is leased dies too
    late = make_event(3)
    await store.ingest(late, dedup_key(late), [NewDelivery("old-sms", "replies", "carol")])
    await store.claim("old-sms", limit=5, lease=30, ordered=False, owner="a")
    assert await store.abandon_unknown(kept, "destination removed", follow_up=up) == {"old-sms": 1}


async def test_expire_kills_deliveries_past_max_age_unless_being_sent(store):
    retried = await put(store, 1)  # failed once, waiting for its retry
    sending = await put(store, 2)  # an attempt in flight: its lease runs
    lapsed = await put(store, 3)  # claimed, but its lease ran out: nobody is sending it
    delivered = await put(store, 4)
    never = await put(store, 5)  # never attempted (its destination is down)
    elsewhere = await put(store, 6, destinations=("other",))
    (c_retried,) = await claim(store, "a", limit=1)
    await store.complete([finished(c_retried, RetryAt(time.time() + 60, "HTTP 500"))])
    (c_sending,) = await claim(store, "a", limit=1, lease=30)
    (c_lapsed,) = await claim(store, "a", limit=1, lease=0.3)
    (c_delivered,) = await claim(store, "a", limit=1)
    await store.complete([finished(c_delivered, Done())])
    assert [c.event_id for c in (c_retried, c_sending, c_lapsed, c_delivered)] == [retried, sending, lapsed, delivered]
    assert await store.expire("crm", max_age=5) == 0  # none is that old (a slow machine may take 0.5 s to here)
    await asyncio.sleep(0.7)
    young = await put(store, 7)
    assert await store.expire("crm", max_age=3600) == 0

    assert await store.expire("crm", max_age=0.5) == 3
    rows = {r.event_id: r for r in await store.list_deliveries(DeliveryFilter())}
    assert {e: (r.status, r.last_error, r.next_at is None) for e, r in rows.items() if r.status == "dead"} == {
        retried: ("dead", "max_age 0.5s passed after 1 attempts: HTTP 500", True),
        lapsed: ("dead", "max_age 0.5s passed after 1 attempts", True),
        never: ("dead", "max_age 0.5s passed after 0 attempts", True),
    }
    kept = [rows[e].status for e in (sending, delivered, young, elsewhere)]
    assert kept == ["pending", "delivered", "pending", "pending"]
    assert (await store.stats())["crm"].dead == 3
    assert await store.expire("crm", max_age=0.5) == 0  # once
    assert [c.event_id for c in await claim(store, "b")] == [young]  # the dead are not handed out
    # the attempt in flight still has the last word
    await store.complete([finished(c_sending, Done())])
    assert [r.status for r in await store.list_deliveries(DeliveryFilter(event_id=sending))] == ["delivered"]
    # one destination at a time, each with its own max_age
    assert await store.expire("other", max_age=3600) == 0
    assert await store.expire("other", max_age=0.5) == 1
    (other,) = await store.list_deliveries(DeliveryFilter(destination="other"))
    assert (other.status, other.last_error) == ("dead", "max_age 0.5s passed after 0 attempts")
    assert len(await store.replay(DeliveryFilter(status="dead"))) == 4  # dead as any other: replayable


async def test_expire_leaves_a_last_retry_due_at_the_deadline_to_its_worker(store):
    last = await put(store, 1)
    (c,) = await claim(store)
    await asyncio.sleep(0.3)
    deadline = time.time()  # max_age 0.3s: the last retry is cut to the deadline, due now
    await store.complete([finished(c, RetryAt(deadline, "HTTP 500"))])
    assert await store.expire("crm", max_age=0.3, grace=5) == 0  # due less than 5 s ago: the worker's
    assert [c.event_id for c in await claim(store)] == [last]
    (c,) = await store.list_deliveries(DeliveryFilter())
    assert c.status == "pending"


async def test_replay_can_be_kept_to_the_configured_destinations(store):
    await put(store, 1, destinations=("crm", "gone"))
    assert await store.abandon_unknown({"crm"}, "destination removed") == {"gone": 1}
    assert await store.replay(DeliveryFilter(destinations=("crm",))) == []
    rows = {r.destination: r for r in await store.list_deliveries(DeliveryFilter())}
    assert await store.replay(DeliveryFilter(destinations=("crm", "gone"))) == [rows["gone"].id]


async def test_stats_count_pending_and_dead_per_destination(store):
    assert await store.stats() == {}
    before = time.time()
    await put(store, 1, destinations=("crm", "log"))
    await put(store, 2)
    await put(store, 3)
    c = (await claim(store, limit=2))[:2]
    await store.complete([finished(c[0], Dead("x")), finished(c[1], Done())])
    stats = await store.stats()
    assert (stats["crm"].pending, stats["crm"].dead) == (1, 1)
    assert (stats["log"].pending, stats["log"].dead) == (1, 0)
    assert before - 1 <= stats["log"].oldest_pending <= time.time()


async def test_purge_deletes_finished_deliveries_their_attempts_and_orphaned_events(store):
    kept_event = await put(store, 1, destinations=("crm", "log"))
    gone_event = await put(store, 2)
    pending_event = await put(store, 3)
    claims = await claim(store)
    await store.complete([finished(c, Done()) for c in claims if c.event_id != pending_event])
    now = time.time() + 1
    assert await store.purge(delivered_before=now, dead_before=now, batch=1) == 1
    assert await store.purge(delivered_before=now, dead_before=now, batch=10) == 1
    assert await store.purge(delivered_before=now, dead_before=now) == 0
    assert await store.get_event(gone_event) is None
    assert await store.get_event(kept_event) is not None  # its log delivery is pending
    assert [r.destination for r in await store.event_deliveries(kept_event)] == ["log"]
    assert await store.get_event(pending_event) is not None
    for c in claims:
        if c.event_id != pending_event:
            assert await store.attempts(c.id) == []
    assert await store.purge(delivered_before=0, dead_before=0) == 0  # nothing that old


async def test_list_deliveries_filters(store):
    e1 = await put(store, 1, destinations=("crm", "log"))
    await put(store, 2)
    (c,) = await store.claim("log", limit=10, lease=30, ordered=False, owner="a")
    await store.complete([finished(c, Dead("x"))])
    rows = await store.list_deliveries(DeliveryFilter())
    assert [r.id for r in rows] == sorted((r.id for r in rows), reverse=True)
    assert len(rows) == 3
    assert [r.destination for r in await store.list_deliveries(DeliveryFilter(status="dead"))] == ["log"]
    assert len(await store.list_deliveries(DeliveryFilter(destination="crm"))) == 2
    assert {r.destination for r in await store.list_deliveries(DeliveryFilter(event_id=e1))} == {"crm", "log"}
    assert [r.id for r in await store.list_deliveries(DeliveryFilter(ids=(rows[0].id, rows[2].id)))] == [
        rows[0].id,
        rows[2].id,
    ]
    assert await store.list_deliveries(DeliveryFilter(since=time.time() + 60)) == []
    assert await store.list_deliveries(DeliveryFilter(until=0)) == []
    assert len(await store.list_deliveries(DeliveryFilter(limit=2))) == 2


async def test_list_events_filters_newest_first(store):
    ids = []
    for n, (sender, text) in enumerate([("15551110000", "STOP"), ("15552220000", "stop now"), ("15552220000", "hi")]):
        ids.append(await put(store, n, sender=sender, text=text))
        await asyncio.sleep(0.01)
    assert [e["id"] for e in await store.list_events(EventFilter())] == ids[::-1]
    assert [e["id"] for e in await store.list_events(EventFilter(sender="+15552220000"))] == ids[:0:-1]
    assert [e["id"] for e in await store.list_events(EventFilter(keyword="stop"))] == ids[1::-1]
    assert len(await store.list_events(EventFilter(type="sms.received", to="86717"))) == 3
    assert await store.list_events(EventFilter(type="mms.received")) == []
    assert await store.list_events(EventFilter(to="99999")) == []
    assert await store.list_events(EventFilter(since=time.time() + 60)) == []
    assert len(await store.list_events(EventFilter(until=time.time() + 60, limit=2))) == 2


async def test_conversation_state_is_kept_per_destination(store):
    assert await store.get_conversation("slack", "+1555|86717") is None
    await store.put_conversation("slack", "+1555|86717", "1700000000.000100")
    await store.put_conversation("email", "+1555|86717", "<m@x>")
    await store.put_conversation("slack", "+1555|86717", "1700000000.000200")
    assert await store.get_conversation("slack", "+1555|86717") == "1700000000.000200"
    assert await store.get_conversation("email", "+1555|86717") == "<m@x>"


async def test_deliveries_that_wait_for_the_media_step_are_released_when_it_ends(store):
    """An MMS's deliveries are stored due `media.wait` later, beside its `~media` step; the step
    rewrites the event (archived_url) and, when it ends, makes them due at once (CONTRACT §9)."""
    event = make_event(1)
    deliveries = [NewDelivery("~media", "media", "c", ordered=False), NewDelivery("crm", "r", "c", delay=3600)]
    await store.ingest(event, dedup_key(event), deliveries)
    assert await claim(store) == []  # waits: due in an hour
    step = await store.claim("~media", limit=10, lease=30, ordered=False, owner="a")
    assert [c.destination for c in step] == ["~media"]
    body = json.dumps({**event, "media": [{"url": "https://x/1.jpg", "archived_url": "https://b/media/1"}]})
    assert await store.update_event(event["id"], body) == []  # progress only: still waiting
    assert await claim(store) == []
    assert await store.update_event(event["id"], None, release_except="~media") == ["crm"]
    (claimed,) = await claim(store)
    assert claimed.event["media"][0]["archived_url"] == "https://b/media/1"  # the event as updated
    assert await store.update_event(event["id"], None, release_except="~media") == []  # leased: left alone


async def test_keep_meta_keeps_the_first_value(store):
    assert await store.keep_meta("media_link_key", "first") == "first"
    assert await store.keep_meta("media_link_key", "second") == "first"


# ---------------------------------------------------------------------------- PostgreSQL only


async def test_postgres_errors_are_store_errors_without_the_password():
    if not PG_URL:
        pytest.skip(NO_PG)
    parts = urlsplit(PG_URL)
    url = urlunsplit(parts._replace(netloc="bridge:s3cret-pw@127.0.0.1:1"))
    with pytest.raises(StoreError) as info:
        await PostgresStore(url).open()
    assert "s3cret-pw" not in str(info.value) and "127.0.0.1:1" in str(info.value)
    with pytest.raises(StoreError):
        await PostgresStore(url).ping()  # never opened


async def test_postgres_ping_fails_when_the_database_cannot_take_a_write(pg_url):
    store = PostgresStore(with_query(pg_url, statement_timeout="300"))
    await store.open()
    admin = await asyncpg.connect(pg_url)
    try:
        await store.ping()
        async with admin.transaction():
            await admin.execute("LOCK TABLE meta IN ACCESS EXCLUSIVE MODE")  # writes to it wait
            t0 = time.monotonic()
            with pytest.raises(StoreError, match="statement timeout"):
                await store.ping()
            assert time.monotonic() - t0 < 5
        await store.ping()
    finally:
        await admin.close()
        await store.close()


async def test_postgres_store_reconnects_after_its_connections_are_killed(pg_url):
    name = f"bridge-test-{uuid.uuid4().hex[:8]}"
    store = PostgresStore(with_query(pg_url, application_name=name))
    await store.open()
    admin = await asyncpg.connect(pg_url)
    try:
        await store.ping()
        query = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1"
        assert await admin.fetchval(query, name) >= 1
        await asyncio.sleep(0.1)
        failures = 0
        for n in range(3):
            event = make_event(n)
            try:
                assert (await store.ingest(event, dedup_key(event), [])).status == "accepted"
            except StoreError:  # at most the one that met the dead connection
                failures += 1
        assert failures <= 1
    finally:
        await admin.close()
        await store.close()


async def test_two_postgres_stores_never_claim_the_same_delivery(pg_url):
    one, two = PostgresStore(pg_url), PostgresStore(pg_url)
    await one.open()
    await two.open()
    try:
        for n in range(200):
            await put(one if n % 2 else two, n, conversation=str(n % 7))
        got: list[tuple[str, Claim]] = []

        async def worker(store: Store, owner: str) -> None:
            while batch := await store.claim("crm", limit=random.randint(1, 9), lease=30, ordered=False, owner=owner):
                got.extend((owner, c) for c in batch)
                await store.complete([finished(c, Done()) for c in batch])

        await asyncio.gather(*(worker(s, f"{name}{i}") for name, s in (("one", one), ("two", two)) for i in range(4)))
        counts = Counter(c.id for _, c in got)
        assert len(counts) == 200 and max(counts.values()) == 1
        assert {c.attempt for _, c in got} == {1}
        assert len({owner[:3] for owner, _ in got}) == 2  # both stores took part
    finally:
        await one.close()
        await two.close()


async def test_two_postgres_stores_keep_each_conversation_in_order(pg_url):
    one, two = PostgresStore(pg_url), PostgresStore(pg_url)
    await one.open()
    await two.open()
    try:
        # ingested concurrently from both stores, interleaved within each conversation
        await asyncio.gather(
            *(
                put(one if n % 2 else two, n, conversation=f"conv{n % 10}", sender=f"1555{n % 10:07d}")
                for n in range(120)
            )
        )
        inflight: dict[str, int] = {}
        sent: dict[str, list[int]] = defaultdict(list)
        violations: list[str] = []

        async def worker(store: Store, owner: str) -> None:
            idle = 0
            while idle < 3:
                batch = await store.claim("crm", limit=4, lease=30, ordered=True, owner=owner)
                if not batch:
                    idle += 1
                    await asyncio.sleep(0.02)
                    continue
                idle = 0
                for c in batch:
                    if c.conversation in inflight:
                        violations.append(f"{c.conversation}: {c.id} while {inflight[c.conversation]} in flight")
                    inflight[c.conversation] = c.id
                await asyncio.sleep(0.005)
                for c in batch:
                    sent[c.conversation].append(c.id)
                    inflight.pop(c.conversation, None)
                await store.complete([finished(c, Done()) for c in batch])

        await asyncio.gather(*(worker(s, f"w{i}") for s in (one, two) for i in range(3)))
        assert violations == []
        assert sum(len(v) for v in sent.values()) == 120
        for conversation, ids in sent.items():
            assert ids == sorted(ids), f"{conversation} sent out of order: {ids}"
    finally:
        await one.close()
        await two.close()


async def test_the_same_postback_at_two_stores_at_once_is_stored_once(pg_url):
    one, two = PostgresStore(pg_url), PostgresStore(pg_url)
    await one.open()
    await two.open()
    try:
        for n in range(20):
            a, b = make_event(n), make_event(n)
            results = await asyncio.gather(
                one.ingest(a, dedup_key(a), [NewDelivery("crm", "r", "c")]),
                two.ingest(b, dedup_key(b), [NewDelivery("crm", "r", "c")]),
            )
            assert sorted(r.status for r in results) == ["accepted", "duplicate"]
            assert results[0].event_id == results[1].event_id
        assert len(await one.list_deliveries(DeliveryFilter(limit=1000))) == 20
    finally:
        await one.close()
        await two.close()


# ---------------------------------------------------------------------------- the real process


def hook_config(store: str, url: str) -> dict[str, Any]:
    return {
        "store": store,
        "retry": {"initial": "50ms", "max_interval": "200ms", "max_age": "1h"},
        "destinations": {"crm": {"type": "webhook", "url": url + "/hook"}},
        "default": ["crm"],
    }


def log_lines(bridge: BridgeProcess) -> list[dict[str, Any]]:
    """This process's JSON log lines (both processes share a work directory)."""
    assert bridge.stderr_path is not None
    lines = []
    for line in bridge.stderr_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    return lines


async def wait_for_ids(sink: Sink, ids: set[str], timeout: float) -> None:
    def missing() -> set[str]:
        return ids - {r.json()["id"] for r in sink.received}

    await eventually(lambda: not missing(), timeout, lambda: f"{len(ids)} events delivered ({len(missing())} missing)")


@pytest.mark.slow
async def test_serve_with_postgres_delivers_end_to_end(pg_url, sink, bridge_factory):
    bridge = bridge_factory(hook_config(pg_url, sink.url))
    bridge.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(bridge.url + "/readyz") as r:
            assert r.status == 200
        async with session.post(bridge.url + "/postback", data=sms(1)) as r:
            assert r.status == 200
            body = await r.json()
        async with session.post(bridge.url + "/postback", data=sms(1)) as r:
            assert (r.status, await r.json()) == (200, {"status": "duplicate", "id": body["id"]})
    (request,) = await sink.wait_for(1)
    assert request.json()["id"] == body["id"] and request.json()["from"] == "+15552312102"
    await asyncio.sleep(0.3)
    assert len(sink.received) == 1
    listing = bridge.cli("deliveries", "-c", str(bridge.config_path), "--json").stdout
    assert '"status": "delivered"' in listing
    assert bridge.stop() == 0


@pytest.mark.slow
async def test_two_serve_processes_on_one_database_share_the_work(pg_url, sink, bridge_factory):
    async def slow_ok(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)  # a backlog builds, and both instances poll it
        return web.Response(text="ok")

    sink.default = slow_ok
    env = {"BRIDGE_LOG_LEVEL": "info"}
    first = bridge_factory(hook_config(pg_url, sink.url), env)
    first.start()
    second = bridge_factory(hook_config(pg_url, sink.url), env)  # same database, same destination
    second.start()
    bridges = [first, second]
    ids: dict[int, str] = {}
    limit = asyncio.Semaphore(16)

    async with aiohttp.ClientSession() as session:

        async def send(n: int, bridge: BridgeProcess) -> tuple[int, dict[str, str]]:
            async with limit, session.post(bridge.url + "/postback", data=sms(n)) as r:
                return r.status, await r.json()

        answers = await asyncio.gather(*(send(n, bridges[n % 2]) for n in range(300)))
        for n, (status, body) in enumerate(answers):
            assert (status, body["status"]) == (200, "accepted"), (n, status, body)
            ids[n] = body["id"]
        # Skycore retrying some of them, at either instance, and some at both at once
        again = await asyncio.gather(
            *(send(n, bridges[(n + 1) % 2]) for n in range(0, 300, 7)),
            *(send(n, b) for n in range(3, 300, 31) for b in bridges),
        )
        assert all(status == 200 and body["status"] == "duplicate" for status, body in again), again
        assert [body["id"] for _, body in again[: len(range(0, 300, 7))]] == [ids[n] for n in range(0, 300, 7)]

    await wait_for_ids(sink, set(ids.values()), timeout=40)
    await asyncio.sleep(0.5)
    counts = Counter(r.json()["id"] for r in sink.received)
    assert sum(counts.values()) == 300 and max(counts.values()) == 1, "an event was sent twice"

    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT status, attempts, count(*) FROM deliveries GROUP BY status, attempts")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("delivered", 1, 300)], "a delivery was claimed more than once"
    for bridge in bridges:
        assert bridge.stop() == 0
    per_process = [sum(line.get("msg") == "delivery attempt" for line in log_lines(b)) for b in bridges]
    assert sum(per_process) == 300 and min(per_process) > 0, per_process


@pytest.mark.slow
def test_check_config_never_shows_the_database_password(tmp_path):
    for url in (
        "postgresql://bridge:pw-in-userinfo@db:5432/b",
        "postgresql://bridge@db/b?sslmode=require&password=pw-in-query",
    ):
        path = tmp_path / "config.yaml"
        path.write_text(f"store: {url}\ndestinations: {{audit: {{type: log}}}}\ndefault: [audit]\n")
        done = subprocess.run(
            [sys.executable, "-m", "bridge", "check-config", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert "store postgresql://bridge" in done.stdout and "****" in done.stdout
        assert "pw-in" not in done.stdout + done.stderr


async def test_serve_keeps_apart_what_the_old_key_merged(store_url, sink, bridge_factory):
    """Through the real `serve` (the postback lane in front), on SQLite and PostgreSQL: a store the
    previous version left holds an N201 under the old key; the N202 of that message, which the
    old key answered `duplicate`, is a new event, as is each of the rest; a byte-for-byte repeat
    of each is `duplicate` with the first id; each event reaches the receiver once."""
    before = open_store(store_url)
    await before.open()
    sent = event_from(DISTINCT["sent"])
    await before.ingest(sent, dedup_key_v1(sent), [NewDelivery("crm", "default", "old")])
    await before.close()

    bridge = bridge_factory(hook_config(store_url, sink.url))
    bridge.start()
    firsts = {}
    async with aiohttp.ClientSession() as session:
        for name, body in DISTINCT.items():
            if name == "sent":
                continue  # stored before the upgrade, under the old key
            async with session.post(bridge.url + "/postback", data=body) as r:
                answer = await r.json()
                assert (r.status, answer["status"]) == (200, "accepted"), (name, answer)
                firsts[name] = answer["id"]
        for name, body in DISTINCT.items():
            if name in firsts:
                async with session.post(bridge.url + "/postback", data=body) as r:
                    assert (r.status, await r.json()) == (200, {"status": "duplicate", "id": firsts[name]}), name
    await wait_for_ids(sink, {sent["id"], *firsts.values()}, timeout=10)
    await asyncio.sleep(0.3)
    got = Counter(r.json()["id"] for r in sink.received)
    assert got == Counter({sent["id"]: 1, **{i: 1 for i in firsts.values()}})
    by_id = {r.json()["id"]: r.json() for r in sink.received}
    assert by_id[firsts["delivered"]]["code"] == "N202" and by_id[sent["id"]]["code"] == "N201"
    assert bridge.stop() == 0


async def test_a_tracking_id_given_with_a_result_is_kept_and_found(store):
    """A send that the peer gave an id (Skycore's TRACKINGID) keeps it on its delivery, whether
    its result is written in a batch with others or on its own, and the id finds the delivery."""
    await put(store, 1)
    await put(store, 2)
    first, second = await claim(store)
    await store.complete(
        [
            dataclasses.replace(finished(first, Done()), tracking_id="TRACK-1"),
            finished(second, RetryAt(time.time() + 60, "HTTP 503")),
        ]
    )
    (third,) = await claim(store, "b", lease=0.01) or [None]
    assert third is None  # the retry waits its minute
    found = await store.delivery_by_tracking_id("TRACK-1")
    assert found is not None and found.id == first.id and found.tracking_id == "TRACK-1"
    rows = {row.id: row for row in await store.list_deliveries(DeliveryFilter())}
    assert rows[first.id].tracking_id == "TRACK-1" and rows[second.id].tracking_id is None
    assert await store.delivery_by_tracking_id("TRACK-2") is None


async def test_releasing_an_mms_deliveries_wakes_the_other_instances(pg_url):
    """The media step run by one instance makes the event's deliveries due: the others' loops
    are told at once (NOTIFY), not at their next poll."""
    one, two = PostgresStore(pg_url), PostgresStore(pg_url)
    await one.open()
    await two.open()
    told: list[Any] = []
    try:
        two.listen(told.append)
        await asyncio.wait_for(two.listening.wait(), 5)
        event = make_event(1)
        deliveries = [NewDelivery("~media", "media", "c", ordered=False), NewDelivery("crm", "r", "c", delay=3600)]
        await one.ingest(event, dedup_key(event), deliveries)
        await eventually(lambda: ["crm", "~media"] in [sorted(names or []) for names in told], 5)
        told.clear()
        assert await one.update_event(event["id"], None, release_except="~media") == ["crm"]
        await eventually(lambda: told, 2, interval=0.01)
        assert told == [["crm"]]
    finally:
        await one.close()
        await two.close()


async def test_follow_ups_are_added_with_the_verdict_that_applies_once(store):
    """A result's follow-ups (a reply's feedback in its thread) are deliveries of the same event,
    added in the transaction that records the verdict, and only when the verdict applies: a
    result recorded twice adds them once; a dead verdict adds them and still counts its death."""
    await put(store, 1)
    await put(store, 2)
    await put(store, 3)
    sent, died, later = await claim(store)
    up = (NewDelivery("~feedback", "sent", "c", False),)
    down = (NewDelivery("~feedback", "dead", "c", False),)
    results = [
        dataclasses.replace(finished(sent, Done()), follow_ups=up),
        dataclasses.replace(finished(died, Dead("E713: billing")), follow_ups=down),
        finished(later, RetryAt(time.time() + 60, "HTTP 503")),
    ]
    assert [r.claim.id for r in await store.complete(results)] == [died.id]
    assert await store.complete(results[:2]) == []  # recorded again: applies no more
    feedback = await store.list_deliveries(DeliveryFilter(destination="~feedback"))
    assert sorted((row.event_id, row.route, row.status) for row in feedback) == sorted(
        [(sent.event_id, "sent", "pending"), (died.event_id, "dead", "pending")]
    )
    (taken, other) = await store.claim("~feedback", limit=10, lease=30, ordered=False, owner="a")
    assert {taken.body, other.body} == {sent.body, died.body}  # the event itself, as stored


async def test_a_result_twice_in_one_batch_adds_its_follow_ups_once_in_their_order(store):
    """A result recorded twice in one batch (PostgreSQL: a round of its own for each) adds its
    follow-ups once, with ids in the order they were given (a thread shows them in that order);
    its death beside a retry of another delivery is counted once."""
    await put(store, 1)
    await put(store, 2)
    sent, died = await claim(store)
    ups = tuple(NewDelivery("~feedback", f"step{n}", "c", True) for n in range(3))
    done = dataclasses.replace(finished(sent, Done()), follow_ups=ups)
    dead = dataclasses.replace(finished(died, Dead("E713")), follow_ups=ups[:1])
    assert [r.claim.id for r in await store.complete([done, dead, done, dead])] == [died.id]
    feedback = sorted(await store.list_deliveries(DeliveryFilter(destination="~feedback")), key=lambda r: r.id)
    assert [(row.event_id, row.route) for row in feedback if row.event_id == sent.event_id] == [
        (sent.event_id, "step0"),
        (sent.event_id, "step1"),
        (sent.event_id, "step2"),
    ]
    assert [row.route for row in feedback if row.event_id == died.event_id] == ["step0"]
    assert [a.number for a in await store.attempts(sent.id)] == [1]


async def test_ingest_and_claim_stores_the_event_and_claims_what_is_due_for_one_destination(store):
    """A reply's SMS is claimed with the reply (`ingest_and_claim`): the event and its deliveries
    stored as `ingest` stores them, then the destination's due deliveries leased to `owner`, in
    order: one held back behind an earlier delivery of its conversation is not claimed."""
    sms = ClaimFor("sms", limit=4, lease=30, ordered=True, owner="me")
    first = make_event(1, sender="15550000001")
    deliveries = [NewDelivery("sms", "replies", "alice", True), NewDelivery("crm", "r", "alice")]
    result, claims = await store.ingest_and_claim(first, dedup_key(first), deliveries, sms)
    assert result == Ingested("accepted", first["id"])
    (taken,) = claims
    assert (taken.event_id, taken.destination, taken.route, taken.attempt) == (first["id"], "sms", "replies", 1)
    assert json.loads(taken.body) == first
    assert await store.claim("sms", limit=10, lease=30, ordered=True, owner="other") == []  # leased
    (crm,) = await claim(store)  # the other destination's delivery is stored, not claimed
    assert crm.event_id == first["id"]
    # the same conversation again while the first is being sent: stored, held back
    second = make_event(2, sender="15550000001")
    result, claims = await store.ingest_and_claim(second, dedup_key(second), deliveries[:1], sms)
    assert result == Ingested("accepted", second["id"]) and claims == []
    # Slack's retry of the first (an event of its own, the same dedup key): the first one's id,
    # nothing stored again
    retry = {**first, "id": event_id()}
    again, _ = await store.ingest_and_claim(retry, dedup_key(first), deliveries, sms)
    assert again == Ingested("duplicate", first["id"])
    assert len(await store.list_deliveries(DeliveryFilter(destination="sms"))) == 2
    await store.complete([finished(taken, Done())])
    (then,) = await store.claim("sms", limit=10, lease=30, ordered=True, owner="me")
    assert then.event_id == second["id"]


async def test_complete_and_claim_records_and_claims_the_follow_ups_at_once(store):
    """The verdict that adds a reply's feedback claims it in the same go (`complete_and_claim`);
    its death still counts once."""
    await put(store, 1)
    await put(store, 2)
    sent, died = await claim(store)
    feedback = ClaimFor("~feedback", limit=8, lease=30, ordered=False, owner="me")
    results = [
        dataclasses.replace(finished(sent, Done()), follow_ups=(NewDelivery("~feedback", "sent", "c", False),)),
        dataclasses.replace(finished(died, Dead("E713")), follow_ups=(NewDelivery("~feedback", "dead", "c", False),)),
    ]
    dead, claims = await store.complete_and_claim(results, feedback)
    assert [r.claim.id for r in dead] == [died.id]
    assert sorted((c.event_id, c.route, c.destination) for c in claims) == sorted(
        [(sent.event_id, "sent", "~feedback"), (died.event_id, "dead", "~feedback")]
    )
    assert {c.body for c in claims} == {sent.body, died.body}
    assert await store.claim("~feedback", limit=10, lease=30, ordered=False, owner="other") == []  # ours
    dead, claims = await store.complete_and_claim(results, feedback)  # recorded again: nothing new
    assert dead == [] and claims == []
    rows = await store.list_deliveries(DeliveryFilter(destination="crm"))
    assert sorted(row.status for row in rows) == ["dead", "delivered"]


async def test_thread_and_ledger_reads_a_replys_thread_and_the_ledger_in_one_go(store):
    def which(kept: str | None, started: str | None) -> tuple[str, str] | None:
        seen.append((kept, started))
        key = (kept or "").partition("|")[2] if kept is not None else started
        parts = (key or "").split("|")
        return (parts[1], parts[2]) if len(parts) == 3 else None

    seen: list[tuple[str | None, str | None]] = []
    await store.put_conversation("inbox", "thread:1.1", "C1|#sms|15550000001|86717")
    await store.put_conversation("inbox", "#sms|15550000002|86717", "2.2")  # an old thread: no thread key
    row = OptOutRow("15550000001", "86717", True, "STOP", time.time(), "evt_x")
    await store.record_optout(row)
    assert await store.thread_and_ledger("inbox", "thread:1.1", "1.1", which) == (("15550000001", "86717"), True)
    assert seen[-1] == ("C1|#sms|15550000001|86717", None)
    assert await store.thread_and_ledger("inbox", "thread:2.2", "2.2", which) == (("15550000002", "86717"), False)
    assert seen[-1] == (None, "#sms|15550000002|86717")
    assert await store.thread_and_ledger("inbox", "thread:3.3", "3.3", which) == (None, False)
    assert seen[-1] == (None, None)
    # the ledger is asked for the pair `which` makes, whatever parts of the thread it takes
    elsewhere = await store.thread_and_ledger(
        "inbox", "thread:2.2", "2.2", lambda kept, started: (row.texter, row.short_code)
    )
    assert elsewhere == ((row.texter, row.short_code), True)
    await store.record_optout(dataclasses.replace(row, opted_out=False, word="START", at=row.at + 1))
    assert await store.thread_and_ledger("inbox", "thread:1.1", "1.1", which) == (("15550000001", "86717"), False)
    assert await store.opted_out("15550000001", "86717") is False


async def test_expire_adds_the_follow_up_of_the_deliveries_of_its_route(store):
    """A reply's SMS that dies unattempted past max_age gets its feedback delivery with its
    death, in the same transaction; other routes' deliveries do not."""
    old = make_event(1)
    other = make_event(2)
    await store.ingest(old, dedup_key(old), [NewDelivery("sms", "replies", "alice")])
    await store.ingest(other, dedup_key(other), [NewDelivery("sms", "elsewhere", "bob")])
    await asyncio.sleep(0.05)
    up = ExpiryFollowUp("replies", "~feedback", "dead")
    assert await store.expire("sms", max_age=0.01, follow_up=up) == 2
    (row,) = await store.list_deliveries(DeliveryFilter(destination="~feedback"))
    assert (row.event_id, row.route, row.status) == (old["id"], "dead", "pending")
    (taken,) = await store.claim("~feedback", limit=5, lease=30, ordered=False, owner="a")
    assert taken.conversation == "alice" and json.loads(taken.body) == old
    assert await store.expire("sms", max_age=0.01, follow_up=up) == 0  # dead already: nothing more
