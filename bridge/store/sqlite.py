"""SQLite store: WAL, fsync on every commit, and group commit.

Every write runs on one writer thread that owns its connection (a few lookups that write
nothing run on a reader connection of their own, and the listings on another: `_Reader`). Operations that arrive
while a commit is in flight queue up and are committed together in the next transaction, so a
burst of N postbacks costs a few fsyncs, not N, and each caller still hears back only after
its own data is durable. Each operation runs in a savepoint, so one failing op does not undo
its neighbours; a failed COMMIT fails them all (the store is then not ready: 503).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from bridge.errors import ConfigError, StoreError
from bridge.event import Event
from bridge.jsonout import dumps
from bridge.store import (
    DELIVERY_COLUMNS,
    FAILED_SQL,
    OPTOUT_COLUMNS,
    REPLAY_SET_SQL,
    AttemptResult,
    AttemptRow,
    Claim,
    ClaimFor,
    DeliveryFilter,
    DeliveryRow,
    DestinationStats,
    EventFilter,
    EventSQL,
    ExpiryFollowUp,
    Ingested,
    NewDelivery,
    OptOutRow,
    PendingEvent,
    Store,
    delivery_clauses,
    delivery_row,
    event_search,
    load_queries,
    optout_row,
    owner_gone,
    parse_event_cursor,
    schema,
    verdict,
)

log = logging.getLogger("bridge.store")
Q = load_queries("sqlite.sql")
T = TypeVar("T")
F = TypeVar("F")  # what a caller of _ingest_all gets each result back with (its future)
Op = Callable[[sqlite3.Connection], Any]  # or an _Ingest: every postback of a commit goes in together
_STOP = object()
MAX_BATCH = 1024
# New events go into the text index (migration 0003) this many at a time at least, or after this
# many seconds without postbacks: a few hundred in one statement cost a sixth of one at a time.
TEXT_INDEX_BATCH = 500
TEXT_INDEX_IDLE = 1.0
TEXT_INDEX_MOST = 5000  # at a time: the postbacks of that moment wait for it (about 20 ms)


class _EventSQL(EventSQL):
    def placeholder(self, n: int) -> str:
        return "?"

    def field(self, name: str) -> str:
        return f"json_extract(body, '$.{name}')"  # as the indexes of migration 0003 are made on it

    def unindexed(self, sql: str) -> str:
        return f"+{sql}"  # SQLite's way of saying so

    def contains(self, needle: str, bind: Callable[[Any], str]) -> str:
        # (SQLite's lower() folds ASCII letters only)
        return f"instr(lower({self.field('text')}), lower({bind(needle)})) > 0"

    def text_index(self, needle: str, bind: Callable[[Any], str]) -> str | None:
        """The trigram index of migration 0003 (events_text), for 3 characters or more: the
        events that have each of the needle's trigrams (up to TRIGRAMS of them), anywhere."""
        trigrams = sorted({needle[i : i + 3] for i in range(len(needle) - 2)})
        if not trigrams:
            return None
        step = max(1, len(trigrams) // TRIGRAMS)
        query = " AND ".join('"' + t.replace('"', '""') + '"' for t in trigrams[::step][:TRIGRAMS])
        # and those not in the index yet (events_text_pending), tested as they are
        return (
            f"(id IN (SELECT event_id FROM events_text WHERE events_text MATCH {bind(query)})"
            " OR rowid IN (SELECT event_rowid FROM events_text_pending))"
        )


_SQL = _EventSQL()
TRIGRAMS = 8  # of a needle, asked of the text index: enough to leave few events to test


def _marks(values: Sequence[object]) -> str:
    """`?, ?, ?`: the only thing ever formatted into SQL here; values are always bound."""
    return ", ".join("?" * len(values))


def _schema_version(conn: sqlite3.Connection) -> int:
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return 0
    row = conn.execute(Q["get_meta"], (schema.VERSION_KEY,)).fetchone()
    return schema.version_of(row[0] if row else None)


def _before_versioning(conn: sqlite3.Connection) -> None:
    """A store of 0.1.0 or earlier made before `deliveries` had these columns: add them, so the
    baseline (which makes what is missing, IF NOT EXISTS) finds the table it describes. Every
    delivery in such a store counts as ordered."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(deliveries)")}
    if columns and "ordered" not in columns:
        conn.execute("ALTER TABLE deliveries ADD COLUMN ordered INTEGER NOT NULL DEFAULT 1")
    if columns and "came_in_at" not in columns:
        conn.execute("ALTER TABLE deliveries ADD COLUMN came_in_at REAL")


_ADD_COLUMN = re.compile(r"\s*ALTER\s+TABLE\s+(\w+)\s+ADD\s+COLUMN\s+(\w+)", re.I)


def _adds_a_column_it_has(conn: sqlite3.Connection, statement: str) -> bool:
    """Whether `statement` is an ALTER TABLE ... ADD COLUMN of a column the table has already:
    SQLite has no ADD COLUMN IF NOT EXISTS, and a store brought up from before versioning (its
    version 0) may have been made with any later column."""
    code = "\n".join(line for line in statement.splitlines() if not line.lstrip().startswith("--"))
    matched = _ADD_COLUMN.match(code)
    if matched is None:
        return False
    table, column = matched.groups()
    return any(row[1] == column for row in conn.execute(f"PRAGMA table_info({table})"))


def _statements(script: str) -> list[str]:
    """A migration's statements, one by one: `executescript` would commit the transaction the
    migration runs in before its first statement."""
    out, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending)
            pending = ""
    if any(line.strip() and not line.lstrip().startswith("--") for line in pending.splitlines()):
        raise RuntimeError(f"a migration ends in an unfinished statement: {pending.strip()[:80]!r}")
    return out


class _Writer(threading.Thread):
    def __init__(self, path: str) -> None:
        super().__init__(name="sqlite-writer", daemon=True)
        self.path = path
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None
        self.unindexed = 1  # events stored since the text index last took them (1: look at opening)

    def connect(self) -> sqlite3.Connection:
        if not os.path.exists(self.path):
            # its directory too if need be (0700), as `sqlite:////var/lib/postback-bridge/bridge.db`
            # on a fresh machine; the file is created 0600 before SQLite touches it, and the -wal
            # and -shm files inherit the mode
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA busy_timeout = 10000")
        if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new file
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"cannot put {self.path} in WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")  # durable at COMMIT, also on power loss
        if schema.pending("sqlite", _schema_version(conn), self.path):
            self.migrate(conn)
        # Leases of a process that is gone (kill -9, power cut) are due again at once, not when
        # they run out. Only those: `deliveries` or `replay` opening the store beside a running
        # server must not take the deliveries it is sending away from it (they would go twice).
        now = time.time()
        for (owner,) in conn.execute(Q["lease_owners"]).fetchall():
            if owner_gone(owner):
                conn.execute(Q["recover_leases"], {"now": now, "owner": owner})

    def migrate(self, conn: sqlite3.Connection) -> None:
        """The migrations the store lacks and its new version, in one transaction, taken before
        the version is read again: another process may be opening the same file."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _schema_version(conn)
            todo = schema.pending("sqlite", version, self.path)
            if version == 0:
                _before_versioning(conn)
            for migration in todo:
                for statement in _statements(migration.sql):
                    if not _adds_a_column_it_has(conn, statement):
                        conn.execute(statement)
            if todo:
                conn.execute(Q["set_meta"], (schema.VERSION_KEY, str(todo[-1].version)))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def run(self) -> None:
        try:
            conn = self.connect()
        except BaseException as exc:  # reported to open()
            self.startup_error = exc
            self.ready.set()
            return
        self.ready.set()
        try:
            while True:
                try:
                    first = self.queue.get(timeout=TEXT_INDEX_IDLE if self.unindexed else None)
                except queue.Empty:  # quiet: index what waits
                    self._index_text(conn)
                    continue
                if first is _STOP:
                    return
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        item = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                self._run_batch(conn, batch)
                if self.unindexed >= TEXT_INDEX_BATCH:
                    self._index_text(conn)
                if stop:
                    return
        finally:
            conn.close()

    def _index_text(self, conn: sqlite3.Connection) -> None:
        """Put the events waiting for the text index in it, in a transaction of its own (see
        migration 0003). A failure leaves them waiting: a search reads them as they are."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            self.index_text(conn)
            conn.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            log.exception("indexing the text of new events failed; they stay searchable, unindexed")
            self.unindexed = 0

    def index_text(self, conn: sqlite3.Connection) -> None:
        """The statements of `_index_text`, in the transaction of `conn`: up to TEXT_INDEX_MOST
        events (the writer goes on with the rest after its next commit, or quiet second)."""
        last, more = conn.execute(
            "SELECT max(event_rowid), count(*) > ? FROM"
            " (SELECT event_rowid FROM events_text_pending ORDER BY event_rowid LIMIT ?)",
            (TEXT_INDEX_MOST - 1, TEXT_INDEX_MOST),
        ).fetchone()
        if last is not None:
            conn.execute(Q["index_text"], {"last": last})
            conn.execute("DELETE FROM events_text_pending WHERE event_rowid <= ?", (last,))
        self.unindexed = TEXT_INDEX_BATCH if more else 0

    def _run_batch(self, conn: sqlite3.Connection, batch: list[tuple[Op | _Ingest, asyncio.Future[Any], bool]]) -> None:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            ingests = [(op, future) for op, future, _ in batch if isinstance(op, _Ingest)]
            self.unindexed += len(ingests)
            if ingests:
                results.extend(_ingest_all(conn, ingests))
            for op, future, isolated in batch:
                if isinstance(op, _Ingest):
                    continue
                if not isolated:  # cannot fail halfway but for the disk: no savepoint needed
                    results.append((future, op(conn), None))
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    value = op(conn)
                except sqlite3.OperationalError:
                    raise  # the disk or the database failed: the whole batch fails
                except Exception as exc:  # a bad op: undo it alone
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((future, None, exc))
                    continue
                conn.execute("RELEASE op")
                results.append((future, value, None))
            conn.execute("COMMIT")
        except Exception as exc:  # the database, or a bug in an op that has no savepoint
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if not isinstance(exc, sqlite3.Error):
                log.exception("store operation failed; its batch is rolled back")
            error = StoreError(f"SQLite: {exc}")
            results = [(future, None, error) for _, future, _ in batch]
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for item in results:
            by_loop.setdefault(item[0].get_loop(), []).append(item)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed; nobody is waiting
                loop.call_soon_threadsafe(_settle, items)


_Ingest = PendingEvent  # an op the writer thread takes with the others of its commit


def _ingest_all(conn: sqlite3.Connection, ingests: list[tuple[_Ingest, F]]) -> list[tuple[F, Any, None]]:
    """Every postback of a commit in two statements: the events (duplicates skipped by the
    unique dedup key), then the deliveries of those that were new."""
    # rowcount counts the rows the inserts themselves made: the events' trigger (0003) adds a
    # row for each new event, which total_changes would count too, taking retries for new events
    inserted = conn.executemany(
        Q["insert_event"], [(i.event_id, i.dedup_key, i.type, i.received_at, i.body) for i, _ in ingests]
    ).rowcount
    if inserted == len(ingests):
        owner = {i.dedup_key: i.event_id for i, _ in ingests}
    else:  # some were duplicates (of a stored event, or of one earlier in this batch)
        keys = list({i.dedup_key for i, _ in ingests})
        owner = dict(conn.execute(f"SELECT dedup_key, id FROM events WHERE dedup_key IN ({_marks(keys)})", keys))
    rows: list[tuple[Any, ...]] = []
    dropped: list[tuple[str, float]] = []
    results: list[tuple[F, Any, None]] = []
    for item, future in ingests:
        stored_id = owner[item.dedup_key]
        if stored_id == item.event_id:
            eid, at = item.event_id, item.received_at
            rows.extend(
                (eid, d.destination, d.route, d.conversation, d.ordered, at, at + d.delay, at) for d in item.deliveries
            )
            if not item.deliveries:
                dropped.append((eid, at))
            results.append((future, Ingested("accepted", item.event_id), None))
        else:
            results.append((future, Ingested("duplicate", stored_id), None))
    conn.executemany(Q["insert_delivery"], rows)
    if dropped:
        conn.executemany(Q["insert_dropped"], dropped)
    return results


def _claimed(conn: sqlite3.Connection, then: ClaimFor, now: float) -> list[Claim]:
    """`Store.claim` as one op of the writer."""
    params = {
        "destination": then.destination,
        "now": now,
        "lease_until": now + then.lease,
        "owner": then.owner,
        "limit": then.limit,
    }
    rows = conn.execute(Q["claim_ordered" if then.ordered else "claim"], params).fetchall()
    if not rows:
        return []
    ids = sorted({row[1] for row in rows})
    bodies = dict(conn.execute(f"SELECT id, body FROM events WHERE id IN ({_marks(ids)})", ids).fetchall())
    if len(bodies) < len(ids):  # see migration 0005: one such row would fail every claim
        rows = _without_orphans(conn, rows, bodies)
    rows.sort(key=lambda row: row[0])
    return [
        Claim(
            id=row[0],
            event_id=row[1],
            destination=then.destination,
            attempt=row[2],
            created_at=row[3],
            conversation=row[4],
            route=row[5],
            body=bodies[row[1]],
        )
        for row in rows
    ]


def _without_orphans(conn: sqlite3.Connection, rows: list[Any], bodies: dict[str, str]) -> list[Any]:
    """The claimed rows whose event is stored; the others are removed. A delivery without its
    event has nothing to send, and its conversation's later deliveries would wait behind it."""
    orphans = [row[0] for row in rows if row[1] not in bodies]
    conn.execute(f"DELETE FROM attempts WHERE delivery_id IN ({_marks(orphans)})", orphans)  # ids are reused
    conn.execute(f"DELETE FROM deliveries WHERE id IN ({_marks(orphans)})", orphans)
    log.error(
        "deliveries without their event removed",
        extra={"deliveries": orphans, "event_ids": sorted({row[1] for row in rows if row[1] not in bodies})},
    )
    return [row for row in rows if row[1] in bodies]


def _settle(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in items:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


class _Reader:
    """Lookups that write nothing (a reply's thread and the opt-out ledger, a Slack thread's ts,
    a tracking id, when a delivery loop's next delivery is due), on a connection and a thread of
    their own: in WAL mode a reader sees every
    committed transaction and never waits for the writer, so a lookup does not queue behind the
    next group commit's fsync as an op of the writer's would (twice: the batch in flight, then
    its own). It sees what was committed before it was asked; every write a caller awaited was."""

    def __init__(self, path: str, name: str = "sqlite-reader") -> None:
        self.path = path
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:  # in the reader's thread, once the writer made and migrated the file
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA query_only = 1")
            self._conn = conn
        return self._conn

    async def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            return op(self._connection())

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, call)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite: {exc}") from exc

    def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._pool.submit(shut)
        self._pool.shutdown(wait=True)


class SQLiteStore(Store):
    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: _Writer | None = None
        self._reader: _Reader | None = None
        # the admin API's and the console's listings, on a reader of their own: a page of a big
        # store (1-30 ms) neither holds postbacks back behind the writer nor a reply's lookups
        self._lister: _Reader | None = None
        # a reply's point lookups (its thread, the opt-out ledger) on the event loop itself: see _quick
        self._quick_conn: sqlite3.Connection | None = None
        self._closing = False

    async def open(self) -> None:
        writer = _Writer(self.path)
        writer.start()
        await asyncio.to_thread(writer.ready.wait)
        if writer.startup_error is not None:
            exc = writer.startup_error
            if isinstance(exc, ConfigError):  # a store of a later release: waiting cannot help
                raise exc
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._writer = writer
        self._reader = _Reader(self.path)
        self._lister = _Reader(self.path, "sqlite-lister")

    async def close(self) -> None:
        self._closing = True  # no new connection of the loop's own (`_quick`) while this waits
        for reader in (self._reader, self._lister):
            if reader is not None:
                await asyncio.to_thread(reader.close)
        self._reader = self._lister = None
        if self._quick_conn is not None:
            self._quick_conn.close()
            self._quick_conn = None
        if self._writer is not None:
            self._writer.queue.put(_STOP)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        self._closing = False  # closed: `_writer` says so from here on

    def _run(self, op: Callable[[sqlite3.Connection], T] | _Ingest, *, isolated: bool = True) -> asyncio.Future[T]:
        """Queue `op` for the next commit. `isolated=False` is for ops whose only possible failure
        is the database's own (which fails the whole batch anyway): they skip the savepoint."""
        if self._writer is None:
            raise StoreError("store is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writer.queue.put((op, future, isolated))
        return future

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run a lookup that writes nothing on the reader (see _Reader)."""
        if self._reader is None:
            raise StoreError("store is not open")
        return await self._reader.run(op)

    async def _quick(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run a point lookup (a few rows by a primary key or an index) on a read-only connection
        of the event loop's own. It costs tens of microseconds; a trip to the reader thread and
        back costs several times that in thread wake-ups, and a reply makes two of them (its
        thread and the ledger, then the ledger again right before its SMS). In WAL mode a reader
        takes no lock the writer holds, so it never waits for a commit; should SQLite still say
        busy (a WAL being recovered), the lookup goes to the reader thread, which may wait."""
        if self._writer is None or self._closing:
            raise StoreError("store is not open")
        try:
            if self._quick_conn is None:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout = 0")  # never wait on the loop
                conn.execute("PRAGMA query_only = 1")
                self._quick_conn = conn
            return op(self._quick_conn)
        except sqlite3.OperationalError:
            return await self._read(op)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite: {exc}") from exc

    async def _list(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run a listing (admin API, console, /metrics' counts) on the lister (see _Reader)."""
        if self._lister is None:
            raise StoreError("store is not open")
        return await self._lister.run(op)

    async def ping(self) -> None:
        now = str(time.time())
        await self._run(lambda conn: conn.execute(Q["heartbeat"], (now,)))

    async def ingest(self, event: Event, dedup_key: str, deliveries: list[NewDelivery]) -> Ingested:
        item = _Ingest(event["id"], dedup_key, event["type"], time.time(), dumps(event), deliveries)
        result: Ingested = await self._run(item, isolated=False)  # answered by _ingest_all
        return result

    async def claim(self, destination: str, *, limit: int, lease: float, ordered: bool, owner: str) -> list[Claim]:
        then = ClaimFor(destination, limit, lease, ordered, owner)
        now = time.time()
        return await self._run(lambda conn: _claimed(conn, then, now))

    async def ingest_and_claim(
        self, event: Event, dedup_key: str, deliveries: list[NewDelivery], then: ClaimFor
    ) -> tuple[Ingested, list[Claim]]:
        # one op of the writer's next commit: the event as `ingest` stores it, then the claim
        item = _Ingest(event["id"], dedup_key, event["type"], time.time(), dumps(event), deliveries)

        def op(conn: sqlite3.Connection) -> tuple[Ingested, list[Claim]]:
            ((_, result, _),) = _ingest_all(conn, [(item, None)])
            return result, _claimed(conn, then, time.time())

        return await self._run(op)

    def _complete_op(self, results: list[AttemptResult]) -> Callable[[sqlite3.Connection], list[AttemptResult]]:
        now = time.time()
        attempts: list[tuple[Any, ...]] = []
        finishes: list[tuple[AttemptResult, tuple[Any, ...]]] = []
        deaths: list[tuple[AttemptResult, tuple[Any, ...]]] = []
        for r in results:
            status, next_at, error = verdict(r.decision, now)
            attempts.append((r.claim.id, r.claim.attempt, r.started_at, r.outcome, r.status, r.reason, r.duration))
            finish = (status, next_at, error, now, r.claim.id, r.claim.attempt, r.tracking_id)
            (deaths if status == "dead" else finishes).append((r, finish))
        # one at a time, to see which applied: deaths, and verdicts with follow-ups, are few
        alone = [item for item in finishes if item[0].follow_ups]
        together = [finish for r, finish in finishes if not r.follow_ups]

        def follow(conn: sqlite3.Connection, r: AttemptResult) -> None:
            eid = r.claim.event_id
            rows = [(eid, d.destination, d.route, d.conversation, d.ordered, now, now, now) for d in r.follow_ups]
            conn.executemany(Q["insert_delivery"], rows)

        def op(conn: sqlite3.Connection) -> list[AttemptResult]:
            conn.executemany(Q["record_attempt"], attempts)
            conn.executemany(Q["finish"], together)
            for r, finish in alone:
                if conn.execute(Q["finish"], finish).rowcount:
                    follow(conn, r)
            died = [r for r, finish in deaths if conn.execute(Q["finish"], finish).rowcount]
            for r in died:
                follow(conn, r)
            return died

        return op

    async def complete(self, results: list[AttemptResult]) -> list[AttemptResult]:
        return await self._run(self._complete_op(results))

    async def complete_and_claim(
        self, results: list[AttemptResult], then: ClaimFor
    ) -> tuple[list[AttemptResult], list[Claim]]:
        complete = self._complete_op(results)

        def op(conn: sqlite3.Connection) -> tuple[list[AttemptResult], list[Claim]]:
            died = complete(conn)
            return died, _claimed(conn, then, time.time())

        return await self._run(op)

    async def release(self, claims: list[Claim], *, owner: str) -> None:
        now = time.time()
        rows = [{"now": now, "id": c.id, "attempt": c.attempt, "owner": owner} for c in claims]

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(Q["release"], rows)

        await self._run(op)

    async def next_due(self, destination: str) -> float | None:
        # a delivery loop asks after each claim that found fewer than it wanted: on the reader
        return await self._read(lambda conn: conn.execute(Q["next_due"], (destination,)).fetchone()[0])

    async def get_conversation(self, destination: str, key: str) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(Q["get_conversation"], (destination, key)).fetchone()
            return row[0] if row else None

        return await self._read(op)

    async def put_conversation(self, destination: str, key: str, value: str) -> None:
        await self._run(lambda conn: conn.execute(Q["put_conversation"], (destination, key, value)))

    async def conversation_of(self, destination: str, value: str) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(Q["conversation_of"], (destination, value)).fetchone()
            return row[0] if row else None

        return await self._read(op)

    async def record_optout(self, row: OptOutRow) -> None:
        values = (row.texter, row.short_code, int(row.opted_out), row.word, row.at, row.event_id)
        await self._run(lambda conn: conn.execute(Q["record_optout"], values))

    async def opted_out(self, texter: str, short_code: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(Q["opted_out"], (texter, short_code)).fetchone()
            return bool(row and row[0])

        return await self._quick(op)

    async def thread_and_ledger(
        self, destination: str, key: str, value: str, which: Callable[[str | None, str | None], tuple[str, str] | None]
    ) -> tuple[tuple[str, str] | None, bool]:
        def op(conn: sqlite3.Connection) -> tuple[tuple[str, str] | None, bool]:
            row = conn.execute(Q["get_conversation"], (destination, key)).fetchone()
            other = None
            if row is None:
                found = conn.execute(Q["conversation_of"], (destination, value)).fetchone()
                other = found[0] if found else None
            texter = which(row[0] if row else None, other)
            if texter is None:
                return None, False
            stopped = conn.execute(Q["opted_out"], texter).fetchone()
            return texter, bool(stopped and stopped[0])

        return await self._quick(op)

    async def list_optouts(self, number: str | None = None, *, limit: int = 1000) -> list[OptOutRow]:
        where, params = ("", []) if number is None else (" WHERE texter = ? OR short_code = ?", [number, number])
        query = f"SELECT {OPTOUT_COLUMNS} FROM optouts{where} ORDER BY at DESC, texter, short_code LIMIT ?"

        def op(conn: sqlite3.Connection) -> list[OptOutRow]:
            return [optout_row(row) for row in conn.execute(query, [*params, limit]).fetchall()]

        return await self._list(op)

    async def delivery_by_tracking_id(self, tracking_id: str) -> DeliveryRow | None:
        def op(conn: sqlite3.Connection) -> DeliveryRow | None:
            row = conn.execute(Q["delivery_by_tracking_id"], (tracking_id,)).fetchone()
            return delivery_row(row) if row else None

        return await self._quick(op)  # asked for each delivery report (bridge.ingest): by an index

    @staticmethod
    def _where(where: DeliveryFilter) -> tuple[str, list[Any]]:
        params: list[Any] = []

        def bind(value: Any) -> str:
            params.append(value)
            return "?"

        def among(column: str, values: Sequence[Any], sql_type: str) -> str:
            params.extend(values)
            return f"{column} IN ({_marks(values)})"

        clauses = delivery_clauses(where, bind, among)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    async def list_deliveries(self, where: DeliveryFilter) -> list[DeliveryRow]:
        sql, params = self._where(where)
        query = f"SELECT {DELIVERY_COLUMNS} FROM deliveries{sql} ORDER BY id DESC LIMIT ?"

        def op(conn: sqlite3.Connection) -> list[DeliveryRow]:
            rows = conn.execute(query, [*params, where.limit]).fetchall()
            return [delivery_row(row) for row in rows]

        return await self._list(op)

    async def update_event(self, event_id: str, body: str | None, *, release_except: str | None = None) -> list[str]:
        now = time.time()

        def op(conn: sqlite3.Connection) -> list[str]:
            if body is not None:
                conn.execute(Q["update_event"], (body, event_id))
            if release_except is None:
                return []
            rows = conn.execute(Q["release_waiting"], (now, event_id, release_except, now)).fetchall()
            return sorted({row[0] for row in rows})

        return await self._run(op)

    async def keep_meta(self, key: str, value: str) -> str:
        def op(conn: sqlite3.Connection) -> str:
            conn.execute(Q["keep_meta"], (key, value))
            return str(conn.execute(Q["get_meta"], (key,)).fetchone()[0])

        return await self._run(op)

    async def get_event(self, event_id: str) -> Event | None:
        def op(conn: sqlite3.Connection) -> Event | None:
            row = conn.execute(Q["get_event"], (event_id,)).fetchone()
            return json.loads(row[0]) if row else None

        return await self._read(op)

    async def attempts(self, delivery_id: int) -> list[AttemptRow]:
        return await self._list(
            lambda conn: [AttemptRow(*row) for row in conn.execute(Q["attempts"], (delivery_id,)).fetchall()]
        )

    async def replay(self, where: DeliveryFilter, *, force: bool = False) -> list[int]:
        sql, params = self._where(where)
        statuses = ("dead", "delivered") if force else ("dead",)
        now = time.time()

        def op(conn: sqlite3.Connection) -> list[int]:
            ids = [
                row[0]
                for row in conn.execute(
                    f"SELECT id FROM deliveries{sql}{' AND' if sql else ' WHERE'}"
                    f" (status IN ({_marks(statuses)}) OR {FAILED_SQL}) ORDER BY id LIMIT ?",
                    [*params, *statuses, where.limit],
                ).fetchall()
            ]
            # a new attempt series: due now, and max_age counts from the replay (when it came in
            # is kept: a later listing or replay by time range still finds it)
            conn.executemany(
                f"UPDATE deliveries SET status = 'pending', next_at = ?, {REPLAY_SET_SQL} = ?, updated_at = ?,"
                " leased_by = NULL, last_error = NULL WHERE id = ?",
                [(now, now, now, i) for i in ids],
            )
            return ids

        return await self._run(op)

    async def abandon_unknown(
        self,
        keep: Collection[str],
        reason: str,
        *,
        follow_up: ExpiryFollowUp | None = None,
        leave_leased: bool = False,
    ) -> dict[str, int]:
        now, names = time.time(), sorted(keep)
        if follow_up is not None and follow_up.destination not in names:
            follow_up = None  # it would be abandoned itself
        leased = " AND NOT (leased_by IS NOT NULL AND next_at > ?)" if leave_leased else ""

        def op(conn: sqlite3.Connection) -> dict[str, int]:
            query = (
                "UPDATE deliveries SET status = 'dead', leased_by = NULL, last_error = ?, updated_at = ?"
                f" WHERE status = 'pending' AND destination NOT IN ({_marks(names)}){leased}"
                " RETURNING destination, event_id, route, conversation"
            )
            rows = conn.execute(query, [reason, now, *names, *([now] if leave_leased else [])]).fetchall()
            if follow_up is not None:
                ups = [
                    (eid, follow_up.destination, follow_up.then_route, conversation, False, now, now, now)
                    for _, eid, route, conversation in rows
                    if route == follow_up.route
                ]
                conn.executemany(Q["insert_delivery"], ups)
            return dict(collections.Counter(row[0] for row in rows))

        return await self._run(op)

    async def expire(
        self, destination: str, *, max_age: float, grace: float = 0.0, follow_up: ExpiryFollowUp | None = None
    ) -> int:
        now = time.time()
        params = {
            "destination": destination,
            "now": now,
            "settled": now - grace,
            "cutoff": now - max_age,
            "reason": f"max_age {max_age:g}s passed after ",
        }

        def op(conn: sqlite3.Connection) -> int:
            rows = conn.execute(Q["expire"], params).fetchall()
            if follow_up is not None:
                ups = [
                    (eid, follow_up.destination, follow_up.then_route, conversation, False, now, now, now)
                    for eid, route, conversation in rows
                    if route == follow_up.route
                ]
                conn.executemany(Q["insert_delivery"], ups)
            return len(rows)

        return await self._run(op)

    async def order_pending(self, destinations: Collection[str]) -> int:
        names = sorted(destinations)
        if not names:
            return 0

        def op(conn: sqlite3.Connection) -> int:
            query = (
                "UPDATE deliveries SET ordered = 1"
                f" WHERE status = 'pending' AND ordered = 0 AND destination IN ({_marks(names)})"
            )
            return conn.execute(query, names).rowcount

        return await self._run(op)

    async def list_events(self, where: EventFilter) -> list[Event]:
        cursor = parse_event_cursor(where.before) if where.before is not None else None

        def op(conn: sqlite3.Connection) -> list[Event]:
            anchor = None
            if cursor is not None:  # the event's own received_at, unless it is gone (purged)
                row = conn.execute("SELECT received_at FROM events WHERE id = ?", (cursor[1],)).fetchone()
                anchor = (row[0] if row else cursor[0], cursor[1])
            search = event_search(_SQL, where, anchor)
            try:
                query = next(search)
                while True:
                    query = search.send(conn.execute(query.sql, query.values).fetchall())
            except StopIteration as done:
                events: list[Event] = done.value
                return events

        return await self._list(op)

    async def index_text(self) -> None:
        """Put the events waiting for the text index in it now (the writer does so by itself
        every TEXT_INDEX_BATCH postbacks, and when quiet)."""
        writer = self._writer
        if writer is None:
            raise StoreError("store is not open")
        await self._run(writer.index_text)

    async def postbacks_per_minute(self, since: float) -> list[tuple[float, int]]:
        def op(conn: sqlite3.Connection) -> list[tuple[float, int]]:
            return [(float(m), n) for m, n in conn.execute(Q["postbacks_per_minute"], (since,)).fetchall()]

        return await self._list(op)

    async def recent_errors(self, limit: int) -> list[DeliveryRow]:
        def op(conn: sqlite3.Connection) -> list[DeliveryRow]:
            return [delivery_row(row) for row in conn.execute(Q["recent_errors"], (limit,)).fetchall()]

        return await self._list(op)

    async def event_deliveries(self, event_id: str) -> list[DeliveryRow]:
        def op(conn: sqlite3.Connection) -> list[DeliveryRow]:
            rows = conn.execute(Q["deliveries_of_event"], (event_id,)).fetchall()
            return [delivery_row(row) for row in rows]

        return await self._list(op)

    async def stats(self) -> dict[str, DestinationStats]:
        def op(conn: sqlite3.Connection) -> dict[str, DestinationStats]:
            out: dict[str, DestinationStats] = {}
            for destination, status, count, oldest in conn.execute(Q["stats"]).fetchall():
                current = out.get(destination, DestinationStats())
                if status == "pending":
                    current = replace(current, pending=count, oldest_pending=oldest)
                else:
                    current = replace(current, dead=count)
                out[destination] = current
            return out

        return await self._list(op)

    async def purge(self, *, delivered_before: float, dead_before: float, batch: int = 500) -> int:
        params = {"delivered_before": delivered_before, "dead_before": dead_before, "batch": batch}

        def op(conn: sqlite3.Connection) -> int:
            rows = conn.execute(Q["purge_deliveries"], params).fetchall()
            conn.executemany(Q["purge_attempts"], [(row[0],) for row in rows])
            dropped = [row[0] for row in conn.execute(Q["purge_dropped"], params).fetchall()]
            events = {row[1] for row in rows} | set(dropped)
            conn.executemany(Q["purge_event"], [(e, e) for e in events])
            if events:
                conn.execute("PRAGMA incremental_vacuum(256)")
            return len(rows) + len(dropped)

        return await self._run(op)
