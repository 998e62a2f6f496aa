"""Reading untrusted values (the config file's, after `${VAR}`s are filled in): every problem
collected with its place (`routes[2].match.keyword`) instead of stopping at the first, with a
did-you-mean for an unknown key. Used by config.py and by each destination's `parse`.

Hand-written rather than pydantic's: its messages are the product's (the invalid-config tests
hold them word for word), an unset variable is reported where its value is used, once, and a
place reads as the user wrote it (`to[1]`, or `to` for a single value).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import time
from datetime import UTC, datetime
from typing import Any

from yarl import URL

from bridge.digits import is_digits, parse_uint
from bridge.secret import Secret, redact_url

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")  # ASCII digits: \d takes any script's
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class EnvStr(str):
    """A value that came whole from one `${VAR}`: `port: ${SMTP_PORT}` may then be a number."""

    __slots__ = ()


class Unset(EnvStr):
    """A value whose variable is unset. Readers report it (the same message as interpolation,
    so it shows once) instead of a confusing "must not be empty"."""

    names: tuple[str, ...] = ()


def unset_message(name: str) -> str:
    return f"environment variable {name} is not set (use ${{{name}:-default}} for a default)"


def parse_duration(value: str | int | float) -> float:
    """`500ms`, `1s`, `10m`, `24h`, `30d`, `1h30m`, or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 500ms, 10s, 5m, 24h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    text = value.strip()
    if is_digits(text.replace(".", "", 1)):
        return float(text)
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"{value!r} is not a duration like 500ms, 10s, 5m, 24h")
    return total


def parse_when(text: str) -> float:
    """An ISO 8601 time (`2026-11-23T10:00:00Z`; one with no offset is UTC), or a duration meaning
    that long ago (`2h`), as a Unix time: what `--since`/`--until` and the admin API's
    `since`/`until` take alike."""
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        example = "an ISO 8601 time like 2026-11-23T10:00:00Z nor a duration like 2h"
        raise ValueError(f"{text!r} is neither {example}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class Reader:
    """Reads raw YAML values, collecting every problem with its place instead of stopping."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def unset(self, value: Unset, path: str) -> None:
        """Report each unset variable in `value`; the reading that found it then gives None."""
        for name in value.names:
            self.error(path, unset_message(name))

    def mapping(
        self,
        value: Any,
        path: str,
        allowed: set[str] | frozenset[str],
        required: set[str] | frozenset[str] = frozenset(),
    ) -> dict[str, Any] | None:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.error(path, f"expected a mapping, got {kind_of(value)}")
            return None
        for key in value:
            if not isinstance(key, str):
                self.error(path, f"keys must be strings, got {key!r}")
            elif key not in allowed:
                hint = suggest(key, allowed)
                self.error(join(path, key), "unknown key" + (f" (did you mean '{hint}'?)" if hint else ""))
        for key in sorted(required - set(value)):
            self.error(join(path, key), "is required")
        return value

    def string(self, value: Any, path: str, *, empty_ok: bool = False) -> str | None:
        if isinstance(value, Unset):
            self.unset(value, path)
            return None
        if isinstance(value, bool) or value is None or isinstance(value, dict | list):
            self.error(path, f"expected a string, got {kind_of(value)}")
            return None
        text = str(value)  # YAML reads 86717 as a number; the user meant the digits
        if not text and not empty_ok:
            self.error(path, "must not be empty")
            return None
        return text

    def secret(self, value: Any, path: str) -> Secret | None:
        text = self.string(value, path)
        return Secret(text) if text is not None else None

    def integer(self, value: Any, path: str, *, minimum: int | None = None) -> int | None:
        if isinstance(value, Unset):
            self.unset(value, path)
            return None
        if isinstance(value, EnvStr) and (number := parse_uint(value.strip())) is not None:
            value = number
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"expected an integer, got {kind_of(value)}")
            return None
        if minimum is not None and value < minimum:
            self.error(path, f"must be at least {minimum}")
            return None
        return value

    def boolean(self, value: Any, path: str) -> bool | None:
        if isinstance(value, Unset):
            self.unset(value, path)
            return None
        if isinstance(value, EnvStr) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if not isinstance(value, bool):
            self.error(path, f"expected true or false, got {kind_of(value)}")
            return None
        return value

    def duration(self, value: Any, path: str, *, positive: bool = True) -> float | None:
        if isinstance(value, Unset):
            self.unset(value, path)
            return None
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            self.error(path, f"expected a duration like 500ms, 10s, 5m, 24h, got {kind_of(value)}")
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.error(path, str(exc))
            return None
        if positive and seconds <= 0:
            self.error(path, "must be more than 0")
            return None
        return seconds

    def strings(self, value: Any, path: str, *, allow_single: bool = True) -> tuple[str, ...] | None:
        """A list of strings; a single string is a list of one where allowed."""
        single = allow_single and not isinstance(value, list)
        if single:
            value = [value]
        if not isinstance(value, list):
            self.error(path, f"expected a list, got {kind_of(value)}")
            return None
        out = []
        for i, item in enumerate(value):
            text = self.string(item, path if single else f"{path}[{i}]")  # the place the user wrote
            if text is not None:
                out.append(text)
        return tuple(out) if len(out) == len(value) else None

    def url(self, value: Any, path: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
        text = self.string(value, path)
        if text is None:
            return None
        scheme, sep, rest = text.partition("://")
        if not sep or scheme.lower() not in schemes or not rest or rest.startswith("/"):
            self.error(path, f"expected an {' or '.join(schemes)} URL, got {redact_url(text)!r}")
            return None
        try:
            parsed = URL(text)
            if not parsed.raw_host or parsed.port is None:
                raise ValueError("no host")
        except (ValueError, TypeError) as exc:  # a port past 65535, a bad IPv6 literal, ...
            self.error(path, f"not a valid URL: {exc}")
            return None
        return text

    def networks(self, value: Any, path: str) -> tuple[Any, ...]:
        items = self.strings(value, path) or ()
        out = []
        for i, item in enumerate(items):
            try:
                out.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                self.error(f"{path}[{i}]", f"{item!r} is not an IP address or CIDR")
        return tuple(out)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def kind_of(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int | float):
        return f"a number ({value})"
    return f"{value!r}"


def suggest(key: str, allowed: set[str] | frozenset[str]) -> str | None:
    close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return close[0] if close else None


def item_place(path: str, raw: Any, i: int) -> str:
    """The place of the i-th of values written as `raw`: `path[i]` in a list, `path` alone."""
    return f"{path}[{i}]" if isinstance(raw, list) else path
