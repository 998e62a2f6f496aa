"""The store: events, their deliveries, every attempt, conversation state.

A narrow interface (like procrastinate's connectors) so SQLite and PostgreSQL drop in behind it.
The one promise everything rests on: `ingest` returns only once the event and all its delivery
rows are committed durably, in one transaction.
"""

from __future__ import annotations

import abc
import base64
import binascii
import json
import os
import re
from collections.abc import Callable, Collection, Generator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from importlib.resources import files
from typing import Any, ClassVar, Self

from bridge.errors import StoreError
from bridge.event import Event
from bridge.retry import Dead, Decision, Done, RetryAt

# An event's JSON fields that event lists filter on (`EventFilter`), and the columns of `events`
# that hold them on PostgreSQL (migration 0004): written with the event, indexed, and what
# `event_search` asks there. (SQLite's indexes are on the JSON: see its 0004.)
EVENT_COLUMNS = {"from": "sender", "to": "recipient", "keyword": "keyword", "text": "text"}


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class PendingEvent:
    """One postback's event as a store writes it, waiting for the group commit that takes it:
    what both stores batch (SQLite's writer thread, PostgreSQL's ingest_batch)."""

    event_id: str
    dedup_key: str
    type: str
    received_at: float
    body: str  # the event as JSON, byte for byte what is stored
    deliveries: list[NewDelivery]
    # the fields event lists filter on, in columns of their own on PostgreSQL (EVENT_COLUMNS;
    # migration 0004); SQLite's store leaves them out
    sender: str | None = None
    recipient: str | None = None
    keyword: str | None = None
    text: str | None = None

    @classmethod
    def of(
        cls, event: Event, dedup_key: str, received_at: float, body: str, deliveries: list[NewDelivery], **more: Any
    ) -> Self:
        """The pending event of `event`, its columns taken from it (a value that is not a
        string, or is missing, is NULL)."""
        columns = {column: _string(event.get(name)) for name, column in EVENT_COLUMNS.items()}
        return cls(event["id"], dedup_key, event["type"], received_at, body, deliveries, **columns, **more)


@dataclass(frozen=True)
class NewDelivery:
    destination: str
    route: str
    conversation: str
    ordered: bool = True  # the destination sends a conversation in order (Destination.ordered)
    delay: float = 0.0  # first due this many seconds after it is stored (an MMS's waiting for its files)


@dataclass(frozen=True)
class Ingested:
    status: str  # "accepted" | "duplicate"
    event_id: str


@dataclass(frozen=True)
class Claim:
    id: int
    event_id: str
    destination: str
    attempt: int  # this attempt's number, from 1
    created_at: float  # when it was stored, or last replayed: max_age counts from here
    conversation: str
    route: str
    body: str  # the event as stored: JSON

    @cached_property
    def event(self) -> Event:
        """Decoded when first asked for: a webhook sends `body` as it is."""
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ClaimFor:
    """A claim to make in the same trip as a write (`Store.ingest_and_claim`,
    `Store.complete_and_claim`): what `Store.claim` takes."""

    destination: str
    limit: int
    lease: float
    ordered: bool
    owner: str


@dataclass(frozen=True)
class ExpiryFollowUp:
    """What `Store.expire` (and `Store.abandon_unknown`) adds, in its transaction, for each
    delivery it makes dead whose route is `route`: a delivery of the same event to `destination`
    under `then_route` (same conversation, unordered). A reply's SMS that dies unattempted (past
    max_age, or its destination gone from the config) still shows in its thread."""

    route: str
    destination: str
    then_route: str


