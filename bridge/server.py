"""The HTTP side: take a postback, store it with its deliveries, answer 200 (CONTRACT §4).

Never a 500: bad input is a 4xx saying what is wrong; anything unexpected, or a store that
cannot take the write, is a 503 so that Skycore retries later.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hmac
import ipaddress
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from bridge import admin, logs
from bridge.carriers import Carriers
from bridge.config import AuthConfig, Config, load
from bridge.delivery import Dispatcher
from bridge.destinations import USER_AGENT, Destination, Services, conversation_key
from bridge.errors import BridgeError, ConfigError, PostbackError, StoreError
from bridge.event import dedup_key, normalize
from bridge.ids import event_id, timestamp
from bridge.metrics import Metrics
from bridge.postback import parse
from bridge.routing import route
from bridge.store import AttemptResult, Claim, NewDelivery, Store, open_store

log = logging.getLogger("bridge.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Skycore gives up on an answer after 10 s; a store slower than this gets a 503 (it may still
# commit: Skycore's retry is then answered "duplicate", and the event is delivered once)
STORE_PATIENCE = 8.0
# A PostgreSQL store that cannot be reached when `serve` starts is tried again after 1 s, then
# twice as long each time up to 30 s; postbacks get a 503 (Skycore retries) until it opens.
CONNECT_FIRST, CONNECT_MAX = 1.0, 30.0
# How long `serve` waits for that store before it listens anyway: a database host that hangs
# must not keep /healthz from answering (a liveness probe would restart us for it).
OPEN_PATIENCE = 5.0
OTHER_BODY_BYTES = 64 * 1024  # the most any other request may send (admin JSON bodies)


class Patience:
    """Cuts short the postbacks whose store write takes longer than `seconds` (to about
    `seconds + every`). One sweep for all of them instead of a timer per postback:
    `asyncio.timeout` costs a timer handle, a heap push and its cleanup on every postback.

        task = patience.start()
        try:
            await store.ingest(...)
        except asyncio.CancelledError:
            if not patience.ran_out(task):
                raise  # cancelled by someone else (shutdown): not ours to swallow
            ...  # too slow
        finally:
            patience.stop(task)
    """

    def __init__(self, seconds: float, every: float = 0.25) -> None:
        self.seconds, self.every = seconds, every
        # deadline by task, in start order; with one `seconds` that is deadline order too
        self._waiting: dict[asyncio.Task[Any], float] = {}
        self._cut: set[asyncio.Task[Any]] = set()

    def start(self) -> asyncio.Task[Any]:
        task = asyncio.current_task()
        assert task is not None
        self._waiting[task] = time.monotonic() + self.seconds
        return task

    def stop(self, task: asyncio.Task[Any]) -> None:
        self._waiting.pop(task, None)
        self._cut.discard(task)

    def ran_out(self, task: asyncio.Task[Any]) -> bool:
        """True when this sweep cancelled `task` and nothing else has asked to cancel it too."""
        if task not in self._cut:
            return False
        self._cut.discard(task)
        return task.uncancel() == 0

    def sweep(self, now: float) -> None:
        for task, deadline in list(self._waiting.items()):
            if deadline > now:
                break
            del self._waiting[task]
            self._cut.add(task)
            task.cancel()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                self.sweep(time.monotonic())
            except Exception:  # never expected; without the sweep a hung store would hang requests
                log.exception("store patience sweep failed")


@dataclass
class Runtime:
    """Everything a request needs. On reload `config`, `carriers` and `dispatcher` are swapped
    whole, so a request sees either the old config or the new one, never a mix."""

    config: Config
    carriers: Carriers
    metrics: Metrics = field(default_factory=Metrics)
    store: Store | None = None
    dispatcher: Dispatcher | None = None
    services: Services | None = None
    patience: Patience = field(default_factory=lambda: Patience(STORE_PATIENCE))
    # why the store is not open yet (it could not be reached at startup), or None once it is;
    # /readyz, which anyone may ask, shows only its kind (the message names hosts)
    store_error: BaseException | None = None
    # the startup's attempt to open it, when it was still going after OPEN_PATIENCE
    opening: asyncio.Future[None] | None = None
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # postbacks being routed and stored, by the config (id) that routes them; a reload waits for
    # the old config's to be stored before it retires that config's destinations
    _routing: collections.Counter[int] = field(default_factory=collections.Counter)
    _routed: asyncio.Event = field(default_factory=asyncio.Event)

    def hold(self) -> Config:
        """The config to route one postback with; `release` it once its deliveries are stored.
        (Two calls, not a context manager: this is on every postback's path.)"""
        config = self.config
        self._routing[id(config)] += 1
        return config

    def release(self, config: Config) -> None:
        key = id(config)
        self._routing[key] -= 1
        if not self._routing[key]:
            del self._routing[key]
            self._routed.set()

    async def _routed_with(self, config: Config, patience: float) -> None:
        deadline = time.monotonic() + patience
        while id(config) in self._routing and time.monotonic() < deadline:
            self._routed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._routed.wait(), 0.1)

    async def sweep(self) -> None:
        """Pending deliveries to destinations the config no longer has are dead (listable,
        replayable once it is back): never left pending for a destination nobody sends to. And
        a destination that is ordered now (Slack `thread_by_sender` turned on) orders what was
        queued for it before, too."""
        assert self.store is not None
        destinations = self.config.destinations
        try:
            removed = await self.store.abandon_unknown(set(destinations), "destination removed")
            ordered = await self.store.order_pending([name for name, d in destinations.items() if d.ordered])
        except StoreError as exc:
            log.warning("cannot update pending deliveries for the config", extra={"error": str(exc)})
            return
        for name, count in removed.items():
            self.metrics.died(name, "destination_removed", count)
        if removed:
            log.warning(
                "pending deliveries to removed destinations are dead",
                extra={"count": sum(removed.values()), "destinations": sorted(removed)},
            )
        if ordered:
            log.info("pending deliveries now go in conversation order", extra={"count": ordered})

    async def open_destinations(self, services: Services) -> None:
        self.services = services
        for destination in self.config.destinations.values():
            await destination.open(services)

    async def start_delivery(self) -> None:
        """Start the delivery loops, once the store is open."""
        assert self.store is not None
        async with self._reload_lock:  # with the config a reload may be swapping meanwhile
            await self.sweep()  # the config may have lost a destination since the last run
            self.dispatcher = self._dispatcher(self.config)
            self.dispatcher.start()

    def _dispatcher(self, config: Config) -> Dispatcher:
        assert self.store is not None
        self.metrics.destinations(config.destinations)
        return Dispatcher(self.store, config.destinations, on_result=self._on_result, on_dead=self.metrics.died)

    async def connect(self) -> None:
        """Open a store that could not be reached at startup, trying again with backoff until it
        opens; then start delivering. Until then postbacks, /readyz and the admin API answer 503."""
        assert self.store is not None
        delay = CONNECT_FIRST
        # The startup's attempt, if it is still going, is waited for rather than cut short: an
        # asyncpg connection stuck in a query does not give up on being cancelled anyway.
        attempt, self.opening = self.opening, None
        while True:
            if attempt is None:
                await asyncio.sleep(delay)
                attempt = asyncio.ensure_future(self.store.open())
            try:
                await attempt
            except Exception as exc:  # ConfigError too: a database being set up refuses us a while
                attempt = None
                self.store_error = exc
                delay = min(delay * 2, CONNECT_MAX)
                if isinstance(exc, BridgeError):
                    log.error("store still unreachable", extra={"error": str(exc), "retry_in": delay})
                else:  # a bug: logged whole, and tried again, or we would answer 503 for ever
                    log.exception("store open failed unexpectedly", extra={"retry_in": delay})
                continue
            break
        self.store_error = None
        self.metrics.store_up.set(1)
        log.info("store open")
        await self.start_delivery()

    async def stop_delivery(self) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        for destination in self.config.destinations.values():
            await destination.close()

    def _on_result(self, destination: Destination, claim: Claim, result: AttemptResult) -> None:
        name = claim.destination
        self.metrics.attempt(name, result.outcome)
        if result.outcome == "delivered":
            received = timestamp(claim.event_id)  # the id is made when the postback is received
            if received is not None:
                self.metrics.delivered_after(name, max(0.0, time.time() - received))

    async def reload(self) -> list[str]:
        """Load the config file again. On any problem the running config stays and the
        problems are returned; else routes and destinations swap at once."""
        async with self._reload_lock:
            problems = await self._reload()
            if problems:
                self.metrics.reloads.labels("failure").inc()
                log.error("config reload rejected; the running config stays", extra={"errors": problems})
            else:
                self.metrics.reloads.labels("success").inc()
                self.metrics.last_reload.set_to_current_time()
                log.info(
                    "config reloaded",
                    extra={"destinations": sorted(self.config.destinations), "routes": len(self.config.routes)},
                )
                for warning in self.config.warnings():
                    log.warning("config warning", extra={"warning": warning})
            return problems

    async def _reload(self) -> list[str]:
        old = self.config
        if old.source is None:
            return ["running on built-in defaults: there is no config file to reload (serve -c FILE)"]
        try:
            new = await asyncio.to_thread(load, old.source)
        except ConfigError as exc:
            return exc.problems
        problems = []
        if new.store != old.store:  # URLs may hold a password: not shown
            problems.append("store: cannot change while running; restart to use the new store")
        for what, running, wanted in (
            ("server.listen", f"{old.server.host}:{old.server.port}", f"{new.server.host}:{new.server.port}"),
            ("server.postback_path", old.server.postback_path, new.server.postback_path),
        ):
            if running != wanted:
                problems.append(f"{what}: cannot change while running ({running}, file says {wanted}); restart")
        if problems:
            return problems
        assert self.store is not None and self.services is not None
        for destination in new.destinations.values():
            await destination.open(self.services)
        # Not delivering yet (the store has not opened): `start_delivery` will, with this config.
        old_dispatcher = self.dispatcher
        dispatcher = None if old_dispatcher is None else self._dispatcher(new)
        self.config, self.carriers, self.dispatcher = new, Carriers(new.carriers), dispatcher
        try:
            if dispatcher is not None:
                dispatcher.start()
                # postbacks that were routed with the old config are stored before we look
                await self._routed_with(old, patience=old.server.client_timeout + 15)
                await self.sweep()
        finally:
            if old_dispatcher is not None:
                await old_dispatcher.stop()
            for destination in old.destinations.values():
                await destination.close()
        return []

    async def refresh_gauges(self) -> None:
        """Pending, dead and oldest-pending age per destination, read from the store."""
        assert self.store is not None
        stats = await self.store.stats()
        now = time.time()
        for name in set(self.config.destinations) | set(stats):
            current = stats.get(name)
            self.metrics.pending.labels(name).set(current.pending if current else 0)
            self.metrics.dead.labels(name).set(current.dead if current else 0)
            oldest = current.oldest_pending if current else None
            self.metrics.oldest.labels(name).set(max(0.0, now - oldest) if oldest else 0)


