"""PostgreSQL store: several bridge instances on one database.

Same semantics as the SQLite store, with the database doing the coordination instead of one
writer thread: each operation is one transaction on a pooled connection, claims skip rows
another instance is claiming (`FOR UPDATE SKIP LOCKED`), and a claimed delivery stays
'pending' with a lease (`next_at` in the future, `leased_by` its owner) until its verdict is
recorded. All SQL is in postgres.sql. Errors of the driver or the network become StoreError
here, at the boundary, so callers answer 503 and retry.

Group commit, as the SQLite store's writer does it: postbacks that arrive while a commit is in
flight queue up and go in the next one, all of them in one statement (`ingest_batch`), and each
caller hears back only once that commit is done. A batch that fails is tried again one postback
at a time, so one bad row (or a connection cut mid-commit) cannot fail its neighbours; a postback
whose event is found stored under its own id then (the commit had gone through before the
connection died) is accepted, not a duplicate.

Wake-up across instances: once a batch has committed (and its postbacks are answered), its
destinations are NOTIFYed on a channel of this database and schema, in a statement of its own
(see `notify` in postgres.sql for why not in the batch's), unless no other instance listens; every
instance LISTENs on a connection of its own and wakes its delivery loops for them at once. When
that connection is lost it is made again with backoff, and the loops' 1 s poll covers what was
missed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from bridge.errors import ConfigError, StoreError
from bridge.event import Event
from bridge.jsonout import dumps
from bridge.secret import redact_url
from bridge.store import (
    DELIVERY_COLUMNS,
    EVENT_COLUMNS,
    FAILED_SQL,
    OPTOUT_COLUMNS,
    REPLAY_SET_SQL,
    AttemptResult,
    AttemptRow,
    Claim,
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
Q = load_queries("postgres.sql")
# pg_stat_activity shows the first 1,023 bytes of a statement (track_activity_query_size): the
# listeners check goes without its comments
LISTENERS = "\n".join(line for line in Q["listeners"].splitlines() if not line.startswith("--"))
POOL_SIZE = 10
# Delivery bookkeeping (claims, verdicts, when the next is due) has a pool of its own whose
# commits do not wait for their WAL to reach the disk (synchronous_commit off): postbacks are
# answered only after an fsync'd commit, but a lease or a verdict lost with the last few hundred
# milliseconds of a PostgreSQL crash only means a delivery is sent again (at least once, as
# CONTRACT §6 says), never that an event is lost. That includes deaths and the follow-ups a verdict
# adds (a reply's feedback), lost with their verdict: the delivery is attempted again, and a death
# may then be counted (and a reply's ❌ shown) twice. It takes a flush off every claim and record,
# which would otherwise queue behind (and hold back) the postbacks' own.
BOOKKEEPING_POOL_SIZE = 4
# Group commit: how many batches of postbacks may be committing at once (each on a connection of
# its own), and how many postbacks go in one. While the batches in flight commit, new postbacks
# queue for the next one.
BATCHES_IN_FLIGHT = 1
MAX_BATCH = 512
# The LISTEN connection: checked this often (a connection cut without a word is noticed), made
# again after LISTEN_RETRY_FIRST seconds when lost, then twice as long each time up to the max.
LISTEN_CHECK = 5.0
LISTEN_RETRY_FIRST, LISTEN_RETRY_MAX = 0.1, 5.0
# The text index's pending list (migration 0004) is merged this often while postbacks come, off
# their path: left to itself, the insert that finds it full merges it, and its postbacks wait.
TEXT_INDEX_MERGE_EVERY = 1.0  # seconds
CONNECT_TIMEOUT = 10.0  # seconds; also how long an operation waits for a free connection
# A migration is not an operation: on a big store it rewrites tables and builds indexes for
# minutes (0004 on a million events: 47 s), and cut off by COMMAND_TIMEOUT it would be rolled
# back and tried again at every start, for ever. Waiting for locks has its own limit
# (SCHEMA_LOCK_PATIENCE); this only stops one that hangs.
MIGRATION_TIMEOUT = 6 * 3600.0
COMMAND_TIMEOUT = 15.0  # a database that hangs is an error (503), not a request that never ends
SCHEMA_LOCK_PATIENCE = 2  # seconds opening the store waits for a lock on a table

# What the driver and the network raise; anything else is a bug and is not dressed up.
DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# What opening the store raises when the URL or the database needs a person, not a wait: a role
# or password that is refused, no such database, a setting PostgreSQL does not know (libpq's
# `?connect_timeout=`), no right to make the tables. (Not FileNotFoundError: a Unix socket that
# is not there yet, before PostgreSQL has started, raises it too. Certificate files are looked
# for beforehand instead: `_missing_files`.)
NEEDS_A_PERSON = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.UndefinedObjectError,
    asyncpg.InvalidParameterValueError,
    asyncpg.InsufficientPrivilegeError,
)
FILE_PARAMETERS = ("sslrootcert", "sslcert", "sslkey", "sslcrl")


def _updated(status: str) -> int:
    """How many rows an UPDATE changed, from asyncpg's command tag ("UPDATE n")."""
    return int(status.rsplit(" ", 1)[-1])


