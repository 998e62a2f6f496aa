"""Event -> the routes it matches and the destinations it goes to (CONTRACT §3). Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from bridge.carriers import spid_key
from bridge.event import Event


@dataclass(frozen=True)
class Match:
    """All given conditions must hold; a tuple means any of its values."""

    origin: tuple[str, ...] | None = None
    type: tuple[str, ...] | None = None
    code: tuple[str, ...] | None = None
    keyword: tuple[str, ...] | None = None  # upper case
    shortcode: tuple[str, ...] | None = None
    from_: tuple[str, ...] | None = None  # globs
    text: tuple[re.Pattern[str], ...] | None = None
    spid: tuple[str, ...] | None = None
    carrier: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Route:
    name: str
    match: Match
    to: tuple[str, ...]
    continue_: bool = False


@dataclass(frozen=True)
class Decision:
    routes: tuple[str, ...]  # names of the routes that matched, in order
    destinations: tuple[tuple[str, str], ...]  # (destination, the first route that named it)
    defaulted: bool = False  # no route matched and `default` took it

    @property
    def dropped(self) -> bool:
        return not self.destinations


def _any(wanted: tuple[str, ...] | None, value: str | None, *, fold: bool = False) -> bool:
    if wanted is None:
        return True
    if value is None:
        return False
    if fold:
        value = value.upper()
        return any(value == w.upper() for w in wanted)
    return value in wanted


def matches(match: Match, event: Event) -> bool:
    if not _any(match.origin, event["origin"], fold=True):
        return False
    if not _any(match.type, event["type"]):
        return False
    if not _any(match.code, event["code"], fold=True):
        return False
    if not _any(match.keyword, event["keyword"], fold=True):
        return False
    if not _any(match.shortcode, event["to"]):
        return False
    if match.spid is not None:  # normalized at load; the event's only when a route asks
        spid = event["spid"]
        if spid is None or spid_key(spid) not in match.spid:
            return False
    if not _any(match.carrier, event["carrier"], fold=True):
        return False
    if match.from_ is not None:
        sender = event["from"]
        if sender is None or not any(fnmatchcase(sender, glob) for glob in match.from_):
            return False
    if match.text is not None:
        text = event["text"]
        if text is None or not any(p.search(text) for p in match.text):
            return False
    return True


def route(event: Event, routes: tuple[Route, ...], default: tuple[str, ...] | None) -> Decision:
    """First match wins unless it says `continue`; `to: []` drops on purpose; else `default`."""
    names: list[str] = []
    targets: dict[str, str] = {}
    for candidate in routes:
        if not matches(candidate.match, event):
            continue
        names.append(candidate.name)
        for destination in candidate.to:
            targets.setdefault(destination, candidate.name)
        if not candidate.continue_:
            break
    if not names and default:
        return Decision((), tuple((d, "default") for d in dict.fromkeys(default)), defaulted=True)
    return Decision(tuple(names), tuple(targets.items()))
