"""The `route` dry run: a postback -> its event, the routes it matches and what each destination
would get, with nothing stored or sent. The CLI's `route` prints it; the console shows it."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from bridge.carriers import Carriers
from bridge.config import Config
from bridge.destinations.base import Destination
from bridge.event import normalize
from bridge.postback import parse
from bridge.routing import Match, route

DRY_RUN_ID = "evt_DRYRUN"


def describe_match(match: Match) -> str:
    """`keyword=STOP|UNSUBSCRIBE shortcode=86717`, or `everything`."""
    parts = []
    for key, value in vars(match).items():
        if value is None:
            continue
        name = key.rstrip("_")
        shown = [getattr(v, "pattern", v) for v in value]
        parts.append(f"{name}={'|'.join(shown)}")
    return " ".join(parts) or "everything"


def route_report(
    body: bytes, config: Config, destinations: Mapping[str, Destination], carriers: Carriers, *, name: str
) -> dict[str, Any]:
    """What `route` says of one postback (`name` is its file, or where it came from). PostbackError
    when the body is not a postback. `destinations` are live ones (never opened is fine):
    each one's `preview` is what it would send."""
    fields = parse(body)
    event = normalize(fields, event_id=DRY_RUN_ID, received_at=datetime.now(UTC), carriers=carriers)
    decision = route(event, config.routes, config.default)
    sends = {
        destination: {
            "via": via,
            "type": destinations[destination].type_name,
            "would_send": destinations[destination].preview(event),
        }
        for destination, via in decision.destinations
    }
    return {
        "file": name,
        "event": event,
        "routes": list(decision.routes),
        "default": decision.defaulted,
        "destinations": sends,
    }


def routes_said(report: Mapping[str, Any]) -> str:
    """The report's `routes matched:` line, after the colon."""
    if report["routes"]:
        return ", ".join(report["routes"])
    if report["default"]:
        return "none -> default"
    return "none, and no default: the event is dropped"