def _key(destination: str, conversation: str) -> int:
    """A signed 64-bit advisory lock key for (destination, conversation), stable across processes
    (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{destination}\0{conversation}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _Params:
    """`$1, $2, ...` placeholders for a query built from optional filters; values are bound."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _delivery_where(where: DeliveryFilter, p: _Params) -> list[str]:
    return delivery_clauses(
        where, p.add, lambda column, values, sql_type: f"{column} = ANY({p.add(list(values))}::{sql_type}[])"
    )


class _EventSQL(EventSQL):
    def placeholder(self, n: int) -> str:
        return f"${n}"

    def field(self, name: str) -> str:
        return EVENT_COLUMNS[name]  # the columns of migration 0004, which its indexes are on

    def unindexed(self, sql: str) -> str:
        return f"({sql} || '')"

    def contains(self, needle: str, bind: Callable[[Any], str]) -> str:
        """ILIKE: what the trigram index of migrations 0003 and 0004 (events_text, when pg_trgm could be
        had) answers, so it is also `text_index`."""
        pattern = "%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        return f"{self.field('text')} ILIKE {bind(pattern)}"


_SQL = _EventSQL()


def _sql_where(clauses: list[str]) -> str:
    return (" WHERE " + " AND ".join(clauses)) if clauses else ""


def _complete_args(batch: list[tuple[AttemptResult, tuple[str, float, str | None]]], now: float) -> tuple[Any, ...]:
    """The arguments of `complete` in postgres.sql: one array per column."""
    ups = [(r.claim.id, d) for r, _ in batch for d in r.follow_ups]
    return (
        [r.claim.id for r, _ in batch],
        [r.claim.attempt for r, _ in batch],
        [r.started_at for r, _ in batch],
        [r.outcome for r, _ in batch],
        [r.status for r, _ in batch],
        [r.reason for r, _ in batch],
        [r.duration for r, _ in batch],
        [status for _, (status, _, _) in batch],
        [next_at for _, (_, next_at, _) in batch],
        [error for _, (_, _, error) in batch],
        now,
        [r.tracking_id for r, _ in batch],  # the tracking id a send was given (Skycore's), if any
        [of for of, _ in ups],
        [d.destination for _, d in ups],
        [d.route for _, d in ups],
        [d.conversation for _, d in ups],
        [d.ordered for _, d in ups],
    )


def _settings(url: str) -> dict[str, str]:
    """Name our sessions in pg_stat_activity, unless the URL does (`?application_name=...`;
    other query parameters such as `search_path` are server settings too)."""
    query = parse_qs(urlsplit(url).query)
    return {} if "application_name" in query else {"application_name": "postback-bridge"}


def _missing_files(url: str) -> list[str]:
    """`sslrootcert=/path` and the like in the URL whose file is not there."""
    query = parse_qs(urlsplit(url).query)
    return [f"{name}={path}" for name in FILE_PARAMETERS for path in query.get(name, []) if not os.path.exists(path)]


async def _schema_version(conn: asyncpg.Connection) -> int:
    if not await conn.fetchval(Q["has_meta"]):
        return 0
    return schema.version_of(await conn.fetchval(Q["get_meta"], schema.VERSION_KEY))


async def _migrate(conn: asyncpg.Connection, where: str) -> None:
    """The migrations the store lacks and its new version, in one transaction, under an advisory
    lock (two instances starting at once would race), the version read again under it."""
    async with conn.transaction():
        # A change to the schema (a column a new version adds) waits for the running instances'
        # reads and holds their postbacks back while it waits: not for long. Timed out, it is
        # tried again later (a StoreError), as an unreachable database is.
        await conn.execute(f"SET LOCAL lock_timeout = '{SCHEMA_LOCK_PATIENCE}s'")
        await conn.execute(Q["schema_lock"])
        todo = schema.pending("postgres", await _schema_version(conn), where)
        for migration in todo:
            log.info(
                "migrating the store; postbacks wait until it is done",
                extra={"migration": f"{migration.version:04d}_{migration.name}", "store": where},
            )
            await conn.execute(migration.sql, timeout=MIGRATION_TIMEOUT)
        if todo:
            await conn.execute(Q["set_meta"], schema.VERSION_KEY, str(todo[-1].version))