RUNTIME = web.AppKey("runtime", Runtime)


@dataclass(frozen=True, slots=True)
class Reply:
    """A postback's answer, made once: aiohttp sends it as a web.Response, the postback lane
    (bridge.lane) writes it to the socket itself. Always a JSON body."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=self.body, content_type="application/json", charset="utf-8",
            headers=dict(self.headers) if self.headers else None,
        )  # fmt: skip


def answer(status: str, event_id: str) -> Reply:
    """`{"status": ..., "id": ...}` and a newline, as json.dumps would write it (both values are
    plain ASCII). The newline ends the line where `curl` prints it, before the shell's prompt."""
    return Reply(200, f'{{"status": "{status}", "id": "{event_id}"}}\n'.encode())


def refusal(status: int, message: str, **headers: str) -> Reply:
    """`{"error": message}` and a newline, as json_response writes it."""
    return Reply(status, json.dumps({"error": message}).encode() + b"\n", tuple(headers.items()))


# the store is down or not up yet: Skycore retries (postbacks; the admin API the same way)
STORE_DOWN = refusal(503, "store unavailable, retry later", **{"Retry-After": "30"})


def error(status: int, message: str, **headers: str) -> web.Response:
    return refusal(status, message, **headers).response()


# ---------------------------------------------------------------------------- auth


