"""After one attempt: done, retry at T, or dead (CONTRACT §6). Pure functions, fixed clocks."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest
from multidict import CIMultiDict

from bridge.retry import (
    Dead,
    Delivered,
    Done,
    Failed,
    RetryAt,
    RetryPolicy,
    backoff,
    classify_http,
    decide,
    parse_retry_after,
)
from tests.retry_table import (
    BACKOFF_INITIAL,
    BACKOFF_MAX_INTERVAL,
    BACKOFF_WINDOWS,
    DELIVERED,
    PERMANENT,
    RETRYABLE,
    STATUS_TABLE,
    kind,
)

NOW = 1_700_000_000.0
POLICY = RetryPolicy(initial=BACKOFF_INITIAL, max_interval=BACKOFF_MAX_INTERVAL, max_age=86400.0)
NO_HEADERS: CIMultiDict[str] = CIMultiDict()


def after(outcome, *, attempt=1, created_at=NOW, now=NOW, policy=POLICY, rand=lambda: 0.5):
    return decide(outcome, attempt=attempt, created_at=created_at, now=now, policy=policy, rand=rand)


# ---------------------------------------------------------------------------- the shared table


@pytest.mark.parametrize(("status", "expected"), STATUS_TABLE)
def test_classify_http(status, expected):
    outcome = classify_http(status, NO_HEADERS, NOW)
    assert kind(outcome) == expected
    assert outcome.status == status


@pytest.mark.parametrize(("status", "expected"), STATUS_TABLE)
def test_decision_for_each_status(status, expected):
    decision = after(classify_http(status, NO_HEADERS, NOW, body="nope"))
    if expected == DELIVERED:
        assert decision == Done()
    elif expected == PERMANENT:
        assert decision == Dead(f"HTTP {status}: nope")
    else:
        assert isinstance(decision, RetryAt)
        first, top = dict(BACKOFF_WINDOWS)[1]
        assert NOW + first <= decision.at <= NOW + top
        assert decision.reason == f"HTTP {status}: nope"


def test_the_table_covers_the_contract():
    table = dict(STATUS_TABLE)
    assert {s for s, k in table.items() if k == DELIVERED} >= {200, 201, 204}
    assert {s for s, k in table.items() if k == PERMANENT} >= {301, 400, 401, 403, 404, 410, 422}
    assert {s for s, k in table.items() if k == RETRYABLE} >= {408, 429, 500, 502, 503, 504}


def test_the_reason_keeps_the_start_of_the_body():
    outcome = classify_http(422, NO_HEADERS, NOW, body="x" * 1000)
    assert outcome.reason == "HTTP 422: " + "x" * 200
    assert classify_http(404, NO_HEADERS, NOW).reason == "HTTP 404"


def test_failures_other_than_http():
    assert after(Failed("connection refused", retryable=True)) == RetryAt(NOW + 1.5, "connection refused")
    assert after(Failed("invalid_auth", retryable=False)) == Dead("invalid_auth")
    assert after(Delivered()) == Done()


# ---------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        (formatdate(NOW + 90, usegmt=True), 90.0),
        ("Tue, 14 Nov 2023 22:15:20 GMT", 120.0),  # the three HTTP-date forms of RFC 9110
        ("Tuesday, 14-Nov-23 22:15:20 GMT", 120.0),
        ("Tue Nov 14 22:15:20 2023", 120.0),
        ("Tue, 14 Nov 2023 23:15:20 +0100", 120.0),
        (formatdate(NOW - 60, usegmt=True), 0.0),  # in the past: now
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("", None),
        (None, None),
        ("Wed, 99 Foo 2024 00:00:00 GMT", None),
    ],
)
def test_parse_retry_after(value, seconds):
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize("status", [429, 503, 408])
def test_retry_after_seconds_is_honoured(status):
    outcome = classify_http(status, CIMultiDict({"Retry-After": "120"}), NOW)
    assert outcome.retry_after == 120.0
    assert after(outcome, rand=lambda: 0.0) == RetryAt(NOW + 120, f"HTTP {status}")


def test_retry_after_http_date_is_honoured():
    headers = CIMultiDict({"retry-after": formatdate(NOW + 300, usegmt=True)})  # any case, as aiohttp gives it
    assert after(classify_http(429, headers, NOW)) == RetryAt(NOW + 300, "HTTP 429")


def test_retry_after_is_capped_at_max_interval():
    outcome = classify_http(429, CIMultiDict({"Retry-After": "86400"}), NOW)
    assert after(outcome) == RetryAt(NOW + POLICY.max_interval, "HTTP 429")


def test_unusable_retry_after_falls_back_to_backoff():
    outcome = classify_http(503, CIMultiDict({"Retry-After": "later"}), NOW)
    assert outcome.retry_after is None
    assert after(outcome, attempt=3, rand=lambda: 0.5) == RetryAt(NOW + 6.0, "HTTP 503")


def test_retry_after_does_not_make_a_permanent_error_retryable():
    outcome = classify_http(400, CIMultiDict({"Retry-After": "5"}), NOW)
    assert kind(outcome) == PERMANENT
    assert isinstance(after(outcome), Dead)


# ---------------------------------------------------------------------------- max_age


def test_the_last_retry_is_clamped_to_the_deadline():
    """Retries go on until max_age: a backoff that would pass the deadline is cut short to it."""
    policy = RetryPolicy(initial=10.0, max_interval=60.0, max_age=3600.0)
    created = NOW - 3595.0  # the deadline is 5 s away; the backoff (at least 60 s) would pass it
    outcome = Failed("HTTP 503", retryable=True, status=503)
    for rand in (lambda: 0.0, lambda: 0.5, lambda: 1.0):
        decision = after(outcome, attempt=9, created_at=created, policy=policy, rand=rand)
        assert decision == RetryAt(created + 3600.0, "HTTP 503")


def test_a_backoff_short_of_the_deadline_is_not_clamped():
    policy = RetryPolicy(initial=10.0, max_interval=60.0, max_age=3600.0)
    created = NOW - 3000.0  # 600 s left: more than any backoff
    decision = after(Failed("x", retryable=True), attempt=9, created_at=created, policy=policy, rand=lambda: 0.5)
    assert decision == RetryAt(NOW + 60.0, "x")  # max_interval, 540 s short of the deadline


@pytest.mark.parametrize("late", [0.0, 0.001, 5.0, 86400.0])
def test_a_failure_at_or_after_the_deadline_is_dead_with_the_reason(late):
    policy = RetryPolicy(initial=10.0, max_interval=60.0, max_age=3600.0)
    created = NOW - 3600.0 - late  # the clamped last retry, made at the deadline or later
    decision = after(Failed("HTTP 503", retryable=True, status=503), attempt=9, created_at=created, policy=policy)
    assert decision == Dead("gave up after 9 attempts (max_age 3600s): HTTP 503", cause="max_age")


def test_a_failure_just_before_the_deadline_retries_at_the_deadline():
    policy = RetryPolicy(initial=10.0, max_interval=60.0, max_age=3600.0)
    created = NOW - 3599.9
    decision = after(Failed("HTTP 500", retryable=True), attempt=40, created_at=created, policy=policy)
    assert decision == RetryAt(created + 3600.0, "HTTP 500")
    # and that attempt, failing too, is the last
    last = after(Failed("HTTP 500", retryable=True), attempt=41, created_at=created, now=decision.at, policy=policy)
    assert last == Dead("gave up after 41 attempts (max_age 3600s): HTTP 500", cause="max_age")


def test_retry_after_beyond_max_age_is_dead():
    policy = RetryPolicy(initial=1.0, max_interval=600.0, max_age=100.0)
    outcome = Failed("HTTP 429", retryable=True, status=429, retry_after=300.0)
    assert isinstance(after(outcome, policy=policy), Dead)


def test_a_retry_landing_exactly_at_max_age_is_still_made():
    policy = RetryPolicy(initial=10.0, max_interval=10.0, max_age=100.0)
    decision = after(Failed("x", retryable=True), created_at=NOW - 90.0, policy=policy, rand=lambda: 1.0)
    assert decision == RetryAt(NOW + 10.0, "x")


def test_a_permanent_error_is_dead_at_once_even_when_young():
    assert after(Failed("HTTP 410", retryable=False), attempt=1) == Dead("HTTP 410")


# ---------------------------------------------------------------------------- backoff with jitter


@pytest.mark.parametrize(("attempt", "window"), BACKOFF_WINDOWS)
def test_backoff_window_doubles_from_initial_up_to_max_interval(attempt, window):
    base, top = window
    assert backoff(attempt, POLICY, rand=lambda: 0.0) == base
    assert backoff(attempt, POLICY, rand=lambda: 1.0) == top
    assert backoff(attempt, POLICY, rand=lambda: 0.25) == base + (top - base) / 4


def test_backoff_is_never_under_initial_nor_over_max_interval():
    for policy in (POLICY, RetryPolicy(initial=0.05, max_interval=0.2, max_age=3600.0), RetryPolicy(3.0, 3.0, 60.0)):
        for attempt in (1, 2, 3, 5, 8, 13, 64, 10_000):
            for rand in (lambda: 0.0, lambda: 0.5, lambda: 1.0, random.random):
                delay = backoff(attempt, policy, rand=rand)
                assert policy.initial <= delay <= policy.max_interval, (policy, attempt, delay)


def test_backoff_grows_exponentially():
    """Each window starts where the one before ended, until max_interval: the waits double."""
    lows = [backoff(n, POLICY, rand=lambda: 0.0) for n in range(1, 11)]
    highs = [backoff(n, POLICY, rand=lambda: 1.0) for n in range(1, 11)]
    assert lows == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]
    assert highs[:-1] == lows[1:]
    assert highs[-1] == POLICY.max_interval


def test_backoff_from_the_configured_initial():
    policy = RetryPolicy(initial=0.05, max_interval=0.2, max_age=3600.0)
    assert [backoff(n, policy, rand=lambda: 0.0) for n in (1, 2, 3, 4)] == [0.05, 0.1, 0.2, 0.2]
    assert [backoff(n, policy, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.2, 0.2]


def test_jitter_stays_within_the_window_and_spreads():
    delays = [backoff(5, POLICY) for _ in range(2000)]
    assert all(16.0 <= d <= 32.0 for d in delays)
    assert min(delays) < 17.0 and max(delays) > 31.0  # spread over the whole window, not bunched
    first = [backoff(1, POLICY) for _ in range(2000)]
    assert all(1.0 <= d <= 2.0 for d in first)  # the first retry never comes before `initial`
    assert min(first) < 1.1 and max(first) > 1.9


@pytest.mark.parametrize(("attempt", "window"), BACKOFF_WINDOWS)
def test_decide_schedules_within_the_jitter_window(attempt, window):
    outcome = Failed("HTTP 500", retryable=True, status=500)
    low = after(outcome, attempt=attempt, rand=lambda: 0.0)
    high = after(outcome, attempt=attempt, rand=lambda: 1.0)
    assert (low.at, high.at) == (NOW + window[0], NOW + window[1])
