"""The console's pages (CONTRACT §8): sign-in, overview, events, an event, deliveries and dead
letters with replay, conversations, routes. The same filters and store queries as the admin API
(`bridge.admin`), rendered as HTML.

Every page is behind a session (`signed_in`); every POST carries the CSRF token of its session
(`form_post`). Lists that update while open are fetched again by htmx with `?part=live`, which
renders only that region.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from bridge import admin
from bridge.auth import Caller, came_over_https, client_ip, same
from bridge.console import session as sessions
from bridge.console.render import PAGE_HEADERS, chart, page
from bridge.destinations.base import conversation_key
from bridge.destinations.skycore import OPTED_OUT
from bridge.digits import parse_uint
from bridge.dryrun import describe_match, route_report, routes_said
from bridge.errors import PostbackError, StoreError
from bridge.event import REPLY_TYPE, TYPES, Event
from bridge.replies import ROUTE as REPLIES_ROUTE
from bridge.routing import route
from bridge.runtime import RUNTIME, Runtime
from bridge.store import STATUSES, DeliveryFilter, DeliveryRow, EventFilter, Store
from bridge.validate import parse_when


class Form(Protocol):
    """A posted form (aiohttp's MultiDictProxy): a field, or every value of a repeated one."""

    def get(self, key: str, /) -> Any: ...
    def getall(self, key: str, default: list[Any], /) -> list[Any]: ...


log = logging.getLogger("bridge.console")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FormHandler = Callable[[web.Request, Form], Awaitable[web.StreamResponse]]
PAGE_SIZE = 50
ATTEMPTS = web.AppKey("console_attempts", sessions.Attempts)


# ---------------------------------------------------------------------------- sign-in


def _runtime(request: web.Request) -> Runtime:
    return request.app[RUNTIME]


def _key(request: web.Request) -> bytes | None:
    """The session signing key, from the admin_token in force; None without one."""
    token = _runtime(request).config.server.admin_token
    return sessions.signing_key(token.reveal()) if token is not None else None


def _session(request: web.Request) -> sessions.Session | None:
    key = _key(request)
    return None if key is None else sessions.read_session(key, request.cookies.get(sessions.SESSION_COOKIE))


def _secure(request: web.Request) -> bool:
    return came_over_https(request.remote, request.headers, _runtime(request).config.server.auth)


def _set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/ui/", httponly=True, samesite="Strict", secure=_secure(request)
    )


def _no_token() -> web.Response:
    return page(
        "message.html",
        {"title": "The console is off", "message": "Set server.admin_token in the config to use the console.",
         "signed_in": False, "csrf": ""},
        status=404,
    )  # fmt: skip


def _next_path(value: str | None) -> str:
    """Where to go after signing in: a console path of ours, never another site."""
    if value and value.startswith("/ui/") and "\\" not in value and value.isprintable():
        return value
    return "/ui/"


def _login_form(request: web.Request, *, error: str | None = None, status: int = 200) -> web.Response:
    key = _key(request)
    assert key is not None
    nonce = request.cookies.get(sessions.LOGIN_COOKIE) or sessions.new_nonce()
    response = page(
        "login.html",
        {"csrf": sessions.csrf_token(key, nonce, "login"), "next": _next_path(request.query.get("next")),
         "error": error, "signed_in": False},
        status=status,
    )  # fmt: skip
    _set_cookie(request, response, sessions.LOGIN_COOKIE, nonce, sessions.LOGIN_FORM_SECONDS)
    return response


async def login_page(request: web.Request) -> web.Response:
    if _key(request) is None:
        return _no_token()
    if _session(request) is not None:
        return _redirect(_next_path(request.query.get("next")))
    return _login_form(request)