async def _no_reset(conn: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is: the store sets nothing on a session (SET
    LOCAL and advisory xact locks end with their transaction; pool connections never LISTEN),
    so asyncpg's reset query would be a round trip per operation for nothing."""


def _channel(where: str) -> str:
    """The NOTIFY channel of one store (database and schema): instances of other stores on the
    same server do not wake each other. Short: a channel name is at most 63 bytes."""
    return "postback_bridge_" + hashlib.blake2b(where.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class _Postback(PendingEvent):
    """One postback waiting for its group commit, with the future its request awaits."""

    future: asyncio.Future[Ingested] = dataclasses.field(repr=False, compare=False, kw_only=True)


Listener = Callable[[Sequence[str] | None], None]


def _answer(item: _Postback, result: Ingested | BaseException) -> None:
    if item.future.done():  # its caller gave up (patience ran out) or the store closed
        return
    if isinstance(result, BaseException):
        item.future.set_exception(result)
    else:
        item.future.set_result(result)


class PostgresStore(Store):
    retry_open = True

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None
        self._bookkeeping: asyncpg.Pool | None = None  # see BOOKKEEPING_POOL_SIZE
        self._opening: asyncpg.Pool | None = None  # connected, its schema being set up by `open`
        self._queue: list[_Postback] = []
        self._batches: set[asyncio.Task[None]] = set()
        # per conversation lock key, the turn of the last batch that takes it (see _store)
        self._lock_turns: dict[int, asyncio.Future[None]] = {}
        self.batches_failed = 0  # batches tried again one postback at a time (tests, logs)
        self._channel = ""
        self._listeners: list[Listener] = []
        self._listening: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # set while LISTEN is in place (tests wait for it)
        self.listen_pid: int | None = None  # its server process
        self.others_listen = True  # another instance may LISTEN on our channel (see _look_for_listeners)
        self._unannounced: set[str] = set()  # destinations to NOTIFY (see _announce)
        self._announcing: asyncio.Task[None] | None = None
        self._lost_claims: list[tuple[str, float, str]] = []  # destination, lease end, owner: see claim
        self._text_index = False  # the store has it (migration 0004): see _merge_text_index
        self._text_unmerged = False  # events stored since the last merge
        self._merging: asyncio.Task[None] | None = None
        self._last_lease_end = 0.0

    async def open(self) -> None:
        """Raises ConfigError when trying again cannot help (see NEEDS_A_PERSON), StoreError
        when it may (the server is not up yet, or not reachable)."""
        missing = await asyncio.to_thread(_missing_files, self.url)
        if missing:
            raise ConfigError([f"store: {redact_url(self.url)}: no such file: {', '.join(missing)}"])
        try:
            pool = await self._new_pool(POOL_SIZE)
        except (ValueError, OverflowError) as exc:  # a malformed URL (port 99999): trying again won't help
            raise ConfigError([f"store: {redact_url(self.url)}: {exc}"]) from exc
        except DRIVER_ERRORS as exc:
            raise self._cannot_open(exc) from exc
        self._opening = pool
        where = redact_url(self.url)
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                # A store that is up to date is only read here: no lock that running instances'
                # postbacks would queue behind.
                if schema.pending("postgres", await _schema_version(conn), where):
                    await _migrate(conn, where)
                self._channel = _channel(await conn.fetchval(Q["current_schema"]))
                self._text_index = bool(await conn.fetchval(Q["has_text_index"]))
                async with conn.transaction():
                    # Leases of a process on this host that is gone (kill -9) are due again at
                    # once. Only those: a lease of another instance, here or on another host, is
                    # live or runs out by itself; taking it away would send its delivery twice.
                    now = time.time()
                    for (owner,) in await conn.fetch(Q["lease_owners"]):
                        if owner_gone(owner):
                            await conn.execute(Q["recover_leases"], owner, now)
            bookkeeping = await self._new_pool(BOOKKEEPING_POOL_SIZE, synchronous_commit="off")
        except DRIVER_ERRORS as exc:
            pool.terminate()
            raise self._cannot_open(exc) from exc
        except BaseException:  # cancelled (shutdown)
            pool.terminate()
            raise
        finally:
            self._opening = None
        self._pool, self._bookkeeping = pool, bookkeeping

    async def _new_pool(self, size: int, **settings: str) -> asyncpg.Pool:
        """A pool of up to `size` connections to the store, with these server settings beside ours."""
        return await asyncpg.create_pool(
            self.url,
            min_size=1,
            max_size=size,
            timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
            server_settings={**_settings(self.url), **settings},
            reset=_no_reset,
        )

    def _cannot_open(self, exc: BaseException) -> ConfigError | StoreError:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__  # a timeout says nothing
        message = f"cannot open PostgreSQL store {redact_url(self.url)}: {detail}"
        return ConfigError([f"store: {message}"]) if isinstance(exc, NEEDS_A_PERSON) else StoreError(message)

    async def close(self) -> None:
        if self._merging is not None:  # tidying only: the next instance, or autovacuum, merges
            self._merging.cancel()
            await asyncio.gather(self._merging, return_exceptions=True)
            self._merging = None
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)
            self._listening = None
        # postbacks still queued are not stored: their callers answer 503 (Skycore retries);
        # batches being committed are waited for (their callers hear how they went)
        queued, self._queue = self._queue, []
        for item in queued:
            if not item.future.done():
                item.future.set_exception(StoreError("store is closing"))
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        if self._announcing is not None:  # a wake-up only: the others' poll covers it
            self._announcing.cancel()
            await asyncio.gather(self._announcing, return_exceptions=True)
        if self._opening is not None:
            # an `open` still waiting on a database that stopped answering mid-way: asyncpg does
            # not give up on being cancelled, but does once its connections are gone
            self._opening.terminate()
        for pool in (self._pool, self._bookkeeping):
            if pool is not None:
                try:
                    await pool.close()
                except DRIVER_ERRORS:
                    pool.terminate()
        self._pool = self._bookkeeping = None

    @asynccontextmanager
    async def _connection(self, pool: asyncpg.Pool | None) -> AsyncIterator[asyncpg.Connection]:
        """A connection of `pool` for one statement, which is a transaction (and a snapshot) of
        its own: no BEGIN and COMMIT round trips, a third of a transaction's for a point lookup
        (a reply makes several); driver errors leave as StoreError."""
        if pool is None:
            raise StoreError("store is not open")
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                yield conn
        except DRIVER_ERRORS as exc:
            raise StoreError(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection in a transaction; driver errors leave as StoreError."""
        async with self._connection(self._pool) as conn, conn.transaction():
            yield conn

    def _read(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        """A connection for one read (see _connection)."""
        return self._connection(self._pool)

    def _bookkeeping_conn(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        """A connection of the bookkeeping pool (see BOOKKEEPING_POOL_SIZE) for one statement."""
        return self._connection(self._bookkeeping)

    @asynccontextmanager
    async def _bookkeeping_tx(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the bookkeeping pool in a transaction (verdicts that take several
        statements: a batch with a delivery's result in it twice); driver errors leave as
        StoreError."""
        async with self._bookkeeping_conn() as conn, conn.transaction():
            yield conn

    async def ping(self) -> None:
        async with self._tx() as conn:
            await conn.execute(Q["heartbeat"], str(time.time()))

    async def ingest(self, event: Event, dedup_key: str, deliveries: list[NewDelivery]) -> Ingested:
        """Queued for the next group commit; returns once it committed (see the module's doc)."""
        if self._pool is None:
            raise StoreError("store is not open")
        future: asyncio.Future[Ingested] = asyncio.get_running_loop().create_future()
        item = _Postback.of(event, dedup_key, time.time(), dumps(event), deliveries, future=future)
        self._queue.append(item)
        self._start_batches()
        return await future

    def _start_batches(self) -> None:
        while self._queue and len(self._batches) < BATCHES_IN_FLIGHT:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            task = asyncio.create_task(self._commit(batch), name="group-commit")
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._start_batches()

    async def _commit(self, batch: list[_Postback]) -> None:
        """Store `batch` in one transaction and answer each of its postbacks; if that fails,
        each one alone."""
        try:
            results = await self._store(batch)
        except StoreError as exc:
            if len(batch) == 1:
                _answer(batch[0], exc)
                return
            self.batches_failed += 1
            log.warning(
                "group commit failed; its postbacks are stored one by one",
                extra={"count": len(batch), "error": str(exc)},
            )
            await asyncio.gather(*(self._commit([item]) for item in batch))
            return
        except BaseException as exc:  # a bug, or cancelled: never leave a caller waiting
            for item in batch:
                _answer(item, StoreError(f"store failed: {type(exc).__name__}: {exc}"))
            raise
        for item, result in zip(batch, results, strict=True):
            _answer(item, result)
        if self._text_index and any(isinstance(r, Ingested) and r.status == "accepted" for r in results):
            self._text_unmerged = True
            if self._merging is None or self._merging.done():
                self._merging = asyncio.create_task(self._merge_text_index(), name="merge-text-index")
        self._announce(
            d.destination
            for item, result in zip(batch, results, strict=True)
            if isinstance(result, Ingested) and result.status == "accepted"
            for d in item.deliveries
        )

    async def _merge_text_index(self) -> None:
        """Merge the text index's pending list every TEXT_INDEX_MERGE_EVERY seconds while events
        come (one task; it ends after a quiet period and the next stored event starts it again).
        Off the postbacks' path: the merge runs on a bookkeeping connection, and the inserts go
        on meanwhile (they add to the list; only merges wait for each other)."""
        while self._text_unmerged:
            await asyncio.sleep(TEXT_INDEX_MERGE_EVERY)
            self._text_unmerged = False
            try:
                async with self._bookkeeping_conn() as conn:
                    await conn.fetchval(Q["merge_text_index"])
            except StoreError as exc:
                if isinstance(exc.__cause__, asyncpg.InsufficientPrivilegeError):
                    # only the index's owner may (the role that ran the migration): inserts merge
                    # it themselves, as PostgreSQL does by default, and autovacuum does
                    log.warning(
                        "cannot merge the text index's pending list (not its owner); postbacks will",
                        extra={"error": str(exc)},
                    )
                    self._text_index = False
                    return
                log.info("could not merge the text index's pending list", extra={"error": str(exc)})

    def _announce(self, destinations: Iterable[str]) -> None:
        """Wake the other instances for these destinations: names gathered while a NOTIFY is in
        flight go in the next one (at most one at a time, as the group commit). Not when no
        other instance listens (see _look_for_listeners): our own loops were woken already."""
        if not self.others_listen:
            return
        self._unannounced.update(destinations)
        if self._unannounced and (self._announcing is None or self._announcing.done()):
            self._announcing = asyncio.create_task(self._notify(), name="notify")

    async def _notify(self) -> None:
        while self._unannounced:
            names, self._unannounced = ",".join(sorted(self._unannounced)), set()
            try:
                async with self._bookkeeping_conn() as conn:
                    # a payload is at most 8000 bytes: '*' (every destination) when the names would not fit
                    await conn.execute(Q["notify"], self._channel, "*" if len(names) > 7000 else names)
            except StoreError as exc:  # the others' 1 s poll finds these deliveries
                log.info("could not wake the other instances", extra={"error": str(exc)})

    async def _store(self, batch: list[_Postback]) -> list[Ingested | StoreError]:
        ordered = sorted({_key(d.destination, d.conversation) for i in batch for d in i.deliveries if d.ordered})
        rows = [(i.event_id, d, i.received_at) for i in batch for d in i.deliveries]
        dropped = [i for i in batch if not i.deliveries]
        args = (
            [i.event_id for i in batch],
            [i.dedup_key for i in batch],
            [i.type for i in batch],
            [i.received_at for i in batch],
            [i.body for i in batch],
            [i.sender for i in batch],
            [i.recipient for i in batch],
            [i.keyword for i in batch],
            [i.text for i in batch],
            [r[0] for r in rows],
            [r[1].destination for r in rows],
            [r[1].route for r in rows],
            [r[1].conversation for r in rows],
            [r[1].ordered for r in rows],
            [r[2] for r in rows],
            [i.event_id for i in dropped],
            [i.received_at for i in dropped],
            [r[1].delay for r in rows],
        )
        if self._pool is None:
            raise StoreError("store is not open")
        # Batches with ordered deliveries take their conversations' locks (in their statement:
        # see ingest_batch) in the order they started, each once the batches before it that
        # share one of its conversations are done: a conversation's postbacks that came while a
        # batch was in flight get delivery ids after that batch's, as they came. Batches of other
        # conversations do not wait (postbacks stored one by one after a failed batch go at once).
        turn: asyncio.Future[None] | None = None
        before: set[asyncio.Future[None]] = set()
        if ordered:
            turn = asyncio.get_running_loop().create_future()
            before = {self._lock_turns[k] for k in ordered if k in self._lock_turns}
            self._lock_turns.update(dict.fromkeys(ordered, turn))
        try:
            if before:
                await asyncio.shield(asyncio.gather(*before))
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                new = await conn.fetch(Q["ingest_batch"], *args, ordered)  # one round trip, its own transaction
                if turn is not None:
                    turn.set_result(None)  # committed: the next batch may take its locks
                accepted = {row[0] for row in new if row[0] is not None}
                taken = [i.dedup_key for i in batch if i.event_id not in accepted]
                owners = dict(await conn.fetch(Q["events_by_dedup_key"], taken)) if taken else {}
        except DRIVER_ERRORS as exc:
            raise StoreError(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc
        finally:
            if turn is not None:
                if not turn.done():
                    turn.set_result(None)  # failed: the next goes on
                for k in ordered:
                    if self._lock_turns.get(k) is turn:  # no batch after it took this key
                        del self._lock_turns[k]
        results: list[Ingested | StoreError] = []
        for item in batch:
            if item.event_id in accepted:
                results.append(Ingested("accepted", item.event_id))
                continue
            owner = owners.get(item.dedup_key)
            if owner is None:  # taken, and gone by now (purged): Skycore's retry will tell
                results.append(StoreError("PostgreSQL: the event holding this dedup key is gone"))
            elif owner == item.event_id:
                # stored by an earlier try of this batch whose commit went through while its
                # connection was lost: ours, so accepted (and its deliveries are queued)
                results.append(Ingested("accepted", item.event_id))
            else:
                results.append(Ingested("duplicate", owner))
        return results

    async def _look_for_listeners(self, conn: asyncpg.Connection) -> None:
        """Whether another instance listens on this store's channel: its LISTEN connection's last
        statement is this same check, whose text names the channel. When that cannot be told
        (the server does not track statements, or shows another role's as insufficient
        privilege), we assume one does."""
        query = f"{LISTENERS} -- {self._channel}"
        others, seen = await conn.fetchrow(query, timeout=LISTEN_CHECK)
        self.others_listen = bool(others) or not seen

    def listen(self, callback: Listener) -> None:
        self._listeners.append(callback)
        if self._listening is None and self._pool is not None:
            self._listening = asyncio.create_task(self._listen(), name="listen")

    def unlisten(self, callback: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def _wake(self, names: Sequence[str] | None) -> None:
        for callback in list(self._listeners):
            try:
                callback(names)
            except Exception:  # a wake-up only: the poll still finds the deliveries
                log.exception("waking the delivery loops failed")

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._wake(None if payload == "*" else payload.split(","))

    async def _listen(self) -> None:
        """LISTEN on a connection of its own for as long as the store is open; made again with
        backoff when it is lost. Every loop is woken once it is (back) in place: what was stored
        meanwhile was not announced to us."""
        delay = LISTEN_RETRY_FIRST
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self.url,
                    timeout=CONNECT_TIMEOUT,
                    command_timeout=COMMAND_TIMEOUT,
                    server_settings=_settings(self.url),
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _, lost=lost: lost.set())
                await conn.add_listener(self._channel, self._notified)
                await self._look_for_listeners(conn)  # now: the others see us at their next look
                self.listen_pid = conn.get_server_pid()
                self.listening.set()
                if delay > LISTEN_RETRY_FIRST:
                    log.info("listening for other instances' postbacks again")
                delay = LISTEN_RETRY_FIRST
                self._wake(None)
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(LISTEN_CHECK):
                            await lost.wait()
                    if not lost.is_set():
                        await self._look_for_listeners(conn)  # also notices a cut that said nothing
                raise ConnectionError("the LISTEN connection was closed")
            except (*DRIVER_ERRORS, ConnectionError) as exc:
                self.listening.clear()
                log.warning(
                    "not listening for other instances' postbacks (polling meanwhile)",
                    extra={"error": f"{type(exc).__name__}: {exc}", "retry_in": delay},
                )
            finally:
                self.listening.clear()
                self.others_listen = True  # not known while we do not look
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX)

    async def claim(self, destination: str, *, limit: int, lease: float, ordered: bool, owner: str) -> list[Claim]:
        """A claim whose answer is lost (its connection cut) may have committed: its leases would
        keep those deliveries from everyone until they run out. So it is given back at once, or
        before the next claim when the database is not reachable yet (see _give_back)."""
        if self._lost_claims:
            await self._give_back()
        now = time.time()
        lease_end = self._lease_end(now + lease)
        try:
            async with self._bookkeeping_conn() as conn:  # one statement
                rows = await conn.fetch(
                    Q["claim_ordered" if ordered else "claim"], destination, now, limit, lease_end, owner
                )
        except StoreError:
            self._lost_claims.append((destination, lease_end, owner))
            with contextlib.suppress(StoreError):
                await self._give_back()
            raise
        return [
            Claim(
                id=row[0],
                event_id=row[1],
                destination=destination,
                attempt=row[2],
                created_at=row[3],
                conversation=row[4],
                route=row[5],
                body=row[6],
            )
            for row in sorted(rows, key=lambda row: row[0])
        ]

    def _lease_end(self, at: float) -> float:
        """`at`, made to differ from the last claim's lease end, which tells a claim's rows apart
        from those of the claims of its destination and owner before it (see give_back_lost_claims:
        a destination's claims all lease for as long, so theirs differ once the clock has moved)."""
        if at <= self._last_lease_end < at + 1e-3:  # the clock had not moved (or not enough)
            at = math.nextafter(self._last_lease_end, math.inf)
        self._last_lease_end = at
        return at

    async def _give_back(self) -> None:
        """Give back what the lost claims leased (see `claim`); StoreError if that fails too."""
        lost = list(self._lost_claims)
        async with self._bookkeeping_conn() as conn:
            status = await conn.execute(Q["give_back_lost_claims"], *map(list, zip(*lost, strict=True)), time.time())
        self._lost_claims = [claim for claim in self._lost_claims if claim not in lost]
        if given := _updated(status):
            log.info("deliveries of a claim whose answer was lost are due again", extra={"count": given})

    async def complete(self, results: list[AttemptResult]) -> list[AttemptResult]:
        """One statement (see `complete` in postgres.sql), its own transaction on the bookkeeping
        pool (see BOOKKEEPING_POOL_SIZE): lost with a crash of the database, a verdict and its
        follow-ups go together, and the attempt is made again. A delivery with several results
        (recorded twice) takes a round of its own for each, in one transaction, deaths last."""
        if not results:
            return []
        now = time.time()
        rounds: list[list[tuple[AttemptResult, tuple[str, float, str | None]]]] = []
        seen: dict[int, int] = {}
        judged = [(r, verdict(r.decision, now)) for r in results]
        for r, judgement in sorted(judged, key=lambda item: item[1][0] == "dead"):  # stable
            n = seen[r.claim.id] = seen.get(r.claim.id, -1) + 1
            if n == len(rounds):
                rounds.append([])
            rounds[n].append((r, judgement))
        died: list[AttemptResult] = []
        in_turn = self._bookkeeping_conn if len(rounds) == 1 else self._bookkeeping_tx
        async with in_turn() as conn:
            for batch in rounds:
                dead = {row[0] for row in await conn.fetch(Q["complete"], *_complete_args(batch, now))}
                died += [r for r, _ in batch if r.claim.id in dead]
        return died

    async def release(self, claims: list[Claim], *, owner: str) -> None:
        if not claims:
            return
        now = time.time()
        async with self._tx() as conn:
            await conn.executemany(Q["release"], [(c.id, c.attempt, now, owner) for c in claims])

    async def next_due(self, destination: str) -> float | None:
        async with self._bookkeeping_conn() as conn:
            due: float | None = await conn.fetchval(Q["next_due"], destination)
            return due

    async def get_conversation(self, destination: str, key: str) -> str | None:
        async with self._read() as conn:
            value: str | None = await conn.fetchval(Q["get_conversation"], destination, key)
            return value

    async def put_conversation(self, destination: str, key: str, value: str) -> None:
        async with self._tx() as conn:
            await conn.execute(Q["put_conversation"], destination, key, value)

    async def conversation_of(self, destination: str, value: str) -> str | None:
        async with self._read() as conn:
            key: str | None = await conn.fetchval(Q["conversation_of"], destination, value)
            return key

    async def record_optout(self, row: OptOutRow) -> None:
        values = (row.texter, row.short_code, row.opted_out, row.word, row.at, row.event_id)
        async with self._tx() as conn:
            await conn.execute(Q["record_optout"], *values)

    async def opted_out(self, texter: str, short_code: str) -> bool:
        async with self._read() as conn:
            return bool(await conn.fetchval(Q["opted_out"], texter, short_code))

    async def thread_and_ledger(
        self, destination: str, key: str, value: str, which: Callable[[str | None, str | None], tuple[str, str] | None]
    ) -> tuple[tuple[str, str] | None, bool]:
        """One statement (see `thread_and_ledger` in postgres.sql) where a reply took two or three."""
        async with self._read() as conn:
            kept, started, texter, short_code, stopped = await conn.fetchrow(
                Q["thread_and_ledger"], destination, key, value
            )
        found = which(kept, started)
        if found is None:
            return None, False
        if found != (texter, short_code):  # `which` made other parts of it: ask for those
            return found, await self.opted_out(*found)
        return found, bool(stopped)

    async def list_optouts(self, number: str | None = None, *, limit: int = 1000) -> list[OptOutRow]:
        where, params = ("", [limit]) if number is None else (" WHERE texter = $2 OR short_code = $2", [limit, number])
        query = f"SELECT {OPTOUT_COLUMNS} FROM optouts{where} ORDER BY at DESC, texter, short_code LIMIT $1"
        async with self._tx() as conn:
            rows = await conn.fetch(query, *params)
        return [optout_row(row) for row in rows]

    async def delivery_by_tracking_id(self, tracking_id: str) -> DeliveryRow | None:
        async with self._read() as conn:
            row = await conn.fetchrow(Q["delivery_by_tracking_id"], tracking_id)
        return delivery_row(row) if row is not None else None

    async def list_deliveries(self, where: DeliveryFilter) -> list[DeliveryRow]:
        p = _Params()
        sql = _sql_where(_delivery_where(where, p))
        query = f"SELECT {DELIVERY_COLUMNS} FROM deliveries{sql} ORDER BY id DESC LIMIT {p.add(where.limit)}"
        async with self._tx() as conn:
            rows = await conn.fetch(query, *p.values)
        return [delivery_row(row) for row in rows]

    async def update_event(self, event_id: str, body: str | None, *, release_except: str | None = None) -> list[str]:
        async with self._tx() as conn:
            if body is not None:
                await conn.execute(Q["update_event"], event_id, body)
            if release_except is None:
                return []
            rows = await conn.fetch(Q["release_waiting"], event_id, release_except, self._channel, time.time())
        return sorted(row[0] for row in rows if row[0] is not None)

    async def keep_meta(self, key: str, value: str) -> str:
        for _ in range(3):
            async with self._tx() as conn:
                kept: str | None = await conn.fetchval(Q["keep_meta"], key, value)
            if kept is not None:
                return kept
            # another instance kept one after this statement's snapshot was taken: read it now
        raise StoreError(f"cannot read meta {key!r}")

    async def get_event(self, event_id: str) -> Event | None:
        async with self._read() as conn:
            body = await conn.fetchval(Q["get_event"], event_id)
        return json.loads(body) if body is not None else None

    async def attempts(self, delivery_id: int) -> list[AttemptRow]:
        async with self._read() as conn:
            rows = await conn.fetch(Q["attempts"], delivery_id)
        return [AttemptRow(*row) for row in rows]

    async def replay(self, where: DeliveryFilter, *, force: bool = False) -> list[int]:
        p = _Params()
        clauses = _delivery_where(where, p)
        statuses = p.add(["dead", "delivered"] if force else ["dead"])
        clauses.append(f"(status = ANY({statuses}::text[]) OR {FAILED_SQL})")
        now = p.add(time.time())
        # a new attempt series: due now, and max_age counts from the replay (when it came in is
        # kept: a later listing or replay by time range still finds it)
        query = (
            f"UPDATE deliveries SET status = 'pending', next_at = {now}, {REPLAY_SET_SQL} = {now},"
            f" updated_at = {now},"
            " leased_by = NULL, last_error = NULL"
            f" WHERE id IN (SELECT id FROM deliveries{_sql_where(clauses)} ORDER BY id LIMIT {p.add(where.limit)}"
            " FOR UPDATE) RETURNING id"
        )
        async with self._tx() as conn:
            rows = await conn.fetch(query, *p.values)
        return sorted(row[0] for row in rows)

    async def abandon_unknown(
        self,
        keep: Collection[str],
        reason: str,
        *,
        follow_up: ExpiryFollowUp | None = None,
        leave_leased: bool = False,
    ) -> dict[str, int]:
        up = (None, None, None) if follow_up is None else (follow_up.route, follow_up.destination, follow_up.then_route)
        async with self._tx() as conn:
            rows = await conn.fetch(Q["abandon_unknown"], reason, time.time(), sorted(keep), *up, leave_leased)
        return {row[0]: row[1] for row in rows}

    async def expire(
        self, destination: str, *, max_age: float, grace: float = 0.0, follow_up: ExpiryFollowUp | None = None
    ) -> int:
        now, reason = time.time(), f"max_age {max_age:g}s passed after "
        async with self._tx() as conn:
            rows = await conn.fetch(Q["expire"], destination, now - max_age, now, reason, now - grace)
            for row in rows:
                if follow_up is not None and row[1] == follow_up.route:
                    await conn.execute(
                        Q["insert_deliveries"],
                        row[0],
                        [follow_up.destination],
                        [follow_up.then_route],
                        [row[2]],
                        [False],
                        now,
                    )
        return len(rows)

    async def order_pending(self, destinations: Collection[str]) -> int:
        async with self._tx() as conn:
            status = await conn.execute(Q["order_pending"], sorted(destinations))
        return _updated(status)

    async def list_events(self, where: EventFilter) -> list[Event]:
        cursor = parse_event_cursor(where.before) if where.before is not None else None
        async with self._tx() as conn:
            anchor = None
            if cursor is not None:  # the event's own received_at, unless it is gone (purged)
                at = await conn.fetchval("SELECT received_at FROM events WHERE id = $1", cursor[1])
                anchor = (at if at is not None else cursor[0], cursor[1])
            search = event_search(_SQL, where, anchor)
            # A page is a walk of an index in order that stops at the page. The planner, which
            # knows no better than the average number's count, would rather read all of a busy
            # texter's events through a bitmap and sort them (0.2-0.4 s for 17,000): no bitmaps,
            # but for the text index's query (a GIN index is read no other way).
            bitmaps = False
            await conn.execute("SET LOCAL enable_bitmapscan = off")
            try:
                query = next(search)
                while True:
                    if query.by_text != bitmaps:
                        bitmaps = query.by_text
                        await conn.execute(f"SET LOCAL enable_bitmapscan = {'on' if bitmaps else 'off'}")
                    query = search.send(await conn.fetch(query.sql, *query.values))
            except StopIteration as done:
                events: list[Event] = done.value
                return events

    async def postbacks_per_minute(self, since: float) -> list[tuple[float, int]]:
        async with self._tx() as conn:
            rows = await conn.fetch(Q["postbacks_per_minute"], since)
        return [(float(row[0]), row[1]) for row in rows]

    async def recent_errors(self, limit: int) -> list[DeliveryRow]:
        async with self._tx() as conn:
            rows = await conn.fetch(Q["recent_errors"], limit)
        return [delivery_row(row) for row in rows]

    async def event_deliveries(self, event_id: str) -> list[DeliveryRow]:
        async with self._read() as conn:
            rows = await conn.fetch(Q["deliveries_of_event"], event_id)
        return [delivery_row(row) for row in rows]

    async def stats(self) -> dict[str, DestinationStats]:
        async with self._tx() as conn:
            rows = await conn.fetch(Q["stats"])
        out: dict[str, DestinationStats] = {}
        for destination, status, count, oldest in rows:
            current = out.get(destination, DestinationStats())
            if status == "pending":
                current = replace(current, pending=count, oldest_pending=oldest)
            else:
                current = replace(current, dead=count)
            out[destination] = current
        return out

    async def purge(self, *, delivered_before: float, dead_before: float, batch: int = 500) -> int:
        async with self._tx() as conn:
            rows = await conn.fetch(Q["purge_deliveries"], delivered_before, dead_before, batch)
            if rows:
                await conn.execute(Q["purge_attempts"], [row[0] for row in rows])
            dropped = [row[0] for row in await conn.fetch(Q["purge_dropped"], delivered_before, batch)]
            events = {row[1] for row in rows} | set(dropped)
            if events:
                await conn.execute(Q["purge_events"], list(events))
        return len(rows) + len(dropped)
