"""The console's scale benchmark (issue 20): a store of 1,000,000 events and 2,000,000
deliveries, every admin list timed against the real `serve` on it, and ingest with that store
against ingest with an empty one.

    .venv/bin/python bench/console.py                                  # SQLite, in a temporary directory
    .venv/bin/python bench/console.py --store postgresql://postgres@127.0.0.1:5432/test   # a schema of its own

The store is filled directly (rows made in bulk, the secondary indexes dropped meanwhile and
made again afterwards, as a restore would), with a mix like a busy account's: texters of whom
a few send a lot, 8 short codes, keywords, texts, every event type, replies, and deliveries to
four destinations: delivered, dead, failed and pending ones, with their attempts. Pending
deliveries are due in two hours, so the bridge has nothing to send while it is timed.

Then `serve` runs on it and every URL of PAGES is fetched `--runs` times after a warm-up (p50,
p95, max). PAGES is data: the admin API's lists, and the web console's pages (`/ui/...`),
fetched with a session cookie the bench signs itself with the admin token it gave `serve`;
each console answer must be a 200 HTML page that is not the sign-in form, or the page is
marked as failed. Last (unless `--no-ingest`), ingest: the
store's own `ingest` (the group commit every postback goes through), 32 at a time, for the full
store, for an empty store with the same schema, and for an empty store without migration 0003's
indexes (what they cost), taken in turns, round after round (this machine's speed drifts).

Results: bench/results/<time>-console-<backend>.json and latest-console-<backend>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import html
import json
import os
import random
import re
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))

from bench.run import free_port, process  # noqa: E402
from bridge.carriers import Carriers  # noqa: E402
from bridge.console.session import SESSION_COOKIE, new_session, signing_key  # noqa: E402
from bridge.event import dedup_key, normalize  # noqa: E402
from bridge.ids import ulid  # noqa: E402
from bridge.jsonout import dumps  # noqa: E402
from bridge.postback import parse  # noqa: E402
from bridge.store import EVENT_COLUMNS, EventFilter, NewDelivery, Store, open_store  # noqa: E402

GOAL_MS = 150.0
INGEST_GOAL = 0.9  # ingest with the full store at least this much of an empty one's

# ---------------------------------------------------------------------------- what is timed


@dataclass(frozen=True)
class Page:
    """One URL to time. `path` may name values of the context (`{texter}`, `{event_id}`, and
    what earlier pages captured); `capture` keeps this page's `next` under that name (for a
    console page: the `cursor` or `before_id` of the link to the next page it shows)."""

    name: str
    path: str
    capture: str | None = None
    ui: bool = False  # a console page: its answer must be a page of HTML, not the sign-in form


PAGES: list[Page] = [
    Page("events: newest", "/admin/events", capture="events_next"),
    Page("events: 2nd page (cursor)", "/admin/events?cursor={events_next}"),
    Page("events: 20th page (cursor)", "/admin/events?cursor={events_page20}"),
    Page("events: a busy texter", "/admin/events?texter={busy_texter}", capture="texter_next"),
    Page("events: a busy texter, 2nd page", "/admin/events?texter={busy_texter}&cursor={texter_next}"),
    Page("events: a texter", "/admin/events?texter={texter}"),
    Page("events: a short code", "/admin/events?short_code={short_code}", capture="short_code_next"),
    Page("events: a short code, 2nd page", "/admin/events?short_code={short_code}&cursor={short_code_next}"),
    Page("events: a quiet short code", "/admin/events?short_code={quiet_short_code}"),
    Page("conversation: texter and short code", "/admin/events?texter={busy_texter}&short_code={short_code}"),
    Page("events: keyword (common)", "/admin/events?keyword=INFO"),
    Page("events: keyword (rare)", "/admin/events?keyword={rare_keyword}"),
    Page("events: keyword (none such)", "/admin/events?keyword=NOSUCHWORD"),
    Page("events: type (common)", "/admin/events?type=sms.received"),
    Page("events: type (rare)", "/admin/events?type=email_subscriber.opted_out"),
    Page("events: text (common word)", "/admin/events?text=pizza", capture="text_next"),
    Page("events: text, 2nd page", "/admin/events?text=pizza&cursor={text_next}"),
    Page("events: text (rare word)", "/admin/events?text=kumquat"),
    Page("events: text (no match)", "/admin/events?text=zzyzx"),
    Page("events: text and short code", "/admin/events?text=refund&short_code={short_code}"),
    Page("events: time range (a day, 10 days ago)", "/admin/events?since={day_start}&until={day_end}"),
    Page("events: last hour", "/admin/events?since=1h"),
    Page("event: one, its deliveries and attempts", "/admin/events/{event_id}"),
    Page("deliveries: newest", "/admin/deliveries", capture="deliveries_next"),
    Page("deliveries: 2nd page", "/admin/deliveries?before_id={deliveries_next}"),
    Page("deliveries: status delivered", "/admin/deliveries?status=delivered"),
    Page("deliveries: status pending", "/admin/deliveries?status=pending"),
    Page("deliveries: status failed", "/admin/deliveries?status=failed"),
    Page("deliveries: destination", "/admin/deliveries?destination=slack"),
    Page("deliveries: destination and status", "/admin/deliveries?destination=sms&status=dead"),
    Page("dead letters", "/admin/dead-letters", capture="dead_next"),
    Page("dead letters: 2nd page", "/admin/dead-letters?before_id={dead_next}"),
    Page("dead letters: a destination", "/admin/dead-letters?destination=crm"),
    Page("delivery: one with its attempts", "/admin/deliveries/{delivery_id}"),
    Page("opt-outs", "/admin/optouts"),
    Page("opt-outs: a number", "/admin/optouts?number={optout_texter}"),
    Page("metrics (pending and dead counts)", "/metrics"),
    # the web console: its lists show 50 rows a page
    Page("ui: overview", "/ui/", ui=True),
    Page("ui: overview, live part (polled)", "/ui/?part=live", ui=True),
    Page("ui: events", "/ui/events", capture="ui_events_next", ui=True),
    Page("ui: events, 2nd page (its link)", "/ui/events?cursor={ui_events_next}", ui=True),
    Page("ui: events, live part (polled)", "/ui/events?part=live", ui=True),
    Page("ui: events, a busy texter", "/ui/events?texter={busy_texter}", capture="ui_texter_next", ui=True),
    Page(
        "ui: events, a busy texter, 2nd page",
        "/ui/events?texter={busy_texter}&cursor={ui_texter_next}",
        ui=True,
    ),
    Page("ui: events, a texter", "/ui/events?texter={texter}", ui=True),
    Page("ui: events, a short code", "/ui/events?short_code={short_code}", ui=True),
    Page("ui: events, a quiet short code", "/ui/events?short_code={quiet_short_code}", ui=True),
    Page("ui: events, keyword (common)", "/ui/events?keyword=INFO", ui=True),
    Page("ui: events, keyword (rare)", "/ui/events?keyword={rare_keyword}", ui=True),
    Page("ui: events, type (common)", "/ui/events?type=sms.received", ui=True),
    Page("ui: events, type (rare)", "/ui/events?type=email_subscriber.opted_out", ui=True),
    Page("ui: events, text (common word)", "/ui/events?text=pizza", capture="ui_text_next", ui=True),
    Page("ui: events, text, 2nd page", "/ui/events?text=pizza&cursor={ui_text_next}", ui=True),
    Page("ui: events, text (rare word)", "/ui/events?text=kumquat", ui=True),
    Page("ui: events, text and short code", "/ui/events?text=refund&short_code={short_code}", ui=True),
    Page(
        "ui: events, every field of the form",
        "/ui/events?texter={busy_texter}&short_code={short_code}&keyword=&type=sms.received&text=pizza&since=&until=",
        ui=True,
    ),
    Page("ui: event, its deliveries and attempts", "/ui/events/{event_id}", ui=True),
    Page("ui: deliveries", "/ui/deliveries", capture="ui_deliveries_next", ui=True),
    Page("ui: deliveries, 2nd page (its link)", "/ui/deliveries?before_id={ui_deliveries_next}", ui=True),
    Page("ui: deliveries, status delivered", "/ui/deliveries?status=delivered", ui=True),
    Page("ui: deliveries, status pending", "/ui/deliveries?status=pending", ui=True),
    Page("ui: deliveries, status failed", "/ui/deliveries?status=failed", ui=True),
    Page("ui: deliveries, status dead", "/ui/deliveries?status=dead", ui=True),
    Page("ui: deliveries, destination", "/ui/deliveries?destination=slack", ui=True),
    Page("ui: deliveries, destination and status", "/ui/deliveries?destination=sms&status=dead", ui=True),
    Page("ui: deliveries, live part (polled)", "/ui/deliveries?part=live", ui=True),
    Page("ui: dead letters", "/ui/dead-letters", capture="ui_dead_next", ui=True),
    Page("ui: dead letters, 2nd page (its link)", "/ui/dead-letters?before_id={ui_dead_next}", ui=True),
    Page("ui: dead letters, a destination", "/ui/dead-letters?destination=crm", ui=True),
    Page("ui: conversations (the picker)", "/ui/conversations", ui=True),
    Page(
        "ui: a conversation (a busy texter)",
        "/ui/conversations?texter={busy_texter}&short_code={short_code}",
        capture="ui_conversation_next",
        ui=True,
    ),
    Page(
        "ui: a conversation, earlier messages",
        "/ui/conversations?texter={busy_texter}&short_code={short_code}&cursor={ui_conversation_next}",
        ui=True,
    ),
    Page(
        "ui: a conversation, live part (polled)",
        "/ui/conversations?texter={busy_texter}&short_code={short_code}&part=live",
        ui=True,
    ),
    Page("ui: routes", "/ui/routes", ui=True),
]

# What the console's Overview asks the store for that no admin list shows: timed in the bench's
# own process, on the store's own connection.
STORE_CALLS = {
    "store: postbacks per minute, last hour": lambda store: store.postbacks_per_minute(time.time() - 3600),
    "store: recent errors (10)": lambda store: store.recent_errors(10),
    "store: pending and dead counts (stats)": lambda store: store.stats(),
    "store: a conversation (100)": lambda store: store.list_events(
        EventFilter(texter=_texters(random.Random(20), 1)[0], short_code=SHORT_CODES[0])
    ),
}

# ---------------------------------------------------------------------------- the data

SHORT_CODES = ["86717", "77676", "55123", "90210", "42424", "31313", "12345", "67890"]
SHORT_WEIGHTS = [40, 25, 12, 8, 6, 5, 3, 1]
KEYWORDS = ["STOP", "START", "HELP", "INFO", "JOIN", "DEALS", "YES", "PIZZA", "MENU", "HOURS"]
VOCABULARY = (
    "the a to you i and is my for it of on can what when where order pizza delivery today tomorrow "
    "please thanks thank hi hello yes no ok okay store open close time price deal coupon code menu "
    "refund late cold hot large small medium pepperoni cheese veggie wings soda drink address "
    "street apartment call me back now later still waiting how much long minutes hour again wrong "
    "missing extra sauce crust thin thick gluten free vegan spicy mild great good bad love best"
)
WORDS = VOCABULARY.split()
REPLIES = ["Thanks! Your order is on its way.", "We open at 11am.", "Sorry about that, refund sent."]
DESTINATIONS = ["crm", "slack", "sms", "email"]
ERRORS = ["HTTP 500", "HTTP 503", "connection refused", "timeout after 10s", "HTTP 404", "channel_not_found"]
TYPES = [  # type, origin, code, weight
    ("sms.received", "SMS_MO", "N211", 600),
    ("sms.status", "SMS_MT", "N202", 200),
    ("sms.reply", "SLACK_REPLY", "", 80),
    ("mms.received", "MMS_MO", "N251", 40),
    ("subscriber.opted_in", "SUB", "N301", 25),
    ("subscriber.opted_out", "SUB", "N302", 25),
    ("postback.received", "OTHER", "N999", 20),
    ("email_subscriber.opted_in", "EMAIL_SUB", "N303", 6),
    ("email_subscriber.opted_out", "EMAIL_SUB", "N304", 4),
]


def _texters(rng: random.Random, n: int) -> list[str]:
    return [f"+1{rng.randrange(2_000_000_000, 9_999_999_999)}" for _ in range(n)]


def _text(rng: random.Random, n: int) -> tuple[str, str]:
    """A texter's text and its keyword."""
    if rng.random() < 0.35:
        keyword = rng.choice(KEYWORDS)
        words = [keyword] if rng.random() < 0.6 else [keyword, *rng.choices(WORDS, k=rng.randint(1, 6))]
    else:
        words = rng.choices(WORDS, k=rng.randint(1, 18))
    if n % 40_000 == 7:
        words.append("kumquat")  # a rare word: 25 in a million
    text = " ".join(words)
    if rng.random() < 0.3:
        text = text.capitalize() + rng.choice(["?", "!", "."])
    return text, words[0].upper().strip("?!.")


