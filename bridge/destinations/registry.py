"""`type:` -> destination class, and the live destination of a spec. Only config and the
running bridge import this: the destination modules know nothing of each other."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache

from bridge.destinations.base import Destination, DestinationSpec


@cache
def registry() -> Mapping[str, type[Destination]]:
    """`type:` -> destination class."""
    from bridge.destinations.email import EmailDestination
    from bridge.destinations.log import LogDestination
    from bridge.destinations.skycore import SkycoreDestination
    from bridge.destinations.slack import SlackDestination
    from bridge.destinations.webhook import WebhookDestination

    classes: list[type[Destination]] = [
        EmailDestination, LogDestination, SkycoreDestination, SlackDestination, WebhookDestination,
    ]  # fmt: skip
    return {cls.type_name: cls for cls in classes}


def build(spec: DestinationSpec) -> Destination:
    """The live destination of `spec`, not opened yet."""
    return registry()[spec.type].build(spec)


def build_all(specs: Mapping[str, DestinationSpec]) -> dict[str, Destination]:
    return {name: build(spec) for name, spec in specs.items()}
