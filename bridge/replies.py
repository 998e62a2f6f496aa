"""Answering texters from Slack (CONTRACT §7): `POST /slack/events`, a person's reply in a
texter's thread stored as an `sms.reply` event with one delivery to the skycore destination
`replies.send_with` names, and what became of it shown in the thread.

The request is checked first (slack-sdk's `SignatureVerifier`: the signing secret's HMAC of the
body, and a timestamp within 5 minutes), before anything is parsed; a wrong or stale one is a
401 and nothing is stored. Then the reply is stored, in one transaction with its deliveries,
before Slack gets its 200; Slack's retries of one event (same `event_id`) are duplicates of it.
Anything that is not a reply is answered 200 and ignored.

What the thread shows comes after, from what the bridge learns: `outbox_tray` once Skycore took
the SMS (its attempt recorded), `white_check_mark` when an SMS_MT N202 postback names its
TRACKINGID, `x` and a line with the reason when it went dead or a delivery report says it
failed, `no_entry` and a line when it was not sent at all (opted out, too long).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from slack_sdk.signature import SignatureVerifier
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient

from bridge import logs
from bridge.answers import error
from bridge.config import FEEDBACK, FEEDBACK_REPORT, REPLY_ROUTE, Config
from bridge.delivery import Dispatcher
from bridge.destinations.base import Attempt, Destination, conversation_key
from bridge.destinations.skycore import OPTED_OUT
from bridge.destinations.slack import RepliesOptions, SlackDestination, SlackOptions, thread_key
from bridge.digits import is_digits
from bridge.errors import StoreError
from bridge.event import REPLY_TYPE, Event, format_time
from bridge.ids import event_id
from bridge.ingest import read_body
from bridge.retry import Delivered, Failed, Outcome, RetryPolicy
from bridge.routing import route
from bridge.runtime import RUNTIME, Runtime
from bridge.smstext import length, plain, segments
from bridge.store import AttemptResult, Claim, ClaimFor, ExpiryFollowUp, Ingested, NewDelivery, Store
from bridge.validate import Reader

log = logging.getLogger("bridge.replies")

PATH = "/slack/events"
BODY_BYTES = 512 * 1024  # a Slack message holds up to 40,000 characters
ANSWER_WITHIN = 2.5  # seconds: Slack waits 3 for an answer, then retries
SCOPES = ("chat:write", "reactions:write", "channels:history", "groups:history")
EVENTS = ("message.channels", "message.groups")
_CHANNEL_ID = re.compile(r"[CGD][A-Z0-9]{6,}")
ROUTE = REPLY_ROUTE  # the route name a reply's delivery to send_with is stored under


@dataclass(frozen=True)
class App:
    """One Slack destination that takes replies."""

    destination: str
    channel: str
    replies: RepliesOptions


def apps(runtime: Runtime) -> list[App]:
    return apps_of(runtime.config)


def apps_of(config: Config) -> list[App]:
    """The Slack destinations that take replies."""
    out = []
    for name, spec in config.destinations.items():
        options = spec.options
        if spec.type == "slack" and isinstance(options, SlackOptions) and options.replies is not None:
            out.append(App(name, options.channel or "", options.replies))
    return out


def _verified(apps_: list[App], body: bytes, headers: Any) -> App | None:
    """The app whose signing secret signed this request, checked before anything is parsed."""
    timestamp = headers.get("X-Slack-Request-Timestamp", "")
    signature = headers.get("X-Slack-Signature", "")
    # SignatureVerifier raises on a timestamp that is not a number and on a signature that is
    # not ASCII (hmac.compare_digest): neither is Slack's, so neither gets that far
    if not is_digits(timestamp) or len(timestamp) > 12 or not signature.isascii():
        return None
    for app in apps_:
        secret = app.replies.signing_secret
        if secret is not None and SignatureVerifier(secret.reveal()).is_valid(body, timestamp, signature):
            return app
    return None


def not_a_reply(message: Any) -> str | None:
    """Why a Slack event is not a person's reply in a thread (None when it is one): one of
    metrics.REPLY_IGNORED."""
    if not isinstance(message, dict) or message.get("type") != "message":
        return "not_a_message"
    if message.get("subtype"):
        return "subtype"  # edits, deletions, joins, the bridge's own posts
    if message.get("bot_id") or message.get("bot_profile"):
        return "bot"
    thread_ts, ts = message.get("thread_ts"), message.get("ts")
    if not isinstance(thread_ts, str) or not isinstance(ts, str) or thread_ts == ts:
        return "not_in_a_thread"
    if not all(isinstance(message.get(key), str) for key in ("user", "text", "channel")):
        return "incomplete"  # no person, text or channel
    return None


async def conversation(store: Store, app: App, channel_id: str, thread_ts: str) -> tuple[tuple[str, str] | None, bool]:
    """(texter, short code) of the bridge's thread `thread_ts` in channel `channel_id`, or None
    when it is no thread the bridge started for a conversation in this destination's channel;
    and whether that texter opted out of that short code. One lookup (`thread_and_ledger`)."""

    def which(kept: str | None, started: str | None) -> tuple[str, str] | None:
        if kept is not None:
            known_id, _, key = kept.partition("|")
            if known_id and known_id != channel_id:
                return None  # the same ts in another channel
        else:  # a thread started before the bridge kept its channel id
            key = started or ""
            if not key or (_CHANNEL_ID.fullmatch(app.channel) and app.channel != channel_id):
                return None
        parts = key.rsplit("|", 2)
        if len(parts) != 3 or parts[0] != app.channel or not parts[1] or not parts[2]:
            return None
        return parts[1], parts[2]

    return await store.thread_and_ledger(app.destination, thread_key(thread_ts), thread_ts, which)


def reply_event(message: dict[str, Any], texter: str, short_code: str, slack: dict[str, Any]) -> Event:
    text = plain(message["text"])
    try:
        said = format_time(datetime.fromtimestamp(float(message["ts"]), UTC))
    except (ValueError, OverflowError):
        said = None
    return {
        "id": event_id(),
        "type": REPLY_TYPE,
        "origin": "SLACK",
        "code": None,
        "from": short_code,
        "to": texter,
        "keyword": None,
        "text": text,
        "subject": None,
        "media": [],
        "spid": None,
        "carrier": None,
        "transaction_id": None,
        "tracking_id": None,
        "occurred_at": said,
        "received_at": format_time(datetime.now(UTC), millis=True),
        "fields": {"slack": slack},
    }


def too_long(text: str, max_segments: int | None) -> str | None:
    if max_segments is None:
        return None
    count = segments(text)
    if count <= max_segments:
        return None
    encoding, units = length(text)
    return (
        f"Not sent: the reply is {units} {encoding} characters, {count} SMS segments; "
        f"at most {max_segments} are sent. Shorten it and reply again."
    )


async def slack_events(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    taking = apps(runtime)
    if not any(a.replies.signing_secret for a in taking):
        return error(404, "not found")
    server = runtime.config.server
    try:
        body = await read_body(request, max(server.max_body_bytes, BODY_BYTES), server.client_timeout)
    except web.HTTPRequestEntityTooLarge:
        return error(413, "body is too large")
    except TimeoutError:
        return error(408, f"body not received within {server.client_timeout:g}s")
    app = _verified(taking, body, request.headers)
    if app is None:
        log.warning("Slack request refused: bad or stale signature", extra={"remote": request.remote})
        return error(401, "invalid or stale Slack signature")
    try:
        payload = json.loads(body)
    except ValueError:
        return error(400, "body is not JSON")
    if not isinstance(payload, dict):
        return error(400, "body is not a JSON object")
    if payload.get("type") == "url_verification":
        return web.json_response({"challenge": payload.get("challenge")})
    if payload.get("type") != "event_callback":
        return web.json_response({"ok": True})
    try:
        async with asyncio.timeout(ANSWER_WITHIN):
            await take_reply(runtime, app, payload, "events_api")
    except TimeoutError:
        # Slack gives up after 3 s and sends the event again: say so first (a write that did
        # commit meanwhile makes the retry a duplicate)
        log.error("reply not stored in time", extra={"slack_event_id": payload.get("event_id")})
        return error(503, "temporarily unavailable, retry later")
    return web.json_response({"ok": True})


async def take_reply(runtime: Runtime, app: App, payload: dict[str, Any], source: str) -> str | None:
    """Store the reply in `payload` (an event_callback that came by `source`: events_api,
    socket_mode), if it is one; its event id. Raises StoreError when the store cannot take it
    (Slack then retries)."""
    message = payload.get("event")
    why = not_a_reply(message)
    if why is not None:
        _ignored(runtime, why, payload)
        return None
    assert isinstance(message, dict)
    store = runtime.store
    if store is None:
        raise StoreError("store is not open")
    found, stopped = await conversation(store, app, message["channel"], message["thread_ts"])
    if found is None:
        _ignored(runtime, "not_a_texters_thread", payload)
        return None
    texter, short_code = found
    slack = {
        "destination": app.destination,
        "channel": message["channel"],
        "ts": message["ts"],
        "thread_ts": message["thread_ts"],
        "user": message["user"],
        "event_id": payload.get("event_id"),
    }
    event = reply_event(message, texter, short_code, slack)
    if not event["text"]:
        _ignored(runtime, "empty", payload)
        return None
    refused: str | None = None
    not_sent: str | None
    if stopped:
        refused = "opted_out"
        not_sent = f"Not sent: {texter} opted out of {short_code} (STOP). They must text START to hear from you again."
    else:
        not_sent = too_long(event["text"], app.replies.max_segments)
        refused = None if not_sent is None else "too_long"
    config = runtime.config
    deliveries = []
    key = conversation_key(event)
    send = None  # the SMS's claim, made with the reply: its loop sends it without a claim of its own
    if not_sent is None:
        spec = config.destinations.get(app.replies.send_with)
        if spec is not None:
            deliveries.append(NewDelivery(spec.name, ROUTE, key, spec.ordered))
            if runtime.dispatcher is not None:
                send = runtime.dispatcher.claim_for(spec.name)
    else:
        slack["not_sent"] = not_sent
        deliveries.append(NewDelivery(FEEDBACK, NOT_SENT, key, False))  # ⛔ and why, with the reply
    # routes whose match.type names sms.reply get it too (a CRM logs both sides); `default` never
    # does, and it never goes back into Slack
    naming = tuple(r for r in config.routes if r.match.type is not None and REPLY_TYPE in r.match.type)
    decision = route(event, naming, None)
    for name, route_name in decision.destinations:
        spec = config.destinations.get(name)
        if spec is not None and spec.type != "slack" and name != app.replies.send_with:
            deliveries.append(NewDelivery(name, route_name, key, spec.ordered))
    dedup = "slack:" + str(payload.get("event_id") or f"{message['channel']}:{message['ts']}")
    if send is None or runtime.dispatcher is None:
        result = await store.ingest(event, dedup, deliveries)
    else:
        result = await _ingest_and_send(store, runtime.dispatcher, send, event, dedup, deliveries)
    fields = {"event_id": result.event_id, "to": texter, "from": short_code, "not_sent": not_sent}
    logs.hot(log, logging.INFO, "reply " + result.status, fields)  # one a reply: without a LogRecord
    if result.status != "accepted":
        _ignored(runtime, "duplicate", payload)
        return result.event_id
    runtime.metrics.reply(source)
    if refused is not None:
        runtime.metrics.reply_refused(refused)
    if runtime.dispatcher is not None:
        claimed = None if send is None else send.destination  # its loop has its claim (or was told)
        runtime.dispatcher.notify([d.destination for d in deliveries if d.destination != claimed])
    return result.event_id


async def _ingest_and_send(
    store: Store, dispatcher: Dispatcher, send: ClaimFor, event: Event, dedup: str, deliveries: list[NewDelivery]
) -> Ingested:
    """Store the reply and claim its SMS in one trip, and hand the claim to the SMS's loop. The
    claim is handed over even when the answer to Slack gave up waiting meanwhile (shielded):
    a claim nobody holds would wait for its lease to run out."""

    def hand(done: asyncio.Future[tuple[Ingested, list[Claim]]]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        result, claims = done.result()
        dispatcher.hand(send, claims, expected=result.event_id if result.status == "accepted" else None)

    stored = asyncio.ensure_future(store.ingest_and_claim(event, dedup, deliveries, send))
    stored.add_done_callback(hand)
    result, _ = await asyncio.shield(stored)
    return result


def _ignored(runtime: Runtime, why: str, payload: dict[str, Any]) -> None:
    runtime.metrics.reply_ignored(why)
    log.debug("Slack event ignored", extra={"why": why, "slack_event_id": payload.get("event_id")})


# ---------------------------------------------------------------------------- the thread

# What a reply's thread shows is durable work through the outbox, like any delivery: a delivery
# of the reply event (or of the delivery report) to the bridge's own `~feedback` destination,
# stored in the transaction that learnt what to show, retried while Slack cannot take it, dead
# and replayable when it never could. Its route says what to show.
NOT_SENT = "not_sent"  # with the reply: ⛔ and why (opted out, too long)
SENT = "sent"  # with the sendSMS attempt Skycore took: 📤
DEAD = "dead"  # with the sendSMS attempt that made it dead: ❌ (⛔ when a STOP came meanwhile) and why
# FEEDBACK_REPORT, with a delivery report (N202: ✅, an E code: ❌ and the code), is added by ingest


def _slack_of(event: Event) -> dict[str, Any] | None:
    fields = event.get("fields")
    slack = fields.get("slack") if isinstance(fields, dict) else None
    return slack if isinstance(slack, dict) else None


class FeedbackDestination(Destination):
    """`~feedback`: a reaction (and maybe a line) in a reply's thread, with the Slack
    destination that took the reply. Built by the bridge, never configured."""

    type_name = FEEDBACK
    default_concurrency = 4

    def __init__(self, runtime: Runtime, live: dict[str, Destination], retry: RetryPolicy) -> None:
        super().__init__(FEEDBACK, retry=retry)
        self._runtime = runtime
        self._live = live  # the destinations built with this one (the Slack ones it shows with)

    @classmethod
    def parse(cls, options: dict[str, Any], path: str, r: Reader) -> None:
        r.error(path, "is the bridge's own destination, not one to configure")

    def describe(self) -> str:
        return "what replies' threads show in Slack: reactions and lines"

    def preview(self, event: Event) -> Any:
        return None

    async def send(self, event: Event, attempt: Attempt) -> Outcome:
        try:
            shown = await self._what(event, attempt.route)
        except StoreError as exc:
            return Failed(reason=f"cannot read the reply: {exc}", retryable=True)
        if isinstance(shown, str):
            return Delivered(detail=shown)  # nothing to show
        slack, emoji, say = shown
        live = self._live.get(str(slack.get("destination")))
        channel, ts = slack.get("channel"), slack.get("ts")
        if not isinstance(live, SlackDestination):
            return Failed(reason=f"no Slack destination {slack.get('destination')!r} in the config", retryable=False)
        if not isinstance(channel, str) or not isinstance(ts, str):
            return Failed(reason="the reply names no Slack message", retryable=False)
        thread_ts = slack.get("thread_ts")
        return await live.show(channel, ts, thread_ts if isinstance(thread_ts, str) else None, emoji, say)

    async def _what(self, event: Event, route: str) -> tuple[dict[str, Any], str, str | None] | str:
        """(the reply's `fields.slack`, the reaction, the line) to show, or why nothing."""
        store = self._runtime.store
        if store is None:
            raise StoreError("store is not open")
        if route == FEEDBACK_REPORT:
            row = await store.delivery_by_tracking_id(str(event.get("tracking_id")))
            reply = await store.get_event(row.event_id) if row is not None and row.route == ROUTE else None
            slack = _slack_of(reply) if reply is not None and reply["type"] == REPLY_TYPE else None
            if slack is None:
                return "not the report on a reply's SMS"
            code = (event.get("code") or "").upper()
            if code == "N202":
                return slack, "white_check_mark", None
            status = (event.get("fields") or {}).get("STATUS")
            return slack, "x", f"Not delivered: {code}" + (f" {status}" if isinstance(status, str) and status else "")
        slack = _slack_of(event)
        if slack is None:
            return "not a reply"
        if route == NOT_SENT:
            return slack, "no_entry", str(slack.get("not_sent") or "Not sent.")
        if route == SENT:
            return slack, "outbox_tray", None
        sent = [d for d in await store.event_deliveries(event["id"]) if d.route == ROUTE and d.status == "dead"]
        error = (sent[-1].last_error if sent else None) or "it could not be sent"
        if error.startswith(OPTED_OUT):  # STOP came while it waited: not sent
            return slack, "no_entry", f"Not sent: {error}"
        return slack, "x", f"Not sent: {error}"


def install(app: web.Application) -> None:
    """The Events API route, `~feedback` beside the configured destinations, and what a reply's
    attempt leaves for its thread."""
    runtime = app[RUNTIME]
    app.router.add_post(PATH, slack_events)

    def internal(config: Config, built: dict[str, Destination]) -> dict[str, Destination]:
        if FEEDBACK not in config.internal:
            return {}
        return {FEEDBACK: FeedbackDestination(runtime, built, config.retry)}

    def follow_ups(destination: Destination, claim: Claim, result: AttemptResult) -> tuple[NewDelivery, ...]:
        if destination.type_name != "skycore" or claim.route != ROUTE or FEEDBACK not in runtime.destinations:
            return ()
        if _slack_of(claim.event) is None:
            return ()
        return (NewDelivery(FEEDBACK, SENT if result.outcome == "delivered" else DEAD, claim.conversation, False),)

    def after_attempt(destination: Destination, claim: Claim, result: AttemptResult) -> None:
        if destination.type_name != "skycore" or claim.route != ROUTE or result.outcome == "retry":
            return
        if result.outcome == "delivered":
            runtime.metrics.replies_sent.inc()
        else:
            runtime.metrics.replies_failed.inc()

    runtime.internal.append(internal)
    runtime.destinations.update(internal(runtime.config, runtime.destinations))

    def expiry_follow_up(destination: Destination) -> ExpiryFollowUp | None:
        # a reply's SMS that dies unattempted (Skycore down or paused past max_age): ❌ and why
        if destination.type_name != "skycore" or FEEDBACK not in runtime.destinations:
            return None
        return ExpiryFollowUp(ROUTE, FEEDBACK, DEAD)

    def removal_follow_up() -> ExpiryFollowUp | None:
        # a reply's SMS whose destination the config no longer has (dead: `destination removed`),
        # whatever type that destination was: ❌ and why, while the config still takes replies
        if FEEDBACK not in runtime.destinations:
            return None
        return ExpiryFollowUp(ROUTE, FEEDBACK, DEAD)

    runtime.follow_ups.append(follow_ups)
    runtime.expiry_follow_ups.append(expiry_follow_up)
    runtime.removal_follow_ups.append(removal_follow_up)
    runtime.after_attempt.append(after_attempt)


# ---------------------------------------------------------------------------- Socket Mode

# slack-sdk logs the socket's URL (a one-time credential) at DEBUG: kept above it
_SDK_LOG = logging.getLogger("bridge.replies.socket")
_SDK_LOG.setLevel(logging.INFO)
RECONNECT_FIRST, RECONNECT_MAX = 1.0, 60.0


def _on_request(runtime: Runtime, destination: str) -> Any:
    async def on_request(client: SocketModeClient, request: SocketModeRequest) -> None:
        """The same events as /slack/events, acked only once the reply is stored: an envelope
        not acked is sent again by Slack. The destination's replies as the config in force has
        them (a reload may have changed them since the socket opened)."""
        app = next((a for a in apps(runtime) if a.destination == destination), None)
        if request.type == "events_api" and isinstance(request.payload, dict) and app is not None:
            try:
                async with asyncio.timeout(ANSWER_WITHIN):
                    await take_reply(runtime, app, request.payload, "socket_mode")
            except (StoreError, TimeoutError) as exc:
                log.error("reply not stored; not acked, Slack sends it again", extra={"error": str(exc)})
                return
            except Exception:
                log.exception("reply from Socket Mode failed; not acked")
                return
        await client.send_socket_mode_response(SocketModeResponse(envelope_id=request.envelope_id))

    return on_request


async def _connect(client: SocketModeClient, destination: str) -> None:
    """Connect, trying again with backoff while Slack cannot be reached; once connected,
    slack-sdk reconnects by itself when the socket drops."""
    delay = RECONNECT_FIRST
    while True:
        try:
            await client.connect()  # type: ignore[no-untyped-call]
            log.info("Socket Mode connected", extra={"destination": destination})
            return
        except Exception as exc:  # the SDK raises what aiohttp or the Web API raise
            log.warning("Socket Mode cannot connect", extra={"destination": destination, "error": str(exc)[:200]})
            await asyncio.sleep(delay)
            delay = min(2 * delay, RECONNECT_MAX)


@dataclass
class _Socket:
    wanted: tuple[str, str]  # (app token, Web API URL) it was opened with
    client: SocketModeClient
    connecting: asyncio.Task[None]


class SocketModes:
    """One Socket Mode client per Slack destination with `replies.app_token`, kept in step with
    the config: `apply` (at start and after each reload) starts the ones a config adds, stops
    the ones it removes, and restarts one whose app_token (or api_url) changed."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.running: dict[str, _Socket] = {}

    @staticmethod
    def wanted(config: Config) -> dict[str, tuple[str, str]]:
        out = {}
        for app in apps_of(config):
            if app.replies.app_token is not None:
                options = config.destinations[app.destination].options
                api_url = options.api_url if isinstance(options, SlackOptions) else "https://slack.com/api/"
                out[app.destination] = (app.replies.app_token.reveal(), api_url)
        return out

    async def apply(self, config: Config) -> None:
        wanted = self.wanted(config)
        for name in list(self.running):
            if self.running[name].wanted != wanted.get(name):
                await self._stop(name, "app_token changed" if name in wanted else "app_token removed")
        for name, key in wanted.items():
            if name not in self.running:
                self._start(name, key)

    def _start(self, destination: str, wanted: tuple[str, str]) -> None:
        token, api_url = wanted
        web_client = AsyncWebClient(base_url=api_url, logger=_SDK_LOG, retry_handlers=[])
        client = SocketModeClient(app_token=token, web_client=web_client, logger=_SDK_LOG)
        client.socket_mode_request_listeners.append(_on_request(self.runtime, destination))
        task = asyncio.create_task(_connect(client, destination), name=f"socket-mode:{destination}")
        self.running[destination] = _Socket(wanted, client, task)
        log.info("Socket Mode starting", extra={"destination": destination})

    async def _stop(self, destination: str, why: str) -> None:
        socket = self.running.pop(destination)
        socket.connecting.cancel()
        await socket.client.close()  # type: ignore[no-untyped-call]
        log.info("Socket Mode stopped", extra={"destination": destination, "why": why})

    async def close(self) -> None:
        for name in list(self.running):
            await self._stop(name, "shutting down")


async def socket_mode_ctx(web_app: web.Application) -> Any:
    """Socket Mode clients for the Slack destinations with `replies.app_token`, started,
    stopped and restarted as config reloads add, remove or change their tokens."""
    runtime = web_app[RUNTIME]
    sockets = SocketModes(runtime)
    await sockets.apply(runtime.config)

    async def reloaded(old: Config, new: Config) -> None:
        await sockets.apply(new)

    runtime.after_reload.append(reloaded)
    yield
    runtime.after_reload.remove(reloaded)
    await sockets.close()


def needs(config: Config) -> list[str]:
    """What each Slack app that takes replies must have, for check-config (CONTRACT §7)."""
    lines = []
    for app in apps_of(config):
        how = []
        url = f"https://<this bridge's public host>{PATH}"
        if app.replies.signing_secret and app.replies.app_token:
            how += [
                "  signing_secret and app_token: the bridge takes both; Slack sends each event one way:"
                " over the socket while Socket Mode is on in the app, else to the Request URL",
                f"  Request URL (Event Subscriptions), used only while Socket Mode is off: {url}",
                "  for Socket Mode: an app-level token with connections:write",
            ]
        elif app.replies.signing_secret:
            how.append(f"  Request URL (Event Subscriptions): {url}")
        elif app.replies.app_token:
            how.append("  Socket Mode on, an app-level token with connections:write (no Request URL needed)")
        lines += [
            f"{app.destination}: replies in its threads are sent as SMS with {app.replies.send_with}"
            + (f" (at most {app.replies.max_segments} segments)" if app.replies.max_segments else ""),
            *how,
            f"  bot token scopes: {SCOPES[0]}, {SCOPES[1]}, and {SCOPES[2]} (public channel) or {SCOPES[3]} (private)",
            f"  bot events: {EVENTS[0]} (public channel) or {EVENTS[1]} (private)",
            f"  the app is a member of {app.channel} (/invite @your-app)",
            f"  what the thread shows goes through the bridge's own destination {FEEDBACK} "
            f"(postback-bridge deliveries --destination '{FEEDBACK}')",
        ]
    return lines
