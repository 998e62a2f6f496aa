"""Time-sortable, unique ids (ULID layout: 48-bit milliseconds + 80 random bits, Crockford base32)."""

from __future__ import annotations

import os
import random
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_lock = threading.Lock()
# Seeded once from the OS: ids must be unique, not secret, and os.urandom per millisecond showed
# up as a syscall costing ~100us under load here.
_random = random.Random(os.urandom(16))
_last_ms = 0
_last_rand = 0


# Two Crockford characters per 10 bits: 13 lookups encode a 128-bit ULID (as 130 bits).
_PAIRS = [_ALPHABET[i >> 5] + _ALPHABET[i & 31] for i in range(1024)]


def _encode(value: int) -> str:
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in range(120, -1, -10)])


def ulid(now_ms: int | None = None) -> str:
    """A ULID; ids made in the same millisecond by this process still sort in creation order."""
    global _last_ms, _last_rand
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    with _lock:
        if ms <= _last_ms:
            ms = _last_ms
            rand = _last_rand + 1
        else:
            rand = _random.getrandbits(79)  # leave room to increment
        _last_ms, _last_rand = ms, rand
    return _encode((ms << 80) | rand)


def event_id() -> str:
    return "evt_" + ulid()


def timestamp(ulid_or_id: str) -> float | None:
    """When an id was made (seconds since the epoch), read from its first 10 characters."""
    text = ulid_or_id.rpartition("_")[2]
    if len(text) != 26:
        return None
    ms = 0
    for char in text[:10]:
        value = _ALPHABET.find(char.upper())
        if value < 0:
            return None
        ms = ms * 32 + value
    return ms / 1000