@dataclass
class Fill:
    events: int
    deliveries: int
    span_days: float = 20.0


def rows(fill: Fill, seed: int = 20) -> Iterator[tuple[tuple[Any, ...], list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """(event row, its delivery rows, their attempt rows) for each event, oldest first. Events
    are (id, dedup_key, type, received_at, body, and the columns of its fields: EVENT_COLUMNS);
    deliveries (id, event_id, destination, route,
    conversation, status, attempts, created_at, next_at, leased_by, last_error, updated_at,
    ordered, came_in_at, tracking_id); attempts (delivery_id, number, at, outcome, status,
    error, duration)."""
    rng = random.Random(seed)
    texters = _texters(rng, 200_000)
    now = time.time()
    start = now - fill.span_days * 86400
    step = (now - 60 - start) / fill.events
    extra = fill.deliveries - fill.events  # every event goes to crm; this many to one more
    types = [t for t in TYPES for _ in range(t[3])]
    delivery_id = 0
    for n in range(fill.events):
        at = start + n * step + rng.random() * step * 0.5
        texter = texters[int(len(texters) * rng.random() ** 3)]  # a few texters send a lot
        short = rng.choices(SHORT_CODES, SHORT_WEIGHTS)[0]
        kind, origin, code, _ = rng.choice(types)
        text: str | None = None
        keyword: str | None = None
        sender, to = texter, short
        if kind in ("sms.received", "mms.received"):
            text, keyword = _text(rng, n)
        elif kind in ("sms.reply", "sms.status"):
            sender, to = short, texter
            if kind == "sms.reply":
                text = rng.choice(REPLIES)
        event_id = "evt_" + ulid(int(at * 1000))
        iso = datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        fields = {"ORIGIN": origin, "CODE": code, "FROM": sender.lstrip("+"), "TO": to.lstrip("+")}
        if text is not None:
            fields["TEXT"] = text
        fields["TRANSACTIONID"] = f"{n:08d}-{rng.getrandbits(40):010x}"
        event = {
            "id": event_id, "type": kind, "origin": origin, "code": code, "from": sender, "to": to,
            "keyword": keyword, "text": text, "subject": None, "media": [], "spid": None, "carrier": None,
            "transaction_id": fields["TRANSACTIONID"], "tracking_id": None, "occurred_at": iso[:19] + "Z",
            "received_at": iso, "fields": fields,
        }  # fmt: skip
        key = hashlib.sha256(f"tx\0{origin}\0{code}\0{fields['TRANSACTIONID']}".encode()).hexdigest()
        event_row = (event_id, key, kind, at, dumps(event), sender, to, keyword, text)
        if kind == "sms.reply":
            second = "sms"
        elif kind in ("sms.received", "mms.received"):
            second = "slack"
        else:
            second = "email"
        targets = ["crm", second] if n * extra // fill.events != (n + 1) * extra // fill.events else ["crm"]
        deliveries, attempts = [], []
        age = now - at
        for destination in targets:
            delivery_id += 1
            roll = rng.random()
            error = None
            if age < 3600 and roll < 0.08:  # recent and not delivered yet: due in two hours
                status, tries = "pending", rng.choice([0, 1, 1, 2])
                error = rng.choice(ERRORS) if tries else None
                next_at = now + 7200
            elif roll < 0.02 or (destination == "sms" and roll < 0.06):
                status, tries, error, next_at = "dead", rng.randint(3, 8), rng.choice(ERRORS), at + 3600
            else:
                status, tries, next_at = "delivered", 1 if roll < 0.93 else rng.randint(2, 3), at + 1
            updated = at + (tries or 0) * 2.0
            tracking = f"{n:09d}" if destination == "sms" and status == "delivered" else None
            deliveries.append((
                delivery_id, event_id, destination, "default", f"{texter}|{short}", status, tries, at, next_at, None,
                error, updated, destination == "slack", None, tracking,
            ))  # fmt: skip
            for number in range(1, tries + 1):
                outcome = status if number == tries and status != "pending" else "retry"
                failed = outcome != "delivered"
                attempts.append((
                    delivery_id, number, at + number * 2.0, outcome, 500 if failed else 200,
                    (error or "HTTP 503") if failed else None, 0.05 + rng.random() * 0.2,
                ))  # fmt: skip
        yield event_row, deliveries, attempts


def optout_rows(fill: Fill, seed: int = 21) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)
    texters = _texters(rng, 30_000)
    now = time.time()
    out = []
    for texter in texters:
        for short in rng.sample(SHORT_CODES, rng.randint(1, 2)):
            stop = rng.random() < 0.7
            at = now - rng.random() * fill.span_days * 86400
            out.append((texter, short, stop, "STOP" if stop else "START", at, "evt_" + ulid(int(at * 1000))))
    return out


# ---------------------------------------------------------------------------- filling a store

CHUNK = 20_000


def chunks(fill: Fill) -> Iterator[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """`rows` in chunks of CHUNK events: (events, their deliveries, their attempts)."""
    events: list[tuple[Any, ...]] = []
    deliveries: list[tuple[Any, ...]] = []
    attempts: list[tuple[Any, ...]] = []
    for event, its_deliveries, its_attempts in rows(fill):
        events.append(event)
        deliveries += its_deliveries
        attempts += its_attempts
        if len(events) >= CHUNK:
            yield events, deliveries, attempts
            events, deliveries, attempts = [], [], []
    yield events, deliveries, attempts


EVENT_ROW = ("id", "dedup_key", "type", "received_at", "body", *EVENT_COLUMNS.values())
DELIVERY_COLUMNS = [
    "id", "event_id", "destination", "route", "conversation", "status", "attempts", "created_at", "next_at",
    "leased_by", "last_error", "updated_at", "ordered", "came_in_at", "tracking_id",
]  # fmt: skip


async def fill_store(url: str, fill: Fill) -> dict[str, Any]:
    store = open_store(url)
    await store.open()  # the schema, every migration
    await store.close()
    started = time.monotonic()
    if url.startswith("sqlite"):
        timings = await asyncio.to_thread(_fill_sqlite, url.removeprefix("sqlite:///"), fill)
    else:
        timings = await _fill_postgres(url, fill)
    timings["total_s"] = round(time.monotonic() - started, 1)
    return timings


def _fill_sqlite(path: str, fill: Fill) -> dict[str, Any]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    schema = conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE type IN ('index', 'trigger') AND sql IS NOT NULL"
        " AND tbl_name IN ('events', 'deliveries', 'attempts', 'optouts')"
    ).fetchall()
    for kind, name, _ in schema:
        conn.execute(f"DROP {kind.upper()} {name}")
    started = time.monotonic()
    conn.execute("BEGIN")
    for events, deliveries, attempts in chunks(fill):
        conn.executemany(
            f"INSERT INTO events ({', '.join(EVENT_ROW)}) VALUES ({', '.join('?' * len(EVENT_ROW))})", events
        )
        conn.executemany(
            f"INSERT INTO deliveries ({', '.join(DELIVERY_COLUMNS)}) VALUES ({', '.join('?' * len(DELIVERY_COLUMNS))})",
            deliveries,
        )
        conn.executemany("INSERT INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?)", attempts)
    conn.executemany("INSERT OR REPLACE INTO optouts VALUES (?, ?, ?, ?, ?, ?)", optout_rows(fill))
    conn.execute("COMMIT")
    loaded = time.monotonic()
    conn.execute("BEGIN")
    conn.execute("DELETE FROM events_text")
    conn.execute(
        "INSERT INTO events_text (rowid, text, event_id) SELECT rowid, text, id FROM events WHERE text IS NOT NULL"
    )
    for _, _, sql in schema:
        conn.execute(sql)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {
        "rows_s": round(loaded - started, 1),
        "indexes_s": round(time.monotonic() - loaded, 1),
        "size_mb": round(os.path.getsize(path) / 1e6),
    }


async def _fill_postgres(url: str, fill: Fill) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET maintenance_work_mem = '512MB'")
        await conn.execute("SET synchronous_commit = off")
        schema = await conn.fetch(
            "SELECT i.indexname, i.indexdef FROM pg_indexes AS i"
            " JOIN pg_class AS c ON c.relname = i.indexname AND c.relnamespace = current_schema()::regnamespace"
            " JOIN pg_index AS x ON x.indexrelid = c.oid"
            " WHERE i.schemaname = current_schema() AND NOT x.indisprimary AND NOT x.indisunique"
            " AND i.tablename IN ('events', 'deliveries', 'attempts', 'optouts')"
        )
        for row in schema:
            await conn.execute(f"DROP INDEX {row['indexname']}")
        started = time.monotonic()
        for events, deliveries, attempts in chunks(fill):
            await conn.copy_records_to_table("events", records=events, columns=EVENT_ROW)
            await conn.copy_records_to_table("deliveries", records=deliveries, columns=DELIVERY_COLUMNS)
            await conn.copy_records_to_table("attempts", records=attempts)
        await conn.copy_records_to_table("optouts", records=optout_rows(fill))
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('deliveries', 'id'), (SELECT max(id) FROM deliveries))"
        )
        loaded = time.monotonic()
        for row in schema:
            await conn.execute(row["indexdef"])
        await conn.execute("VACUUM ANALYZE events")
        await conn.execute("VACUUM ANALYZE deliveries")
        await conn.execute("VACUUM ANALYZE attempts")
        await conn.execute("ANALYZE optouts")
        size = await conn.fetchval(
            "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class AS c"
            " WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'"
        )
        return {
            "rows_s": round(loaded - started, 1),
            "indexes_s": round(time.monotonic() - loaded, 1),
            "size_mb": round(size / 1e6),
        }
    finally:
        await conn.close()


