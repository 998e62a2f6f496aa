"""Versioned migrations (bridge/store/schema.py): a new store is made at the latest version, a
store made by the previous release (0.1.0, before versions were kept) is brought up to it with
what it holds, a store of a later release is refused, and a migration that fails changes nothing.

PostgreSQL cases need BRIDGE_TEST_POSTGRES_URL, as in test_store_contract."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bridge.destinations.base import conversation_key
from bridge.errors import ConfigError
from bridge.event import Event, dedup_key
from bridge.store import DeliveryFilter, EventFilter, Ingested, NewDelivery, open_store, schema
from bridge.store.sqlite import _statements
from tests.test_store_contract import claim, make_event, pg_url, store_url  # noqa: F401

# A migration, once released, never changes: stores out there have run it as it was, and the
# baseline is also what 0.1.0's stores hold (the upgrade test makes one from it). A change to a
# released file fails here; a change to the schema is a new numbered file.
RELEASED = {
    "postgres/0001_baseline.sql": "d4c79b6c0ce0822826f9f24185c0a69e738bcc6ee4a9393798320fe66e8ed373",
    "postgres/0002_replies.sql": "132fd102b5bc639d0a8e7bca6f9b9c1b74a2c4b1d286c777434c9c8e109724e0",
    "sqlite/0001_baseline.sql": "1aec5d660b30898086493ee390562b09117df6926ad8c1a3e5c70e03ac6e6031",
    "sqlite/0002_replies.sql": "629bd4a1cd7d6a92cbc5fa90a839bd6198f3494e947ed0b1cc70f2a16414654c",
    "postgres/0003_console.sql": "45dd5c8ab2604bd4be1816d2dada83960c2a44bacf57b27df075dc78e561102c",
    "sqlite/0003_console.sql": "dfb5b0f17fe90e7d30818ea8952cb46490b7e962adebd7e9d55598afd0a8a5df",
    "postgres/0004_event_columns.sql": "49827ae96bb82c748f7b3a9edcbf4ba3bccf0827e9a0b1e2852cd018d476fcca",
    "sqlite/0004_event_columns.sql": "91c40fd8c83c441222e8c7ae2be60197cb41cbd8199be926d9876da7912f4bbd",
    "postgres/0005_orphan_deliveries.sql": "43c429a71bb4f8c57325777d723d31f5fc6a6fd5fec9162ac223c6ac86a62992",
    "sqlite/0005_orphan_deliveries.sql": "4763873594240c77bb0ecc546535ecf9f9190b494c2ab235ab91afe122483e02",
}


def backend(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgres"


async def version_in(url: str) -> int | None:
    if backend(url) == "sqlite":
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        finally:
            conn.close()
        return int(row[0]) if row else None
    conn = await asyncpg.connect(url)
    try:
        value = await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'")
    finally:
        await conn.close()
    return None if value is None else int(value)


async def run_sql(url: str, script: str, *args: object) -> None:
    if backend(url) == "sqlite":
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            if args:
                conn.execute(script, args)
                conn.commit()
            else:
                conn.executescript(script)
        finally:
            conn.close()
        return
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(script, *args)
    finally:
        await conn.close()


# ---------------------------------------------------------------------------- the files


def test_both_backends_have_the_same_migrations_numbered_without_gaps():
    sqlite_side = [(m.version, m.name) for m in schema.migrations("sqlite")]
    postgres_side = [(m.version, m.name) for m in schema.migrations("postgres")]
    assert sqlite_side == postgres_side
    assert [v for v, _ in sqlite_side] == list(range(1, len(sqlite_side) + 1))
    assert schema.latest("sqlite") == len(sqlite_side) >= 1


def test_a_released_migration_is_never_edited():
    folder = Path(schema.__file__).parent / "migrations"
    got = {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*/*.sql")}
    assert {name: got.get(name) for name in RELEASED} == RELEASED


def test_sqlite_migrations_split_into_whole_statements():
    for migration in schema.migrations("sqlite"):
        statements = _statements(migration.sql)
        assert statements and all(sqlite3.complete_statement(s) for s in statements)
    with pytest.raises(RuntimeError, match="unfinished statement"):
        _statements("CREATE TABLE a (x INTEGER);\nCREATE TABLE b (y\n-- a comment\n")


# ---------------------------------------------------------------------------- opening


async def test_a_new_store_is_made_at_the_latest_version(store_url):  # noqa: F811
    store = open_store(store_url)
    await store.open()
    await store.close()
    assert await version_in(store_url) == schema.latest(backend(store_url))
    again = open_store(store_url)  # and opening it again changes nothing
    await again.open()
    await again.close()
    assert await version_in(store_url) == schema.latest(backend(store_url))


async def test_a_store_of_the_previous_release_is_upgraded_with_what_it_holds(store_url):  # noqa: F811
    """0.1.0's schema, as its stores are on disk, with an event, its dedup key as 0.1.0 computed
    it, and a pending delivery: opened by this version, all of it is still there and works."""
    await run_sql(store_url, schema.migrations(backend(store_url))[0].sql)  # 0001 is 0.1.0's schema
    old = make_event(1)
    now = time.time()
    await run_sql(
        store_url,
        "INSERT INTO events (id, dedup_key, type, received_at, body) VALUES ($1, $2, $3, $4, $5)"
        if backend(store_url) == "postgres"
        else "INSERT INTO events (id, dedup_key, type, received_at, body) VALUES (?, ?, ?, ?, ?)",
        old["id"],
        "an-old-release's-key",
        old["type"],
        now,
        json.dumps(old),
    )
    insert_delivery = (
        "INSERT INTO deliveries (event_id, destination, route, conversation, status, created_at, next_at, updated_at)"
        " VALUES ({}, 'crm', 'r', 'c', 'pending', {}, {}, {})"
    )
    marks = ("$1", "$2", "$2", "$2") if backend(store_url) == "postgres" else ("?", "?", "?", "?")
    args = (old["id"], now) if backend(store_url) == "postgres" else (old["id"], now, now, now)
    await run_sql(store_url, insert_delivery.format(*marks), *args)
    assert await version_in(store_url) is None  # 0.1.0 kept no version

    store = open_store(store_url)
    await store.open()
    try:
        assert await version_in(store_url) == schema.latest(backend(store_url))
        (pending,) = await claim(store)
        assert pending.event_id == old["id"]
        assert (await store.get_event(old["id"]))["id"] == old["id"]
        # the old key is kept as it was: the same key is still a duplicate of that event
        assert await store.ingest(make_event(1), "an-old-release's-key", []) == Ingested("duplicate", old["id"])
        new = make_event(2)
        assert await store.ingest(new, dedup_key(new), [NewDelivery("crm", "r", "c")]) == Ingested(
            "accepted", new["id"]
        )
        assert len(await store.list_deliveries(DeliveryFilter())) == 2
    finally:
        await store.close()


async def test_a_store_of_a_later_release_is_refused_and_left_as_it_is(store_url):  # noqa: F811
    store = open_store(store_url)
    await store.open()
    await store.close()
    newer = schema.latest(backend(store_url)) + 1
    await run_sql(
        store_url,
        "UPDATE meta SET value = $1 WHERE key = 'schema_version'"
        if backend(store_url) == "postgres"
        else "UPDATE meta SET value = ? WHERE key = 'schema_version'",
        str(newer),
    )
    with pytest.raises(ConfigError, match=f"schema version {newer}, newer than this postback-bridge knows"):
        await open_store(store_url).open()
    assert await version_in(store_url) == newer


def test_serve_and_the_cli_refuse_a_store_of_a_later_release_and_say_why(bridge_factory, tmp_path: Path):
    bridge = bridge_factory({"default": []})
    bridge.start()
    assert bridge.stop() == 0
    conn = sqlite3.connect(tmp_path / "bridge.db")
    with conn:
        assert conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'").rowcount == 1
    conn.close()
    done = bridge.cli("deliveries", "-c", str(bridge.config_path), check=False)
    assert done.returncode != 0 and "schema version 999" in done.stderr, done.stdout + done.stderr
    serve = bridge.cli("serve", "-c", str(bridge.config_path), check=False)  # exits, not waits
    assert serve.returncode != 0 and "schema version 999" in serve.stderr, serve.stderr


async def test_a_migration_that_fails_changes_nothing(store_url, monkeypatch):  # noqa: F811
    """Every migration and the new version are one transaction: a bad one leaves the store at
    the version it was, usable by the release that made it."""
    store = open_store(store_url)
    await store.open()
    await store.close()
    at = schema.latest(backend(store_url))
    broken = schema.Migration(at + 1, "broken", "CREATE TABLE half_made (x INTEGER);\nTHIS IS NOT SQL;\n")
    monkeypatch.setattr(schema, "migrations", lambda name, real=schema.migrations: (*real(name), broken))
    with pytest.raises(Exception):  # noqa: B017 (the driver's own error, whatever it is)
        await open_store(store_url).open()
    monkeypatch.undo()
    assert await version_in(store_url) == at
    store = open_store(store_url)
    await store.open()  # the release that made it still opens it
    await store.close()
    with pytest.raises(Exception):  # noqa: B017
        await run_sql(store_url, "SELECT * FROM half_made")


async def test_stores_opened_at_once_migrate_once(store_url):  # noqa: F811
    """Several instances (or `serve` and a CLI command) opening a new store together: one makes
    the schema, the others wait for it and find it done."""
    stores = [open_store(store_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    for s in stores:
        await s.close()
    assert await version_in(store_url) == schema.latest(backend(store_url))


async def test_0004_fills_the_event_columns_of_a_store_of_version_3(store_url):  # noqa: F811
    """A store as 0003 left it, with events in it: 0004 copies each event's `from`, `to`,
    keyword and text into their columns (a value that is not a string is NULL) on PostgreSQL
    (SQLite's indexes stay on the JSON), and event lists find the old events by them as they
    find new ones, on both."""
    for migration in schema.migrations(backend(store_url))[:3]:
        await run_sql(store_url, migration.sql)
    await run_sql(store_url, "INSERT INTO meta (key, value) VALUES ('schema_version', '3')")
    received = make_event(1, sender="15550001111", to="86717", text="Where is my PIZZA order")
    texter, short = received["from"], received["to"]
    reply = {**received, "id": "evt_reply", "from": short, "to": texter, "text": "On its way", "type": "sms.reply"}
    reply["keyword"] = None
    odd = {**make_event(3, sender="15550002222", text="odd"), "keyword": 42}  # not a string: NULL
    insert = (
        "INSERT INTO events (id, dedup_key, type, received_at, body) VALUES ($1, $2, $3, $4, $5)"
        if backend(store_url) == "postgres"
        else "INSERT INTO events (id, dedup_key, type, received_at, body) VALUES (?, ?, ?, ?, ?)"
    )
    now = time.time()
    for n, event in enumerate((received, reply, odd)):
        await run_sql(store_url, insert, event["id"], f"key-{n}", event["type"], now + n, json.dumps(event))

    store = open_store(store_url)
    await store.open()
    try:
        assert await version_in(store_url) == schema.latest(backend(store_url))
        conversation = await store.list_events(EventFilter(texter=texter, short_code=short))
        assert [e["id"] for e in conversation] == [reply["id"], received["id"]]
        assert [e["id"] for e in await store.list_events(EventFilter(text="pizza"))] == [received["id"]]
        assert [e["id"] for e in await store.list_events(EventFilter(keyword=received["keyword"].lower()))] == [
            received["id"]
        ]
        if backend(store_url) == "postgres":  # a keyword that is no string has no column value
            assert await store.list_events(EventFilter(keyword="42")) == []
        # and a new event, written with its columns, is found beside them
        new = make_event(4, sender="15550001111", to="86717", text="another pizza please")
        assert (await store.ingest(new, dedup_key(new), [])).status == "accepted"
        assert [e["id"] for e in await store.list_events(EventFilter(text="PIZZA"))] == [new["id"], received["id"]]
    finally:
        await store.close()
    if backend(store_url) == "sqlite":
        return
    rows = await column_rows(store_url)
    assert rows[received["id"]] == (texter, short, received["keyword"], "Where is my PIZZA order")
    assert rows[reply["id"]] == (short, texter, None, "On its way")
    assert rows[odd["id"]][2] is None


async def column_rows(url: str) -> dict[str, tuple[object, ...]]:
    query = "SELECT id, sender, recipient, keyword, text FROM events"
    if backend(url) == "sqlite":
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            return {row[0]: tuple(row[1:]) for row in conn.execute(query)}
        finally:
            conn.close()
    conn = await asyncpg.connect(url)
    try:
        return {row[0]: tuple(row[1:]) for row in await conn.fetch(query)}
    finally:
        await conn.close()


async def test_a_long_migration_is_not_cut_off_by_the_command_timeout(pg_url, monkeypatch):  # noqa: F811
    """A migration on a big store runs for minutes (0004 on a million events: 47 s), longer than
    any one operation may (COMMAND_TIMEOUT, 15 s): it runs to its end, rather than being rolled
    back at each start for ever."""
    from bridge.store import postgres as postgres_store

    store = open_store(pg_url)
    await store.open()
    await store.close()
    at = schema.latest("postgres")
    slow = schema.Migration(at + 1, "slow", "SELECT pg_sleep(1.5);\nCREATE TABLE made_slowly (x integer);\n")
    monkeypatch.setattr(schema, "migrations", lambda name, real=schema.migrations: (*real(name), slow))
    monkeypatch.setattr(postgres_store, "COMMAND_TIMEOUT", 0.5)
    store = open_store(pg_url)
    await store.open()
    await store.close()
    assert await version_in(pg_url) == at + 1
    await run_sql(pg_url, "SELECT * FROM made_slowly")


def _orphaned_store(path: Path, version: int) -> dict[str, Any]:
    """A SQLite store at `version` as the miscount before 0005 left it: the rows of commits it
    took for "all new", written as that code wrote them (the first copy of a postback sent twice
    in one commit stored with no delivery, the deliveries under the second copy's id; a retry's
    deliveries under its own id, its first copy stored earlier with its own). Returns the ids."""
    conn = sqlite3.connect(path)
    made: dict[str, Any] = {}
    now = time.time()

    def event(name: str, sender: str, at: float) -> Event:
        e = make_event(len(made), sender=sender)
        conn.execute(
            "INSERT INTO events (id, dedup_key, type, received_at, body) VALUES (?, ?, ?, ?, ?)",
            (e["id"], dedup_key(e), e["type"], at, json.dumps(e)),
        )
        made[name] = e["id"]
        return e

    def delivery(name: str, event_id: str, conversation: str, at: float) -> None:
        made[name] = conn.execute(
            "INSERT INTO deliveries (event_id, destination, route, conversation, status, created_at, next_at,"
            " updated_at) VALUES (?, 'crm', 'r', ?, 'pending', ?, ?, ?)",
            (event_id, conversation, at, at, at),
        ).lastrowid

    try:
        with conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
            stored = event("stored", "15550000001", now - 200)  # texter B's, stored long before
            delivery("stored delivery", stored["id"], conversation_key(stored), now - 200)
            # a commit of: A's postback, B's retry of `stored`, A's postback again, C's new one
            a = event("a", "15550000002", now - 100)
            delivery("b's retry copy", "evt_b_retry", conversation_key(stored), now - 99.999)
            delivery("a's only", "evt_a_second_copy", conversation_key(a), now - 99.998)
            c = event("c", "15550000003", now - 99.997)
            delivery("c delivery", c["id"], conversation_key(c), now - 99.997)
            # a commit of: D's postback, E's postback, then each again
            d = event("d", "15550000004", now - 50)
            e = event("e", "15550000005", now - 49.999)
            delivery("d's only", "evt_d_second_copy", conversation_key(d), now - 49.998)
            delivery("e's only", "evt_e_second_copy", conversation_key(e), now - 49.997)
            nowhere = event("nowhere", "15550000006", now - 49.996)  # routed nowhere, beside them
            conn.execute("INSERT INTO dropped (event_id, received_at) VALUES (?, ?)", (nowhere["id"], now - 49.996))
    finally:
        conn.close()
    return made


async def test_0005_gives_sqlite_orphan_deliveries_back_to_their_event_or_removes_copies(tmp_path: Path):
    """A store that the miscount before 0005 left with deliveries whose event is not stored
    (see test_store_contract's tests of retries in one commit with new postbacks): opened by
    this release, a retry's copy of a stored event's delivery is gone, and each event's only
    delivery is its own again, in its own conversation, even when another texter's rows came
    between (found in review: matched by time alone, one went to the wrong texter's event)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = open_store(url)
    await store.open()
    await store.close()
    made = _orphaned_store(tmp_path / "store.db", 4)
    store = open_store(url)
    await store.open()
    try:
        assert await version_in(url) == schema.latest("sqlite")
        rows = {r.id: r.event_id for r in await store.list_deliveries(DeliveryFilter())}
        assert rows == {
            made["stored delivery"]: made["stored"],
            made["a's only"]: made["a"],
            made["c delivery"]: made["c"],
            made["d's only"]: made["d"],
            made["e's only"]: made["e"],
        }
        claims = await claim(store, ordered=True)
        assert sorted(c.event["id"] for c in claims) == sorted(rows.values())
        assert all(c.conversation == conversation_key(c.event) for c in claims)
        assert await store.event_deliveries(made["nowhere"]) == []
    finally:
        await store.close()


async def test_a_delivery_without_its_event_does_not_stop_its_destination_claims(tmp_path: Path, caplog):
    """Should such a row appear again (a copy of a store made by hand, a bug), a claim that
    meets it removes it, with any attempts of its id, and says so, and hands out the rest,
    rather than failing every claim of its destination for ever."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = open_store(url)
    await store.open()
    await store.close()
    made = _orphaned_store(tmp_path / "store.db", schema.latest("sqlite"))
    await run_sql(
        url,
        "INSERT INTO attempts (delivery_id, number, at, outcome, status, error, duration)"
        " VALUES (?, 1, ?, 'retry', 500, 'an old error', 0.1)",
        made["b's retry copy"],
        time.time(),
    )
    orphans = [made[name] for name in ("b's retry copy", "a's only", "d's only", "e's only")]
    store = open_store(url)
    await store.open()
    try:
        claims = await claim(store)
        assert {c.event_id for c in claims} == {made["stored"], made["c"]}
        remaining = {r.id for r in await store.list_deliveries(DeliveryFilter())}
        assert not remaining & set(orphans)
        assert await store.attempts(made["b's retry copy"]) == []
        assert await claim(store) == []
    finally:
        await store.close()
    (record,) = [r for r in caplog.records if r.getMessage() == "deliveries without their event removed"]
    assert record.levelname == "ERROR" and sorted(record.deliveries) == sorted(orphans)
    assert record.event_ids == sorted(["evt_b_retry", "evt_a_second_copy", "evt_d_second_copy", "evt_e_second_copy"])
