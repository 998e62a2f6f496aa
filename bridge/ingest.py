"""Taking a postback in: admit the caller, parse, normalize, route, store, answer (CONTRACT §4).
The one path that both aiohttp's handler (bridge.app) and the postback lane (bridge.lane) call.

Never a 500: bad input is a 4xx saying what is wrong; anything unexpected, or a store that
cannot take the write, is a 503 so that Skycore retries later.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from bridge import logs
from bridge.answers import STORE_DOWN, Reply, answer, refusal
from bridge.auth import Caller, check_auth
from bridge.config import FEEDBACK, FEEDBACK_REPORT, MEDIA_DESTINATION, REPLY_ROUTE, Config
from bridge.destinations.base import conversation_key
from bridge.errors import PostbackError, StoreError
from bridge.event import Event, dedup_key, normalize, says_delivered_or_failed
from bridge.ids import event_id
from bridge.optouts import Word, word_of
from bridge.postback import parse
from bridge.routing import route
from bridge.runtime import Runtime
from bridge.store import Ingested, NewDelivery, OptOutRow, Store

log = logging.getLogger("bridge.ingest")


async def read_body(request: web.Request, limit: int, patience: float) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (chunked too), 408 if too slow.

    aiohttp has already undone any Content-Encoding, so the limit is on the decompressed size
    (a gzip bomb stops at `limit`); a body that does not decode is a 400, not our fault.
    """
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    chunks, size = [], 0
    content = request.content
    if content.is_eof() and content.exception() is None:
        # all of it came with the headers (a postback is small): nothing to wait for, no timer
        body = content.read_nowait()
        if len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
        return body
    try:
        async with asyncio.timeout(patience):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
                chunks.append(chunk)
    except web.RequestPayloadError as exc:
        reason = getattr(exc.__cause__, "message", None) or "malformed"
        message = json.dumps({"error": f"cannot read the body: {reason}"})
        raise web.HTTPBadRequest(text=message, content_type="application/json") from None
    return b"".join(chunks)


def admit(runtime: Runtime, caller: Caller) -> Reply | None:
    """None when `caller` may post here; else the 401/403/404 to answer."""
    auth = runtime.config.server.auth
    if caller.path_token is not None and not auth.token:
        return refusal(404, "not found")
    denied = check_auth(caller, auth)
    if denied is not None:
        runtime.metrics.postback("", "rejected", "auth")
    return denied


async def take(runtime: Runtime, body: bytes, content_type: str, remote: str | None) -> Reply:
    """Parse, normalize, route and store one postback's body: the 200, 400 or 503 to answer."""
    try:
        fields = parse(body, content_type)
    except PostbackError as exc:
        runtime.metrics.postback("", "rejected", "invalid")
        log.info("postback rejected", extra={"reason": str(exc), "remote": remote})
        return refusal(400, str(exc))

    config = runtime.hold()  # the config now, which may be newer than the request's
    try:
        return await _take(runtime, config, fields)
    finally:
        runtime.release(config)