@dataclass(frozen=True)
class AttemptResult:
    claim: Claim
    started_at: float
    duration: float
    outcome: str  # delivered | retry | dead
    status: int | None
    error: str | None
    decision: Decision
    detail: str | None = None  # what a destination says about a success (e.g. a side step that failed)
    tracking_id: str | None = None  # the peer's id for it (Skycore's TRACKINGID), kept on the delivery
    # deliveries of the same event to add when this verdict applies, in its transaction (what a
    # reply's attempt leaves for the thread to show: bridge.replies): recorded twice, added once
    follow_ups: tuple[NewDelivery, ...] = ()

    @property
    def reason(self) -> str | None:
        """What the attempt's record says: the error, or for a success its detail (a file the
        media step did not keep, a Slack upload refused), which is otherwise only in the log."""
        return self.error if self.error is not None else self.detail


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> `2026-11-23T10:00:00.123Z` (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def verdict(decision: Decision, now: float) -> tuple[str, float, str | None]:
    """A decision as a delivery row's (status, next_at, last_error)."""
    if isinstance(decision, Done):
        return "delivered", now, None
    if isinstance(decision, RetryAt):
        return "pending", decision.at, decision.reason
    assert isinstance(decision, Dead)
    return "dead", now, decision.reason


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    event_id: str
    destination: str
    route: str
    status: str
    attempts: int
    created_at: float
    next_at: float | None
    updated_at: float
    last_error: str | None
    tracking_id: str | None = None  # the peer's id for it, once delivered (Skycore's TRACKINGID)

    def as_json(self) -> dict[str, Any]:
        """As the admin API and `deliveries --json` show it."""
        return {
            "id": self.id,
            "event_id": self.event_id,
            "destination": self.destination,
            "route": self.route,
            "status": self.status,
            "attempts": self.attempts,
            "created_at": iso(self.created_at),
            "next_at": iso(self.next_at),
            "updated_at": iso(self.updated_at),
            "last_error": self.last_error,
            "tracking_id": self.tracking_id,
        }


def delivery_row(row: Sequence[Any]) -> DeliveryRow:
    """A DeliveryRow from a row of `id, event_id, destination, route, status, attempts,
    created_at, next_at, updated_at, last_error, tracking_id`, as both stores select them;
    next_at is shown only while the delivery is pending."""
    return DeliveryRow(
        id=row[0], event_id=row[1], destination=row[2], route=row[3], status=row[4], attempts=row[5],
        created_at=row[6], next_at=row[7] if row[4] == "pending" else None, updated_at=row[8], last_error=row[9],
        tracking_id=row[10],
    )  # fmt: skip


@dataclass(frozen=True)
class AttemptRow:
    number: int
    at: float
    outcome: str
    status: int | None
    error: str | None
    duration: float

    def as_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "at": iso(self.at),
            "outcome": self.outcome,
            "status": self.status,
            "error": self.error,
            "duration_ms": round(self.duration * 1000, 1),
        }


@dataclass(frozen=True)
class OptOutRow:
    """A texter's latest word to a short code (CONTRACT §7): opted out or back in."""

    texter: str
    short_code: str
    opted_out: bool
    word: str  # the keyword (STOP, START, ...) or SUB code (N302, N301) that said it
    at: float
    event_id: str

    def as_json(self) -> dict[str, Any]:
        return {
            "texter": self.texter,
            "short_code": self.short_code,
            "opted_out": self.opted_out,
            "word": self.word,
            "at": iso(self.at),
            "event_id": self.event_id,
        }


OPTOUT_COLUMNS = "texter, short_code, opted_out, word, at, event_id"


def optout_row(row: Sequence[Any]) -> OptOutRow:
    return OptOutRow(row[0], row[1], bool(row[2]), row[3], row[4], row[5])


@dataclass(frozen=True)
class EventFilter:
    """Which events `list_events` gives, newest first by (received_at, id)."""

    type: str | None = None
    sender: str | None = None  # the event's `from`
    to: str | None = None
    keyword: str | None = None
    since: float | None = None  # received_at
    until: float | None = None
    limit: int = 100
    # A texter's number: the event's `from` (what they sent) or its `to` (an `sms.reply` to them);
    # either side matches. With `short_code` too: one conversation, both ways.
    texter: str | None = None
    short_code: str | None = None  # either side too
    text: str | None = None  # a case-insensitive substring of the event's text
    before: str | None = None  # a cursor (`event_cursor` of the last event of the page before)


