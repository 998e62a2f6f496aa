"""bridge_deliveries_died_total: every way a delivery becomes dead is counted once, with its
reason, whether or not an attempt made it dead (the attempts' outcome="dead" misses a delivery
that dies waiting in the queue past max_age, or whose destination was removed)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge.delivery import Dispatcher
from bridge.destinations.base import Attempt, Destination
from bridge.event import Event
from bridge.metrics import DEAD_REASONS, Metrics
from bridge.retry import Delivered, Failed, Outcome, RetryPolicy
from bridge.store import DeliveryFilter, NewDelivery
from bridge.store.sqlite import SQLiteStore
from tests.conftest import eventually, post, sms

DIED = "bridge_deliveries_died_total"


class Scripted(Destination):
    """A destination that answers every attempt the same way, or raises."""

    type_name = "scripted"

    def __init__(self, name: str, answer: Outcome | Exception, retry: RetryPolicy | None = None) -> None:
        super().__init__(name)
        self.answer = answer
        self.attempts = 0
        self.retry = retry or RetryPolicy(initial=0.05, max_interval=0.2, max_age=3600)
        self.attempt_timeout = 2.0

    @classmethod
    def parse(cls, *args: Any) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return "scripted"

    def preview(self, event: Event) -> Any:
        return None

    async def send(self, event: Event, attempt: Attempt) -> Outcome:
        self.attempts += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def died(metrics: Metrics) -> dict[tuple[str, str], float]:
    """The counter's nonzero samples, by (destination, reason)."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == DIED and sample.value:
                out[(sample.labels["destination"], sample.labels["reason"])] = sample.value
    return out


async def test_each_way_an_attempt_or_max_age_kills_a_delivery_counts_once_with_its_reason(tmp_path: Path):
    store = SQLiteStore(str(tmp_path / "b.db"))
    await store.open()
    short = RetryPolicy(initial=0.05, max_interval=0.2, max_age=1.0)
    destinations: dict[str, Destination] = {
        "refuses": Scripted("refuses", Failed("HTTP 400: no such list", retryable=False, status=400)),
        "raises": Scripted("raises", RuntimeError("a bug")),
        "fails": Scripted("fails", Failed("HTTP 500", retryable=True, status=500), short),
        # down for good: taken to be down after 5 failures and probed one at a time, so most of
        # its backlog is never attempted and dies in the queue at max_age
        "down": Scripted("down", Failed("HTTP 503", retryable=True, status=503), short),
        "fine": Scripted("fine", Delivered(status=200)),
    }
    destinations["down"].concurrency = 1
    backlog = {"refuses": 1, "raises": 1, "fails": 1, "down": 30, "fine": 3}
    n = 0
    for name, count in backlog.items():
        for _ in range(count):
            n += 1
            event = {"id": f"evt_{n:04d}", "type": "sms.received", "origin": "SMS_MO"}
            await store.ingest(event, f"k{n}", [NewDelivery(name, "r", f"c{n}")])  # type: ignore[arg-type]
    metrics = Metrics()
    dispatcher = Dispatcher(store, destinations, on_dead=metrics.died)
    dispatcher.start()
    try:

        async def none_pending() -> bool:
            return not any(s.pending for s in (await store.stats()).values())

        await eventually(none_pending, 15, raises=False)  # the assertions below say what is wrong
        await asyncio.sleep(0.3)  # room for a death to be counted twice
        stats = await store.stats()
    finally:
        await dispatcher.stop()
        await store.close()
    assert {name: s.dead for name, s in stats.items() if s.dead} == {"refuses": 1, "raises": 1, "fails": 1, "down": 30}
    assert destinations["down"].attempts < 30, "the backlog was attempted: its deaths by the queue are not tested"
    assert died(metrics) == {
        ("refuses", "rejected"): 1,
        ("raises", "error"): 1,
        ("fails", "max_age"): 1,
        ("down", "max_age"): 30,
    }


