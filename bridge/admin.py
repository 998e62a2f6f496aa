"""`/admin/*`: events, deliveries with every attempt, replay and reload, as JSON.

Guarded by the bearer `server.admin_token`. Without one it is open to requests made directly on
a loopback listen (the operator's own machine), refused (403) to any that came through a reverse
proxy (which on the same host connects from loopback too), and off (404) anywhere else.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from bridge import __version__
from bridge.auth import address_of, came_through_a_proxy, same
from bridge.digits import parse_uint
from bridge.errors import StoreError
from bridge.event import phone
from bridge.runtime import RUNTIME, Runtime
from bridge.store import STATUSES, DeliveryFilter, EventFilter, Store, parse_event_cursor
from bridge.validate import parse_when

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_LIMIT = 1000
MIN_TEXT = 3  # characters of a text search: what a trigram index can find (migration 0003)


class BadQuery(web.HTTPBadRequest):
    def __init__(self, message: str) -> None:
        self.message = message  # what was wrong, for a page that says it in HTML (the console)
        super().__init__(text=f'{{"error": {_json_str(message)}}}', content_type="application/json")


def _json_str(text: str) -> str:
    import json

    return json.dumps(text)


def _time(query: Any, key: str) -> float | None:
    value = query.get(key)
    if value is None or value == "":
        return None
    try:
        return parse_when(value)
    except ValueError as exc:
        raise BadQuery(f"{key}: {exc}") from None


def _limit(query: Any) -> int:
    limit = parse_uint(query.get("limit", "100"), max_digits=4)
    if limit is None or not 1 <= limit <= MAX_LIMIT:
        raise BadQuery(f"limit: expected a number from 1 to {MAX_LIMIT}")
    return limit


def _flag(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def _before_id(query: Any) -> int | None:
    value = query.get("before_id")
    if value is None or value == "":
        return None
    number = parse_uint(value)
    if number is None:
        raise BadQuery("before_id: expected a delivery id (the `next` of the page before)")
    return number


def _text(query: Any, key: str) -> str | None:
    """A text filter: None when absent or blank."""
    value = query.get(key)
    return value.strip() or None if isinstance(value, str) else None


def _number(query: Any, key: str) -> str | None:
    """A phone number or short code as people write them (`+1 555-231-2102`, `1 (555) 231 2102`)
    as the events hold it (`+15552312102`)."""
    value = _text(query, key)
    return phone(_SEPARATORS.sub("", value)) if value is not None else None


_SEPARATORS = re.compile(r"[\s().-]")


def delivery_filter(query: Any, *, default_status: str | None = None) -> DeliveryFilter:
    status = query.get("status") or default_status  # an empty field (a form's "any") filters nothing
    if status is not None and status not in STATUSES:
        raise BadQuery(f"status: expected one of {', '.join(STATUSES)}")
    return DeliveryFilter(
        status=status,
        destination=query.get("destination") or None,
        event_id=query.get("event_id") or None,
        since=_time(query, "since"),
        until=_time(query, "until"),
        limit=_limit(query),
        before_id=_before_id(query),
    )


def event_filter(query: Any) -> EventFilter:
    """The events a query asks for (the admin API's and the console's), 400 for a bad value.
    A texter's number may be given as digits (15552312102 finds +15552312102)."""
    cursor = _text(query, "cursor")
    if cursor is not None:
        try:
            parse_event_cursor(cursor)
        except ValueError:
            raise BadQuery("cursor: not a cursor this bridge gave (use the `next` of the page before)") from None
    text = _text(query, "text")
    if text is not None and len(text) < MIN_TEXT:
        raise BadQuery(f"text: at least {MIN_TEXT} characters (shorter ones would read every event)")
    return EventFilter(  # a blank field (a form's "any") filters nothing
        type=_text(query, "type"),
        sender=_text(query, "from"),
        to=_text(query, "to"),
        keyword=_text(query, "keyword"),
        since=_time(query, "since"),
        until=_time(query, "until"),
        limit=_limit(query),
        texter=_number(query, "texter"),
        short_code=_number(query, "short_code"),
        text=text,
        before=cursor,
    )


# ---------------------------------------------------------------------------- handlers


def _runtime(request: web.Request) -> Runtime:
    return request.app[RUNTIME]


def store_of(request: web.Request) -> Store:
    """The open store; StoreError (a 503, as for postbacks) while it is not open yet."""
    store = _runtime(request).store
    if store is None:
        raise StoreError("store is not open")
    return store