MAX_CURSOR = 200  # characters: a cursor is an event id and a time, well under this


def event_cursor(event: Event) -> str:
    """The cursor that lists the events after `event` (older ones): `EventFilter(before=...)`.
    Opaque to its users; it holds the event's id and its `received_at`."""
    raw = f"{event['received_at']}|{event['id']}"
    return base64.urlsafe_b64encode(raw.encode()).decode("ascii").rstrip("=")


def parse_event_cursor(cursor: str) -> tuple[float, str]:
    """A cursor's (received_at as epoch seconds, event id); ValueError for anything that is not
    a cursor `event_cursor` made."""
    if not cursor or len(cursor) > MAX_CURSOR or not cursor.isascii():
        raise ValueError("not a cursor this bridge made")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not a cursor this bridge made") from None
    when, sep, event_id = raw.partition("|")
    if not sep or not event_id or not event_id.isprintable():
        raise ValueError("not a cursor this bridge made")
    try:
        at = datetime.fromisoformat(when)
    except ValueError:
        raise ValueError("not a cursor this bridge made") from None
    if at.tzinfo is None:
        raise ValueError("not a cursor this bridge made")
    return at.timestamp(), event_id


class EventSQL(abc.ABC):
    """How a store writes what `event_search` asks for: its placeholders, an event's fields
    (the same expressions its indexes are made on), and its text search."""

    @abc.abstractmethod
    def placeholder(self, n: int) -> str:
        """The placeholder of the `n`th value bound (from 1)."""

    @abc.abstractmethod
    def field(self, name: str) -> str:
        """The SQL of the event's field `name` (the same expression its index is made on)."""

    @abc.abstractmethod
    def unindexed(self, sql: str) -> str:
        """`sql` as an expression no index is used for."""

    @abc.abstractmethod
    def contains(self, needle: str, bind: Callable[[Any], str]) -> str:
        """The condition: the event's text holds `needle`, in any case."""

    def text_index(self, needle: str, bind: Callable[[Any], str]) -> str | None:
        """A condition an index of the text answers (it may match more than `contains`), or
        None when there is none for this needle."""
        return None


# Text search reads this many events of a page's other filters newest first (a window) and
# tests their text. Only when fewer than a page match there does it ask the text index for the
# older ones: a common word fills a page from the window at once, and a rare one has few hits in
# the index. (The index alone would hand a common word's hundreds of thousands of events over
# to be sorted.)
TEXT_WINDOW = 4000


class _Query:
    def __init__(self, sql: EventSQL) -> None:
        self.sql = sql
        self.params: list[Any] = []

    def bind(self, value: Any) -> str:
        self.params.append(value)
        return self.sql.placeholder(len(self.params))


Rows = Sequence[Sequence[Any]]


@dataclass(frozen=True)
class SearchQuery:
    """One query of `event_search`. `by_text` says it is the one a text index answers: a store
    whose planner must be told how to walk (PostgreSQL) lets it use a bitmap of that index; the
    others are walks of an index in order, which stop at the page."""

    sql: str
    values: list[Any]
    by_text: bool = False


EventSearch = Generator[SearchQuery, Rows, list[Event]]
ORDER = " ORDER BY received_at DESC, id DESC"


