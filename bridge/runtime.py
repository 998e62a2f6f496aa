"""The running bridge: the config in force and its reload, the store and the delivery loops,
the metrics, and the patience with a slow store. One Runtime per app, at `app[RUNTIME]`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from bridge.carriers import Carriers
from bridge.config import MEDIA_DESTINATION, Config, MediaConfig, load
from bridge.delivery import Dispatcher
from bridge.destinations.base import Destination, Services
from bridge.destinations.registry import build_all
from bridge.errors import BridgeError, ConfigError, StoreError
from bridge.ids import timestamp
from bridge.media import links
from bridge.media.step import MediaStep
from bridge.media.stores import MediaStore, MediaStoreError, open_media_store
from bridge.metrics import Metrics
from bridge.store import AttemptResult, Claim, ExpiryFollowUp, NewDelivery, Store

log = logging.getLogger("bridge.runtime")


def settle_heap() -> None:
    """Put what exists now out of the cyclic collector's sight (gc.freeze), once the app has
    started and before it listens: the modules, the config, the store and the destinations live
    as long as the process, and a full collection that walked them all stopped the event loop
    for about 30 ms (measured at 3,000 postbacks/s: every second or two, the p99 of every
    postback in flight). Frozen, a full collection walks only what serving made since. Frozen
    objects are still freed when nothing refers to them; one that ends in a reference cycle
    stays until the heap is thawed, so this thaws it first and collects: after a reload (the
    old config's objects), and once a store that could not be reached at start is open."""
    if gc.get_freeze_count():
        gc.unfreeze()
    gc.collect()
    gc.freeze()


# Skycore gives up on an answer after 10 s; a store slower than this gets a 503 (it may still
# commit: Skycore's retry is then answered "duplicate", and the event is delivered once)
STORE_PATIENCE = 8.0
# A PostgreSQL store that cannot be reached when `serve` starts is tried again after 1 s, then
# twice as long each time up to 30 s; postbacks get a 503 (Skycore retries) until it opens.
CONNECT_FIRST, CONNECT_MAX = 1.0, 30.0
# How long `serve` waits for that store before it listens anyway: a database host that hangs
# must not keep /healthz from answering (a liveness probe would restart us for it).
OPEN_PATIENCE = 5.0


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
    """Everything a request needs. On reload `config`, `carriers`, `destinations` (the live ones
    built from the config's specs) and `dispatcher` are swapped whole, so a request sees either
    the old config or the new one, never a mix."""

    config: Config
    carriers: Carriers
    destinations: dict[str, Destination] = field(default_factory=dict)
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
    # called after each attempt is recorded (bridge.replies); each must be quick and not raise
    after_attempt: list[Callable[[Destination, Claim, AttemptResult], None]] = field(default_factory=list)
    # deliveries of the same event an attempt's verdict adds, in the transaction that records it
    # (a reply's feedback in its thread: bridge.replies)
    follow_ups: list[Callable[[Destination, Claim, AttemptResult], tuple[NewDelivery, ...]]] = field(
        default_factory=list
    )
    # the same for deliveries that die unattempted past max_age, in the transaction that marks
    # them dead (a reply's SMS: its thread shows it); one per destination at most
    expiry_follow_ups: list[Callable[[Destination], ExpiryFollowUp | None]] = field(default_factory=list)
    # the same for pending deliveries that die because their destination left the config
    # (`sweep`), asked once the config in force has its destinations; one at most
    removal_follow_ups: list[Callable[[], ExpiryFollowUp | None]] = field(default_factory=list)
    # the bridge's own destinations (`~feedback`) beside the configured ones, built from a config
    # and the live destinations built with it (bridge.replies); see Config.internal
    internal: list[Callable[[Config, dict[str, Destination]], dict[str, Destination]]] = field(default_factory=list)
    # called with (old config, new config) once a reload swapped them (Socket Mode clients)
    after_reload: list[Callable[[Config, Config], Awaitable[None]]] = field(default_factory=list)

    # signs their links (the same for every instance on one store: `media_link_key`)
    media_store: MediaStore | None = None
    media_key: bytes | None = None

    def build(self, config: Config) -> dict[str, Destination]:
        """The live destinations of `config` (not opened yet): the configured ones, and the
        bridge's own that it needs (`~media`; `~feedback` through `internal`)."""
        built = build_all(config.destinations)
        if config.media is not None:
            built[MEDIA_DESTINATION] = MediaStep(
                config.media, finish=self.media_done, key=lambda: self.media_key, files=lambda: self.media_store
            )
        for make in self.internal:
            built.update(make(config, built))
        return built

    async def open_media(self) -> None:
        """The media store, with a `media:` section (a directory needs nothing; S3 a client)."""
        media = self.config.media
        if media is not None and self.media_store is None:
            store = open_media_store(media)
            await store.open()
            self.media_store = store

    async def close_media(self) -> None:
        if self.media_store is not None:
            await self.media_store.close()
            self.media_store = None

    async def _media_key(self, media: MediaConfig) -> None:
        """The links' signing key: from `media.secret`, else a random one kept in the store (the
        first instance to ask keeps it; links stay good across restarts and instances)."""
        assert self.store is not None
        if media.secret is not None:
            self.media_key = links.key_from_secret(media.secret.reveal())
        elif self.media_key is None:
            try:
                kept = await self.store.keep_meta("media_link_key", os.urandom(32).hex())
                self.media_key = bytes.fromhex(kept)
            except (StoreError, ValueError) as exc:
                log.error("cannot read the media links' key; /media answers 503", extra={"error": str(exc)})

    async def media_done(self, event_id: str, body: str | None, ended: bool) -> None:
        """The media step wrote `body` (None: nothing new); when it has `ended`, the event's
        deliveries that wait for it are due now (StoreError: the step tries again)."""
        assert self.store is not None
        names = await self.store.update_event(event_id, body, release_except=MEDIA_DESTINATION if ended else None)
        if names and self.dispatcher is not None:
            self.dispatcher.notify(names)

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

    async def sweep(self, *, leave_leased: bool = False) -> None:
        """Pending deliveries to destinations the config no longer has are dead (listable,
        replayable once it is back): never left pending for a destination nobody sends to. And
        a destination that is ordered now (Slack `thread_by_sender` turned on) orders what was
        queued for it before, too. A reply's SMS that dies so still shows in its thread, while
        the config takes replies (`removal_follow_ups`: its `~feedback`, in the same transaction).
        With `leave_leased` (a reload, while the old config's loops still run), what is leased
        is left to its attempt: its verdict stands, and what was claimed but not sent is given
        back when those loops stop, for the reload's second sweep."""
        assert self.store is not None
        destinations = self.destinations  # the internal ones too (`~media`): theirs are not unknown
        follow_up = next((found for hook in self.removal_follow_ups if (found := hook()) is not None), None)
        try:
            removed = await self.store.abandon_unknown(
                set(destinations) | self.config.internal,
                "destination removed",
                follow_up=follow_up,
                leave_leased=leave_leased,
            )
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
            if follow_up is not None and self.dispatcher is not None:
                self.dispatcher.notify([follow_up.destination])  # what their threads show is due now
        if ordered:
            log.info("pending deliveries now go in conversation order", extra={"count": ordered})

    async def open_destinations(self, services: Services) -> None:
        self.services = services
        for destination in self.destinations.values():
            await destination.open(services)

    async def start_delivery(self) -> None:
        """Start the delivery loops, once the store is open."""
        assert self.store is not None
        async with self._reload_lock:  # with the config a reload may be swapping meanwhile
            if self.config.media is not None:
                await self._media_key(self.config.media)
            await self.sweep()  # the config may have lost a destination since the last run
            self.dispatcher = self._dispatcher(self.destinations)
            self.dispatcher.start()

    def _dispatcher(self, destinations: dict[str, Destination]) -> Dispatcher:
        assert self.store is not None
        self.metrics.destinations(destinations)
        return Dispatcher(
            self.store,
            destinations,
            on_result=self._on_result,
            on_dead=self.metrics.died,
            follow_ups=self._follow_ups,
            expiry_follow_up=self._expiry_follow_up,
        )

    def _expiry_follow_up(self, destination: Destination) -> ExpiryFollowUp | None:
        for hook in self.expiry_follow_ups:
            found = hook(destination)
            if found is not None:
                return found
        return None

    def _follow_ups(self, destination: Destination, claim: Claim, result: AttemptResult) -> tuple[NewDelivery, ...]:
        out: tuple[NewDelivery, ...] = ()
        for hook in self.follow_ups:
            out += hook(destination, claim, result)
        return out

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
        if gc.get_freeze_count():  # serving froze the heap without the store's pool in it
            settle_heap()

    async def stop_delivery(self) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        for destination in self.destinations.values():
            await destination.close()

    def _on_result(self, destination: Destination, claim: Claim, result: AttemptResult) -> None:
        for hook in self.after_attempt:
            try:
                hook(destination, claim, result)
            except Exception:  # feedback only: the attempt is recorded
                log.exception("after an attempt")
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
                if gc.get_freeze_count():  # serving froze the heap at start: the old config's cycles go
                    settle_heap()
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
            ("server.lane", str(old.server.lane).lower(), str(new.server.lane).lower()),  # the listening socket's
        ):
            if running != wanted:
                problems.append(f"{what}: cannot change while running ({running}, file says {wanted}); restart")
        kept_in = [None if c.media is None else (c.media.store, c.media.s3) for c in (old, new)]
        if old.media is not None and kept_in[0] != kept_in[1]:
            problems.append("media: the store cannot change or go while running; restart")
        elif old.media is None and new.media is not None:
            problems.append("media: cannot be turned on while running; restart")
        if problems:
            return problems
        assert self.store is not None and self.services is not None
        if new.media is not None:
            await self._media_key(new.media)
        built = self.build(new)
        for destination in built.values():
            await destination.open(self.services)
        # Not delivering yet (the store has not opened): `start_delivery` will, with this config.
        old_dispatcher, old_destinations = self.dispatcher, self.destinations
        dispatcher = None if old_dispatcher is None else self._dispatcher(built)
        self.config, self.carriers, self.destinations, self.dispatcher = new, Carriers(new.carriers), built, dispatcher
        try:
            if dispatcher is not None:
                dispatcher.start()
                # postbacks that were routed with the old config are stored before we look
                await self._routed_with(old, patience=old.server.client_timeout + 15)
                await self.sweep(leave_leased=True)  # the old loops' attempts are theirs to finish
        finally:
            if old_dispatcher is not None:
                await old_dispatcher.stop()
            for destination in old_destinations.values():
                await destination.close()
        if dispatcher is not None:
            # the old loops have stopped: their verdicts are in, and what they had claimed but not
            # sent is given back, so it dies now (a reply's with its line in the thread), not
            # pending for good; other instances' leases are still theirs
            await self.sweep(leave_leased=True)
        for hook in self.after_reload:
            try:
                await hook(old, new)
            except Exception:  # the reload is done; what a hook starts is its own to log
                log.exception("after a config reload")
        return []

    async def refresh_gauges(self) -> None:
        """Pending, dead and oldest-pending age per destination, read from the store."""
        assert self.store is not None
        stats = await self.store.stats()
        now = time.time()
        for name in set(self.config.destinations) | self.config.internal | set(stats):
            current = stats.get(name)
            self.metrics.pending.labels(name).set(current.pending if current else 0)
            self.metrics.dead.labels(name).set(current.dead if current else 0)
            oldest = current.oldest_pending if current else None
            self.metrics.oldest.labels(name).set(max(0.0, now - oldest) if oldest else 0)


RUNTIME = web.AppKey("runtime", Runtime)


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
    media = runtime.config.media
    if media is not None and runtime.media_store is not None:
        try:
            files = await runtime.media_store.purge(time.time() - media.keep)
        except MediaStoreError as exc:
            log.warning("media purge failed; trying again later", extra={"error": str(exc)})
        else:
            if files:
                log.info("media purge", extra={"files": files})
    return total
