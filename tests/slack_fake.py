"""A fake Slack on 127.0.0.1: `chat.postMessage` of the Web API and an incoming webhook.

It records every call and answers like Slack: `{"ok": true, "ts": ...}` or `{"ok": false,
"error": ...}`, 429 with `Retry-After`, or a 5xx page. It also refuses what real Slack refuses
and a wrong renderer would send: a wrong token, an image block whose `image_url` is not an
http(s) URL, a section over 3000 characters, more than 50 blocks, a `thread_ts` that is not one
of its own top-level messages in that channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TOKEN = "xoxb-1111-2222-fakeBotTokenValue"
WEBHOOK_PATH = "/services/T0000/B0000/fakeWebhookSecretPath"
WEBHOOK_STATUS = {"no_service": 404, "channel_is_archived": 410, "action_prohibited": 403}


@dataclass
class Call:
    kind: str  # "chat.postMessage" or "webhook"
    body: dict[str, Any]
    headers: dict[str, str]
    at: float
    ok: bool = False  # Slack took it
    ts: str | None = None  # the message's ts (the Web API answers one, a webhook does not)

    def dump(self) -> str:
        """Everything Slack would render, as one string to search."""
        return json.dumps({k: self.body.get(k) for k in ("text", "blocks")}, ensure_ascii=False)

    def mrkdwn(self) -> list[str]:
        """Every mrkdwn string: the fallback and each text Slack parses for links and mentions."""
        out = [self.body.get("text", "")]
        for block in self.body.get("blocks", []):
            for item in [block.get("text"), *block.get("fields", []), *block.get("elements", [])]:
                if isinstance(item, dict) and item.get("type") == "mrkdwn":
                    out.append(item["text"])
        return out


@dataclass
class FakeSlack:
    """`script` is consumed one entry per call: None (answer normally), an error code
    (`"channel_not_found"`), `("ratelimited", "1")` (429 with that Retry-After), or an int
    status: a normal answer with that status if 2xx, else an HTML error page. `delay` holds
    every answer back that many seconds."""

    url: str = ""
    calls: list[Call] = field(default_factory=list)
    script: list[Any] = field(default_factory=list)
    delay: float = 0.0
    reject_images: bool = False  # answer invalid_blocks to image blocks, like Slack when a file is gone
    threads: dict[str, set[str]] = field(default_factory=dict)  # channel -> top-level ts
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _clock: int = 0

    @property
    def api_url(self) -> str:
        return self.url + "/api/"

    @property
    def webhook_url(self) -> str:
        return self.url + WEBHOOK_PATH

    def posted(self) -> list[Call]:
        """The calls that put a message in the channel."""
        return [c for c in self.calls if c.ok]

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[Call]:
        # woken by each call as it arrives rather than polled, so not eventually()
        deadline = time.monotonic() + timeout
        while len(self.calls) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"fake Slack got {len(self.calls)} calls, expected {count}")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(remaining, 0.2))
        return self.calls

    def _refusal(self, body: dict[str, Any]) -> str | None:
        blocks = body.get("blocks") or []
        if not body.get("text") and not blocks:
            return "no_text"
        if len(blocks) > 50:
            return "invalid_blocks"
        for block in blocks:
            texts = [block.get("text"), *block.get("fields", []), *block.get("elements", [])]
            if any(isinstance(t, dict) and len(t.get("text", "")) > 3000 for t in texts):
                return "invalid_blocks"
            if block.get("type") == "image":
                url = str(block.get("image_url", ""))
                if self.reject_images or not url.startswith(("http://", "https://")) or not block.get("alt_text"):
                    return "invalid_blocks"
        return None

    def _scripted(self) -> tuple[int, web.Response | str | None]:
        """The status of a success, and a ready answer or an error code, for this call."""
        entry = self.script.pop(0) if self.script else None
        if isinstance(entry, tuple):
            code, retry_after = entry
            headers = {"Retry-After": retry_after}
            return 429, web.json_response({"ok": False, "error": code}, status=429, headers=headers)
        if isinstance(entry, int) and not 200 <= entry < 300:
            return entry, web.Response(status=entry, text="<html>upstream trouble</html>", content_type="text/html")
        if isinstance(entry, int):
            return entry, None
        return 200, entry

    async def post_message(self, request: web.Request) -> web.Response:
        body = await request.json()
        call = Call("chat.postMessage", body, dict(request.headers), time.time())
        self.calls.append(call)
        self.arrived.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        status, scripted = self._scripted()
        if isinstance(scripted, web.Response):
            return scripted
        auth = request.headers.get("Authorization", "")
        error = scripted
        if error is None and not auth:
            error = "not_authed"
        elif error is None and auth != f"Bearer {TOKEN}":
            error = "invalid_auth"
        channel = body.get("channel")
        if error is None and not channel:
            error = "channel_not_found"
        error = error or self._refusal(body)
        thread_ts = body.get("thread_ts")
        if error is None and thread_ts is not None and thread_ts not in self.threads.get(channel, set()):
            error = "invalid_thread_ts"
        if error is not None:
            return web.json_response({"ok": False, "error": error})
        self._clock += 1
        call.ok, call.ts = True, f"1714579200.{self._clock:06d}"
        if thread_ts is None:
            self.threads.setdefault(channel, set()).add(call.ts)
        answer = {"ok": True, "channel": "C0FAKE", "ts": call.ts, "message": {"text": body["text"]}}
        return web.json_response(answer, status=status)

    async def webhook(self, request: web.Request) -> web.Response:
        body = await request.json()
        call = Call("webhook", body, dict(request.headers), time.time())
        self.calls.append(call)
        self.arrived.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        if request.path != WEBHOOK_PATH:
            return web.Response(status=404, text="no_service")
        status, scripted = self._scripted()
        if isinstance(scripted, web.Response):
            return scripted
        error = scripted or self._refusal(body)
        if error is not None:
            return web.Response(status=WEBHOOK_STATUS.get(error, 400), text=error)
        call.ok = True
        return web.Response(text="ok", status=status)


@contextlib.asynccontextmanager
async def fake_slack() -> AsyncIterator[FakeSlack]:
    slack = FakeSlack()
    app = web.Application()
    app.router.add_post("/api/chat.postMessage", slack.post_message)
    app.router.add_post("/services/{tail:.*}", slack.webhook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    slack.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield slack
    finally:
        await runner.cleanup()