def event_sides(where: EventFilter) -> list[dict[str, str]]:
    """The `from` and `to` each query of a search asks for. A texter or short code matches either
    side of an event, so there are two (each walks its own index newest first and stops at the
    page; an OR would read every event of a short code to sort them); none: nothing matches.
    The first number of a side is the one whose index the query walks."""
    sides: list[dict[str, str]]
    if where.texter is not None and where.short_code is not None:  # the texter's number leads: it is the rarer
        sides = [{"from": where.texter, "to": where.short_code}, {"to": where.texter, "from": where.short_code}]
    elif where.texter is not None:
        sides = [{"from": where.texter}, {"to": where.texter}]
    elif where.short_code is not None:
        sides = [{"to": where.short_code}, {"from": where.short_code}]
    else:
        sides = [{}]
    for name, value in (("from", where.sender), ("to", where.to)):
        if value is not None:  # every side must have it too; a side that names another cannot
            sides = [{**side, name: value} for side in sides if side.get(name, value) == value]
    return sides


def _side_sql(
    q: _Query, where: EventFilter, side: dict[str, str], below: tuple[float, str] | None, *, text: bool
) -> str:
    """The WHERE of one side: its numbers, the other filters, below the cursor; the text test too
    with `text`."""
    numbers = list(side.items())
    clauses = [f"{q.sql.field(name)} = {q.bind(value)}" for name, value in numbers[:1]]
    # the others only tested on what that index gives (a planner may think a short code's index,
    # which holds most events, the better walk)
    clauses += [f"{q.sql.unindexed(q.sql.field(name))} = {q.bind(value)}" for name, value in numbers[1:]]
    if where.type is not None:
        clauses.append(f"type = {q.bind(where.type)}")
    if where.keyword is not None:
        clauses.append(f"upper({q.sql.field('keyword')}) = upper({q.bind(where.keyword)})")
    if where.since is not None:
        clauses.append(f"received_at >= {q.bind(where.since)}")
    if where.until is not None:
        clauses.append(f"received_at < {q.bind(where.until)}")
    if below is not None:
        clauses.append(f"(received_at, id) < ({q.bind(below[0])}, {q.bind(below[1])})")
    if text and where.text is not None:
        clauses.append(q.sql.contains(where.text, q.bind))
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def event_search(sql: EventSQL, where: EventFilter, anchor: tuple[float, str] | None) -> EventSearch:
    """`list_events` for either store: yields each SearchQuery and is sent its rows; returns
    the events. `anchor` is the (received_at, id) the page starts below (see
    `parse_event_cursor`)."""
    limit = where.limit
    found: list[Sequence[Any]] = []
    for side in event_sides(where):
        q = _Query(sql)
        if where.text is None:
            query = f"SELECT body, received_at, id FROM events{_side_sql(q, where, side, anchor, text=False)}{ORDER}"
            found += yield SearchQuery(f"{query} LIMIT {q.bind(limit)}", q.params)
            continue
        # the window: the newest events of the other filters, their text tested
        columns = f"body, received_at, id, {sql.field('text')}"
        window = f"SELECT {columns} FROM events{_side_sql(q, where, side, anchor, text=False)}{ORDER}"
        tested = f"FROM ({window} LIMIT {q.bind(TEXT_WINDOW)}) AS recent WHERE {sql.contains(where.text, q.bind)}"
        hits = yield SearchQuery(f"SELECT body, received_at, id {tested}{ORDER} LIMIT {q.bind(limit)}", q.params)
        found += hits
        if len(hits) == limit:
            continue
        q = _Query(sql)
        query = f"SELECT received_at, id FROM events{_side_sql(q, where, side, anchor, text=False)}{ORDER}"
        last = yield SearchQuery(f"{query} LIMIT 1 OFFSET {q.bind(TEXT_WINDOW - 1)}", q.params)
        if not last:  # the window held every event of the other filters
            continue
        # older than the window: what the text index finds there
        q = _Query(sql)
        clauses = _side_sql(q, where, side, (last[0][0], last[0][1]), text=True)
        indexed = sql.text_index(where.text, q.bind)
        if indexed is not None:
            clauses += f" AND {indexed}"
        query = f"SELECT body, received_at, id FROM events{clauses}{ORDER}"
        found += yield SearchQuery(f"{query} LIMIT {q.bind(limit - len(hits))}", q.params, by_text=True)
    found.sort(key=lambda row: (row[1], row[2]), reverse=True)
    return merged(found, limit)