class Headers(Protocol):
    def get(self, name: str, default: str = ..., /) -> str: ...
    def getall(self, name: str, default: list[str] = ..., /) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class Caller:
    """Who posts, as auth sees it: from aiohttp's request, or from a head the lane read."""

    remote: str | None
    headers: Headers  # case-insensitive: aiohttp's CIMultiDictProxy, or the lane's
    path_token: str | None = None  # `/postback/{token}`
    query_token: str | None = None  # `?token=`

    @classmethod
    def of(cls, request: web.Request) -> Caller:
        return cls(request.remote, request.headers, request.match_info.get("token"), request.query.get("token"))


def client_ip(request: Caller, auth: AuthConfig) -> str | None:
    """The peer address, or with trusted proxies the right-most X-Forwarded-For hop that is
    not one of them (the left part of the header is whatever the client claims)."""
    peer = request.remote
    if not auth.trusted_proxies or peer is None:
        return peer
    hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", []) for h in v.split(",")]
    chain = [*hops, peer]
    for hop in reversed(chain):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return hop
        if not any(address in net for net in auth.trusted_proxies):
            return hop
    return chain[0]


def _allowed(ip: str | None, auth: AuthConfig) -> bool:
    if not auth.allow_from:
        return True
    try:
        address = ipaddress.ip_address((ip or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in net for net in auth.allow_from)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


def check_auth(request: Caller, auth: AuthConfig) -> Reply | None:
    """None when the request may post; else the 401/403 to answer (with no hint of what was wrong)."""
    if not _allowed(client_ip(request, auth), auth):
        return refusal(403, "forbidden")
    if not (auth.token or auth.basic):
        return None
    if auth.token:
        given = request.path_token or request.query_token
        if given is not None and _same(given, auth.token.reveal()):
            return None
    if auth.basic:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except ValueError:  # bad base64 (binascii.Error), non-ASCII header, or not UTF-8
                user, password = "", ""
            user_ok = _same(user, auth.basic.username)
            if _same(password, auth.basic.password.reveal()) and user_ok:
                return None
        return refusal(401, "unauthorized", **{"WWW-Authenticate": 'Basic realm="postback-bridge", charset="UTF-8"'})
    return refusal(401, "unauthorized")


# ---------------------------------------------------------------------------- handlers


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


async def postback(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    server, metrics = runtime.config.server, runtime.metrics
    denied = admit(runtime, Caller.of(request))
    if denied is not None:
        return denied.response()
    try:
        body = await read_body(request, server.max_body_bytes, server.client_timeout)
    except web.HTTPRequestEntityTooLarge:
        metrics.postback("", "rejected", "too_large")
        return error(413, f"body is larger than max_body_bytes ({server.max_body_bytes} bytes)")
    except TimeoutError:
        metrics.postback("", "rejected", "timeout")
        return error(408, f"body not received within {server.client_timeout:g}s")
    reply = await take(runtime, body, request.headers.get("Content-Type", ""), request.remote)
    return reply.response()


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
    patience = runtime.patience
    task = patience.start()
    try:
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
    if result.status == "accepted":  # events, not postbacks: Skycore's retry of one is no new event
        for name in decision.routes or (("default",) if decision.defaulted else ()):
            metrics.route(name)
        if decision.dropped and not decision.routes:
            metrics.unmatched.inc()
    if decision.dropped:
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
        runtime.dispatcher.notify([d for d, _ in decision.destinations])
    return answer(result.status, result.event_id)


async def not_found(request: web.Request) -> web.Response:
    return error(404, "not found")


def _other_methods(allow: str) -> Handler:
    async def not_allowed(request: web.Request) -> web.Response:
        return error(405, f"method not allowed: use {allow}", Allow=allow)

    return not_allowed


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    store = runtime.store
    try:
        if store is None:
            raise StoreError("store is not open")
        if runtime.store_error is not None:
            cause = runtime.store_error.__cause__ or runtime.store_error
            raise StoreError(f"not open yet ({type(cause).__name__}; the log says more)")
        async with asyncio.timeout(5):
            await store.ping()
    except (StoreError, TimeoutError) as exc:
        runtime.metrics.store_up.set(0)
        return web.json_response({"status": "unavailable", "store": str(exc) or "timeout"}, status=503)
    runtime.metrics.store_up.set(1)
    return web.json_response({"status": "ready"})


async def metrics_view(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        async with asyncio.timeout(5):
            await runtime.refresh_gauges()
        runtime.metrics.store_up.set(1)
    except (StoreError, TimeoutError):
        runtime.metrics.store_up.set(0)
    return web.Response(
        body=runtime.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


@web.middleware
async def never_500(request: web.Request, handler: Handler) -> web.StreamResponse:
    """HTTP errors pass through; anything unexpected becomes 503 (Skycore retries) and is logged."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 500:
            return error(503, "temporarily unavailable, retry later")
        if exc.empty_body or exc.content_type != "application/json":
            return error(exc.status, exc.reason.lower())
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return unexpected(exc, _route_path(request), request.method).response()


def unexpected(exc: Exception, path: str, method: str) -> Reply:
    """The 503 for an exception no handler expected (Skycore retries), logged; the store being
    down or not up yet (the admin API) is expected: a warning, no traceback."""
    if isinstance(exc, StoreError):
        log.warning("store unavailable", extra={"error": str(exc), "path": path})
        return STORE_DOWN
    log.error("unexpected error", exc_info=exc, extra={"path": path, "method": method})
    return refusal(503, "temporarily unavailable, retry later")


def _route_path(request: web.Request) -> str:
    """The path as routed (`/{token}`), never the token in it."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


# ---------------------------------------------------------------------------- assembly


def create_app(config: Config, *, store: Store | None = None) -> web.Application:
    runtime = Runtime(config=config, carriers=Carriers(config.carriers))
    app = web.Application(
        middlewares=[never_500],
        # postbacks keep to max_body_bytes themselves (read_body); this is aiohttp's limit for the
        # rest, such as an admin replay's JSON body, which a tiny max_body_bytes must not refuse
        client_max_size=max(config.server.max_body_bytes, OTHER_BODY_BYTES),
        # a connection that has not finished its request headers by then is closed (slowloris)
        handler_args={"keepalive_timeout": config.server.client_timeout},
    )
    app[RUNTIME] = runtime
    path = config.server.postback_path
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    admin.add_routes(app)
    app.router.add_post(path, postback)
    app.router.add_post(path + "/{token}", postback)
    # Another method on one of our paths is a 405 naming the allowed ones; any method on a path
    # that is not ours is a 404. (Without the first, the catch-all `/{token}` below would take
    # PUT /healthz; without the second, it would make every unknown path a 405.)
    # A path can have several resources (a postback_path of /healthz): only the last answers 405,
    # naming every method the path has, so no resource hides a later one's POST.
    by_path: dict[str, list[Any]] = {}
    for resource in app.router.resources():
        by_path.setdefault(resource.canonical, []).append(resource)
    for resources in by_path.values():
        methods = sorted({route.method for resource in resources for route in resource})
        resources[-1].add_route("*", _other_methods(", ".join(methods)))
    app.router.add_post("/{token}", postback)
    app.router.add_route("*", "/{token}", not_found)
    app.cleanup_ctx.append(_store_ctx(store))
    app.cleanup_ctx.append(_delivery_ctx)
    app.cleanup_ctx.append(_retention_ctx)
    return app


def _store_ctx(store: Store | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        runtime = app[RUNTIME]
        runtime.store = store or open_store(runtime.config.store)
        opening = asyncio.ensure_future(runtime.store.open())
        await asyncio.wait([opening], timeout=OPEN_PATIENCE if runtime.store.retry_open else None)
        problem = opening.exception() if opening.done() else TimeoutError()
        if problem is not None:
            if not (runtime.store.retry_open and isinstance(problem, StoreError | TimeoutError)):
                raise problem  # serve exits: a file we cannot open now will not open later, nor a bad URL
            # PostgreSQL may start after us (a compose file, a reboot): serve 503s meanwhile, and
            # the attempt still going, if any, goes on (Runtime.connect)
            runtime.store_error, runtime.opening = problem, None if opening.done() else opening
            runtime.metrics.store_up.set(0)
            why = str(problem) or f"no answer within {OPEN_PATIENCE:g}s; still trying"
            log.error("store unreachable; answering 503 until it opens", extra={"error": why})
        sweeper = asyncio.create_task(runtime.patience.run(), name="store-patience")
        yield
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await runtime.store.close()

    return ctx


async def _delivery_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    assert runtime.store is not None
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256, limit_per_host=64),
        headers={"User-Agent": USER_AGENT},
    )
    await runtime.open_destinations(Services(http=http, state=runtime.store))
    connecting = None
    if runtime.store_error is None:
        await runtime.start_delivery()
    else:
        connecting = asyncio.create_task(runtime.connect(), name="store-connect")
    loop = asyncio.get_running_loop()
    if runtime.config.source is not None and hasattr(signal, "SIGHUP"):
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(runtime.reload()))
    yield
    if runtime.config.source is not None and hasattr(signal, "SIGHUP"):
        loop.remove_signal_handler(signal.SIGHUP)
    if connecting is not None:
        connecting.cancel()
        # not for long: an open stuck mid-way gives up only once store.close() (next) cuts it off
        await asyncio.wait([connecting], timeout=2)
    await runtime.stop_delivery()
    await http.close()


RETENTION_EVERY = 600.0  # seconds between purges; each purge goes in small batches


async def _retention_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]

    async def purge_forever() -> None:
        while True:
            if runtime.store_error is None:  # else the store is not open yet: nothing to say
                await purge_once(runtime)
            await asyncio.sleep(RETENTION_EVERY)

    task = asyncio.create_task(purge_forever(), name="retention")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def purge_once(runtime: Runtime, batch: int = 500) -> int:
    """Delete finished deliveries past retention (and events left without any) and dropped
    events past `retention.delivered`, a batch at a time so postbacks never wait long behind
    it. Returns how many deliveries and dropped events went."""
    assert runtime.store is not None
    total = 0
    while True:
        now, retention = time.time(), runtime.config.retention
        try:
            n = await runtime.store.purge(
                delivered_before=now - retention.delivered, dead_before=now - retention.dead, batch=batch
            )
        except StoreError as exc:
            log.warning("retention purge failed; trying again later", extra={"error": str(exc)})
            return total
        total += n
        if n < batch:
            break
        await asyncio.sleep(0.05)  # let postbacks through between batches
    if total:
        log.info("retention purge", extra={"purged": total})
    return total
