"""What happens after one delivery attempt: done, retry at T, or dead. Pure, like
Alertmanager's `Retrier.Check`: the destinations say *how* an attempt failed, this decides."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from bridge.digits import is_digits


@dataclass(frozen=True)
class RetryPolicy:
    initial: float = 1.0
    max_interval: float = 600.0
    max_age: float = 86400.0


@dataclass(frozen=True)
class Delivered:
    status: int | None = None
    detail: str | None = None
    tracking_id: str | None = None  # the peer's id for what it took (Skycore's TRACKINGID), kept on the delivery


@dataclass(frozen=True)
class Failed:
    reason: str
    retryable: bool
    status: int | None = None
    retry_after: float | None = None  # seconds, from the peer


Outcome = Delivered | Failed


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class RetryAt:
    at: float
    reason: str


@dataclass(frozen=True)
class Dead:
    reason: str
    # why, as `bridge_deliveries_died_total{reason}` counts it (bridge.metrics.DEAD_REASONS):
    # the peer refused it for good, or retries ran out at max_age
    cause: str = "rejected"


Decision = Done | RetryAt | Dead

RETRYABLE_STATUSES = frozenset({408, 429})  # CONTRACT §6: every other 4xx is dead at once


def parse_retry_after(value: str | None, now: float) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP-date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    if is_digits(value):  # not str.isdigit(): it takes '²', which float() refuses
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment is None:
        return None
    if moment.tzinfo is None:  # asctime dates carry no zone; every HTTP-date is GMT (RFC 9110 5.6.7)
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - now)


def classify_http(status: int, headers: Mapping[str, str], now: float, body: str = "") -> Outcome:
    """An HTTP response -> Delivered for 2xx, else Failed, retryable for 408/429/5xx."""
    if 200 <= status < 300:
        return Delivered(status=status)
    reason = f"HTTP {status}" + (f": {body[:200]}" if body else "")
    retryable = status in RETRYABLE_STATUSES or status >= 500
    retry_after = parse_retry_after(headers.get("Retry-After"), now) if retryable else None
    return Failed(reason=reason, retryable=retryable, status=status, retry_after=retry_after)


def backoff(attempt: int, policy: RetryPolicy, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt `attempt` (from 1): exponential backoff with jitter,
    never under `initial` nor over `max_interval`. The base doubles from `initial` and is capped
    at `max_interval`, base = min(max_interval, initial * 2^(n-1)); the wait is uniform in
    [base, min(max_interval, 2 * base)], so retries spread out without coming early."""
    base: float = min(policy.max_interval, policy.initial * (2 ** max(0, min(attempt - 1, 62))))
    return base + (min(policy.max_interval, 2 * base) - base) * rand()


def decide(
    outcome: Outcome,
    *,
    attempt: int,
    created_at: float,
    now: float,
    policy: RetryPolicy,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """`attempt` counts from 1; `created_at` is when the delivery was stored (or last replayed).
    Retries go on until `max_age` after `created_at` (the deadline): a backoff that would pass it
    is cut short to the deadline, so the last retry is made at the deadline, and an attempt that
    fails at or after it makes the delivery dead. A `Retry-After` beyond the deadline makes it
    dead at once: the peer asked not to be tried again before then."""
    if isinstance(outcome, Delivered):
        return Done()
    if not outcome.retryable:
        return Dead(outcome.reason)
    deadline = created_at + policy.max_age
    if outcome.retry_after is not None:
        at = now + min(outcome.retry_after, policy.max_interval)
    else:
        at = min(now + backoff(attempt, policy, rand), deadline)
    if now >= deadline or at > deadline:
        return Dead(
            f"gave up after {attempt} attempts (max_age {policy.max_age:g}s): {outcome.reason}", cause="max_age"
        )
    return RetryAt(at=at, reason=outcome.reason)