async def list_events(request: web.Request) -> web.Response:
    events, after = await store_of(request).events_page(event_filter(request.query))
    return web.json_response({"events": events, "next": after})


async def get_event(request: web.Request) -> web.Response:
    store = store_of(request)
    event_id = request.match_info["event_id"]
    event = await store.get_event(event_id)
    if event is None:
        return web.json_response({"error": f"no event {event_id}"}, status=404)
    deliveries = []
    for row in await store.event_deliveries(event_id):
        item = row.as_json()
        item["attempt_log"] = [a.as_json() for a in await store.attempts(row.id)]
        deliveries.append(item)
    return web.json_response({"event": event, "deliveries": deliveries})


async def _deliveries_page(request: web.Request, where: DeliveryFilter) -> web.Response:
    rows, after = await store_of(request).deliveries_page(where)
    return web.json_response({"deliveries": [r.as_json() for r in rows], "next": after})


async def list_deliveries(request: web.Request) -> web.Response:
    return await _deliveries_page(request, delivery_filter(request.query))


async def list_dead_letters(request: web.Request) -> web.Response:
    """The dead-letter list: dead deliveries, newest first (the other filters apply)."""
    return await _deliveries_page(request, replace(delivery_filter(request.query), status="dead"))


async def get_delivery(request: web.Request) -> web.Response:
    store = store_of(request)
    delivery_id = _int(request.match_info["delivery_id"])
    rows = await store.list_deliveries(DeliveryFilter(ids=(delivery_id,), limit=1))
    if not rows:
        return web.json_response({"error": f"no delivery {delivery_id}"}, status=404)
    item = rows[0].as_json()
    item["attempt_log"] = [a.as_json() for a in await store.attempts(delivery_id)]
    return web.json_response(item)


def _int(text: str) -> int:
    number = parse_uint(text)  # a row id: ASCII digits, within a signed 64-bit integer
    if number is None:
        raise BadQuery(f"{text!r} is not a delivery id")
    return number


@dataclass(frozen=True)
class Replayed:
    """What a replay did: the ids made pending again, or why nothing was (with the HTTP status
    that says so)."""

    ids: list[int]
    error: str | None = None
    status: int = 200


async def replay(runtime: Runtime, where: DeliveryFilter, *, single: bool, force: bool = False) -> Replayed:
    """Replay what `where` selects, to destinations the config has (a replay to a removed one
    would wait forever), and wake their loops. With `single` (one delivery or event), an empty
    result says why: no such delivery, a removed destination, or already delivered."""
    store = runtime.store
    if store is None:
        raise StoreError("store is not open")
    # the bridge's own (~media, ~feedback) count as configured
    configured = (*runtime.config.destinations, *sorted(runtime.config.internal))
    ids = await store.replay(replace(where, destinations=configured), force=force)
    if single and not ids:
        rows = await store.list_deliveries(where)
        if not rows:
            return Replayed([], "nothing to replay: no such delivery or event", 404)
        gone = sorted({r.destination for r in rows} - set(configured))
        if gone:
            message = f"destination {', '.join(gone)} is not in the config: add it back, reload, then replay"
            return Replayed([], message, 409)
        if any(r.status == "delivered" for r in rows) and not force:
            return Replayed([], "already delivered: add ?force=true to send it again", 409)
    if ids and runtime.dispatcher is not None:
        runtime.dispatcher.notify(configured)
    return Replayed(ids)


async def _replay(request: web.Request, where: DeliveryFilter, *, single: bool) -> web.Response:
    done = await replay(_runtime(request), where, single=single, force=_flag(request.query.get("force")))
    if done.error is None:
        return web.json_response({"replayed": done.ids})
    body: dict[str, Any] = {"error": done.error} if done.status == 404 else {"error": done.error, "replayed": []}
    return web.json_response(body, status=done.status)


async def replay_delivery(request: web.Request) -> web.Response:
    delivery_id = _int(request.match_info["delivery_id"])
    return await _replay(request, DeliveryFilter(ids=(delivery_id,), limit=1), single=True)


async def replay_event(request: web.Request) -> web.Response:
    where = DeliveryFilter(event_id=request.match_info["event_id"], limit=MAX_LIMIT)
    return await _replay(request, where, single=True)


