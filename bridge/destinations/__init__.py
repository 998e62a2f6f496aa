"""Destinations: one module per `type:`, each making exactly one attempt per call.

A destination renders an event and sends it once; it says how the attempt went (Delivered, or
Failed with retryable yes/no and a reason). The delivery loop (`bridge.delivery`) owns
attempts, backoff, leases and logging, so no destination retries on its own.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from bridge import __version__
from bridge.config import Reader, RetryPolicy
from bridge.event import Event
from bridge.retry import Outcome

if TYPE_CHECKING:
    import aiohttp

USER_AGENT = f"postback-bridge/{__version__}"


class ConversationState(Protocol):
    """Per-destination memory of a conversation (e.g. the Slack thread of one texter)."""

    async def get_conversation(self, destination: str, key: str) -> str | None: ...

    async def put_conversation(self, destination: str, key: str, value: str) -> None: ...


@dataclass
class Services:
    """What destinations may use, opened and closed by the server."""

    http: aiohttp.ClientSession
    state: ConversationState


@dataclass(frozen=True)
class Attempt:
    delivery_id: int
    number: int  # 1 for the first attempt
    conversation: str  # the (sender, short code) key of the event
    event_id: str = ""


def conversation_key(event: Event) -> str:
    """One texter talking to one short code; status and subscriber events key the same way.
    A delivery report goes from the short code to the texter, so its ends are swapped."""
    sender, recipient = event["from"], event["to"]
    if event["type"] in ("sms.status", "mms.status"):
        sender, recipient = recipient, sender
    return f"{sender or ''}|{recipient or ''}"


class Destination(abc.ABC):
    type_name: ClassVar[str]
    config_keys: ClassVar[frozenset[str]] = frozenset()
    required_keys: ClassVar[frozenset[str]] = frozenset()
    default_concurrency: ClassVar[int] = 16

    #: deliveries of one conversation to this destination go one at a time, in order
    ordered: bool = False
    #: the longest one attempt may take; the delivery loop cancels it after this
    attempt_timeout: float = 30.0
    #: True when `send` bounds all of its own waiting by a timeout shorter than attempt_timeout
    #: (the delivery loop then sets no timer of its own: one per attempt is enough)
    bounds_itself: ClassVar[bool] = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.retry = RetryPolicy()
        self.concurrency = self.default_concurrency

    @classmethod
    @abc.abstractmethod
    def from_config(cls, name: str, options: dict[str, Any], path: str, r: Reader) -> Destination | None:
        """Validate this type's options (errors go to `r` with their place)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for check-config; never a secret."""

    @abc.abstractmethod
    def preview(self, event: Event) -> Any:
        """What `send` would send for this event (JSON-able, secrets masked), for `route`."""

    @abc.abstractmethod
    async def send(self, event: Event, attempt: Attempt) -> Outcome:
        """Make one attempt. Raise only for bugs: the loop then marks the delivery dead."""

    async def send_stored(self, body: str, attempt: Attempt) -> Outcome:
        """What the delivery loop calls, with the event as the store keeps it (JSON): `send`
        with it decoded. A destination that can use the JSON as it is overrides this."""
        return await self.send(json.loads(body), attempt)

    async def open(self, services: Services) -> None:  # noqa: B027 (optional hook)
        """Open clients; called once before the first send."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Close what `open` opened."""


@cache
def registry() -> Mapping[str, type[Destination]]:
    """`type:` -> destination class."""
    from bridge.destinations.email import EmailDestination
    from bridge.destinations.log import LogDestination
    from bridge.destinations.slack import SlackDestination
    from bridge.destinations.webhook import WebhookDestination

    classes: list[type[Destination]] = [EmailDestination, LogDestination, SlackDestination, WebhookDestination]
    return {cls.type_name: cls for cls in classes}
