"""The aiohttp application: its routes, the never-500 middleware, the health and metrics
endpoints, and the lifecycle of the store, the delivery loops and retention around it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from bridge import admin, console, replies
from bridge.answers import error
from bridge.auth import Caller
from bridge.carriers import Carriers
from bridge.config import Config
from bridge.destinations.base import Services
from bridge.errors import StoreError
from bridge.ingest import admit, read_body, take, unexpected
from bridge.media.serve import add_routes as media_routes
from bridge.runtime import OPEN_PATIENCE, RUNTIME, Runtime, purge_once
from bridge.store import Store, open_store

log = logging.getLogger("bridge.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OTHER_BODY_BYTES = 64 * 1024  # the most any other request may send (admin JSON bodies)


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


def _route_path(request: web.Request) -> str:
    """The path as routed (`/{token}`), never the token in it."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


# ---------------------------------------------------------------------------- assembly


def create_app(config: Config, *, store: Store | None = None) -> web.Application:
    runtime = Runtime(config=config, carriers=Carriers(config.carriers))
    runtime.destinations = runtime.build(config)
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
    # GET /media/<sha256>: kept MMS files by signed link; 404 without `media:`
    media_routes(app, lambda: (runtime.config.media, runtime.media_store, runtime.media_key))
    console.add_routes(app)  # /ui/: the web console
    replies.install(app)  # POST /slack/events: 404 unless a Slack destination takes replies
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
    app.cleanup_ctx.append(replies.socket_mode_ctx)  # after the store and the destinations are open
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
    # No default headers: each user names itself (Slack's SDK with USER_AGENT as its prefix, a
    # webhook with `client: aiohttp` as bridge.http1 does), and a session-wide User-Agent would
    # come first in every request, ahead of the order http1 sends the same headers in.
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256, limit_per_host=64),
        # no cookies, as bridge.http1 keeps none: a receiver's Set-Cookie would otherwise go back
        # with every later request to its host, whichever destination sends it
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    await runtime.open_media()
    services = Services(http=http, state=runtime.store, ledger=runtime.store, media=runtime.media_store)
    await runtime.open_destinations(services)
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
    await runtime.close_media()
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