# ---------------------------------------------------------------------------- the context


async def context_of(url: str) -> dict[str, str]:
    """The values PAGES name: numbers and ids found in the store."""
    sqlite = url.startswith("sqlite")
    field = EVENT_COLUMNS.__getitem__
    queries = {
        "busy_texter": f"SELECT {field('from')} FROM events WHERE type = 'sms.received'"
        " ORDER BY received_at DESC LIMIT 1",
        "event_id": "SELECT event_id FROM deliveries WHERE status = 'dead' ORDER BY id DESC LIMIT 1",
        "delivery_id": "SELECT id FROM deliveries WHERE attempts > 2 ORDER BY id DESC LIMIT 1",
        "optout_texter": "SELECT texter FROM optouts ORDER BY at DESC LIMIT 1",
        "texter": f"SELECT {field('from')} FROM events WHERE type = 'sms.received' ORDER BY received_at LIMIT 1",
    }
    out: dict[str, str] = {}
    if sqlite:
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        for name, query in queries.items():
            out[name] = str(conn.execute(query).fetchone()[0])
        conn.close()
    else:
        pg = await asyncpg.connect(url)
        for name, query in queries.items():
            out[name] = str(await pg.fetchval(query))
        await pg.close()
    # the busiest texter of all: the first of the generator's list is the likeliest
    rng = random.Random(20)
    out["busy_texter"] = _texters(rng, 1)[0]
    out["short_code"] = SHORT_CODES[0]
    out["quiet_short_code"] = SHORT_CODES[-1]
    out["rare_keyword"] = "HOURS"
    day = time.time() - 10 * 86400
    out["day_start"] = datetime.fromtimestamp(day, UTC).isoformat(timespec="seconds")
    out["day_end"] = datetime.fromtimestamp(day + 86400, UTC).isoformat(timespec="seconds")
    return out