async def login(request: web.Request) -> web.Response:
    key = _key(request)
    token = _runtime(request).config.server.admin_token
    if key is None or token is None:
        return _no_token()
    form = await request.post()
    if not sessions.csrf_ok(key, request.cookies.get(sessions.LOGIN_COOKIE), _field(form, "csrf"), "login"):
        return _forbidden("This sign-in form has expired. Open the sign-in page again.")
    attempts = request.app[ATTEMPTS]
    client = client_ip(Caller.of(request), _runtime(request).config.server.auth) or "?"
    wait = attempts.wait(client)
    if wait:
        message = f"Too many attempts. Wait {int(wait) + 1} seconds, then try again."
        return _login_form(request, error=message, status=429)
    if not same(_field(form, "token") or "", token.reveal()):
        attempts.failed(client)
        return _login_form(request, error="Sign-in failed. Check the token and try again.", status=401)
    attempts.succeeded(client)
    _, cookie = sessions.new_session(key)
    response = _redirect(_next_path(_field(form, "next")))
    _set_cookie(request, response, sessions.SESSION_COOKIE, cookie, sessions.SESSION_SECONDS)
    response.del_cookie(sessions.LOGIN_COOKIE, path="/ui/")
    return response


def _field(form: Form, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _redirect(target: str) -> web.Response:
    """A 303 to `target`, returned (the app's middleware answers a raised one in JSON)."""
    return web.Response(status=303, headers={"Location": target, **PAGE_HEADERS})


def _forbidden(message: str) -> web.Response:
    return page("message.html", {"title": "Forbidden", "message": message, "signed_in": False, "csrf": ""}, status=403)


def signed_in(handler: Handler) -> Handler:
    """The page for a signed-in session; else to the sign-in form (an htmx poll is told to go
    there too), or 404 when the console is off (no admin_token)."""

    @functools.wraps(handler)
    async def check(request: web.Request) -> web.StreamResponse:
        if _key(request) is None:
            return _no_token()
        current = _session(request)
        if current is None:
            target = "/ui/login?" + urlencode({"next": request.path_qs if request.method == "GET" else "/ui/"})
            if request.headers.get("HX-Request"):
                return web.Response(status=401, headers={"HX-Redirect": target})
            if request.method != "GET":
                return _forbidden("Your session has ended. Sign in again, then repeat what you did.")
            return _redirect(target)
        try:
            return await handler(request)
        except StoreError as exc:  # not open yet, or unreachable: the page says so (the log too)
            log.warning("store unavailable", extra={"error": str(exc), "path": request.path})
            message = "The bridge cannot read its store right now. Try again in a moment."
            context = _context(request, "", title="The store is not reachable", message=message)
            return page("message.html", context, status=503, headers={"Retry-After": "5"})

    return check


def form_post(handler: FormHandler) -> Handler:
    """A POST of a signed-in session whose form carries that session's CSRF token; else 403."""

    @signed_in
    @functools.wraps(handler)
    async def check(request: web.Request) -> web.StreamResponse:
        key = _key(request)
        assert key is not None
        form = await request.post()
        current = _session(request)
        assert current is not None  # signed_in saw to it
        if not sessions.csrf_ok(key, current.id, _field(form, "csrf")):
            return _forbidden("This form did not come from your console session (no valid CSRF token). "
                              "Reload the page and try again.")  # fmt: skip
        return await handler(request, form)

    return check


async def logout(request: web.Request, form: Form) -> web.StreamResponse:
    response = _redirect("/ui/login")
    response.del_cookie(sessions.SESSION_COOKIE, path="/ui/")
    return response


def _context(request: web.Request, nav: str, **more: Any) -> dict[str, Any]:
    key = _key(request)
    assert key is not None
    current = _session(request)  # signed_in saw to it: read again (an HMAC), not kept on the request
    assert current is not None
    return {"nav": nav, "csrf": sessions.csrf_token(key, current.id), "signed_in": True, "live": False, **more}


def _bad_query(request: web.Request, nav: str, exc: admin.BadQuery) -> web.Response:
    context = _context(request, nav, title="That filter does not work", message=exc.message)
    return page("message.html", context, status=400)


# ---------------------------------------------------------------------------- overview


def destination_state(runtime: Runtime, name: str, now: float) -> tuple[str, float | None]:
    """`up`; `probing` (it looks down: one delivery at a time, the next at the time given); or
    `paused` (a Retry-After: nothing is sent until the time given). As this instance's delivery
    loop sees it."""
    dispatcher = runtime.dispatcher
    health = dispatcher.health.get(name) if dispatcher is not None else None
    if health is None:
        return "up", None
    until = health.paused_until if health.paused_until > now else None
    if health.down:
        return "probing", until
    if until is not None:
        return "paused", until
    return "up", None


@signed_in
async def overview(request: web.Request) -> web.StreamResponse:
    runtime, store, now = _runtime(request), admin.store_of(request), time.time()
    stats = await store.stats()
    rows = []
    for name in sorted(set(runtime.config.destinations) | set(stats)):
        spec = runtime.config.destinations.get(name)
        state, until = destination_state(runtime, name, now) if spec else ("removed", None)
        current = stats.get(name)
        oldest = current.oldest_pending if current else None
        rows.append({
            "name": name, "type": spec.type if spec else "-", "state": state, "until": until,
            "pending": current.pending if current else 0, "dead": current.dead if current else 0,
            "oldest_age": now - oldest if oldest else None,
        })  # fmt: skip
    oldest_all = [r["oldest_age"] for r in rows if r["oldest_age"] is not None]
    context = _context(
        request,
        "overview",
        destinations=rows,
        pending=sum(r["pending"] for r in rows),
        dead=sum(r["dead"] for r in rows),
        oldest=max(oldest_all) if oldest_all else None,
        chart=chart(await store.postbacks_per_minute(now - 3600)),
        errors=await store.recent_errors(10),
        live=True,
    )
    return page("overview.html" if request.query.get("part") != "live" else "_overview_live.html", context)


# ---------------------------------------------------------------------------- events


def _link(path: str, query: Mapping[str, str], drop: tuple[str, ...], **add: str) -> str:
    """`path` with the query's non-empty fields but `drop`, and `add`: the link to a next page."""
    kept = [(k, v) for k, v in query.items() if k not in drop and k not in add and v]
    return f"{path}?{urlencode([*kept, *add.items()])}"


@signed_in
async def events(request: web.Request) -> web.StreamResponse:
    query = {**request.query, "limit": str(PAGE_SIZE)}
    try:
        where = admin.event_filter(query)
    except admin.BadQuery as exc:
        return _bad_query(request, "events", exc)
    found, after = await admin.store_of(request).events_page(where)
    first_page = not request.query.get("cursor")  # only the newest page takes new events live
    context = _context(
        request,
        "events",
        events=found,
        query=request.query,
        types=sorted(TYPES),
        live_url=_link(request.path, request.query, ("part",), part="live"),
        next_page=None if after is None else _link(request.path, request.query, ("part",), cursor=after),
        live=first_page,
    )
    return page("events.html" if request.query.get("part") != "live" else "_event_rows.html", context)


@signed_in
async def event_page(request: web.Request) -> web.StreamResponse:
    runtime, store = _runtime(request), admin.store_of(request)
    event_id = request.match_info["event_id"]
    event = await store.get_event(event_id)
    if event is None:
        context = _context(request, "events", title="No such event", message=f"There is no event {event_id}.")
        return page("message.html", context, status=404)
    deliveries = []
    for row in await store.event_deliveries(event_id):
        deliveries.append({"row": row, "label": status_label(row), "attempts": await store.attempts(row.id)})
    decision = route(event, runtime.config.routes, runtime.config.default)
    context = _context(
        request,
        "events",
        event=event,
        deliveries=deliveries,
        decision=decision,
        routes_line=routes_said({"routes": decision.routes, "default": decision.defaulted}),
        conversation=tuple(conversation_key(event).split("|", 1)),
        notice=_notice(request),
        live=True,
    )
    return page("event.html" if request.query.get("part") != "live" else "_event_deliveries.html", context)


def status_label(row: DeliveryRow) -> str:
    """What a delivery's state is called on the page: `retrying` for one pending after a failed
    attempt (`failed` in the filters)."""
    if row.status == "pending" and row.last_error:
        return "retrying"
    return row.status


# ---------------------------------------------------------------------------- deliveries, replay


def _notice(request: web.Request) -> str | None:
    """What the last POST did, told by the page it sends back to (fixed texts: nothing from the
    query string is shown as it is)."""
    done = request.query.get("done")
    count = request.query.get("n", "")
    if done == "replayed" and count.isdigit():
        noun = "delivery" if count == "1" else "deliveries"
        return f"Replayed {count} {noun}: due now."
    if done == "nothing":
        return "Nothing was replayed: only dead and failed deliveries are (delivered ones with Send again)."
    if done == "error":
        return {
            "404": "Nothing to replay: there is no such delivery.",
            "409": "Not replayed: it is delivered already, or its destination is no longer in the config.",
        }.get(count, "Not replayed.")
    return None


async def _deliveries(request: web.Request, *, dead_letters: bool) -> web.StreamResponse:
    nav = "dead" if dead_letters else "deliveries"
    query = {**request.query, "limit": str(PAGE_SIZE)}
    try:
        where = admin.delivery_filter(query)
    except admin.BadQuery as exc:
        return _bad_query(request, nav, exc)
    if dead_letters:
        where = replace(where, status="dead")
    rows, after = await admin.store_of(request).deliveries_page(where)
    context = _context(
        request,
        nav,
        rows=[{"row": r, "label": status_label(r)} for r in rows],
        query=request.query,
        statuses=STATUSES,
        dead_letters=dead_letters,
        destinations=sorted(_runtime(request).config.destinations),
        here=request.path_qs,
        live_url=_link(request.path, request.query, _NOT_KEPT, part="live"),
        filter_fields=[(k, v) for k, v in request.query.items() if k in _FILTER_KEYS and v],
        next_page=None
        if after is None
        else _link(request.path, request.query, ("part", "done", "n"), before_id=str(after)),
        notice=_notice(request),
        live=True,
    )
    return page("deliveries.html" if request.query.get("part") != "live" else "_delivery_rows.html", context)


_FILTER_KEYS = ("status", "destination", "event_id", "since", "until")
_NOT_KEPT = ("part", "done", "n")  # what a link to the next page leaves out


@signed_in
async def deliveries(request: web.Request) -> web.StreamResponse:
    return await _deliveries(request, dead_letters=False)


@signed_in
async def dead_letters(request: web.Request) -> web.StreamResponse:
    return await _deliveries(request, dead_letters=True)


def _back(form: Form, fallback: str, **done: str) -> web.Response:
    """The redirect to the page the form came from, saying what was done (`done=`, `n=`)."""
    base, _, query = _next_path(_field(form, "back") or fallback).split("#", 1)[0].partition("?")
    return _redirect(_link(base, dict(parse_qsl(query)), ("done", "n"), **done))


async def _replayed(request: web.Request, form: Form, where: DeliveryFilter, fallback: str) -> web.Response:
    """Replay one delivery or event; the redirect back that says how it went."""
    force = _field(form, "force") == "1"
    done = await admin.replay(_runtime(request), where, single=True, force=force)
    if done.error is not None:
        return _back(form, fallback, done="error", n=str(done.status))
    return _back(form, fallback, done="replayed", n=str(len(done.ids)))


async def replay_one(request: web.Request, form: Form) -> web.StreamResponse:
    delivery_id = parse_uint(request.match_info["delivery_id"])
    if delivery_id is None:
        return _back(form, "/ui/deliveries", done="error", n="404")
    return await _replayed(request, form, DeliveryFilter(ids=(delivery_id,), limit=1), "/ui/deliveries")


async def replay_event(request: web.Request, form: Form) -> web.StreamResponse:
    event_id = request.match_info["event_id"]
    where = DeliveryFilter(event_id=event_id, limit=admin.MAX_LIMIT)
    return await _replayed(request, form, where, f"/ui/events/{event_id}")


def replayable(row: DeliveryRow) -> bool:
    """Dead, or pending after a failed attempt: what a replay takes (store.replay, without force)."""
    return row.status == "dead" or (row.status == "pending" and row.last_error is not None)


async def replay_many(request: web.Request, form: Form) -> web.StreamResponse:
    """Two steps: the selection (ticked ids, or all that a filter shows) and a page that says how
    many it is; then, confirmed, exactly those ids are replayed."""
    store = admin.store_of(request)
    back = _next_path(_field(form, "back") or "/ui/deliveries")
    if _field(form, "confirm") == "yes":
        ids = _ids(form.getall("ids", []))[: admin.MAX_LIMIT]
        if not ids:
            return _back(form, back, done="nothing")
        done = await admin.replay(_runtime(request), DeliveryFilter(ids=tuple(ids), limit=len(ids)), single=False)
        return _back(form, back, done="replayed", n=str(len(done.ids)))
    skipped = 0
    if _field(form, "scope") == "filter":
        filters = {k: v for k in _FILTER_KEYS if (v := _field(form, k))}
        if _field(form, "dead_letters") == "1":
            filters["status"] = "dead"
        try:
            where = admin.delivery_filter({**filters, "limit": str(admin.MAX_LIMIT)})
        except admin.BadQuery as exc:
            return _bad_query(request, "deliveries", exc)
        if where.status in (None, "dead", "failed"):
            rows = [r for r in await _matching(store, where) if replayable(r)]
        else:
            rows = []  # pending ones are on their way, delivered ones need Send again
        more = len(rows) > admin.MAX_LIMIT
        rows = rows[: admin.MAX_LIMIT]
        said = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in filters.items())
        what = f"all that this filter shows ({said})" if said else "all that the list shows (no filter)"
        which = _WHICH.get(where.status or "", _WHICH[""])
    else:
        ids = _ids(form.getall("ids", []))
        found = await store.list_deliveries(DeliveryFilter(ids=tuple(ids), limit=max(1, len(ids)))) if ids else []
        rows, more, what, which = [r for r in found if replayable(r)], False, "the ones you ticked", _WHICH[""]
        skipped = len(ids) - len(rows)
    nav = "dead" if back.startswith("/ui/dead-letters") else "deliveries"
    context = _context(request, nav, rows=rows, more=more, what=what, which=which, back=back, skipped=skipped)
    return page("confirm.html", context)


