"""PostgreSQL store: several bridge instances on one database.

Same semantics as the SQLite store, with the database doing the coordination instead of one
writer thread: each operation is one transaction on a pooled connection, claims skip rows
another instance is claiming (`FOR UPDATE SKIP LOCKED`), and a claimed delivery stays
'pending' with a lease (`next_at` in the future, `leased_by` its owner) until its verdict is
recorded. All SQL is in postgres.sql. Errors of the driver or the network become StoreError
here, at the boundary, so callers answer 503 and retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from bridge.errors import ConfigError, StoreError
from bridge.event import Event
from bridge.jsonout import dumps
from bridge.secret import redact_url
from bridge.store import (
    CAME_IN_SQL,
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
    Ingested,
    NewDelivery,
    OptOutRow,
    Store,
    delivery_clauses,
    delivery_row,
    load_queries,
    optout_row,
    owner_gone,
    schema,
    verdict,
)

Q = load_queries("postgres.sql")
POOL_SIZE = 10
CONNECT_TIMEOUT = 10.0  # seconds; also how long an operation waits for a free connection
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


def _sql_where(clauses: list[str]) -> str:
    return (" WHERE " + " AND ".join(clauses)) if clauses else ""


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
            await conn.execute(migration.sql)
        if todo:
            await conn.execute(Q["set_meta"], schema.VERSION_KEY, str(todo[-1].version))


class PostgresStore(Store):
    retry_open = True

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None
        self._opening: asyncpg.Pool | None = None  # connected, its schema being set up by `open`

    async def open(self) -> None:
        """Raises ConfigError when trying again cannot help (see NEEDS_A_PERSON), StoreError
        when it may (the server is not up yet, or not reachable)."""
        missing = await asyncio.to_thread(_missing_files, self.url)
        if missing:
            raise ConfigError([f"store: {redact_url(self.url)}: no such file: {', '.join(missing)}"])
        try:
            pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=POOL_SIZE,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings=_settings(self.url),
            )
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
                async with conn.transaction():
                    # Leases of a process on this host that is gone (kill -9) are due again at
                    # once. Only those: a lease of another instance, here or on another host, is
                    # live or runs out by itself; taking it away would send its delivery twice.
                    now = time.time()
                    for (owner,) in await conn.fetch(Q["lease_owners"]):
                        if owner_gone(owner):
                            await conn.execute(Q["recover_leases"], owner, now)
        except DRIVER_ERRORS as exc:
            pool.terminate()
            raise self._cannot_open(exc) from exc
        except BaseException:  # cancelled (shutdown)
            pool.terminate()
            raise
        finally:
            self._opening = None
        self._pool = pool

    def _cannot_open(self, exc: BaseException) -> ConfigError | StoreError:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__  # a timeout says nothing
        message = f"cannot open PostgreSQL store {redact_url(self.url)}: {detail}"
        return ConfigError([f"store: {message}"]) if isinstance(exc, NEEDS_A_PERSON) else StoreError(message)

    async def close(self) -> None:
        if self._opening is not None:
            # an `open` still waiting on a database that stopped answering mid-way: asyncpg does
            # not give up on being cancelled, but does once its connections are gone
            self._opening.terminate()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await pool.close()
            except DRIVER_ERRORS:
                pool.terminate()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection in a transaction; driver errors leave as StoreError."""
        if self._pool is None:
            raise StoreError("store is not open")
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn, conn.transaction():
                yield conn
        except DRIVER_ERRORS as exc:
            raise StoreError(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        async with self._tx() as conn:
            await conn.execute(Q["heartbeat"], str(time.time()))

    async def ingest(self, event: Event, dedup_key: str, deliveries: list[NewDelivery]) -> Ingested:
        now = time.time()
        async with self._tx() as conn:
            ordered = [_key(d.destination, d.conversation) for d in deliveries if d.ordered]
            if ordered:
                await conn.execute(Q["lock_conversations"], ordered)
            stored = await conn.fetchval(Q["insert_event"], event["id"], dedup_key, event["type"], now, dumps(event))
            if stored is None:  # the key is taken, by a committed event (or one that just committed)
                existing = await conn.fetchval(Q["event_by_dedup_key"], dedup_key)
                return Ingested("duplicate", existing)
            if deliveries:
                await conn.execute(
                    Q["insert_deliveries"],
                    event["id"],
                    [d.destination for d in deliveries],
                    [d.route for d in deliveries],
                    [d.conversation for d in deliveries],
                    [d.ordered for d in deliveries],
                    now,
                )
            else:  # dropped: kept for its dedup key and id
                await conn.execute(Q["insert_dropped"], event["id"], now)
        return Ingested("accepted", event["id"])

    async def claim(self, destination: str, *, limit: int, lease: float, ordered: bool, owner: str) -> list[Claim]:
        now = time.time()
        async with self._tx() as conn:
            rows = await conn.fetch(
                Q["claim_ordered" if ordered else "claim"], destination, now, limit, now + lease, owner
            )
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

    async def complete(self, results: list[AttemptResult]) -> list[AttemptResult]:
        now = time.time()
        attempts: list[tuple[Any, ...]] = []
        finishes: list[tuple[AttemptResult, tuple[Any, ...]]] = []
        deaths: list[tuple[AttemptResult, tuple[Any, ...]]] = []
        for r in results:
            status, next_at, error = verdict(r.decision, now)
            attempts.append((r.claim.id, r.claim.attempt, r.started_at, r.outcome, r.status, r.error, r.duration))
            finish = (r.claim.id, r.claim.attempt, status, next_at, error, now, r.tracking_id)
            (deaths if status == "dead" else finishes).append((r, finish))
        if not results:
            return []
        died = []
        async with self._tx() as conn:
            await conn.executemany(Q["record_attempt"], attempts)
            if finishes:
                await conn.executemany(Q["finish"], [finish for _, finish in finishes])
            for r, finish in deaths:  # one at a time, to see which applied: deaths are few
                if _updated(await conn.execute(Q["finish"], *finish)):
                    died.append(r)
        return died

    async def release(self, claims: list[Claim], *, owner: str) -> None:
        if not claims:
            return
        now = time.time()
        async with self._tx() as conn:
            await conn.executemany(Q["release"], [(c.id, c.attempt, now, owner) for c in claims])

    async def next_due(self, destination: str) -> float | None:
        async with self._tx() as conn:
            due: float | None = await conn.fetchval(Q["next_due"], destination)
            return due

    async def get_conversation(self, destination: str, key: str) -> str | None:
        async with self._tx() as conn:
            value: str | None = await conn.fetchval(Q["get_conversation"], destination, key)
            return value

    async def put_conversation(self, destination: str, key: str, value: str) -> None:
        async with self._tx() as conn:
            await conn.execute(Q["put_conversation"], destination, key, value)

    async def conversation_of(self, destination: str, value: str) -> str | None:
        async with self._tx() as conn:
            key: str | None = await conn.fetchval(Q["conversation_of"], destination, value)
            return key

    async def record_optout(self, row: OptOutRow) -> None:
        values = (row.texter, row.short_code, row.opted_out, row.word, row.at, row.event_id)
        async with self._tx() as conn:
            await conn.execute(Q["record_optout"], *values)

    async def opted_out(self, texter: str, short_code: str) -> bool:
        async with self._tx() as conn:
            return bool(await conn.fetchval(Q["opted_out"], texter, short_code))

    async def list_optouts(self, number: str | None = None, *, limit: int = 1000) -> list[OptOutRow]:
        where, params = ("", [limit]) if number is None else (" WHERE texter = $2 OR short_code = $2", [limit, number])
        query = f"SELECT {OPTOUT_COLUMNS} FROM optouts{where} ORDER BY at DESC, texter, short_code LIMIT $1"
        async with self._tx() as conn:
            rows = await conn.fetch(query, *params)
        return [optout_row(row) for row in rows]

    async def delivery_by_tracking_id(self, tracking_id: str) -> DeliveryRow | None:
        async with self._tx() as conn:
            row = await conn.fetchrow(Q["delivery_by_tracking_id"], tracking_id)
        return delivery_row(row) if row is not None else None

    async def list_deliveries(self, where: DeliveryFilter) -> list[DeliveryRow]:
        p = _Params()
        sql = _sql_where(_delivery_where(where, p))
        query = (
            f"SELECT id, event_id, destination, route, status, attempts, {CAME_IN_SQL}, next_at, updated_at,"
            f" last_error, tracking_id FROM deliveries{sql} ORDER BY id DESC LIMIT {p.add(where.limit)}"
        )
        async with self._tx() as conn:
            rows = await conn.fetch(query, *p.values)
        return [delivery_row(row) for row in rows]

    async def get_event(self, event_id: str) -> Event | None:
        async with self._tx() as conn:
            body = await conn.fetchval(Q["get_event"], event_id)
        return json.loads(body) if body is not None else None

    async def attempts(self, delivery_id: int) -> list[AttemptRow]:
        async with self._tx() as conn:
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

    async def abandon_unknown(self, keep: Collection[str], reason: str) -> dict[str, int]:
        async with self._tx() as conn:
            rows = await conn.fetch(Q["abandon_unknown"], reason, time.time(), sorted(keep))
        return {row[0]: row[1] for row in rows}

    async def expire(self, destination: str, *, max_age: float, grace: float = 0.0) -> int:
        now, reason = time.time(), f"max_age {max_age:g}s passed after "
        async with self._tx() as conn:
            status = await conn.execute(Q["expire"], destination, now - max_age, now, reason, now - grace)
        return _updated(status)

    async def order_pending(self, destinations: Collection[str]) -> int:
        async with self._tx() as conn:
            status = await conn.execute(Q["order_pending"], sorted(destinations))
        return _updated(status)

    async def list_events(self, where: EventFilter) -> list[Event]:
        p = _Params()
        clauses = []
        if where.type is not None:
            clauses.append(f"type = {p.add(where.type)}")
        for field, value in (("from", where.sender), ("to", where.to)):
            if value is not None:
                clauses.append(f"body::json ->> '{field}' = {p.add(value)}")
        if where.keyword is not None:
            clauses.append(f"upper(body::json ->> 'keyword') = upper({p.add(where.keyword)})")
        if where.since is not None:
            clauses.append(f"received_at >= {p.add(where.since)}")
        if where.until is not None:
            clauses.append(f"received_at < {p.add(where.until)}")
        query = (
            f"SELECT body FROM events{_sql_where(clauses)}"
            f" ORDER BY received_at DESC, id DESC LIMIT {p.add(where.limit)}"
        )
        async with self._tx() as conn:
            rows = await conn.fetch(query, *p.values)
        return [json.loads(row[0]) for row in rows]

    async def event_deliveries(self, event_id: str) -> list[DeliveryRow]:
        async with self._tx() as conn:
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