# ---------------------------------------------------------------------------- serving and timing


@contextlib.contextmanager
def serving(url: str, work: Path, token: str) -> Iterator[int]:
    port = free_port()
    config = work / "console-bench.yaml"
    sink = f"http://127.0.0.1:{free_port()}/nobody-listens"
    destinations = "".join(f"  {d}: {{type: webhook, url: '{sink}'}}\n" for d in DESTINATIONS)
    config.write_text(
        f"server: {{listen: 127.0.0.1:{port}, admin_token: {token}}}\n"
        f"store: {url}\n"
        "retry: {max_age: 30d}\n"
        "retention: {delivered: 3650d, dead: 3650d}\n"
        f"destinations:\n{destinations}"
        "default: [crm]\n"
    )
    with process([sys.executable, "-m", "bridge", "serve", "-c", str(config)], 0, port, work / "serve.log"):
        yield port


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def time_pages(
    base: str, pages: list[Page], context: dict[str, str], *, runs: int, token: str
) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"}
    _, cookie = new_session(signing_key(token))  # the console's session, as signing in would give
    out = []
    async with aiohttp.ClientSession(base, cookies={SESSION_COOKIE: cookie}) as session:
        # the 20th page of events: follow the cursor
        cursor = None
        for _ in range(19):
            params = {"cursor": cursor} if cursor else {}
            async with session.get("/admin/events", params=params, headers=headers) as response:
                cursor = (await response.json())["next"]
        context["events_page20"] = urllib.parse.quote(cursor or "", safe="")
        for page in pages:
            try:
                path = page.path.format(**{k: urllib.parse.quote(v, safe="") for k, v in context.items()})
            except KeyError as missing:
                out.append({"name": page.name, "path": page.path, "skipped": f"no {missing} in the context"})
                continue
            times, status, size, wrong = [], 0, 0, None
            for n in range(runs + 1):
                started = time.perf_counter()
                async with session.get(path, headers=headers, allow_redirects=False) as response:
                    body = await response.read()
                elapsed = (time.perf_counter() - started) * 1000
                status, size = response.status, len(body)
                if page.ui:
                    wrong = wrong or _not_a_page(status, response.content_type, body)
                if n == 0:  # the warm-up: what it captures, and its count
                    if page.capture and status == 200:
                        context[page.capture] = _next_of(body, ui=page.ui)
                    continue
                times.append(elapsed)
            rows = _count_html(body) if page.ui else _count(body)
            out.append({
                "name": page.name, "path": path, "ui": page.ui, "status": status, "bytes": size, "rows": rows,
                "p50_ms": round(statistics.median(times), 1), "p95_ms": round(_percentile(times, 0.95), 1),
                "max_ms": round(max(times), 1), **({"not_a_page": wrong} if wrong else {}),
            })  # fmt: skip
            said = f", NOT A PAGE: {wrong}" if wrong else ""
            print(
                f"  {page.name}: p50 {out[-1]['p50_ms']} ms, max {out[-1]['max_ms']} ms ({rows} rows, {status}{said})"
            )
    return out


