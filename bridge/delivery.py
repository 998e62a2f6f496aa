"""The delivery loop: claim due deliveries, make one attempt each, record what happened.

One loop per destination, so a slow or dead destination never delays another. Within a
destination up to `concurrency` attempts run at once; ordered destinations get only the oldest
pending delivery of each conversation (the store's claim sees to it). The retry decision is the
pure `bridge.retry.decide`; this module only does the I/O around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bridge import logs
from bridge.destinations.base import Attempt, Destination
from bridge.errors import StoreError
from bridge.retry import Dead, Delivered, Done, Failed, Outcome, RetryAt, RetryPolicy, backoff, decide
from bridge.store import AttemptResult, Claim, ClaimFor, ExpiryFollowUp, NewDelivery, Store

log = logging.getLogger("bridge.delivery")

IDLE_POLL = 1.0  # look at the store at least this often (other instances, clock drift)
# After a wake-up, wait this long before claiming, so that one claim takes every postback that
# came in meanwhile: a claim (and later a record) per postback would cost a store round trip and
# a commit each, which under load costs more than the postbacks themselves.
LINGER = 0.005
LEASE_MARGIN = 30.0
BREAK_AFTER = 5  # retryable failures in a row before a destination is taken to be down
# Retries stop at max_age (`decide`), but a backlog behind a destination that is down or paused
# waits in the store unattempted. A check per destination marks what is pending past its
# max_age dead: every 1% of max_age, at least every second and at most every minute, since each
# check reads the destination's pending deliveries (a 24h max_age is not paid for every second).
EXPIRE_EVERY_MIN = 1.0
EXPIRE_EVERY_MAX = 60.0


def expire_grace(max_age: float) -> float:
    """How long a delivery due at its deadline (its last retry) is left for the worker to claim
    before the check may mark it dead unattempted."""
    return min(1.0, max_age / 10)


def expire_every(max_age: float) -> float:
    """Seconds between two checks for deliveries past `max_age`."""
    return min(EXPIRE_EVERY_MAX, max(EXPIRE_EVERY_MIN, max_age / 100))


@dataclass
class Health:
    """Whether a destination looks down. While it does, its loop sends one probe at a time with
    backoff instead of trying every pending delivery: a CRM that is down for an hour costs a
    few requests, not one per backlog item per retry, and the backlog waits in the store.
    A 429/503 with Retry-After pauses the whole destination for that long."""

    failures: int = 0
    paused_until: float = 0.0

    @property
    def down(self) -> bool:
        return self.failures >= BREAK_AFTER

    def record(self, outcome: Outcome, policy: RetryPolicy, now: float) -> None:
        if not (isinstance(outcome, Failed) and outcome.retryable):
            self.failures, self.paused_until = 0, 0.0  # it answered: up (a 4xx is the payload's fault)
            return
        self.failures += 1
        if outcome.retry_after is not None:
            self.paused_until = max(self.paused_until, now + min(outcome.retry_after, policy.max_interval))
        elif self.down:
            delay = backoff(self.failures - BREAK_AFTER + 1, policy)  # in [initial, max_interval]
            self.paused_until = max(self.paused_until, now + delay)


class Dispatcher:
    def __init__(
        self,
        store: Store,
        destinations: Mapping[str, Destination],
        *,
        on_result: Callable[[Destination, Claim, AttemptResult], None] | None = None,
        on_dead: Callable[[str, str, int], None] | None = None,
        follow_ups: Callable[[Destination, Claim, AttemptResult], tuple[NewDelivery, ...]] | None = None,
        expiry_follow_up: Callable[[Destination], ExpiryFollowUp | None] | None = None,
        lease_margin: float = LEASE_MARGIN,
    ) -> None:
        self.store = store
        self.destinations = dict(destinations)
        self.lease_margin = lease_margin
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._on_result = on_result
        # (destination, reason, count) for deliveries this dispatcher made dead: by an attempt's
        # verdict (the Dead decision's cause) or past max_age unattempted (`_expire`)
        self._on_dead = on_dead
        # deliveries of the same event an attempt's verdict adds, recorded with it (bridge.replies)
        self._follow_ups = follow_ups
        # what a delivery that dies unattempted past max_age adds (`Store.expire`; bridge.replies)
        self._expiry_follow_up = expiry_follow_up
        self._wake: dict[str, asyncio.Event] = {}
        # Whether the store may hold deliveries due for a destination that its loop has not
        # claimed: new ones were stored (notify), a verdict freed a conversation's next, a check
        # or a failed claim says to look. A loop woken without it (an attempt finished, claims
        # handed to it) starts what it holds and claims nothing until `_idle_until`: the claim
        # that sent it idle found fewer than it asked for, so nothing else was due then.
        self._due: dict[str, bool] = {}
        self._idle_until: dict[str, float] = {}  # time.monotonic() of its next look at the store
        # an ordered destination's due delivery waits behind an earlier one of its conversation:
        # the verdict that frees it (recorded) makes the loop look again
        self._held: dict[str, bool] = {}
        # verdicts recorded per destination: one recorded while its loop claimed or asked when
        # the next is due (before `_held` could say it waits) frees its conversation too
        self._verdicts: dict[str, int] = {}
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._inflight: dict[str, dict[asyncio.Task[None], Claim]] = {}
        self._ready: dict[str, deque[tuple[Claim, float]]] = {}  # claimed (when), waiting for a slot
        self.health: dict[str, Health] = {name: Health() for name in self.destinations}
        self._stopping = False
        self._background: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._recorder = _Recorder(store, self._recorded, self._follow_ups_claim, self.hand, self.notify)
        self._expiry: asyncio.Task[None] | None = None

    def start(self) -> None:
        for name, destination in self.destinations.items():
            self._wake[name] = asyncio.Event()
            self._due[name] = True
            self._idle_until[name] = 0.0
            self._held[name] = False
            self._verdicts[name] = 0
            self._inflight[name] = {}
            self._ready[name] = deque()
            self._loops[name] = asyncio.create_task(self._run(destination), name=f"deliver:{name}")
        if self.destinations:
            self._expiry = asyncio.create_task(self._expire(), name="expire")
            # deliveries another instance stored wake us at once, not at the next poll
            self.store.listen(self._stored_elsewhere)

    def _stored_elsewhere(self, names: Sequence[str] | None) -> None:
        self.notify(list(self._wake) if names is None else names)

    def notify(self, names: Sequence[str]) -> None:
        """New deliveries are due now for these destinations."""
        for name in names:
            wake = self._wake.get(name)
            if wake is not None:
                self._due[name] = True
                wake.set()

    def claim_for(self, name: str) -> ClaimFor | None:
        """A claim for `name`'s loop to make in the same trip as a write (`Store.ingest_and_claim`,
        `Store.complete_and_claim`) and to `hand` it: as many as it has free slots for, or None
        when it should not take any now (stopping, paused, down, or a backlog of its own)."""
        destination = self.destinations.get(name)
        if destination is None or self._stopping or name not in self._wake:
            return None
        health = self.health[name]
        if health.down or health.paused_until > time.time():
            return None
        free = destination.concurrency - len(self._inflight[name]) - len(self._ready[name])
        if free <= 0:
            return None
        lease = 2 * destination.attempt_timeout + self.lease_margin
        return ClaimFor(name, free, lease, destination.ordered, self.owner)

    def hand(self, then: ClaimFor, claims: Sequence[Claim], expected: str | None = None) -> None:
        """Claims made for `then` (see `claim_for`) to its loop, which starts them without a
        claim of its own. When the claim may have left some due (it got as many as it asked
        for, or `expected`, the event whose delivery should be among them, is not: an ordered
        conversation held back), the loop looks as on `notify`."""
        name = then.destination
        if name not in self._wake or self._stopping:
            if claims:  # stop() may have gathered what it gives back already: these go back now
                task = asyncio.create_task(self._release(list(claims)))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return
        if claims:
            now = time.monotonic()
            self._ready[name].extend((claim, now) for claim in claims)
            self._wake[name].set()
        held = then.ordered if expected is None else all(c.event_id != expected for c in claims)
        if not claims or len(claims) >= then.limit or held:
            # none: the claim failed (a store that claims in turn) or found the others first;
            # the loop looks, as on `notify`, rather than at its next idle poll
            self.notify([name])

    def _follow_ups_claim(self, batch: Sequence[AttemptResult]) -> ClaimFor | None:
        """What the recorder claims with a batch whose results add follow-ups (a reply's
        feedback): for the first of their destinations; the others are told as on `notify`."""
        names = list(dict.fromkeys(d.destination for r in batch for d in r.follow_ups))
        if not names:
            return None
        if len(names) > 1:
            self.notify(names[1:])
        then = self.claim_for(names[0])
        if then is None:
            self.notify(names[:1])
        return then

    async def stop(self, grace: float = 5.0) -> None:
        """Stop claiming; let attempts in flight finish for `grace` seconds, then cancel them and
        give their deliveries back to the queue."""
        self._stopping = True
        self._stopped.set()
        self.store.unlisten(self._stored_elsewhere)
        for wake in self._wake.values():
            wake.set()
        # Loops are not cancelled mid-claim: a claim cut off there would leave its deliveries
        # leased by nobody until the lease runs out. They notice `_stopping` and return.
        background = [*self._loops.values(), *([self._expiry] if self._expiry is not None else [])]
        if background:
            await asyncio.wait(background, timeout=grace)
        inflight = [task for tasks in self._inflight.values() for task in tasks]
        if inflight:
            await asyncio.wait(inflight, timeout=grace)
        unfinished: list[Claim] = [claim for ready in self._ready.values() for claim, _ in ready]
        for ready in self._ready.values():
            ready.clear()
        for tasks in self._inflight.values():
            for task, claim in list(tasks.items()):
                if not task.done():
                    task.cancel()
                    unfinished.append(claim)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, *[t for ts in self._inflight.values() for t in ts], return_exceptions=True)
        await self._recorder.drain(grace)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if unfinished:
            try:
                await self.store.release(unfinished, owner=self.owner)
            except StoreError:
                log.warning("could not release leased deliveries; they are retried when their lease runs out")
            log.info("released leased deliveries", extra={"count": len(unfinished)})

    async def _run(self, destination: Destination) -> None:
        name = destination.name
        wake, inflight, ready = self._wake[name], self._inflight[name], self._ready[name]
        # A claim may wait in `ready` for about one attempt before its own attempt starts, so
        # the lease covers two attempts and a margin; one that waited longer is given back.
        lease = 2 * destination.attempt_timeout + self.lease_margin
        start_within = destination.attempt_timeout + self.lease_margin / 2
        health = self.health[name]

        def finished(task: asyncio.Task[None]) -> None:
            inflight.pop(task, None)
            wake.set()  # a slot is free: what waits in `ready` starts (and a backlog is claimed)

        async def start_ready(slots: int) -> None:
            stale = []
            while ready and len(inflight) < slots:
                claim, claimed_at = ready.popleft()
                if time.monotonic() - claimed_at > start_within:
                    stale.append(claim)  # its lease could run out mid-attempt: another may take it
                    continue
                task = asyncio.create_task(self._attempt(destination, claim, claimed_at))
                inflight[task] = claim
                task.add_done_callback(finished)
            await self._release(stale)

        lingered = False
        while not self._stopping:
            wake.clear()  # before claiming, so a notify during the claim is not lost
            pause = health.paused_until - time.time()
            if pause > 0:
                # what was claimed ahead goes back now: its lease would run out while we wait
                await self._release([claim for claim, _ in ready])
                ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await self._stopped.wait()
                continue
            slots = 1 if health.down else destination.concurrency
            await start_ready(slots)
            idle_for = self._idle_until[name] - time.monotonic()
            if not self._due[name] and idle_for > 0:
                # woken by a finished attempt or handed claims, nothing stored meanwhile: the
                # store had nothing more due when this loop last looked
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(idle_for):
                        await wake.wait()
                continue
            # Claims come a batch at a time, one batch ahead of the free slots, so a finished
            # attempt starts the next from memory instead of waiting for a claim of one.
            want = (slots - len(inflight)) + (0 if health.down else slots) - len(ready)
            if want <= 0 or len(ready) > slots // 2:
                await wake.wait()  # a slot frees up: top up at once, this is a backlog
                lingered = True
                continue
            if not lingered:
                lingered = True
                await asyncio.sleep(LINGER)
                continue  # slots may have changed meanwhile
            lingered = False
            self._due[name] = False  # before claiming, so a notify during the claim is not lost
            self._idle_until[name] = 0.0
            verdicts = self._verdicts[name]  # as a notify: one recorded from here on is not lost
            try:
                claims = await self.store.claim(
                    name, limit=want, lease=lease, ordered=destination.ordered, owner=self.owner
                )
            except Exception as exc:  # the store (StoreError) or a bug: the loop must not die
                log.warning("cannot claim deliveries", extra={"destination": name, "error": str(exc)})
                self._due[name] = True
                await asyncio.sleep(IDLE_POLL)
                continue
            claimed_at = time.monotonic()
            ready.extend((claim, claimed_at) for claim in claims)
            if self._stopping:
                return  # stop() gives back what is in `ready`
            await start_ready(slots)
            if len(claims) == want:
                lingered = True  # more may be due now: claim again at once
                continue
            await self._idle(destination, wake, verdicts)

    async def _idle(self, destination: Destination, wake: asyncio.Event, verdicts: int) -> None:
        """Fewer deliveries were due than asked for: sleep until the next is due or a new one
        arrives (notify). An attempt that finishes meanwhile (or claims handed over) wakes the
        loop to start what it holds, and it sleeps on (`_idle_until`); a verdict recorded for an
        ordered destination whose due delivery waits behind its conversation makes it look."""
        name = destination.name
        if self._due[name]:
            return  # stored while claiming (under load nearly always): claim again, no need to ask when
        try:
            due = await self.store.next_due(name)
        except Exception:
            due = None
        now = time.time()
        if due is None:
            timeout = IDLE_POLL
        elif due > now:
            timeout = min(IDLE_POLL, due - now)
        else:
            # Due but not handed out: for an ordered destination, behind an earlier delivery of
            # its conversation (its verdict, recorded, wakes us); otherwise just taken by another
            # instance.
            if destination.ordered and self._verdicts[name] != verdicts:
                return  # a verdict recorded since the claim may have freed it: claim again
            timeout = IDLE_POLL if destination.ordered else 0.01
            self._held[name] = destination.ordered
        self._idle_until[name] = time.monotonic() + timeout
        if self._due[name]:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await wake.wait()

    async def _expire(self) -> None:
        """Mark dead what is pending past its destination's `retry.max_age` and not being sent
        (see EXPIRE_EVERY_MIN). A delivery being sent is left to its attempt's verdict."""
        due = dict.fromkeys(self.destinations, 0.0)
        while not self._stopping:
            for name, destination in self.destinations.items():
                if self._stopping or time.monotonic() < due[name]:
                    continue
                max_age = destination.retry.max_age
                due[name] = time.monotonic() + expire_every(max_age)
                try:
                    follow_up = self._expiry_follow_up(destination) if self._expiry_follow_up is not None else None
                    count = await self.store.expire(
                        name, max_age=max_age, grace=expire_grace(max_age), follow_up=follow_up
                    )
                except Exception as exc:  # the store (StoreError) or a bug: the check must not die
                    log.warning(
                        "cannot mark deliveries past max_age dead", extra={"destination": name, "error": str(exc)}
                    )
                    continue
                if count:
                    self._dead(name, "max_age", count)
                    log.warning(
                        "deliveries past max_age are dead",
                        extra={"destination": name, "count": count, "max_age_s": max_age},
                    )
                    self.notify([name])  # the next deliveries of their conversations are due
                    if follow_up is not None:
                        self.notify([follow_up.destination])
            pause = min(due.values()) - time.monotonic()
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await self._stopped.wait()

    async def _release(self, claims: list[Claim]) -> None:
        if claims:
            with contextlib.suppress(StoreError):  # else their lease runs out: retried then
                await self.store.release(claims, owner=self.owner)

    def _dead(self, destination: str, reason: str, count: int) -> None:
        if self._on_dead is not None:
            try:
                self._on_dead(destination, reason, count)
            except Exception:  # metrics only: the deliveries are dead in the store
                log.exception("after marking deliveries dead")

    def _recorded(self, batch: list[tuple[Destination, AttemptResult, float]], died: list[AttemptResult]) -> None:
        now, clock = time.time(), time.monotonic()
        for destination, result, _ in batch:
            self._log_attempt(destination, result)
            if self._on_result is not None:
                self._on_result(destination, result.claim, result)
            name = destination.name
            if name not in self._wake:
                continue
            self._verdicts[name] += 1
            decision = result.decision
            if isinstance(decision, RetryAt):  # the loop looks again when it is due
                at = clock + max(0.0, decision.at - now)
                if at < self._idle_until[name]:
                    self._idle_until[name] = at
                    self._wake[name].set()
            elif destination.ordered and self._held[name]:
                self._held[name] = False  # the conversation's next delivery may be due now
                self.notify([name])
        for result in died:
            assert isinstance(result.decision, Dead)
            self._dead(result.claim.destination, result.decision.cause, 1)
            if result.claim.destination in self._wake and self.destinations[result.claim.destination].ordered:
                self.notify([result.claim.destination])  # the conversation's next delivery may be due now

    @staticmethod
    def _log_attempt(destination: Destination, result: AttemptResult) -> None:
        claim, decision = result.claim, result.decision
        extra: dict[str, object] = {
            "event_id": claim.event_id,
            "route": claim.route,
            "destination": destination.name,
            "delivery_id": claim.id,
            "attempt": claim.attempt,
            "outcome": result.outcome,
            "status": result.status,
            "duration_ms": round(result.duration * 1000, 1),
        }
        if result.error is not None:
            extra["error"] = result.error
        if result.detail is not None:
            extra["detail"] = result.detail
        if isinstance(decision, RetryAt):
            extra["retry_in_s"] = round(decision.at - time.time(), 3)
        logs.hot(log, logging.WARNING if result.outcome == "dead" else logging.INFO, "delivery attempt", extra)

    async def _attempt(self, destination: Destination, claim: Claim, claimed_at: float) -> None:
        started, t0 = time.time(), time.monotonic()
        attempt = Attempt(
            delivery_id=claim.id,
            number=claim.attempt,
            conversation=claim.conversation,
            event_id=claim.event_id,
            route=claim.route,
        )
        try:
            if destination.bounds_itself:
                outcome: Outcome = await destination.send_stored(claim.body, attempt)
            else:
                async with asyncio.timeout(destination.attempt_timeout):
                    outcome = await destination.send_stored(claim.body, attempt)
        except TimeoutError:
            outcome = Failed(reason=f"attempt took longer than {destination.attempt_timeout:g}s", retryable=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a poison event: dead for this destination, loop goes on
            log.exception(
                "destination raised",
                extra={"event_id": claim.event_id, "destination": destination.name, "attempt": claim.attempt},
            )
            outcome = Failed(reason=f"{type(exc).__name__}: {exc}", retryable=False)
            raised = True
        else:
            raised = False
        if isinstance(outcome, Failed):
            outcome = dataclasses.replace(outcome, reason=_printable(outcome.reason))
        duration = time.monotonic() - t0
        now = time.time()
        health = self.health[destination.name]
        was_down = health.down
        if destination.has_health:
            health.record(outcome, destination.retry, now)
        if health.down != was_down:  # down is worth a warning; back up is good news
            log.log(
                logging.WARNING if health.down else logging.INFO,
                "destination down: probing one delivery at a time" if health.down else "destination back up",
                extra={"destination": destination.name, "failures": health.failures},
            )
        decision = decide(
            outcome, attempt=claim.attempt, created_at=claim.created_at, now=now, policy=destination.retry
        )
        if raised and isinstance(decision, Dead):
            decision = dataclasses.replace(decision, cause="error")  # not the peer's answer: ours
        label = "delivered" if isinstance(decision, Done) else "dead" if isinstance(decision, Dead) else "retry"
        result = AttemptResult(
            claim=claim,
            started_at=started,
            duration=duration,
            outcome=label,
            status=outcome.status,
            error=None if isinstance(outcome, Delivered) else outcome.reason,
            decision=decision,
            detail=outcome.detail if isinstance(outcome, Delivered) else None,
            tracking_id=outcome.tracking_id if isinstance(outcome, Delivered) else None,
        )
        if self._follow_ups is not None and label != "retry":
            try:
                follow_ups = self._follow_ups(destination, claim, result)
            except Exception:  # feedback only: the verdict is recorded without it
                log.exception("cannot work out what follows an attempt", extra={"event_id": claim.event_id})
                follow_ups = ()
            if follow_ups:  # (rarely: a reply's SMS) a copy costs more than the check
                result = dataclasses.replace(result, follow_ups=follow_ups)
        # Recorded in the background, batched with other attempts' results: the slot is free for
        # the next delivery now. Until it is recorded the delivery stays leased (and, for ordered
        # destinations, holds back the rest of its conversation), so nothing is sent twice.
        lease_ends = claimed_at + 2 * destination.attempt_timeout + self.lease_margin
        self._recorder.add(destination, result, give_up_at=lease_ends - self.lease_margin / 2)


def _printable(text: str) -> str:
    """Text a store can keep: a peer's reply decoded with surrogateescape (an SMTP server's
    Latin-1) would make the whole batch of results fail to record."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Recorder:
    """Writes attempt results to the store in batches: whatever piled up while the previous
    write was in flight goes in the next one. While the store cannot take them (disk full) it
    keeps trying until well before each lease runs out: what the peer already has is then not
    sent again once the store is back (recording twice is harmless). After that the lease runs
    out and the delivery is tried again: at least once, never lost."""

    def __init__(
        self,
        store: Store,
        on_recorded: Callable[[list[tuple[Destination, AttemptResult, float]], list[AttemptResult]], None],
        claim_for: Callable[[Sequence[AttemptResult]], ClaimFor | None],
        hand: Callable[[ClaimFor, Sequence[Claim]], None],
        notify: Callable[[Sequence[str]], None],
    ) -> None:
        self.store = store
        self._on_recorded = on_recorded
        # a batch with follow-ups claims them in the same trip, for their loop (a reply's feedback)
        self._claim_for = claim_for
        self._hand = hand
        self._notify = notify
        self._pending: list[tuple[Destination, AttemptResult, float]] = []
        self._task: asyncio.Task[None] | None = None
        self._warned: set[int] = set()  # said once per delivery, not once per retry

    def add(self, destination: Destination, result: AttemptResult, *, give_up_at: float) -> None:
        self._pending.append((destination, result, give_up_at))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="record-attempts")

    async def drain(self, grace: float) -> None:
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), grace)

    async def _run(self) -> None:
        delay = 0.1
        await asyncio.sleep(LINGER)  # one write for the results of attempts finishing about now
        while self._pending:
            batch, self._pending = self._pending, []
            results = [result for _, result, _ in batch]
            then = self._claim_for(results) if any(r.follow_ups for r in results) else None
            try:
                if then is None:
                    died = await self.store.complete(results)
                else:
                    died, claims = await self.store.complete_and_claim(results, then)
                    self._hand(then, claims)
            except StoreError as exc:
                for destination, result, _ in batch:
                    if result.claim.id not in self._warned:
                        self._warned.add(result.claim.id)
                        log.warning(
                            "cannot record attempt",
                            extra={
                                "event_id": result.claim.event_id,
                                "destination": destination.name,
                                "error": str(exc),
                            },
                        )
                now = time.monotonic()
                kept = [item for item in batch if item[2] > now + delay]
                self._warned.difference_update(r.claim.id for _, r, give_up in batch if give_up <= now + delay)
                self._pending = kept + self._pending
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            except Exception:  # one bad result must not keep its neighbours from being recorded
                batch, died = await self._one_by_one(batch)
                if then is not None:  # recorded without the claim: its loop claims them
                    self._notify([then.destination])
            delay = 0.1
            self._warned.difference_update(result.claim.id for _, result, _ in batch)
            try:
                self._on_recorded(batch, died)
            except Exception:  # logs and metrics only: the results are recorded
                log.exception("after recording attempts")

    async def _one_by_one(
        self, batch: list[tuple[Destination, AttemptResult, float]]
    ) -> tuple[list[tuple[Destination, AttemptResult, float]], list[AttemptResult]]:
        """Record each result alone; those that still fail are dropped (their lease runs out and
        they are tried again). Returns the recorded ones, and those of them that made their
        delivery dead."""
        recorded, died = [], []
        for item in batch:
            try:
                died += await self.store.complete([item[1]])
            except Exception:
                log.exception("cannot record attempt", extra={"event_id": item[1].claim.event_id})
                continue
            recorded.append(item)
        return recorded, died