async def _take(runtime: Runtime, config: Config, fields: dict[str, Any]) -> Reply:
    """Normalize, route and store one postback; the 200 (or 503) to answer."""
    metrics = runtime.metrics
    received = datetime.now(UTC)
    event = normalize(fields, event_id=event_id(), received_at=received, carriers=runtime.carriers)
    origin = event["origin"][:32]
    decision = route(event, config.routes, config.default)

    # A dropped event is stored too, with no deliveries: a 200 means stored (CONTRACT §4), and
    # Skycore's retry of it is then a "duplicate" with the same id.
    store = runtime.store
    assert store is not None
    conversation = conversation_key(event)
    destinations = config.destinations
    deliveries = [NewDelivery(d, r, conversation, destinations[d].ordered) for d, r in decision.destinations]
    media = config.media
    if media is not None and deliveries and event["media"]:
        # its files are fetched after the 200 (CONTRACT §9); its deliveries wait for that step,
        # which makes them due as soon as it ends (bridge.media.step), at most media.wait
        deliveries = [
            NewDelivery(MEDIA_DESTINATION, "media", conversation, ordered=False),
            *(replace(d, delay=media.wait) for d in deliveries),
        ]
    patience = runtime.patience
    task = patience.start()  # the store's answers within it, the lookup of a report's reply too
    try:
        if FEEDBACK in config.internal and says_delivered_or_failed(event) and await _on_a_reply(store, event):
            # the report on a reply's SMS: the thread shows it, durable with the event
            deliveries.append(NewDelivery(FEEDBACK, FEEDBACK_REPORT, conversation, False))
        result = await store.ingest(event, dedup_key(event), deliveries)
    except (StoreError, asyncio.CancelledError) as exc:
        if isinstance(exc, asyncio.CancelledError) and not patience.ran_out(task):
            raise
        metrics.store_up.set(0)
        metrics.postback(origin, "unavailable", "store")
        reason = str(exc) if isinstance(exc, StoreError) else f"no answer within {patience.seconds:g}s"
        log.error("store cannot take postback", extra={"error": reason})
        return STORE_DOWN
    finally:
        patience.stop(task)
    said = word_of(event)
    if said is not None and not await _keep_word(store, said, result):
        metrics.postback(origin, "unavailable", "store")
        return STORE_DOWN  # Skycore retries; its retry is a duplicate, and the word is kept then
    if result.status == "accepted":  # events, not postbacks: Skycore's retry of one is no new event
        for name in decision.routes or (("default",) if decision.defaulted else ()):
            metrics.route(name)
        if decision.dropped and not decision.routes:
            metrics.unmatched.inc()
    if decision.dropped:
        if deliveries and result.status == "accepted" and runtime.dispatcher is not None:
            runtime.dispatcher.notify([d.destination for d in deliveries])  # the thread's feedback
        metrics.postback(origin, "dropped" if result.status == "accepted" else result.status, "")
        log.info(
            "event dropped",
            extra={
                "event_id": result.event_id,
                "type": event["type"],
                "routes": list(decision.routes),
                "why": "to: []" if decision.routes else "no route matched and no default",
                "duplicate": result.status == "duplicate",
            },
        )
        return answer(result.status, result.event_id)
    metrics.postback(origin, result.status, "")
    logs.hot(
        log,
        logging.INFO,
        "postback " + result.status,
        {
            "event_id": result.event_id,
            "type": event["type"],
            "from": event["from"],
            "to": event["to"],
            "keyword": event["keyword"],
            "routes": list(decision.routes) or ["default"],
            # where it goes; a duplicate goes nowhere (the first one went)
            "destinations": [d for d, _ in decision.destinations] if result.status == "accepted" else [],
        },
    )
    if result.status == "accepted" and runtime.dispatcher is not None:
        runtime.dispatcher.notify([d.destination for d in deliveries])
    return answer(result.status, result.event_id)


async def _on_a_reply(store: Store, event: Event) -> bool:
    """Whether a delivery report's TRACKINGID is a reply's SMS (its sendSMS answer, recorded
    within milliseconds of it, gave the id), so that the thread is to show it: most reports are
    on messages the bridge never sent, and those get no `~feedback` delivery. When the store
    cannot say now, the report gets one anyway (its attempt looks the id up again)."""
    try:
        row = await store.delivery_by_tracking_id(str(event.get("tracking_id")))
    except StoreError:
        return True
    return row is not None and row.route == REPLY_ROUTE


async def _keep_word(store: Store, said: Word, result: Ingested) -> bool:
    """The texter's opt-out (or opt-in) into the ledger, right after its event is stored and
    before the 200; False when the store cannot take it now.

    Not in the event's transaction, but idempotent and ordered by when the texter said it: a
    crash or a store error between the two means no 200, so Skycore sends the postback again,
    which is a duplicate of the stored event and is kept in the ledger then. A duplicate's time
    is the stored event's (its own `received_at` would be later than a word said since)."""
    at = said.at
    try:
        if result.status == "duplicate":
            stored = await store.get_event(result.event_id)
            again = word_of(stored) if stored is not None else None
            at = again.at if again is not None else at
        row = OptOutRow(said.texter, said.short_code, said.opted_out, said.word, at, result.event_id)
        await store.record_optout(row)
    except StoreError as exc:
        log.error("store cannot keep an opt-out", extra={"error": str(exc), "event_id": result.event_id})
        return False
    log.info(
        "opted out" if said.opted_out else "opted in",
        extra={"event_id": result.event_id, "from": said.texter, "to": said.short_code, "word": said.word},
    )
    return True


def unexpected(exc: Exception, path: str, method: str) -> Reply:
    """The 503 for an exception no handler expected (Skycore retries), logged; the store being
    down or not up yet (the admin API) is expected: a warning, no traceback."""
    if isinstance(exc, StoreError):
        log.warning("store unavailable", extra={"error": str(exc), "path": path})
        return STORE_DOWN
    log.error("unexpected error", exc_info=exc, extra={"path": path, "method": method})
    return refusal(503, "temporarily unavailable, retry later")