async def test_a_delivery_dead_in_the_queue_is_counted_by_the_instance_that_marked_it(tmp_path: Path):
    """Two dispatchers on one store (two instances on one database): each death once in all."""
    store = SQLiteStore(str(tmp_path / "b.db"))
    await store.open()
    for n in range(20):
        event = {"id": f"evt_{n:04d}", "type": "sms.received", "origin": "SMS_MO"}
        await store.ingest(event, f"k{n}", [NewDelivery("crm", "r", f"c{n}")])  # type: ignore[arg-type]
    await asyncio.sleep(0.4)  # all of them past a max_age of 0.3 s, never attempted
    metrics = [Metrics(), Metrics()]
    dispatchers = []
    for m in metrics:
        crm = Scripted(
            "crm", Failed("HTTP 503", retryable=True), RetryPolicy(initial=0.05, max_interval=0.1, max_age=0.3)
        )
        dispatchers.append(Dispatcher(store, {"crm": crm}, on_dead=m.died))
    for d in dispatchers:
        d.start()
    try:

        async def none_pending() -> bool:
            return not (await store.stats())["crm"].pending

        await eventually(none_pending, 10, interval=0.05, raises=False)  # the assertions below say what is wrong
        await asyncio.sleep(0.3)
    finally:
        for d in dispatchers:
            await d.stop()
        rows = await store.list_deliveries(DeliveryFilter(limit=100))
        await store.close()
    assert [r.status for r in rows] == ["dead"] * 20
    counted = [died(m) for m in metrics]
    assert sum(c.get(("crm", "max_age"), 0) for c in counted) == 20, counted
    assert all(set(c) <= {("crm", "max_age")} for c in counted), counted


# ---------------------------------------------------------------------------- the real bridge


async def scrape(url: str) -> dict[tuple[str, str], float]:
    """Every sample of the counter, zeros too, by (destination, reason)."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == DIED:
                out[(sample.labels["destination"], sample.labels["reason"])] = sample.value
    return out


@pytest.mark.slow
async def test_deliveries_of_a_removed_destination_count_once_on_reload_and_on_restart(sink, bridge_factory):
    sink.default = 503  # crm is down: its deliveries wait
    config = {
        "retry": {"initial": "1h", "max_interval": "1h", "max_age": "24h"},
        "destinations": {
            "crm": {"type": "webhook", "url": sink.url + "/crm"},
            "audit": {"type": "log"},
        },
        "routes": [{"name": "all", "match": {}, "to": ["crm"]}],
    }
    bridge = bridge_factory(config)
    original = bridge.config_path.read_text()
    bridge.start()
    # every configured destination's counters are there from the start, at 0: Prometheus'
    # increase() does not see a first death in a series that appears with it
    before = await scrape(bridge.url)
    assert before == {(d, reason): 0 for d in ("crm", "audit") for reason in DEAD_REASONS}
    for n in (1, 2):
        assert (await post(bridge.url + "/postback", sms(n)))[0] == 200
    await sink.wait_for(2)

    def without_crm() -> None:
        changed = yaml.safe_load(original)
        changed["destinations"].pop("crm")
        changed["routes"][0]["to"] = ["audit"]
        bridge.config_path.write_text(yaml.safe_dump(changed, sort_keys=False))

    without_crm()
    assert bridge.proc is not None
    bridge.proc.send_signal(signal.SIGHUP)

    async def counted() -> bool:
        return (await scrape(bridge.url)).get(("crm", "destination_removed")) == 2

    await eventually(counted)
    await asyncio.sleep(0.5)
    after = await scrape(bridge.url)
    assert {k: v for k, v in after.items() if v} == {("crm", "destination_removed"): 2}

    # removed while the bridge was not running: counted by the start that finds them
    bridge.stop()
    bridge.config_path.write_text(original)
    bridge.start()
    assert (await post(bridge.url + "/postback", sms(3)))[0] == 200
    await sink.wait_for(3)
    bridge.stop()
    without_crm()
    bridge.start()
    restarted = await scrape(bridge.url)
    assert {k: v for k, v in restarted.items() if v} == {("crm", "destination_removed"): 1}
