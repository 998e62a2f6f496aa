"""What every destination is: the `Destination` base, the spec the config makes of one (data,
no connection), and what the delivery loop hands an attempt.

A destination renders an event and sends it once; it says how the attempt went (Delivered, or
Failed with retryable yes/no and a reason). The delivery loop (`bridge.delivery`) owns
attempts, backoff, leases and logging, so no destination retries on its own.
"""

from __future__ import annotations

import abc
import asyncio
import json
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from bridge import __version__
from bridge.event import Event
from bridge.retry import Failed, Outcome, RetryPolicy
from bridge.templates import RenderError, Templates
from bridge.validate import Reader

if TYPE_CHECKING:
    import aiohttp

USER_AGENT = f"postback-bridge/{__version__}"


class ConversationState(Protocol):
    """Per-destination memory of a conversation (e.g. the Slack thread of one texter)."""

    async def get_conversation(self, destination: str, key: str) -> str | None: ...

    async def put_conversation(self, destination: str, key: str, value: str) -> None: ...


class OptOutLedger(Protocol):
    """Whether a texter's latest word to a short code was an opt-out (CONTRACT §7)."""

    async def opted_out(self, texter: str, short_code: str) -> bool: ...


class MediaFiles(Protocol):
    """The kept MMS files (bridge.media.stores), by SHA-256."""

    async def get(self, digest: str) -> bytes | None: ...


@dataclass
class Services:
    """What destinations may use, opened and closed by the server."""

    http: aiohttp.ClientSession
    state: ConversationState
    ledger: OptOutLedger | None = None  # the store's opt-out ledger (an SMS is never sent past it)
    media: MediaFiles | None = None  # the kept MMS files, with a `media:` section (CONTRACT §9)


@dataclass(frozen=True)
class Attempt:
    delivery_id: int
    number: int  # 1 for the first attempt
    conversation: str  # the (sender, short code) key of the event
    event_id: str = ""
    route: str = ""  # the route it was stored under (what an internal delivery is for)


def conversation_key(event: Event) -> str:
    """One texter talking to one short code; status, subscriber and reply events key the same
    way. A delivery report and a reply go from the short code to the texter, so their ends are
    swapped."""
    sender, recipient = event["from"], event["to"]
    if event["type"] in ("sms.status", "mms.status", "sms.reply"):
        sender, recipient = recipient, sender
    return f"{sender or ''}|{recipient or ''}"


async def rendered(templates: Templates, event: Event) -> dict[str, str] | Failed:
    """A destination's templates, rendered before anything is sent; one with a loop on a worker
    thread (it may take up to RENDER_SECONDS, and holds up no one else's deliveries meanwhile).
    A template that fails makes the delivery dead with the template's error as the reason:
    retrying would fail the same way."""
    try:
        if not templates.loops:  # bounded by its length: a thread would cost more than it
            return templates.render(event)
        return await asyncio.to_thread(templates.render, event)
    except RenderError as exc:
        return Failed(reason=str(exc), retryable=False)


def preview_rendered(templates: Templates, event: Event) -> dict[str, str] | str:
    """What `route` shows: the rendered templates, or the error a send would die of."""
    try:
        return templates.render(event)
    except RenderError as exc:
        return str(exc)


@dataclass(frozen=True)
class DestinationSpec:
    """One destination as the config file gives it: plain data (the frozen Config holds these).
    The running bridge builds the live destination of each (`registry.build`) and opens it."""

    name: str
    type: str
    retry: RetryPolicy
    concurrency: int
    ordered: bool  # a conversation's deliveries go one at a time, in order
    options: Any  # the type's own frozen options, as its `parse` made them


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
    #: whether retryable failures in a row mean the destination is down (the delivery loop then
    #: probes one at a time): False where each delivery goes to a peer of its own (the media
    #: step fetches from whatever host an MMS names; one that is down says nothing of the others)
    has_health: ClassVar[bool] = True

    def __init__(self, name: str, *, retry: RetryPolicy | None = None, concurrency: int | None = None) -> None:
        self.name = name
        self.retry = retry or RetryPolicy()
        self.concurrency = concurrency or self.default_concurrency

    @classmethod
    @abc.abstractmethod
    def parse(cls, options: dict[str, Any], path: str, r: Reader) -> Any | None:
        """This type's options, validated into its frozen options (data): errors go to `r`
        with their place, and None comes back when there were any."""

    @classmethod
    def is_ordered(cls, options: Any) -> bool:
        """Whether deliveries of one conversation go one at a time, in order, with these options."""
        return cls.ordered

    @classmethod
    def build(cls, spec: DestinationSpec) -> Destination:
        """The live destination of a spec: not opened yet (no connection, no I/O)."""
        options = {f.name: getattr(spec.options, f.name) for f in fields(spec.options)}
        return cls(spec.name, retry=spec.retry, concurrency=spec.concurrency, **options)

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