def _not_a_page(status: int, content_type: str, body: bytes) -> str | None:
    """Why a console answer is not the page asked for (None: it is): not a 200, not HTML, or the
    sign-in form (the session cookie was refused)."""
    if status != 200:
        return f"status {status}"
    if content_type != "text/html":
        return f"content type {content_type}"
    if b'action="/ui/login"' in body:
        return "the sign-in form"
    return None


_PAGER = re.compile(rb'<a href="([^"]*)">(?:Older events|Older deliveries|Earlier messages)</a>')


def _next_of(body: bytes, *, ui: bool) -> str:
    """The next page's cursor: the admin API's `next`, or the `cursor` (events, conversations)
    or `before_id` (deliveries) of the link a console page shows to it; "" when there is none."""
    if not ui:
        return str(json.loads(body).get("next") or "")
    link = _PAGER.search(body)
    if link is None:
        return ""
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(html.unescape(link.group(1).decode())).query))
    return query.get("cursor") or query.get("before_id") or ""


_ROWS = re.compile(rb'<tr>\s+<td|<li class="(?:in|out)bound"|<li><a href="/ui/conversations\?')


def _count_html(body: bytes) -> int:
    """The rows a console page shows: table rows, a conversation's messages, the picker's pairs."""
    return len(_ROWS.findall(body))


