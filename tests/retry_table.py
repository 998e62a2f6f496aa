"""One table of HTTP statuses -> what the delivery loop must make of them (CONTRACT §6), and
one of how long it waits before each retry.

Shared like Alertmanager's notify tests: every destination that speaks HTTP checks its own
outcomes against this table, so "is 429 retryable?" has one answer across the project.

    from tests.retry_table import STATUS_TABLE, kind
    assert kind(await destination.send(event, attempt)) == expected
"""

from __future__ import annotations

from bridge.retry import Delivered, Failed, Outcome

DELIVERED = "delivered"
RETRYABLE = "retryable"
PERMANENT = "permanent"

STATUS_TABLE: list[tuple[int, str]] = [
    (200, DELIVERED),
    (201, DELIVERED),
    (202, DELIVERED),
    (204, DELIVERED),
    (301, PERMANENT),  # a moved webhook URL needs a config change, not a retry
    (302, PERMANENT),
    (400, PERMANENT),
    (401, PERMANENT),
    (403, PERMANENT),
    (404, PERMANENT),
    (405, PERMANENT),
    (409, PERMANENT),
    (410, PERMANENT),
    (413, PERMANENT),
    (422, PERMANENT),
    (408, RETRYABLE),
    (425, PERMANENT),  # CONTRACT §6 names 408 and 429 only
    (429, RETRYABLE),
    (500, RETRYABLE),
    (502, RETRYABLE),
    (503, RETRYABLE),
    (504, RETRYABLE),
    (507, RETRYABLE),
]

# The wait after failed attempt n, for the default policy (initial 1s, max_interval 10m): uniform
# in [base, top], base = min(max_interval, initial * 2^(n-1)), top = min(max_interval, 2 * base).
# So never less than `initial`, never more than `max_interval`, and doubling in between.
BACKOFF_INITIAL = 1.0
BACKOFF_MAX_INTERVAL = 600.0
BACKOFF_WINDOWS: list[tuple[int, tuple[float, float]]] = [
    (1, (1.0, 2.0)),
    (2, (2.0, 4.0)),
    (3, (4.0, 8.0)),
    (4, (8.0, 16.0)),
    (9, (256.0, 512.0)),
    (10, (512.0, 600.0)),
    (11, (600.0, 600.0)),
    (12, (600.0, 600.0)),
    (100, (600.0, 600.0)),
    (10_000, (600.0, 600.0)),
]


def kind(outcome: Outcome) -> str:
    """An attempt's outcome as one word of the table."""
    if isinstance(outcome, Delivered):
        return DELIVERED
    assert isinstance(outcome, Failed), outcome
    return RETRYABLE if outcome.retryable else PERMANENT
