"""The media step of one MMS (CONTRACT §9): `~media`, an internal destination. Its delivery is
stored with the event, before the 200, and the event's other deliveries wait for it (they are
stored due `media.wait` later). Each attempt fetches the files not kept yet, keeps them, writes
their `archived_url` into the stored event, and, once nothing is left to try (every file kept,
linked as too large, or refused for good), makes the waiting deliveries due at once. A file
that cannot be fetched now is a retry, until `media.wait` has passed: the deliveries then go
with what was kept by then, and a file that was not keeps only its original URL.

Being a delivery, the step has what every delivery has: retries with backoff, the lease that
makes it survive a crash or a restart (another attempt picks it up), `deliveries`, replay and
the metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from bridge.config import MEDIA_DESTINATION, MediaConfig
from bridge.destinations.base import Attempt, Destination, Services
from bridge.errors import StoreError
from bridge.event import Event
from bridge.jsonout import dumps
from bridge.media import links
from bridge.media.fetch import Fetched, Kept, NotFetched, TooLarge, fetch, session
from bridge.media.guard import Policy
from bridge.media.stores import MediaStore, MediaStoreError
from bridge.retry import Delivered, Failed, Outcome, RetryPolicy
from bridge.validate import Reader

# (event id, the event's new JSON or None, whether the step has ended) -> the store updated and
# the waiting deliveries woken (Runtime.media_done)
Finish = Callable[[str, str | None, bool], Awaitable[None]]


def policy_of(config: MediaConfig) -> RetryPolicy:
    """Retries until `media.wait` has passed: the deliveries go then anyway."""
    return RetryPolicy(initial=1.0, max_interval=max(1.0, min(30.0, config.wait / 4)), max_age=config.wait)


class MediaStep(Destination):
    type_name = MEDIA_DESTINATION
    default_concurrency = 4
    has_health = False  # each MMS names its own hosts: one that is down must not hold back the rest

    def __init__(
        self,
        config: MediaConfig,
        *,
        finish: Finish,
        key: Callable[[], bytes | None],
        files: Callable[[], MediaStore | None],
    ) -> None:
        super().__init__(MEDIA_DESTINATION, retry=policy_of(config))
        self.config = config
        self.policy = Policy(config.allow_private, config.allow_networks)
        self.attempt_timeout = config.timeout + 60.0  # the fetches (at once), then keeping the files
        self._finish = finish
        self._key = key
        self._files = files
        self._client: aiohttp.ClientSession | None = None

    @classmethod
    def parse(cls, options: dict[str, Any], path: str, r: Reader) -> Any | None:
        raise NotImplementedError("an internal destination: not in the config")

    def describe(self) -> str:
        c = self.config
        return f"fetch MMS files (max_bytes {c.max_bytes}, timeout {c.timeout:g}s, wait {c.wait:g}s) into {c.store}"

    def preview(self, event: Event) -> Any:
        return {"fetch": [item.get("url") for item in event.get("media") or []], "into": self.config.store}

    async def open(self, services: Services) -> None:
        self._client = session(self.policy)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        self._client = None

    async def _one(self, url: Any) -> Fetched:
        if not isinstance(url, str):
            return NotFetched("no URL", retryable=False)
        assert self._client is not None, "open() first"
        c = self.config
        return await fetch(self._client, url, policy=self.policy, max_bytes=c.max_bytes, within=c.timeout)

    async def send(self, event: Event, attempt: Attempt) -> Outcome:
        files, key = self._files(), self._key()
        if files is None or key is None:
            return Failed(reason="the media store is not open yet", retryable=True)
        media: list[dict[str, Any]] = [dict(item) for item in event.get("media") or []]
        todo = [i for i, item in enumerate(media) if "archived_url" not in item]
        results = await asyncio.gather(*(self._one(media[i].get("url")) for i in todo))
        retry: list[str] = []
        notes: list[str] = []
        changed = False
        expires = int(time.time() + self.config.link_lifetime)
        for i, result in zip(todo, results, strict=True):
            url = str(media[i].get("url"))[:200]
            if isinstance(result, Kept):
                digest = hashlib.sha256(result.data).hexdigest()
                try:
                    await files.put(digest, result.data, result.content_type)
                except MediaStoreError as exc:
                    retry.append(f"{url}: {exc}")
                    continue
                media[i].update(
                    archived_url=self.config.public_url + links.path(key, digest, expires),
                    content_type=result.content_type,
                    size=len(result.data),
                    sha256=digest,
                )
                changed = True
            elif isinstance(result, TooLarge):
                notes.append(f"{url}: {result.reason}: linked, not kept")
            elif result.retryable:
                retry.append(f"{url}: {result.reason}")
            else:
                notes.append(f"{url}: {result.reason}")
        body = dumps({**event, "media": media}) if changed else None
        if body is not None or not retry:
            try:
                await self._finish(event["id"], body, not retry)
            except StoreError as exc:
                return Failed(reason=f"cannot update the event: {exc}", retryable=True)
        if retry:
            return Failed(reason="; ".join(retry), retryable=True)
        return Delivered(detail="; ".join(notes) or None)
