"""A fake Slack on 127.0.0.1: `chat.postMessage`, `reactions.add` and the file upload of
`files_upload_v2` (`files.getUploadURLExternal`, the upload URL, `files.completeUploadExternal`)
of the Web API and an incoming webhook; and what Slack sends an app: signed Events API requests (`signed`).

It records every call and answers like Slack: `{"ok": true, "ts": ...}` or `{"ok": false,
"error": ...}`, 429 with `Retry-After`, or a 5xx page. It also refuses what real Slack refuses
and a wrong renderer would send: a wrong token, an image block whose `image_url` is not an
http(s) URL, a section over 3000 characters, more than 50 blocks, a `thread_ts` that is not one
of its own top-level messages in that channel, a reaction on a message it never saw. Channels
are named by name or id: `#sms-inbox` is `C0FAKE`, the next one `C0FAKE2`, and answers give
the id, as Slack does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.conftest import serving, wait_for_arrivals

TOKEN = "xoxb-1111-2222-fakeBotTokenValue"
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"  # the example in Slack's docs
APP_TOKEN = "xapp-1-A0FAKE-1111-fakeAppLevelToken"
WEBHOOK_PATH = "/services/T0000/B0000/fakeWebhookSecretPath"
WEBHOOK_STATUS = {"no_service": 404, "channel_is_archived": 410, "action_prohibited": 403}
CUT_OFF = ("cut_off_chunked", "cut_off_length")  # script entries: a 200 that breaks off mid-body
CUT_OFF_404 = "cut_off_404"  # script entry: a 404 (channel_not_found) whose body breaks off


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
    (`"channel_not_found"`), `("ratelimited", "1")` (429 with that Retry-After), an int
    status: a normal answer with that status if 2xx, else an HTML error page, or one of CUT_OFF
    (`reactions.add` only): the call is taken as usual and its 200 breaks off mid-body, the
    connection closed after half of it (sent chunked, or short of its Content-Length). `delay`
    holds every answer back that many seconds."""

    url: str = ""
    calls: list[Call] = field(default_factory=list)
    script: list[Any] = field(default_factory=list)
    delay: float = 0.0
    reject_images: bool = False  # answer invalid_blocks to image blocks, like Slack when a file is gone
    down: bool = False  # every Web API call answers 503 (an HTML page) while set
    threads: dict[str, set[str]] = field(default_factory=dict)  # channel id -> top-level ts
    messages: dict[str, set[str]] = field(default_factory=dict)  # channel id -> every ts it knows
    reactions: list[tuple[str, str, str]] = field(default_factory=list)  # (channel id, ts, name)
    # the same, to look up: bench/replies.py adds thousands, and a scan of the list per call made
    # the fake slower as a run went on
    _reacted: set[tuple[str, str, str]] = field(default_factory=set)
    channel_ids: dict[str, str] = field(default_factory=dict)  # name -> id
    # Socket Mode: the sockets apps opened (apps.connections.open, then the websocket) and the
    # envelope ids they acked
    sockets: list[web.WebSocketResponse] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    socket_opened: asyncio.Event = field(default_factory=asyncio.Event)
    connections_opened: int = 0
    app_tokens: set[str] = field(default_factory=lambda: {APP_TOKEN})  # the app-level tokens it takes
    opened_with: list[str] = field(default_factory=list)  # the token of each socket URL it gave out
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    # files_upload_v2: upload URLs handed out (file id -> (filename, length)), the bytes that
    # came to them, and what files.completeUploadExternal shared: (channel id, thread_ts, files)
    upload_urls: dict[str, tuple[str, int]] = field(default_factory=dict)
    uploaded: dict[str, bytes] = field(default_factory=dict)
    shared: list[tuple[str, str | None, list[tuple[str, str, bytes]]]] = field(default_factory=list)
    refuse_uploads: str | None = None  # an error code for files.completeUploadExternal (e.g. missing_scope)
    _clock: int = 0

    @property
    def api_url(self) -> str:
        return self.url + "/api/"

    @property
    def webhook_url(self) -> str:
        return self.url + WEBHOOK_PATH

    def channel_id(self, channel: str) -> str:
        """The id of a channel given by name (or by id)."""
        if channel in self.channel_ids.values():
            return channel
        if channel not in self.channel_ids:
            n = len(self.channel_ids) + 1
            self.channel_ids[channel] = "C0FAKE" + (str(n) if n > 1 else "")
        return self.channel_ids[channel]

    def person_says(self, channel: str, ts: str) -> None:
        """A message a person posted (the fake knows it: reactions on it are taken)."""
        self.messages.setdefault(self.channel_id(channel), set()).add(ts)

    def reactions_on(self, ts: str) -> list[str]:
        return [name for _, at, name in self.reactions if at == ts]

    def thread_lines(self, thread_ts: str) -> list[str]:
        """The texts the app posted in a thread."""
        return [c.body.get("text", "") for c in self.posted() if c.body.get("thread_ts") == thread_ts]

    def posted(self) -> list[Call]:
        """The calls that put a message in the channel (a reaction does not)."""
        return [c for c in self.calls if c.ok and c.kind != "reactions.add"]

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[Call]:
        await wait_for_arrivals(self.calls, self.arrived, count, timeout, "fake Slack")
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
        if self.down:
            return 503, web.Response(status=503, text="<html>slack is down</html>", content_type="text/html")
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
        channel_id = self.channel_id(channel) if channel else ""
        if error is None and thread_ts is not None and thread_ts not in self.threads.get(channel_id, set()):
            error = "invalid_thread_ts"
        if error is not None:
            return web.json_response({"ok": False, "error": error})
        self._clock += 1
        call.ok, call.ts = True, f"1714579200.{self._clock:06d}"
        if thread_ts is None:
            self.threads.setdefault(channel_id, set()).add(call.ts)
        self.messages.setdefault(channel_id, set()).add(call.ts)
        answer = {"ok": True, "channel": channel_id, "ts": call.ts, "message": {"text": body["text"]}}
        return web.json_response(answer, status=status)

    async def reactions_add(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = dict(request.query)  # slack-sdk sends these arguments in the query string
        if request.content_type == "application/json":
            body.update(await request.json())
        else:
            body.update({k: str(v) for k, v in (await request.post()).items()})
        call = Call("reactions.add", body, dict(request.headers), time.time())
        self.calls.append(call)
        self.arrived.set()
        status, scripted = self._scripted()
        if isinstance(scripted, web.Response):
            return scripted
        if scripted == CUT_OFF_404:
            return await self._cut_off(request, {"ok": False, "error": "channel_not_found"}, chunked=True, status=404)
        cut = scripted if scripted in CUT_OFF else None
        error = None if cut else scripted
        if error is None and request.headers.get("Authorization", "") != f"Bearer {TOKEN}":
            error = "invalid_auth"
        channel, ts, name = str(body.get("channel", "")), str(body.get("timestamp", "")), str(body.get("name", ""))
        channel_id = self.channel_id(channel) if channel else ""
        if error is None and ts not in self.messages.get(channel_id, set()):
            error = "message_not_found"
        if error is None and not name:
            error = "invalid_name"
        if error is None and (channel_id, ts, name) in self._reacted:
            error = "already_reacted"
        if error is not None:
            return web.json_response({"ok": False, "error": error})
        call.ok = True
        self.reactions.append((channel_id, ts, name))
        self._reacted.add((channel_id, ts, name))
        if cut is not None:
            return await self._cut_off(request, {"ok": True}, chunked=cut == "cut_off_chunked")
        return web.json_response({"ok": True}, status=status)

    @staticmethod
    async def _cut_off(
        request: web.Request, answer: dict[str, Any], *, chunked: bool, status: int = 200
    ) -> web.StreamResponse:
        """An answer whose body breaks off: its first half (one chunk, or short of the
        Content-Length it announced), then the connection closes."""
        body = json.dumps(answer).encode()
        response = web.StreamResponse(status=status, headers={"Content-Type": "application/json; charset=utf-8"})
        if chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        assert request.transport is not None
        request.transport.close()  # what was written goes first; aiohttp's end of the body cannot
        return response

    async def _form(self, request: web.Request) -> dict[str, str]:
        """A Web API call's arguments: slack-sdk sends them in the query string or as a form."""
        body = dict(request.query)
        body.update({k: str(v) for k, v in (await request.post()).items()})
        return body

    async def get_upload_url(self, request: web.Request) -> web.Response:
        """files.getUploadURLExternal: an upload URL (on this fake, on 127.0.0.1) per file."""
        body = await self._form(request)
        if request.headers.get("Authorization", "") != f"Bearer {TOKEN}":
            return web.json_response({"ok": False, "error": "invalid_auth"})
        if not body.get("filename") or not body.get("length", "").isdigit():
            return web.json_response({"ok": False, "error": "invalid_arguments"})
        file_id = f"F0FAKE{len(self.upload_urls) + 1}"
        self.upload_urls[file_id] = (body["filename"], int(body["length"]))
        return web.json_response({"ok": True, "file_id": file_id, "upload_url": f"{self.url}/upload/{file_id}"})

    async def upload(self, request: web.Request) -> web.Response:
        """The upload URL: takes the file's bytes, which must be as long as announced."""
        file_id = request.match_info["file_id"]
        data = await request.read()
        if file_id not in self.upload_urls or len(data) != self.upload_urls[file_id][1]:
            return web.Response(status=400, text="bad upload")
        self.uploaded[file_id] = data
        return web.Response(text="OK - " + str(len(data)))

    async def complete_upload(self, request: web.Request) -> web.Response:
        """files.completeUploadExternal: shares uploaded files in a channel (and thread)."""
        body = await self._form(request)
        if self.refuse_uploads:
            return web.json_response({"ok": False, "error": self.refuse_uploads})
        if request.headers.get("Authorization", "") != f"Bearer {TOKEN}":
            return web.json_response({"ok": False, "error": "invalid_auth"})
        files = json.loads(body.get("files", "[]"))
        if not files or any(f.get("id") not in self.uploaded for f in files):
            return web.json_response({"ok": False, "error": "file_not_found"})
        channel = body.get("channel_id", "")
        if channel not in self.channel_ids.values():  # an id, as Slack wants here
            return web.json_response({"ok": False, "error": "invalid_channel"})
        thread_ts = body.get("thread_ts") or None
        if thread_ts is not None and thread_ts not in self.threads.get(channel, set()):
            return web.json_response({"ok": False, "error": "invalid_thread_ts"})
        items = [(self.upload_urls[f["id"]][0], f.get("title", ""), self.uploaded[f["id"]]) for f in files]
        self.shared.append((channel, thread_ts, items))
        self.arrived.set()
        return web.json_response({"ok": True, "files": [{"id": f["id"], "title": f.get("title")} for f in files]})

    async def connections_open(self, request: web.Request) -> web.Response:
        """apps.connections.open: a websocket URL for an app-level token."""
        self.connections_opened += 1  # not in `calls`: those are the messages and reactions
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.app_tokens:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        self.opened_with.append(token)
        return web.json_response({"ok": True, "url": self.url.replace("http://", "ws://") + "/link/?ticket=fake"})

    async def link(self, request: web.Request) -> web.WebSocketResponse:
        """The Socket Mode websocket: says hello, then takes acks until it is closed."""
        socket = web.WebSocketResponse(autoping=True)
        await socket.prepare(request)
        self.sockets.append(socket)
        await socket.send_json({"type": "hello", "num_connections": 1, "connection_info": {"app_id": "A0FAKE"}})
        self.socket_opened.set()
        async for message in socket:
            try:
                data = json.loads(message.data)
            except (TypeError, ValueError):
                continue
            if isinstance(data, dict) and "envelope_id" in data:
                self.acks.append(data["envelope_id"])
        return socket

    def live_socket(self) -> web.WebSocketResponse | None:
        open_ = [s for s in self.sockets if not s.closed]
        return open_[-1] if open_ else None

    async def envelope(self, payload: dict[str, Any], envelope_id: str) -> None:
        """Send an events_api envelope down the app's open socket."""
        socket = self.live_socket()
        assert socket is not None, "no Socket Mode connection"
        await socket.send_json(
            {
                "envelope_id": envelope_id,
                "type": "events_api",
                "payload": payload,
                "accepts_response_payload": False,
                "retry_attempt": 0,
                "retry_reason": "",
            }
        )

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
    app.router.add_post("/api/reactions.add", slack.reactions_add)
    app.router.add_post("/api/apps.connections.open", slack.connections_open)
    app.router.add_post("/api/files.getUploadURLExternal", slack.get_upload_url)
    app.router.add_post("/upload/{file_id}", slack.upload)
    app.router.add_post("/api/files.completeUploadExternal", slack.complete_upload)
    app.router.add_get("/link/", slack.link)
    app.router.add_post("/services/{tail:.*}", slack.webhook)
    async with serving(app, shutdown_timeout=0.5) as slack.url:
        yield slack


def signed(body: bytes, *, secret: str = SIGNING_SECRET, at: float | None = None) -> dict[str, str]:
    """The headers Slack signs a request to an app with (v0: HMAC-SHA256 of `v0:<ts>:<body>`),
    computed here as Slack's docs describe, not with the SDK the bridge checks them with."""
    timestamp = str(int(time.time() if at is None else at))
    digest = hmac.new(secret.encode(), b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256).hexdigest()
    return {
        "X-Slack-Request-Timestamp": timestamp,
        "X-Slack-Signature": "v0=" + digest,
        "Content-Type": "application/json",
    }


def message_event(
    text: str, *, thread_ts: str | None, ts: str, channel: str = "C0FAKE", user: str = "U0PERSON", **extra: object
) -> dict[str, object]:
    """An Events API `event_callback` for a message, as Slack sends it."""
    event: dict[str, object] = {"type": "message", "channel": channel, "user": user, "text": text, "ts": ts}
    if thread_ts is not None:
        event["thread_ts"] = thread_ts
    event.update(extra)
    return {
        "token": "verification-token-unused",
        "team_id": "T0FAKE",
        "api_app_id": "A0FAKE",
        "type": "event_callback",
        "event_id": f"Ev{ts.replace('.', '')}",
        "event_time": int(float(ts)),
        "event": event,
    }