# What a bulk replay takes, by the filter's status (none: both).
_WHICH = {
    "dead": "only dead deliveries",
    "failed": "only deliveries waiting for a retry after a failed attempt",
    "": "the dead deliveries and those waiting for a retry after a failed attempt",
}


async def _matching(store: Store, where: DeliveryFilter) -> list[DeliveryRow]:
    """The dead and failed deliveries a filter shows (the filter's own status, or both), up to
    one more than a replay takes."""
    limit = admin.MAX_LIMIT + 1
    if where.status is not None:
        return await store.list_deliveries(replace(where, limit=limit))
    rows = await store.list_deliveries(replace(where, status="dead", limit=limit))
    rows += await store.list_deliveries(replace(where, status="failed", limit=limit))
    return sorted(rows, key=lambda r: r.id, reverse=True)


def _ids(values: list[Any]) -> list[int]:
    ids = []
    for value in values:
        number = parse_uint(value) if isinstance(value, str) else None
        if number is not None:
            ids.append(number)
    return list(dict.fromkeys(ids))


# ---------------------------------------------------------------------------- conversations

INBOUND = ("sms.received", "mms.received")
REPORTS_SKEW = 60.0  # seconds: instances' clocks may differ a little (a reply stored by one, its report by another)


def reply_state(event: Event, deliveries: list[DeliveryRow], reports: Mapping[str, Event]) -> tuple[str, str]:
    """A reply's state (CONTRACT §8: sent, delivered, failed, not sent, or sending while its
    SMS waits to go) and what says so: why it was not sent (opted out, too long: then it has no
    SMS delivery), its delivery to the SMS destination, then Skycore's delivery report for the
    TRACKINGID that delivery got (`reports`, by tracking id)."""
    slack = event["fields"].get("slack") if isinstance(event.get("fields"), dict) else None
    not_sent = slack.get("not_sent") if isinstance(slack, dict) else None
    if isinstance(not_sent, str):
        return "not sent", not_sent.removeprefix("Not sent: ")
    sms = next((d for d in deliveries if d.route == REPLIES_ROUTE), None)
    if sms is None:
        return "not sent", "no SMS delivery was stored for it"
    if sms.status == "pending":
        return "sending", sms.last_error or "waiting for its turn"
    if sms.status == "dead":
        if (sms.last_error or "").startswith(OPTED_OUT):
            return "not sent", sms.last_error or ""
        return "failed", sms.last_error or ""
    report = reports.get(sms.tracking_id or "")
    code = (report.get("code") or "").upper() if report is not None else ""
    if code == "N202":
        return "delivered", f"delivery report {code}"
    if code.startswith("E"):
        return "failed", f"delivery report {code}"
    return "sent", f"Skycore took it (TRACKINGID {sms.tracking_id})" if sms.tracking_id else "Skycore took it"