def _count(body: bytes) -> int | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    for key in ("events", "deliveries", "optouts"):
        if isinstance(data, dict) and isinstance(data.get(key), list):
            return len(data[key])
    return None


async def time_store_calls(url: str, *, runs: int) -> list[dict[str, Any]]:
    store = open_store(url)
    await store.open()
    out = []
    try:
        for name, call in STORE_CALLS.items():
            times = []
            for n in range(runs + 1):
                started = time.perf_counter()
                await call(store)
                if n:
                    times.append((time.perf_counter() - started) * 1000)
            out.append({
                "name": name, "p50_ms": round(statistics.median(times), 1),
                "p95_ms": round(_percentile(times, 0.95), 1), "max_ms": round(max(times), 1),
            })  # fmt: skip
            print(f"  {name}: p50 {out[-1]['p50_ms']} ms, max {out[-1]['max_ms']} ms", flush=True)
    finally:
        await store.close()
    return out


# ---------------------------------------------------------------------------- ingest


def _postbacks(n: int, start: int) -> list[tuple[dict[str, Any], str]]:
    rng = random.Random(start)
    out = []
    for i in range(start, start + n):
        sender = f"1{rng.randrange(2_000_000_000, 9_999_999_999)}"
        body = (
            f"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><CODE>N211</CODE><FROM>{sender}</FROM><TO>86717</TO>"
            f"<TEXT>{rng.choice(KEYWORDS)} {' '.join(rng.choices(WORDS, k=6))}</TEXT>"
            f"<TRANSACTIONID>ingest-{i}-{rng.getrandbits(48):x}</TRANSACTIONID></POSTBACK>"
        ).encode()
        event = normalize(parse(body), event_id="evt_" + ulid(), received_at=datetime.now(UTC), carriers=Carriers({}))
        out.append((event, dedup_key(event)))
    return out