def merged(rows: Rows, limit: int) -> list[Event]:
    """The events of rows (body, received_at, id), each once (an event may be on both sides of
    a search: a texter to themself), up to `limit`."""
    seen: set[str] = set()
    out: list[Event] = []
    for row in rows:
        if row[2] in seen:
            continue
        seen.add(row[2])
        out.append(json.loads(row[0]))
        if len(out) == limit:
            break
    return out


@dataclass(frozen=True)
class DestinationStats:
    pending: int = 0
    dead: int = 0
    oldest_pending: float | None = None  # created_at of the oldest undelivered delivery


# "failed": pending after a failed attempt, waiting for its retry, and nobody sending it now.
# `deliveries --status failed` lists them; `replay` requeues them with the dead ones (CONTRACT §2).
FAILED_SQL = "(status = 'pending' AND last_error IS NOT NULL AND leased_by IS NULL)"
STATUSES = ("pending", "delivered", "dead", "failed")
# When a delivery came in: what listings show as `created_at` and what --since/--until filter on.
# A replay moves `created_at` (the max_age clock, which every version of the bridge reads there)
# to its own time, and keeps the first one in `came_in_at`.
CAME_IN_SQL = "COALESCE(came_in_at, created_at)"
REPLAY_SET_SQL = "came_in_at = COALESCE(came_in_at, created_at), created_at"  # ... = the replay's time


@dataclass(frozen=True)
class DeliveryFilter:
    status: str | None = None  # pending | delivered | dead, or failed (see FAILED_SQL)
    destination: str | None = None
    event_id: str | None = None
    since: float | None = None
    until: float | None = None
    ids: tuple[int, ...] | None = None
    destinations: tuple[str, ...] | None = None  # only these (replay: the configured ones)
    limit: int = 100
    before_id: int | None = None  # keyset paging: only ids below this (listings are newest, id, first)


def delivery_clauses(
    where: DeliveryFilter, bind: Callable[[Any], str], among: Callable[[str, Sequence[Any], str], str]
) -> list[str]:
    """The SQL conditions of `where`, for either store: `bind(value)` binds a value and gives its
    placeholder (`?`, `$3`); `among(column, values, sql_type)` gives "column is one of values"."""
    clauses = [FAILED_SQL] if where.status == "failed" else []
    status = None if where.status == "failed" else where.status
    for column, value in (("status", status), ("destination", where.destination), ("event_id", where.event_id)):
        if value is not None:
            clauses.append(f"{column} = {bind(value)}")
    if where.since is not None:
        clauses.append(f"{CAME_IN_SQL} >= {bind(where.since)}")
    if where.until is not None:
        clauses.append(f"{CAME_IN_SQL} < {bind(where.until)}")
    if where.ids is not None:
        clauses.append(among("id", where.ids, "bigint"))
    if where.destinations is not None:
        clauses.append(among("destination", where.destinations, "text"))
    if where.before_id is not None:
        clauses.append(f"id < {bind(where.before_id)}")
    return clauses


# What listings select of a delivery, in the order `delivery_row` reads.
DELIVERY_COLUMNS = (
    f"id, event_id, destination, route, status, attempts, {CAME_IN_SQL}, next_at, updated_at, last_error, tracking_id"
)