@signed_in
async def conversations(request: web.Request) -> web.StreamResponse:
    store = admin.store_of(request)
    query = {**request.query, "limit": str(PAGE_SIZE)}
    try:
        where = admin.event_filter({k: query.get(k, "") for k in ("texter", "short_code", "cursor", "limit")})
    except admin.BadQuery as exc:
        return _bad_query(request, "conversations", exc)
    if where.texter is None or where.short_code is None:
        recent = await store.list_events(EventFilter(limit=200))
        pairs = dict.fromkeys(
            tuple(conversation_key(e).split("|", 1)) for e in recent if e["type"] in (*INBOUND, REPLY_TYPE)
        )
        context = _context(request, "conversations", texter=request.query.get("texter", ""),
                           short_code=request.query.get("short_code", ""), recent=list(pairs)[:30])  # fmt: skip
        return page("conversations.html", context)
    found, after = await store.events_page(where)
    # Skycore's delivery reports of this conversation (newest first, so the first of a tracking id
    # is its latest word), also those newer than this page; none from before the page's oldest
    # message, which cannot be about a reply on it (a report follows its SMS, which follows the
    # reply): a busy texter's thousand older ones took 30-50 ms to read (bench/console.py)
    oldest = min((parse_when(e["received_at"]) for e in found), default=None)
    since = None if oldest is None else oldest - REPORTS_SKEW
    statuses = await store.list_events(
        replace(where, type="sms.status", before=None, since=since, limit=admin.MAX_LIMIT)
    )
    reports: dict[str, Event] = {}
    for e in statuses:
        reports.setdefault(e.get("tracking_id") or "", e)
    messages = []
    for event in reversed(found):  # oldest first, as a chat reads
        if event["type"] == REPLY_TYPE:
            state, why = reply_state(event, await store.event_deliveries(event["id"]), reports)
            slack = event["fields"].get("slack") if isinstance(event.get("fields"), dict) else None
            who = slack.get("user") if isinstance(slack, dict) else None
            label = f"Reply by {who} in Slack" if isinstance(who, str) else "Reply"
            messages.append({"event": event, "label": label, "outbound": True, "state": state, "why": why})
        elif event["type"] != "sms.status":
            label = "Texter" if event["type"] in INBOUND else event["type"]
            messages.append({"event": event, "label": label, "outbound": False, "state": None, "why": None})
    optouts = [
        r for r in await store.list_optouts(where.texter, limit=admin.MAX_LIMIT) if r.short_code == where.short_code
    ]
    context = _context(
        request,
        "conversations",
        texter=where.texter,
        short_code=where.short_code,
        messages=messages,
        optout=optouts[0] if optouts else None,
        earlier=None if after is None else _link(request.path, request.query, _NOT_KEPT, cursor=after),
        live_url=_link(request.path, request.query, _NOT_KEPT, part="live"),
        live=not request.query.get("cursor"),
    )
    return page("conversation.html" if request.query.get("part") != "live" else "_messages.html", context)