async def replay_many(request: web.Request) -> web.Response:
    """Every dead or failed delivery of a destination and/or time range (query or JSON body)."""
    params: dict[str, Any] = dict(request.query)
    if request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            raise BadQuery("body: expected a JSON object") from None
        if not isinstance(body, dict):
            raise BadQuery("body: expected a JSON object")
        params.update({k: str(v) if not isinstance(v, str) else v for k, v in body.items()})
    if not any(params.get(k) for k in ("destination", "since", "until", "event_id")):
        raise BadQuery("say which deliveries: destination, since/until or event_id")
    params.setdefault("limit", str(MAX_LIMIT))
    where = delivery_filter(params)
    return await _replay(request, where, single=False)


async def list_optouts(request: web.Request) -> web.Response:
    """The opt-out ledger (CONTRACT §7): each texter's latest word to each short code."""
    raw = request.query.get("number", "").strip()
    number = phone(raw) if raw else None  # 15551234888 finds +15551234888
    rows = await store_of(request).list_optouts(number, limit=_limit(request.query))
    return web.json_response({"optouts": [row.as_json() for row in rows]})


async def reload(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    problems = await runtime.reload()
    if problems:
        return web.json_response({"status": "rejected", "errors": problems}, status=422)
    return web.json_response({"status": "reloaded", "source": runtime.config.source})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


# ---------------------------------------------------------------------------- wiring


def guard(request: web.Request) -> web.Response | None:
    """None when the request may use the admin API; else its 401, 403 or 404.

    With an `admin_token`, the bearer token decides, wherever the request comes from. Without
    one, only a request made directly on a loopback listen gets in (CONTRACT §4): one that came
    through a proxy is refused (403, saying why) whatever its address, and on any other listen the
    admin API is not there (404)."""
    runtime = _runtime(request)
    server = runtime.config.server
    token = server.admin_token
    if token is None:
        proxied = came_through_a_proxy(request.remote, request.headers, server.auth)
        if proxied is not None:
            message = (
                f"forbidden: this request came through a proxy ({proxied}); without server.admin_token the"
                " admin API answers only requests made directly on loopback. Set server.admin_token and send"
                " it as Authorization: Bearer <token>"
            )
            return web.json_response({"error": message}, status=403)
        address = address_of(request.remote)
        if server.loopback and address is not None and address.is_loopback:
            return None
        return web.json_response({"error": "not found"}, status=404)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and same(given.strip(), token.reveal()):
        return None
    return web.json_response({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"})


def guarded(handler: Handler) -> Handler:
    """The handler behind the admin token (on each route rather than a middleware, which every
    postback would pass through too)."""

    @functools.wraps(handler)
    async def check(request: web.Request) -> web.StreamResponse:
        denied = guard(request)
        return denied if denied is not None else await handler(request)

    return check


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/openapi.json", guarded(openapi))
    r.add_get("/admin/events", guarded(list_events))
    r.add_get("/admin/events/{event_id}", guarded(get_event))
    r.add_post("/admin/events/{event_id}/replay", guarded(replay_event))
    r.add_get("/admin/deliveries", guarded(list_deliveries))
    r.add_get("/admin/deliveries/{delivery_id}", guarded(get_delivery))
    r.add_post("/admin/deliveries/{delivery_id}/replay", guarded(replay_delivery))
    r.add_get("/admin/dead-letters", guarded(list_dead_letters))
    r.add_post("/admin/replay", guarded(replay_many))
    r.add_post("/admin/reload", guarded(reload))
    r.add_get("/admin/optouts", guarded(list_optouts))


def _param(name: str, description: str, schema: dict[str, Any] | None = None, where: str = "query") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "description": description,
            "schema": schema or {"type": "string"}}  # fmt: skip


# an ISO 8601 time, or a duration meaning that long ago (`2h`), as the CLI's --since/--until
_TIME = {
    "anyOf": [
        {"type": "string", "format": "date-time"},
        {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"},
    ]
}
_DELIVERY_FILTERS = [
    _param(
        "status",
        "pending, delivered, dead, or failed (pending after a failed attempt, waiting for its retry)",
        {"type": "string", "enum": list(STATUSES)},
    ),
    _param("destination", "destination name"),
    _param("event_id", "evt_..."),
    _param("since", "created at or after", _TIME),
    _param("until", "created before", _TIME),
    _param("limit", "at most this many", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
    _param(
        "before_id",
        "the next page: the `next` of the page before (ids below it)",
        {"type": "integer", "minimum": 1, "example": 1000},
    ),
]
# an example of a cursor, as `event_cursor` makes them
_CURSOR_EXAMPLE = "MjAyNi0xMS0yMlQxMDowMDowMC4xMjNafGV2dF8wMUpEN1FOT1RUSEVSRTAwMDAwMDAwMDA"
_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_OK = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}
_REPLAYED = {
    "description": "replayed delivery ids",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Replayed"}}},
}
_FORCE = _param("force", "also send delivered ones again", {"type": "boolean"})

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "postback-bridge admin API", "version": __version__},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
            "Replayed": {
                "type": "object",
                "properties": {"replayed": {"type": "array", "items": {"type": "integer"}}},
                "required": ["replayed"],
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/admin/events": {
            "get": {
                "summary": "List events, newest first",
                "parameters": [
                    _param("type", "sms.received, mms.received, ..."),
                    _param("from", "sender, E.164"),
                    _param("to", "short code"),
                    _param("keyword", "keyword, any case"),
                    _param("since", "received at or after", _TIME),
                    _param("until", "received before", _TIME),
                    _param("limit", "at most this many", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
                    _param("texter", "a texter's number, either side (`from`, or `to` of a reply): E.164 or digits"),
                    _param("short_code", "a short code, either side (with texter: one conversation, both ways)"),
                    _param(
                        "text",
                        f"a part of the text, any case ({MIN_TEXT} characters or more)",
                        {"type": "string", "minLength": MIN_TEXT, "example": "pizza"},
                    ),
                    _param(
                        "cursor",
                        "the next page: the `next` of the page before",
                        {"type": "string", "example": _CURSOR_EXAMPLE},
                    ),
                ],
                "responses": {"200": _OK, "400": _ERROR, "401": _ERROR},
            }
        },
        "/admin/events/{event_id}": {
            "get": {
                "summary": "One event with its deliveries and every attempt",
                "parameters": [_param("event_id", "evt_...", where="path")],
                "responses": {"200": _OK, "401": _ERROR, "404": _ERROR},
            }
        },
        "/admin/events/{event_id}/replay": {
            "post": {
                "summary": "Replay the dead and failed deliveries of one event (same event id)",
                "parameters": [_param("event_id", "evt_...", where="path"), _FORCE],
                "responses": {"200": _REPLAYED, "401": _ERROR, "404": _ERROR, "409": _ERROR},
            }
        },
        "/admin/deliveries": {
            "get": {
                "summary": "List deliveries, newest first",
                "parameters": _DELIVERY_FILTERS,
                "responses": {"200": _OK, "400": _ERROR, "401": _ERROR},
            }
        },
        "/admin/dead-letters": {
            "get": {
                "summary": "The dead-letter list: dead deliveries, newest first",
                "parameters": [p for p in _DELIVERY_FILTERS if p["name"] != "status"],
                "responses": {"200": _OK, "400": _ERROR, "401": _ERROR},
            }
        },
        "/admin/deliveries/{delivery_id}": {
            "get": {
                "summary": "One delivery with every attempt",
                "parameters": [_param("delivery_id", "delivery id", {"type": "integer"}, where="path")],
                "responses": {"200": _OK, "400": _ERROR, "401": _ERROR, "404": _ERROR},
            }
        },
        "/admin/deliveries/{delivery_id}/replay": {
            "post": {
                "summary": "Replay one delivery (a delivered one needs force)",
                "parameters": [_param("delivery_id", "delivery id", {"type": "integer"}, where="path"), _FORCE],
                "responses": {"200": _REPLAYED, "400": _ERROR, "401": _ERROR, "404": _ERROR, "409": _ERROR},
            }
        },
        "/admin/replay": {
            "post": {
                "summary": "Replay every dead and failed delivery of a destination and/or time range",
                "parameters": [p for p in _DELIVERY_FILTERS if p["name"] not in ("status", "before_id")] + [_FORCE],
                "responses": {"200": _REPLAYED, "400": _ERROR, "401": _ERROR},
            }
        },
        "/admin/optouts": {
            "get": {
                "summary": "The opt-out ledger: each texter's latest word (STOP, START, SUB N302/N301) per short code",
                "parameters": [
                    _param("number", "only this texter or short code (E.164 for a texter: +15551234888)"),
                    _param("limit", "at most this many", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
                ],
                "responses": {"200": _OK, "400": _ERROR, "401": _ERROR},
            }
        },
        "/admin/reload": {
            "post": {
                "summary": "Reload the config file; on any error the old config stays",
                "responses": {"200": _OK, "401": _ERROR, "422": _ERROR},
            }
        },
    },
}