class Store(abc.ABC):
    # A store behind a network (PostgreSQL) may come up after the bridge does: `serve` then keeps
    # trying to open it and answers 503 meanwhile. A local file that cannot be opened will not
    # mend itself: `serve` exits.
    retry_open: ClassVar[bool] = False

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create or upgrade the schema. StoreError if the store cannot be reached;
        ConfigError if its URL can never work."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreError unless the store can take a write now."""

    def listen(self, callback: Callable[[Sequence[str] | None], None]) -> None:
        """Call `callback(destinations)` when another process stored deliveries for these
        destinations (None: any of them may have some). Best effort, as soon as it is known:
        a store that cannot tell (SQLite, one process) never calls it, and callers poll too."""
        return None

    def unlisten(self, callback: Callable[[Sequence[str] | None], None]) -> None:
        """Stop calling `callback`."""
        return None

    @abc.abstractmethod
    async def ingest(self, event: Event, dedup_key: str, deliveries: list[NewDelivery]) -> Ingested: ...

    @abc.abstractmethod
    async def claim(self, destination: str, *, limit: int, lease: float, ordered: bool, owner: str) -> list[Claim]:
        """Lease up to `limit` due deliveries. With `ordered`, only the oldest pending delivery
        of each conversation is due, so one conversation is never sent out of order."""

    async def ingest_and_claim(
        self, event: Event, dedup_key: str, deliveries: list[NewDelivery], then: ClaimFor
    ) -> tuple[Ingested, list[Claim]]:
        """`ingest`, then `claim` as `then` says: what is due for that destination now, the new
        event's delivery among it unless an earlier one of its conversation holds it back
        (ordered). For a delivery that is sent at once (a reply's SMS), so that its delivery loop
        need not claim it. A store that can make both in one trip does (SQLite: one transaction);
        this one makes the two in turn. A claim that fails leaves the event stored and claims
        nothing (the loop claims it as usual)."""
        result = await self.ingest(event, dedup_key, deliveries)
        return result, await self._claim_or_none(then)

    async def complete_and_claim(
        self, results: list[AttemptResult], then: ClaimFor
    ) -> tuple[list[AttemptResult], list[Claim]]:
        """`complete`, then `claim` as `then` says (the follow-ups the results add are due at
        once: a reply's feedback in its thread). As `ingest_and_claim`: one trip where the store
        can, else the two in turn; a claim that fails claims nothing."""
        died = await self.complete(results)
        return died, await self._claim_or_none(then)

    async def _claim_or_none(self, then: ClaimFor) -> list[Claim]:
        """`claim` as `then` says, after a write that went through: a claim that fails claims
        nothing (the loop claims as usual)."""
        try:
            return await self.claim(
                then.destination, limit=then.limit, lease=then.lease, ordered=then.ordered, owner=then.owner
            )
        except StoreError:
            return []

    @abc.abstractmethod
    async def complete(self, results: list[AttemptResult]) -> list[AttemptResult]:
        """Record attempts and apply their decisions; a delivery no longer pending is left alone.
        Returns the results whose delivery this made dead: a late verdict that did not apply (a
        result recorded twice, an attempt whose lease ran out) is not one, so each death is
        counted once. A delivery's dead verdicts apply after its others in the batch: a
        `delivered` one for the same delivery (the peer has it) wins. A result's `follow_ups` are added, in the same
        transaction, only when its verdict applies. (On PostgreSQL all of it is bookkeeping: a
        crash of the server can lose a recorded death with its follow-ups, and the delivery is
        then attempted again, and may die, and be counted, again.)"""

    @abc.abstractmethod
    async def release(self, claims: list[Claim], *, owner: str) -> None:
        """Give leased deliveries back, unattempted (on shutdown), while `owner` still holds them."""

    @abc.abstractmethod
    async def next_due(self, destination: str) -> float | None:
        """When the next pending delivery of `destination` is due, or None."""

    @abc.abstractmethod
    async def get_conversation(self, destination: str, key: str) -> str | None: ...

    @abc.abstractmethod
    async def put_conversation(self, destination: str, key: str, value: str) -> None: ...

    @abc.abstractmethod
    async def conversation_of(self, destination: str, value: str) -> str | None:
        """The conversation key whose state for `destination` is `value` (a Slack thread's ts ->
        `texter|short code`), or None."""

    @abc.abstractmethod
    async def record_optout(self, row: OptOutRow) -> None:
        """Keep `row` as the texter's latest word to the short code, unless a later one is kept
        already. Idempotent: a retry of the same postback changes nothing."""

    @abc.abstractmethod
    async def opted_out(self, texter: str, short_code: str) -> bool:
        """Whether the texter's latest word to the short code was an opt-out."""

    async def thread_and_ledger(
        self, destination: str, key: str, value: str, which: Callable[[str | None, str | None], tuple[str, str] | None]
    ) -> tuple[tuple[str, str] | None, bool]:
        """A reply's lookups in one go (bridge.replies): the conversation state `key` of
        `destination` (or, when there is none, the conversation whose state is `value`), made
        into (texter, short code) by `which(state, conversation)` (pure: a store may call it on
        a thread of its own), and whether that texter opted out of that short code. A store
        that can make them in one trip does (SQLite: one reader round; PostgreSQL: one statement);
        this one asks in turn."""
        kept = await self.get_conversation(destination, key)
        found = which(kept, None if kept is not None else await self.conversation_of(destination, value))
        if found is None:
            return None, False
        return found, await self.opted_out(*found)

    @abc.abstractmethod
    async def list_optouts(self, number: str | None = None, *, limit: int = 1000) -> list[OptOutRow]:
        """The ledger, newest word first; with `number`, only the rows where it is the texter or
        the short code."""

    @abc.abstractmethod
    async def delivery_by_tracking_id(self, tracking_id: str) -> DeliveryRow | None:
        """The (latest) delivery a peer took under this id."""

    @abc.abstractmethod
    async def list_deliveries(self, where: DeliveryFilter) -> list[DeliveryRow]: ...

    @abc.abstractmethod
    async def update_event(self, event_id: str, body: str | None, *, release_except: str | None = None) -> list[str]:
        """Replace the stored event's JSON with `body` (None: leave it). With `release_except`,
        the event's pending deliveries that wait (due later, not leased), but for those to that
        destination, are due now, and other instances are told (PostgreSQL); returns their
        destinations. What the media step does when it ends (bridge.media.step)."""

    @abc.abstractmethod
    async def keep_meta(self, key: str, value: str) -> str:
        """The value kept under `key`, keeping `value` first when there is none: every process on
        this store gets the same one (the media links' signing key)."""

    @abc.abstractmethod
    async def get_event(self, event_id: str) -> Event | None: ...

    @abc.abstractmethod
    async def attempts(self, delivery_id: int) -> list[AttemptRow]: ...

    @abc.abstractmethod
    async def replay(self, where: DeliveryFilter, *, force: bool = False) -> list[int]:
        """Make matching dead (and with `force` delivered) deliveries pending again, due now."""

    @abc.abstractmethod
    async def abandon_unknown(
        self,
        keep: Collection[str],
        reason: str,
        *,
        follow_up: ExpiryFollowUp | None = None,
        leave_leased: bool = False,
    ) -> dict[str, int]:
        """Mark pending deliveries to any destination not in `keep` dead (the config no
        longer has it); how many, by destination (none: empty). With `follow_up`, those of its
        route get their follow-up delivery in the same transaction, when its destination is in
        `keep` (one to a destination not kept would be abandoned itself). With `leave_leased`,
        those leased right now (the lease has not run out: an attempt may be running, or about
        to) are left to their attempt, as `expire` leaves them: a reload sweeps again once the
        old config's loops have stopped and given back what they did not send. A store shared
        by several instances may skip rows another transaction holds rather than wait for them
        (PostgreSQL); the next sweep takes them."""

    @abc.abstractmethod
    async def expire(
        self, destination: str, *, max_age: float, grace: float = 0.0, follow_up: ExpiryFollowUp | None = None
    ) -> int:
        """Mark pending deliveries of `destination` stored more than `max_age` seconds ago dead,
        except those leased right now (an attempt in flight gets its own verdict; a lease that
        ran out counts as not leased) and those due less than `grace` seconds ago (the last
        retry is due at the deadline itself: the worker gets that long to make it). The reason
        says so and keeps the last error: `max_age 3s passed after 2 attempts: HTTP 500`. With
        `follow_up`, those of its route get their follow-up delivery in the same transaction. How
        many."""

    @abc.abstractmethod
    async def order_pending(self, destinations: Collection[str]) -> int:
        """Pending deliveries to these destinations (the ordered ones) queue behind each other
        from now on, also those stored while a destination was not ordered; how many changed."""

    @abc.abstractmethod
    async def list_events(self, where: EventFilter) -> list[Event]:
        """Events newest first by (received_at, id); keyset paging with `where.before`.
        ValueError for a `before` that is not a cursor (`parse_event_cursor`)."""

    async def events_page(self, where: EventFilter) -> tuple[list[Event], str | None]:
        """A page of `list_events` and the cursor of the next one (None: this is the last)."""
        events = await self.list_events(replace(where, limit=where.limit + 1))
        if len(events) <= where.limit:
            return events, None
        return events[: where.limit], event_cursor(events[where.limit - 1])

    async def deliveries_page(self, where: DeliveryFilter) -> tuple[list[DeliveryRow], int | None]:
        """A page of `list_deliveries` and the `before_id` of the next one (None: the last)."""
        rows = await self.list_deliveries(replace(where, limit=where.limit + 1))
        if len(rows) <= where.limit:
            return rows, None
        return rows[: where.limit], rows[where.limit - 1].id

    @abc.abstractmethod
    async def postbacks_per_minute(self, since: float) -> list[tuple[float, int]]:
        """How many events were received in each minute since `since`: (the minute's start as
        epoch seconds, count), oldest first; minutes without any are left out."""

    @abc.abstractmethod
    async def recent_errors(self, limit: int) -> list[DeliveryRow]:
        """The deliveries whose latest attempt failed (waiting for a retry, or dead), the most
        recent failure first, across destinations."""

    @abc.abstractmethod
    async def event_deliveries(self, event_id: str) -> list[DeliveryRow]: ...

    @abc.abstractmethod
    async def stats(self) -> dict[str, DestinationStats]:
        """Pending and dead counts and the oldest pending delivery, per destination."""

    @abc.abstractmethod
    async def purge(self, *, delivered_before: float, dead_before: float, batch: int = 500) -> int:
        """Delete one batch of finished deliveries older than the cut-offs, their attempts, and
        events left with no delivery; and one batch of dropped events (no route sent them
        anywhere) older than `delivered_before`. Returns how many deliveries and dropped events
        went: under `batch` means neither has any left."""