# ---------------------------------------------------------------------------- routes


def _routes_context(request: web.Request, **more: Any) -> dict[str, Any]:
    runtime = _runtime(request)
    config = runtime.config
    routes = [
        {"name": r.name, "match": describe_match(r.match), "to": r.to, "continue": r.continue_} for r in config.routes
    ]
    destinations = [(name, d.type_name, d.describe()) for name, d in sorted(runtime.destinations.items())]
    defaults = {"tried": None, "postback": "", "report": None, "problem": None, "reload": None}
    return _context(request, "routes", routes=routes, default=config.default, destinations=destinations,
                    source=str(config.source) if config.source else None, **{**defaults, **more})  # fmt: skip


@signed_in
async def routes_page(request: web.Request) -> web.StreamResponse:
    return page("routes.html", _routes_context(request))


async def try_route(request: web.Request, form: Form) -> web.StreamResponse:
    runtime = _runtime(request)
    text = _field(form, "postback") or ""
    try:
        report = route_report(
            text.encode(), runtime.config, runtime.destinations, runtime.carriers, name="the pasted postback"
        )
    except PostbackError as exc:
        context = _routes_context(request, tried=True, postback=text, problem=f"Not a postback: {exc}")
        return page("routes.html", context, status=422)
    report["routes_line"] = routes_said(report)
    return page("routes.html", _routes_context(request, tried=True, postback=text, report=report))


async def reload_config(request: web.Request, form: Form) -> web.StreamResponse:
    problems = await _runtime(request).reload()
    context = _routes_context(request, reload={"ok": not problems, "problems": problems})
    return page("routes.html", context, status=422 if problems else 200)