async def ingest_rate(store: Store, postbacks: list[tuple[dict[str, Any], str]], seconds: float) -> tuple[float, float]:
    """Postbacks stored per second, 32 at a time (each with a crm and a slack delivery), and the
    CPU time this process spent per postback (microseconds: the event loop and, for SQLite, the
    writer thread; not PostgreSQL's server)."""
    it = iter(postbacks)
    done = 0
    deadline = time.monotonic() + seconds

    async def sender() -> None:
        nonlocal done
        for event, key in it:
            if time.monotonic() >= deadline:
                return
            conversation = f"{event['from']}|{event['to']}"
            deliveries = [NewDelivery("crm", "r", conversation, False), NewDelivery("slack", "r", conversation)]
            await store.ingest(event, key, deliveries)
            done += 1

    started, cpu = time.monotonic(), time.process_time()
    await asyncio.gather(*(sender() for _ in range(32)))
    return done / (time.monotonic() - started), (time.process_time() - cpu) / max(done, 1) * 1e6


INDEXES_0003 = [
    "events_received_id", "events_from", "events_to", "events_keyword", "events_type", "deliveries_status_id",
    "deliveries_destination_id", "deliveries_errors", "deliveries_open", "events_text",
]  # fmt: skip


async def without_0003(url: str) -> None:
    """Drop what migration 0003 added (its indexes and the text index's triggers)."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        for name in INDEXES_0003[:-1]:
            conn.execute(f"DROP INDEX {name}")
        conn.execute("DROP TRIGGER events_text_queue")
        conn.execute("DROP TRIGGER events_text_delete")
        conn.commit()
        conn.close()
        return
    pg = await asyncpg.connect(url)
    for name in INDEXES_0003:
        await pg.execute(f"DROP INDEX IF EXISTS {name}")
    await pg.execute("CREATE INDEX events_received ON events (received_at)")  # what 0003 replaced
    await pg.close()


async def compare_ingest(urls: dict[str, str], *, rounds: int, seconds: float) -> dict[str, Any]:
    stores = {name: open_store(url) for name, url in urls.items()}
    for store in stores.values():
        await store.open()
    try:
        rates: dict[str, list[float]] = {name: [] for name in stores}
        cpus: dict[str, list[float]] = {name: [] for name in stores}
        made = 0
        warm = _postbacks(2000, 10_000_000)
        for store in stores.values():
            await ingest_rate(store, warm[: 2000 // len(stores)], 2)
            warm = warm[2000 // len(stores) :]
        for n in range(rounds):
            for name, store in stores.items():
                batch = _postbacks(int(seconds * 12_000), made)
                made += len(batch)
                rate, cpu = await ingest_rate(store, batch, seconds)
                rates[name].append(round(rate))
                cpus[name].append(round(cpu, 1))
                print(f"  ingest round {n + 1}, {name}: {rate:,.0f}/s, {cpu:.0f} us CPU each", flush=True)
        return {
            name: {
                "median": statistics.median(r),
                "rounds": r,
                "cpu_us_median": statistics.median(cpus[name]),
                "cpu_us_rounds": cpus[name],
            }
            for name, r in rates.items()
        }
    finally:
        for store in stores.values():
            await store.close()


# ---------------------------------------------------------------------------- the run


@contextlib.asynccontextmanager
async def schemas(url: str, names: list[str], keep: bool) -> AsyncIterator[dict[str, str]]:
    """PostgreSQL: a fresh schema for each name (dropped afterwards unless `keep`); their URLs."""
    admin = await asyncpg.connect(url)
    made = {}
    try:
        for name in names:
            schema = f"bench_console_{name}_{secrets.token_hex(4)}"
            await admin.execute(f"CREATE SCHEMA {schema}")
            parts = urllib.parse.urlsplit(url)
            query = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts.query), ("search_path", schema)])
            made[name] = (schema, urllib.parse.urlunsplit(parts._replace(query=query)))
        yield {name: u for name, (_, u) in made.items()}
    finally:
        if not keep:
            for schema, _ in made.values():
                await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    fill = Fill(args.events, args.deliveries)
    token = secrets.token_urlsafe(16)
    backend = "sqlite" if args.store.startswith("sqlite") or args.store == "sqlite" else "postgresql"
    work = Path(tempfile.mkdtemp(prefix="bridge-console-bench-"))
    load = os.getloadavg()
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_before": [round(x, 1) for x in load],
        },
        "backend": backend,
        "settings": {
            "events": fill.events,
            "deliveries": fill.deliveries,
            "runs": args.runs,
            "rounds": 0 if args.no_ingest else args.rounds,
        },
    }
    names = ["full", "empty", "bare"]
    async with contextlib.AsyncExitStack() as stack:
        if backend == "sqlite":
            urls = {name: f"sqlite:///{work / name}.db" for name in names}
            if args.keep:
                urls["full"] = f"sqlite:///{Path(args.keep).resolve()}"
        else:
            urls = await stack.enter_async_context(schemas(args.store, names, keep=False))
        full = urls["full"]
        if args.keep and Path(args.keep).exists() and backend == "sqlite":
            print(f"reusing {args.keep}", flush=True)
            store = open_store(full)
            await store.open()  # brought up to date
            await store.close()
            results["fill"] = {"reused": args.keep}
        else:
            print(f"filling {backend}: {fill.events:,} events, {fill.deliveries:,} deliveries ...", flush=True)
            results["fill"] = await fill_store(full, fill)
            print(f"  {results['fill']}", flush=True)
        context = await context_of(full)
        print("timing the pages ...", flush=True)
        with serving(full, work, token) as port:
            time.sleep(2)
            results["pages"] = await time_pages(f"http://127.0.0.1:{port}", PAGES, context, runs=args.runs, token=token)
        results["store_calls"] = await time_store_calls(full, runs=args.runs)
        if not args.no_ingest:
            for name in ("empty", "bare"):
                store = open_store(urls[name])
                await store.open()
                await store.close()
            await without_0003(urls["bare"])
            print("ingest: the full store, an empty one, one without 0003's indexes, in turns ...", flush=True)
            results["ingest"] = await compare_ingest(urls, rounds=args.rounds, seconds=args.seconds)
    results["machine"]["load_after"] = [round(x, 1) for x in os.getloadavg()]
    shutil.rmtree(work, ignore_errors=True)  # gigabytes (a --keep store is elsewhere)
    return results


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = [
        f"Run {results['when']} on {results['backend']}, {m['cpus']} CPUs shared with other work (load average "
        f"{m['load_before'][0]} before, {m['load_after'][0]} after), Python {m['python']}: {s['events']:,} events, "
        f"{s['deliveries']:,} deliveries; each page fetched {s['runs']} times after a warm-up.",
        "",
        f"Filled in {results['fill'].get('total_s', '-')} s (rows {results['fill'].get('rows_s', '-')} s, indexes "
        f"{results['fill'].get('indexes_s', '-')} s), {results['fill'].get('size_mb', '-')} MB.",
        "",
        "| page | rows | p50 ms | p95 ms | max ms | under 150 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for page in results["pages"]:
        if "skipped" in page:
            lines.append(f"| {page['name']} | skipped: {page['skipped']} | | | | |")
            continue
        if page.get("not_a_page"):
            met = f"NO (not the page: {page['not_a_page']})"
        else:
            met = "yes" if page["p95_ms"] < GOAL_MS and page["status"] == 200 else f"NO ({page['status']})"
        lines.append(
            f"| {page['name']} | {page['rows']} | {page['p50_ms']} | {page['p95_ms']} | {page['max_ms']} | {met} |"
        )
    for call in results.get("store_calls", []):
        met = "yes" if call["p95_ms"] < GOAL_MS else "NO"
        lines.append(f"| {call['name']} | | {call['p50_ms']} | {call['p95_ms']} | {call['max_ms']} | {met} |")
    if "ingest" not in results:
        return "\n".join(lines)
    ingest = results["ingest"]
    ratio = ingest["full"]["median"] / ingest["empty"]["median"]
    bare = ingest["empty"]["median"] / ingest["bare"]["median"]
    cpu = {name: ingest[name].get("cpu_us_median") for name in ("full", "empty", "bare")}
    lines += [
        "",
        "| ingest (store.ingest, 32 at a time) | postbacks/s, median | rounds | CPU us per postback, median |",
        "| --- | --- | --- | --- |",
        *(
            f"| {label} | {ingest[name]['median']:,.0f} | {', '.join(f'{r:,}' for r in ingest[name]['rounds'])} "
            f"| {ingest[name].get('cpu_us_median', '-')} |"
            for name, label in (
                ("full", "the full store"),
                ("empty", "an empty store"),
                ("bare", "an empty store without migration 0003's indexes"),
            )
        ),
        "",
        f"Ingest with the full store: {ratio:.2f}x an empty one's (goal: at least {INGEST_GOAL}x: "
        f"{'met' if ratio >= INGEST_GOAL else 'NOT met'}). Migration 0003's indexes cost ingest "
        f"{(1 - bare) * 100:.0f}% (an empty store with them against one without).",
    ]
    if all(cpu.values()):
        lines.append(
            f"CPU per postback in this process (steadier than the rates on a shared machine): full "
            f"{cpu['full']} us, empty {cpu['empty']} us, empty without 0003's indexes {cpu['bare']} us."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="sqlite", help="sqlite (a temporary file), or a postgresql:// URL")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--deliveries", type=int, default=2_000_000)
    parser.add_argument("--runs", type=int, default=10, help="timed fetches of each page, after a warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="ingest rounds per store, taken in turns")
    parser.add_argument("--seconds", type=float, default=5, help="each ingest round")
    parser.add_argument("--no-ingest", action="store_true", help="time the pages only, not ingest")
    parser.add_argument("--keep", help="SQLite: fill this file once and reuse it on later runs")
    parser.add_argument("--no-save", action="store_true", help="print, keep nothing in bench/results/")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    text = report(results)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stamp = results["when"].replace(":", "").replace("-", "")
        (RESULTS / f"{stamp}-console-{results['backend']}.json").write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / f"latest-console-{results['backend']}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
