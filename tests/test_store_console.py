"""What the console (CONTRACT §8) asks of every store: events by texter, short code and text,
conversations both ways, keyset pages of events and deliveries, postbacks per minute, the last
errors. SQLite always, PostgreSQL with BRIDGE_TEST_POSTGRES_URL (the fixtures of
test_store_contract)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import pytest

import bridge.store
from bridge.event import dedup_key
from bridge.retry import Dead, Done, RetryAt
from bridge.store import (
    DeliveryFilter,
    EventFilter,
    NewDelivery,
    Store,
    event_cursor,
    open_store,
    parse_event_cursor,
)
from bridge.store import sqlite as sqlite_store
from tests import test_store_contract as contract
from tests.conftest import eventually
from tests.test_store_contract import finished, make_event

# the fixtures of the store contract: a fresh SQLite store, and a PostgreSQL one in a schema of its own
pg_url, store_url, store = contract.pg_url, contract.store_url, contract.store

TEXTER, OTHER, SHORT, SHORT2 = "+15552312102", "+15557770001", "86717", "55555"


async def keep(store: Store, event: dict[str, Any], destinations: tuple[str, ...] = ("crm",)) -> str:
    await store.ingest(event, dedup_key(event), [NewDelivery(d, "r", "c") for d in destinations])
    return str(event["id"])


def reply(n: int, texter: str, short_code: str, text: str) -> dict[str, Any]:
    """An `sms.reply` as replies.py stores it: from the short code, to the texter."""
    event = make_event(n, text=text)
    fields = {**event["fields"], "ORIGIN": "SLACK_REPLY"}
    return {**event, "type": "sms.reply", "from": short_code, "to": texter, "keyword": None, "fields": fields}


async def ids(store: Store, **kw: Any) -> list[str]:
    return [e["id"] for e in await store.list_events(EventFilter(**kw))]


async def test_texter_short_code_and_a_conversation_both_ways(store):
    a = await keep(store, make_event(1, sender=TEXTER[1:], to=SHORT, text="Hello there"))
    b = await keep(store, reply(2, TEXTER, SHORT, "Hi! How can we help?"))
    c = await keep(store, make_event(3, sender=OTHER[1:], to=SHORT, text="stop"))
    d = await keep(store, make_event(4, sender=TEXTER[1:], to=SHORT2, text="INFO please"))
    e = await keep(store, make_event(5, sender=TEXTER[1:], to=SHORT, text="thanks HELLO again"))
    assert await ids(store, texter=TEXTER) == [e, d, b, a]
    assert await ids(store, short_code=SHORT) == [e, c, b, a]
    assert await ids(store, texter=TEXTER, short_code=SHORT) == [e, b, a]  # the conversation, in order
    assert await ids(store, texter=TEXTER, short_code=SHORT2) == [d]
    assert await ids(store, texter=OTHER, short_code=SHORT2) == []
    assert await ids(store, texter=TEXTER, type="sms.reply") == [b]
    assert await ids(store, texter=TEXTER, sender=SHORT) == [b]  # the old filters still hold
    assert await ids(store, short_code=SHORT, to=SHORT2) == []
    assert await ids(store, texter=TEXTER, limit=2) == [e, d]
    # text: any case, anywhere in it; the other filters with it
    assert await ids(store, text="hello") == [e, a]
    assert await ids(store, text="HOW CAN") == [b]
    assert await ids(store, text="hello", short_code=SHORT, keyword="thanks") == [e]
    assert await ids(store, text="%") == [] and await ids(store, text="_") == []  # no wildcards
    assert await ids(store, text="nothing like it") == []


async def test_keyset_pages_walk_every_event_once_in_order(store):
    stored = []
    for n in range(8):
        stored.append(await keep(store, make_event(n, sender=f"1555000{n % 3:04d}")))
        await asyncio.sleep(0.003)  # a millisecond apart at least: see the cursor of an event gone
    seen, before, pages = [], None, 0
    while True:
        page, before = await store.events_page(EventFilter(limit=3, before=before))
        seen += [e["id"] for e in page]
        pages += 1
        if before is None:
            break
    assert seen == stored[::-1] and pages == 3
    # a page of a texter's events, from a cursor: both sides merged, still in order
    texter = "+15550000001"
    theirs = [i for n, i in enumerate(stored) if n % 3 == 1][::-1]
    first, cursor = await store.events_page(EventFilter(texter=texter, limit=2))
    assert [e["id"] for e in first] == theirs[:2] and cursor is not None
    rest, end = await store.events_page(EventFilter(texter=texter, limit=2, before=cursor))
    assert [e["id"] for e in rest] == theirs[2:] and end is None
    # the cursor of an event that is gone since still pages on (by its time)
    events = await store.list_events(EventFilter())
    gone = dict(events[2], id="evt_01JD7QGONE0000000000000000")
    assert len(await store.list_events(EventFilter(before=event_cursor(gone)))) == 5


@pytest.mark.parametrize(
    "cursor", ["x", "", "a" * 300, "éé", "bm90IGEgY3Vyc29y", "fG5vdGhpbmc", "MjAyNi0xMS0yMlQxMDowMDowMHxldnQ"]
)
async def test_a_bad_cursor_is_a_value_error_never_a_store_error(store, cursor):
    with pytest.raises(ValueError, match="not a cursor"):
        parse_event_cursor(cursor)
    with pytest.raises(ValueError, match="not a cursor"):
        await store.list_events(EventFilter(before=cursor))


async def test_delivery_pages_by_id(store):
    for n in range(5):
        await keep(store, make_event(n), destinations=("crm", "slack"))
    rows = await store.list_deliveries(DeliveryFilter())
    everything = [r.id for r in rows]
    first, before = await store.deliveries_page(DeliveryFilter(limit=4))
    assert [r.id for r in first] == everything[:4] and before == everything[3]
    second, more = await store.deliveries_page(DeliveryFilter(limit=4, before_id=before))
    assert [r.id for r in second] == everything[4:8] and more == everything[7]
    last, end = await store.deliveries_page(DeliveryFilter(limit=4, before_id=more))
    assert [r.id for r in last] == everything[8:] and end is None
    slack = await store.list_deliveries(DeliveryFilter(destination="slack", before_id=everything[2]))
    assert [r.id for r in slack] == [r.id for r in rows[3:] if r.destination == "slack"]
    assert len(slack) in (2, 3)


async def test_postbacks_per_minute(store):
    start = time.time()
    for n in range(3):
        await keep(store, make_event(n))
    counts = await store.postbacks_per_minute(start - 120)
    assert sum(n for _, n in counts) == 3
    minute = (start // 60) * 60
    assert all(m in (minute, minute + 60) for m, _ in counts)  # it may tick over meanwhile
    assert await store.postbacks_per_minute(time.time() + 60) == []


async def test_recent_errors_are_the_failed_latest_attempts_newest_first(store):
    for n in range(4):
        await keep(store, make_event(n), destinations=("crm",))
    claims = await store.claim("crm", limit=10, lease=30, ordered=False, owner="x:1:a")
    assert len(claims) == 4
    results = [
        finished(claims[0], Dead("HTTP 404")),
        finished(claims[1], RetryAt(time.time() + 60, "HTTP 503")),
        finished(claims[2], Dead("HTTP 410")),
    ]
    for result in results:  # one at a time: each later than the one before
        await store.complete([result])
        time.sleep(0.002)
    await store.complete([finished(claims[3], Done())])
    errors = await store.recent_errors(10)
    assert [(r.id, r.status, r.last_error) for r in errors] == [
        (claims[2].id, "dead", "HTTP 410"),
        (claims[1].id, "pending", "HTTP 503"),
        (claims[0].id, "dead", "HTTP 404"),
    ]
    assert [r.id for r in await store.recent_errors(1)] == [claims[2].id]


async def test_text_search_past_the_window_uses_the_text_index(store, monkeypatch):
    """A text found in the window fills the page from it; fewer there, and the rest come from the
    text index, older than the window (TEXT_WINDOW made small here); a needle too short for the
    trigram index is tested event by event."""
    monkeypatch.setattr(bridge.store, "TEXT_WINDOW", 3)
    words = ['apple "pie"', "rare Kumquat jam", "apple tart", "kumquat", "plum", "apple", "plum jam", "pear"]
    stored = [await keep(store, make_event(n, text=text)) for n, text in enumerate(words)]
    newest = stored[::-1]
    assert await ids(store, text="KUMQUAT") == [stored[3], stored[1]]  # both older than the window
    assert await ids(store, text="apple", limit=2) == [stored[5], stored[2]]
    assert await ids(store, text="apple") == [stored[5], stored[2], stored[0]]
    assert await ids(store, text="jam", limit=1) == [stored[6]]
    assert await ids(store, text="am") == [stored[6], stored[1]]  # two characters: no trigram
    assert await ids(store, text="p") == [i for i, w in zip(newest, words[::-1], strict=True) if "p" in w]
    page, cursor = await store.events_page(EventFilter(text="a", limit=3))
    rest, _ = await store.events_page(EventFilter(text="a", limit=3, before=cursor))
    assert [e["id"] for e in page + rest] == [i for i, w in zip(newest, words[::-1], strict=True) if "a" in w][:6]
    assert await ids(store, text="kumquat", short_code=SHORT) == [stored[3], stored[1]]
    assert await ids(store, text="kumquat", keyword="RARE") == [stored[1]]
    assert await ids(store, text='e "PIE"') == [stored[0]]  # quotes are text, not the index's syntax
    assert await ids(store, text="pie AND plum") == [] and await ids(store, text="jam OR pear") == []


async def test_new_events_are_found_by_text_before_and_after_they_are_indexed(tmp_path, monkeypatch):
    """SQLite indexes new texts a few hundred at a time (migration 0003): until then a search
    reads them as they are, and after, it finds them through the index."""
    monkeypatch.setattr(bridge.store, "TEXT_WINDOW", 1)
    monkeypatch.setattr(sqlite_store, "TEXT_INDEX_IDLE", 3600.0)  # only when asked, here
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")

    def waiting_rows() -> int:
        conn = sqlite3.connect(tmp_path / "store.db")
        try:
            return int(conn.execute("SELECT count(*) FROM events_text_pending").fetchone()[0])
        finally:
            conn.close()

    await store.open()
    try:
        old = await keep(store, make_event(1, text="a quince jam"))
        await keep(store, make_event(2, text="plain"))
        assert await ids(store, text="QUINCE") == [old]  # waiting for the index
        await store.index_text()
        assert waiting_rows() == 0
        assert await ids(store, text="QUINCE") == [old]  # from the index
        newer = await keep(store, make_event(3, text="quince tart"))
        await keep(store, make_event(4, text="plain"))
        assert await ids(store, text="quince") == [newer, old]  # one of each
        monkeypatch.setattr(sqlite_store, "TEXT_INDEX_MOST", 1)  # a few at a time, the oldest first
        await store.index_text()
        assert await ids(store, text="quince") == [newer, old]
        # the writer goes on with the rest by itself, a few at a time (racing the line above:
        # how many wait at that moment is the writer's business)
        await eventually(lambda: waiting_rows() == 0, 5, "the rest indexed by the writer")
        assert await ids(store, text="quince") == [newer, old]
    finally:
        await store.close()


async def test_sqlite_listings_do_not_wait_behind_the_writer(tmp_path):
    """A page of the console or the admin API reads on a connection of its own (WAL): it answers
    while the writer is busy with a commit, and neither holds the other back."""
    store = sqlite_store.SQLiteStore(str(tmp_path / "bridge.db"))
    await store.open()
    try:
        event_id = await keep(store, make_event(1))
        busy = store._run(lambda conn: time.sleep(1.0))  # the writer, held for a second
        started = time.monotonic()
        events = await store.list_events(EventFilter())
        rows = await store.list_deliveries(DeliveryFilter())
        stats = await store.stats()
        assert time.monotonic() - started < 0.5
        assert [e["id"] for e in events] == [event_id] and [r.event_id for r in rows] == [event_id]
        assert stats["crm"].pending == 1
        await busy
    finally:
        await store.close()