def open_store(url: str) -> Store:
    if url.startswith("sqlite:///"):
        from bridge.store.sqlite import SQLiteStore

        return SQLiteStore(sqlite_path(url))
    if url.startswith(("postgresql://", "postgres://")):
        from bridge.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported store URL scheme: {url.split(':', 1)[0]}")


def sqlite_path(url: str) -> str:
    """`sqlite:///bridge.db` is relative, `sqlite:////var/lib/x.db` absolute."""
    return url.removeprefix("sqlite:///")


def owner_gone(owner: str) -> bool:
    """Whether the process holding a lease is gone. Owners are `node:pid:nonce` (see
    `Dispatcher.owner`); a lease taken on another machine is left to run out."""
    try:
        node, pid_text, _ = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if node != os.uname().nodename:
        return False
    if pid == os.getpid():
        return True  # an earlier life of this pid (PID 1 in a restarted container): we hold none yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


def load_queries(name: str) -> dict[str, str]:
    """Named SQL blocks (`-- name: claim`) from a .sql file beside this module."""
    text = files("bridge.store").joinpath(name).read_text(encoding="utf-8")
    blocks: dict[str, str] = {}
    for match in re.finditer(r"^-- name: (\w+)\n(.*?)(?=^-- name: |\Z)", text, re.S | re.M):
        blocks[match.group(1)] = match.group(2).strip()
    return blocks
