"""Prometheus metrics, one registry per running bridge (so tests can run several)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from bridge import __version__
from bridge.event import ORIGINS

# Every way a delivery becomes dead, the `reason` of bridge_deliveries_died_total:
# - rejected: the destination refused it for good (a 4xx but 408/429, a Slack error such as
#   channel_not_found, an SMTP 5xx, a redirect, a template that cannot render): no retry;
# - max_age: retries ran out at retry.max_age, after an attempt or waiting in the queue (a
#   destination down or paused for longer: Dispatcher._expire);
# - destination_removed: its destination is no longer in the config (a reload or a restart);
# - error: the destination raised (a bug; the log has the traceback).
DEAD_REASONS = ("rejected", "max_age", "destination_removed", "error")

# Replies from Slack (CONTRACT §7): where they came from, why an event was no reply to send,
# and why a reply was not sent. Bounded sets: each is a time series from the start.
REPLY_SOURCES = ("events_api", "socket_mode")
REPLY_IGNORED = (
    "not_a_message",  # another kind of event
    "subtype",  # an edit, a deletion, a join, the bridge's own post
    "bot",  # a bot's message
    "not_in_a_thread",
    "incomplete",  # no person, text or channel
    "not_a_texters_thread",  # a thread the bridge did not start for a conversation, or another channel
    "empty",  # no text left once Slack's markup is plain text
    "duplicate",  # Slack's retry of an event already stored
)
REPLY_REFUSED = ("opted_out", "too_long")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)


def origin_label(origin: str) -> str:
    """The `origin` label of a postback: one of Skycore's ORIGINs (in its case), "" when there is
    none (refused before it was read), else "other". A label value is a time series for as long as
    the bridge runs: one per ORIGIN a sender makes up would grow /metrics (and Prometheus) without
    end."""
    if origin in ORIGINS or not origin:
        return origin
    upper = origin.upper()
    return upper if upper in ORIGINS else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._children: dict[tuple[Any, ...], Any] = {}
        self.postbacks = Counter(
            "bridge_postbacks_received",
            "Postbacks received, by ORIGIN and outcome (accepted, duplicate, dropped, rejected, unavailable).",
            ["origin", "outcome", "reason"],
            registry=r,
        )
        self.routed = Counter(
            "bridge_events_routed", "Events per matching route ('default' for the default).", ["route"], registry=r
        )
        self.unmatched = Counter(
            "bridge_events_unmatched", "Events no route matched and no default took (dropped).", registry=r
        )
        self.attempts = Counter(
            "bridge_delivery_attempts",
            "Delivery attempts by destination and outcome (delivered, retry, dead).",
            ["destination", "outcome"],
            registry=r,
        )
        # Not the attempts' outcome="dead": a delivery past max_age in a queue nobody could send
        # from, or one whose destination was removed, dies without an attempt. Named apart from
        # the gauge bridge_deliveries_dead (how many are dead now), which a purge or a replay
        # lowers: this one only grows, so increase() over it is what an alert looks at.
        self.deaths = Counter(
            "bridge_deliveries_died",
            "Deliveries that became dead, by destination and reason (" + ", ".join(DEAD_REASONS) + ").",
            ["destination", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "bridge_delivery_latency_seconds",
            "Time from receiving an event to delivering it, per destination.",
            ["destination"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pending = Gauge(
            "bridge_deliveries_pending", "Deliveries waiting to be delivered.", ["destination"], registry=r
        )
        self.dead = Gauge(
            "bridge_deliveries_dead", "Deliveries that gave up (listable, replayable).", ["destination"], registry=r
        )
        self.oldest = Gauge(
            "bridge_oldest_pending_delivery_age_seconds",
            "Age of the oldest undelivered delivery, per destination: the number to alert on.",
            ["destination"],
            registry=r,
        )
        self.reloads = Counter(
            "bridge_config_reloads", "Config reloads by result (success, failure).", ["result"], registry=r
        )
        self.last_reload = Gauge(
            "bridge_config_last_reload_success_timestamp_seconds",
            "When the config was last loaded successfully.",
            registry=r,
        )
        self.store_up = Gauge("bridge_store_up", "1 when the store took the last write, else 0.", registry=r)
        # how much the lane (bridge.lane) takes off aiohttp: an operator weighing `lane: false`
        # sees here what it saves, and that it is off once it stops growing
        self.lane_postbacks = Counter(
            "bridge_lane_postbacks", "Postbacks the lane answered itself (server.lane), not aiohttp.", registry=r
        )
        self.replies = Counter(
            "bridge_replies_received",
            "Replies from Slack stored to be sent (or refused), by source (" + ", ".join(REPLY_SOURCES) + ").",
            ["source"],
            registry=r,
        )
        self.replies_ignored = Counter(
            "bridge_replies_ignored",
            "Slack message events that were no reply to send, by why (" + ", ".join(REPLY_IGNORED) + ").",
            ["why"],
            registry=r,
        )
        self.replies_refused = Counter(
            "bridge_replies_refused",
            "Replies not sent, by why (" + ", ".join(REPLY_REFUSED) + "); the thread says so.",
            ["why"],
            registry=r,
        )
        self.replies_sent = Counter(
            "bridge_replies_sent", "Replies Skycore took as an SMS (sendSMS Success).", registry=r
        )
        self.replies_failed = Counter(
            "bridge_replies_failed",
            "Replies whose SMS went dead at an attempt (sendSMS refused, retries ran out).",
            registry=r,
        )
        for source in REPLY_SOURCES:
            self._child(self.replies, source)
        for why in REPLY_IGNORED:
            self._child(self.replies_ignored, why)
        for why in REPLY_REFUSED:
            self._child(self.replies_refused, why)
        Info("bridge_build", "Build information.", registry=r).info({"version": __version__})

    def _child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once: labels() validates and locks on every call,
        which costs more than the increment on the per-postback and per-attempt paths."""
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*values)
            if len(self._children) < 10_000:  # a bound, though every label value here is bounded
                self._children[key] = child
        return child

    def postback(self, origin: str, outcome: str, reason: str = "") -> None:
        self._child(self.postbacks, origin_label(origin), outcome, reason).inc()

    def route(self, name: str) -> None:
        self._child(self.routed, name).inc()

    def attempt(self, destination: str, outcome: str) -> None:
        self._child(self.attempts, destination, outcome).inc()

    def died(self, destination: str, reason: str, count: int = 1) -> None:
        """`count` deliveries of `destination` became dead (once each: counted by whoever made
        them dead in the store, so several instances on one database do not count one twice)."""
        assert reason in DEAD_REASONS, reason
        self._child(self.deaths, destination, reason).inc(count)

    def destinations(self, names: Iterable[str]) -> None:
        """Show every destination's death counters at 0 from the start: Prometheus' increase()
        sees nothing in a series that appears with its first death already counted."""
        for name in names:
            for reason in DEAD_REASONS:
                self._child(self.deaths, name, reason)

    def delivered_after(self, destination: str, seconds: float) -> None:
        self._child(self.latency, destination).observe(seconds)

    def reply(self, source: str) -> None:
        self._child(self.replies, source).inc()

    def reply_ignored(self, why: str) -> None:
        assert why in REPLY_IGNORED, why
        self._child(self.replies_ignored, why).inc()

    def reply_refused(self, why: str) -> None:
        assert why in REPLY_REFUSED, why
        self._child(self.replies_refused, why).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
