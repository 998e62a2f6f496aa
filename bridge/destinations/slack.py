"""`type: slack`: each event as a message people can read (Block Kit with a plain-text
fallback), one thread per texter with `thread_by_sender`, by bot token or incoming webhook.

Rendering (`render`) and error translation (`classify`) are pure; `SlackDestination` only
posts once and turns whatever slack-sdk raises or returns into Delivered/Failed right here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bridge import http1
from bridge.destinations.base import (
    USER_AGENT,
    Attempt,
    ConversationState,
    Destination,
    MediaFiles,
    Services,
    preview_rendered,
    rendered,
)
from bridge.errors import BridgeError, StoreError
from bridge.event import Event, parse_time, text_of
from bridge.mediatypes import filename
from bridge.retry import RETRYABLE_STATUSES, Delivered, Failed, Outcome, parse_retry_after
from bridge.secret import Secret
from bridge.templates import RenderError, Templates, parse_templates, readable_phone
from bridge.validate import Reader

log = logging.getLogger("bridge.destinations.slack")

# slack-sdk logs request URLs and bodies at DEBUG; an incoming-webhook URL is a credential, so
# its logger stays above DEBUG whatever the root level is.
_SDK_LOG = logging.getLogger("bridge.destinations.slack.sdk")
_SDK_LOG.setLevel(logging.INFO)

API_URL = "https://slack.com/api/"
Message = dict[str, Any]

BODY_LIMIT = 2800  # a section's text may hold 3000 characters; room for the note
FALLBACK_LIMIT = 200  # the notification preview
FIELD_LIMIT = 200
MAX_IMAGES = 10  # a message holds at most 50 blocks
MAX_BLOCKS = 50
TEMPLATES = {"text": "text", "blocks": "json"}  # `template:` keys: text, and blocks as a JSON list
IMAGE_URL_LIMIT = 3000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif")  # what Slack's image block shows
SLACK_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif"})

# ---------------------------------------------------------------------------- rendering (pure)

_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def escape(text: str) -> str:
    """Slack mrkdwn escaping: a texter cannot write `<!channel>` or `<http://evil|click>`."""
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def cut(text: str, limit: int) -> tuple[str, int]:
    """`text` escaped and cut to at most `limit` characters (never inside an `&amp;`), and how
    many characters of the original were left out."""
    out: list[str] = []
    size = 0
    for i, ch in enumerate(text):
        piece = _ESCAPES.get(ch, ch)
        if size + len(piece) > limit:
            return "".join(out), len(text) - i
        out.append(piece)
        size += len(piece)
    return "".join(out), 0


def phone_for_people(number: str | None) -> str:
    """`+15552312102` -> `+1 555-231-2102`; other numbers and short codes as they are."""
    return readable_phone(number) or "unknown"


def slack_date(iso: str) -> str:
    """A time each reader sees in their own time zone, with a UTC fallback."""
    moment = parse_time(iso)
    if moment is None:
        return escape(iso)
    fallback = moment.strftime("%Y-%m-%d %H:%M UTC")
    return f"<!date^{int(moment.timestamp())}^{{date_short_pretty}} at {{time}}|{fallback}>"


def is_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not any(c.isspace() for c in value)


def is_image(url: str) -> bool:
    return is_url(url) and len(url) <= IMAGE_URL_LIMIT and urlsplit(url).path.lower().endswith(IMAGE_SUFFIXES)


def link(url: str, name: str | None = None) -> str:
    """`<url|file name>`; `|` would end the URL early, so it is percent-encoded."""
    name = name or urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1] or url
    return f"<{escape(url).replace('|', '%7C')}|{escape(name)}>"


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _context(event: Event, texter: str | None) -> dict[str, Any]:
    """The event id and the texter's number as sent, to search for and to quote."""
    parts = [f"`{escape(event['id'])}`"]
    if texter:
        parts.append(escape(texter))
    parts.append(escape(" ".join(p for p in (event.get("origin"), event.get("code")) if p) or "postback"))
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(parts)}]}


def _field(text: str | None) -> str:
    value, omitted = cut(text or "", FIELD_LIMIT)
    return value + ("…" if omitted else "")


def _one_liner(event: Event, texter: str | None, emoji: str, line: str, fallback: str) -> Message:
    return {"text": fallback, "blocks": [_section(f"{emoji} {line}"), _context(event, texter)]}


def _subscriber(event: Event) -> Message:
    fields = event.get("fields") or {}
    opted_in = event["type"].endswith("opted_in")
    who = event.get("from") or text_of(fields.get("EMAIL")) or None
    person = escape(phone_for_people(who))
    shortcode = escape(event.get("to") or "unknown")
    verb = "opted in to" if opted_in else "opted out of"
    line = f"*{person}* {verb} *{shortcode}*"
    campaign = text_of(fields.get("CAMPAIGNTITLE"))
    if campaign and campaign.strip():
        line += f" · {_field(campaign.strip())}"
    source = text_of(fields.get("SOURCE"))
    if source and source.strip():
        line += f" (via {_field(source.strip())})"
    emoji = ":white_check_mark:" if opted_in else ":no_entry_sign:"
    return _one_liner(event, who, emoji, line, f"{person} {verb} {shortcode}")


def _status(event: Event) -> Message:
    fields = event.get("fields") or {}
    kind = "MMS" if event["type"].startswith("mms") else "SMS"
    # a delivery report goes from the short code to the texter
    texter = escape(phone_for_people(event.get("to")))
    shortcode = escape(event.get("from") or "unknown")
    status = _field((text_of(fields.get("STATUS")) or "").strip() or "status unknown")
    code = f" ({escape(event['code'])})" if event.get("code") else ""
    line = f"{kind} to *{texter}* from *{shortcode}*: {status}{code}"
    return _one_liner(event, event.get("to"), ":outbox_tray:", line, f"{kind} to {texter}: {status}{code}")


def _kept(item: dict[str, Any]) -> str | None:
    """The bridge's own link to a kept file (archived_url), when there is one."""
    kept = item.get("archived_url")
    return kept if isinstance(kept, str) and is_url(kept) else None


def _media_blocks(event: Event, *, images: bool, uploads: bool = False) -> list[dict[str, Any]]:
    """Pictures as image blocks (the kept copy when there is one: Slack fetches it from the
    bridge, not from Skycore, which deletes its files), the rest as links. With `uploads` the kept
    files go into the thread as files (SlackDestination._upload) and everything is a link here."""
    blocks: list[dict[str, Any]] = []
    others: list[str] = []
    sender = phone_for_people(event.get("from"))
    for item in event.get("media") or []:
        url, kept, kind = str(item.get("url", "")), _kept(item), item.get("content_type")
        picture = kind in SLACK_IMAGE_TYPES if kept else is_image(url)
        shown = kept or url
        if images and not uploads and picture and len(shown) <= IMAGE_URL_LIMIT and len(blocks) < MAX_IMAGES:
            blocks.append({"type": "image", "image_url": shown, "alt_text": f"MMS image from {sender}"})
        elif kept:
            digest = str(item.get("sha256") or "")
            others.append(f"• {link(kept, filename(str(kind), digest) if digest else None)}")
        elif is_url(url):
            others.append(f"• {link(url)}")
        else:
            # Skycore's own example has "…URL of Content Here…": show it, never as a link or image
            others.append(f"• {_field(url)}")
    if others:
        blocks.append(_section("*Attachments*\n" + "\n".join(others)))
    return blocks


def _message(event: Event, *, images: bool, uploads: bool = False) -> Message:
    kinds = {"sms.received": (":speech_balloon:", "SMS"), "mms.received": (":frame_with_picture:", "MMS")}
    emoji, kind = kinds.get(event["type"], (":incoming_envelope:", escape(event.get("origin") or "Postback")))
    sender = escape(phone_for_people(event.get("from")))
    shortcode = escape(event.get("to") or "unknown")
    blocks: list[dict[str, Any]] = [_section(f"{emoji} *{kind} from {sender}* to *{shortcode}*")]

    facts = []
    if event.get("keyword"):
        facts.append(f"*Keyword*\n{_field(event['keyword'])}")
    if event.get("carrier"):
        facts.append(f"*Carrier*\n{_field(event['carrier'])}")
    if event.get("occurred_at"):
        facts.append(f"*Sent*\n{slack_date(event['occurred_at'])}")
    if facts:
        blocks.append({"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in facts]})

    if event.get("subject"):
        blocks.append(_section(f"*Subject:* {_field(event['subject'])}"))
    text = event.get("text")
    if text is not None and text.strip():
        # plain text, not mrkdwn: a texter's *stars* and _underscores_ are shown, not formatting,
        # and `<!channel>` is those characters (nothing in plain text pings or links)
        body, omitted = text[:BODY_LIMIT], max(0, len(text) - BODY_LIMIT)
        if omitted:
            body += f"\n… {omitted} more characters not shown; the whole text is in event {event['id']}"
        blocks.append({"type": "section", "text": {"type": "plain_text", "text": body, "emoji": False}})
    elif not event.get("media"):
        blocks.append(_section("_(no text)_"))

    blocks.extend(_media_blocks(event, images=images, uploads=uploads))
    blocks.append(_context(event, event.get("from")))

    preview, omitted = cut(" ".join((text or "").split()), FALLBACK_LIMIT)
    fallback = f"{kind} from {sender} to {shortcode}"
    if preview:
        fallback += f": {preview}" + ("…" if omitted else "")
    elif event.get("media"):
        fallback += f" ({len(event['media'])} attachments)"
    return {"text": fallback, "blocks": blocks}


def render(event: Event, *, images: bool = True, uploads: bool = False) -> Message:
    """The Slack message for `event`: `text` (notification fallback) and `blocks`. With
    `images=False` MMS pictures are links instead of image blocks; with `uploads` kept files are
    links too (they are uploaded into the thread)."""
    kind = event["type"]
    if kind.startswith(("subscriber.", "email_subscriber.")):
        return _subscriber(event)
    if kind in ("sms.status", "mms.status"):
        return _status(event)
    return _message(event, images=images, uploads=uploads)


def templated(message: Message, out: Mapping[str, str]) -> Message:
    """The message with what a destination's templates rendered (CONTRACT §9): `text` replaces
    the text (and, without a `blocks` template, the blocks: a text-only message); `blocks`, a
    JSON list of Block Kit blocks, replaces the blocks (the built-in text stays the fallback).
    RenderError when they rendered something Slack cannot take."""
    result = dict(message)
    if "blocks" in out:
        blocks = json.loads(out["blocks"])  # the template checked it is JSON
        if not isinstance(blocks, list) or not all(isinstance(b, dict) and "type" in b for b in blocks):
            raise RenderError("template.blocks", None, "must render a JSON list of blocks, each with a type")
        if not 1 <= len(blocks) <= MAX_BLOCKS:
            raise RenderError("template.blocks", None, f"rendered {len(blocks)} blocks (1 to {MAX_BLOCKS})")
        result["blocks"] = blocks
    if "text" in out:
        if not out["text"].strip() and "blocks" not in out:
            raise RenderError("template.text", None, "rendered nothing to post")
        result["text"] = out["text"] if out["text"].strip() else message["text"]
        if "blocks" not in out:
            del result["blocks"]
    return result


def has_images(message: Message) -> bool:
    return any(block.get("type") == "image" for block in message.get("blocks", ()))


# ---------------------------------------------------------------------------- errors (pure)

RATE_LIMITED = frozenset({"ratelimited", "rate_limited"})
RETRYABLE_ERRORS = frozenset({"internal_error", "fatal_error", "service_unavailable", "request_timeout"})
_AUTH_HINT = "check the bot token (xoxb-...) and that the app is still installed"
HINTS = {
    "invalid_auth": _AUTH_HINT,
    "not_authed": _AUTH_HINT,
    "token_revoked": _AUTH_HINT,
    "account_inactive": _AUTH_HINT,
    "missing_scope": "add the chat:write scope to the app and reinstall it",
    "channel_not_found": "check the channel name or id; a private channel needs the app invited",
    "not_in_channel": "invite the app to the channel (/invite @app) or add the chat:write.public scope",
    "is_archived": "the channel is archived; unarchive it or choose another",
    "channel_is_archived": "the channel is archived; unarchive it or choose another",
    "no_service": "the incoming webhook was removed; create a new one",
}
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")


ANSWER_BYTES = 64 * 1024  # of a Web API answer to `show`'s calls, read
_FORM = "application/x-www-form-urlencoded"
_JSON = "application/json; charset=utf-8"


def classify(status: int | None, error: str | None, headers: Mapping[str, str], now: float) -> Outcome:
    """Slack's answer -> Delivered, Failed(retryable) for rate limits and Slack's own trouble,
    else Failed(permanent) with Slack's error code as the reason."""
    if status is not None and 200 <= status < 300 and error is None:
        return Delivered(status=status)
    if status == 429 or error in RATE_LIMITED:
        retry_after = parse_retry_after(headers.get("Retry-After"), now)
        return Failed(reason=error or "ratelimited", retryable=True, status=status, retry_after=retry_after)
    reason = error or f"HTTP {status}"
    if error and status is not None and not 200 <= status < 300:  # the status too: "oops (HTTP 500)"
        reason = f"{error} (HTTP {status})"
    if error in RETRYABLE_ERRORS or status is None or status in RETRYABLE_STATUSES or status >= 500:
        return Failed(reason=reason, retryable=True, status=status)
    hint = HINTS.get(error or "")
    return Failed(reason=f"{reason}: {hint}" if hint else reason, retryable=False, status=status)


def error_code(body: Any) -> str | None:
    """The error code of a Web API answer (`{"ok": false, "error": ...}`) or of an incoming
    webhook (the plain-text body); None when it has none we recognise."""
    if isinstance(body, dict):
        value = body.get("error")
        return str(value)[:64] if value else None
    if isinstance(body, str) and _CODE.fullmatch(body.strip()):
        return body.strip()
    return None


# ---------------------------------------------------------------------------- config and I/O


def thread_key(ts: str) -> str:
    """The conversation-state key under which a thread the bridge started names its channel id
    and conversation: `thread:<ts>` -> `<channel id>|<channel>|<texter>|<short code>`."""
    return f"thread:{ts}"


def mask_url(url: str) -> str:
    """An incoming-webhook URL without its secret path."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/**********"


REPLY_KEYS = frozenset({"send_with", "signing_secret", "app_token", "max_segments"})


@dataclass(frozen=True)
class RepliesOptions:
    """`replies:` of a Slack destination (CONTRACT §7): a person's reply in a texter's thread is
    sent to the texter as an SMS with `send_with` (a skycore destination; config checks that)."""

    send_with: str
    signing_secret: Secret | None = None  # the Events API at POST /slack/events
    app_token: Secret | None = None  # Socket Mode (xapp-...)
    max_segments: int | None = None


def parse_replies(raw: Any, path: str, r: Reader) -> RepliesOptions | None:
    errors_before = len(r.errors)
    data = r.mapping(raw, path, REPLY_KEYS, frozenset({"send_with"}))
    if not data:
        return None
    send_with = r.string(data["send_with"], f"{path}.send_with") if "send_with" in data else None
    secret = r.secret(data["signing_secret"], f"{path}.signing_secret") if "signing_secret" in data else None
    app_token = r.secret(data["app_token"], f"{path}.app_token") if "app_token" in data else None
    if app_token is not None and not app_token.reveal().strip().startswith("xapp-"):
        r.error(f"{path}.app_token", "is not an app-level token (it starts with xapp-)")
    if "signing_secret" not in data and "app_token" not in data:
        r.error(path, "needs signing_secret (the Events API at POST /slack/events) or app_token (Socket Mode)")
    max_segments = None
    if "max_segments" in data:
        max_segments = r.integer(data["max_segments"], f"{path}.max_segments", minimum=1)
    if len(r.errors) > errors_before or send_with is None:
        return None
    return RepliesOptions(send_with, secret, app_token, max_segments)


@dataclass(frozen=True)
class SlackOptions:
    """`type: slack`, validated: the keyword arguments of SlackDestination."""

    token: Secret | None = None
    webhook_url: Secret | None = None
    channel: str | None = None
    thread_by_sender: bool = False
    api_url: str = API_URL
    username: str | None = None
    icon_emoji: str | None = None
    timeout: float = 10.0
    replies: RepliesOptions | None = None
    template: Templates | None = None
    upload_media: bool = False


class SlackDestination(Destination):
    type_name = "slack"
    config_keys = frozenset(
        {
            "token",
            "webhook_url",
            "channel",
            "thread_by_sender",
            "api_url",
            "username",
            "icon_emoji",
            "timeout",
            "replies",
            "template",
            "upload_media",
        }
    )
    default_concurrency = 4  # Slack allows about one message a second per channel

    def __init__(
        self,
        name: str,
        *,
        token: Secret | None = None,
        webhook_url: Secret | None = None,
        channel: str | None = None,
        thread_by_sender: bool = False,
        api_url: str = API_URL,
        username: str | None = None,
        icon_emoji: str | None = None,
        timeout: float = 10.0,
        replies: RepliesOptions | None = None,
        template: Templates | None = None,
        upload_media: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(name, **common)
        self.replies = replies
        self.template = template
        self.upload_media = upload_media
        if (token is None) == (webhook_url is None):
            raise ValueError("exactly one of token and webhook_url")
        if token is not None and not channel:
            raise ValueError("a bot token needs a channel")
        if webhook_url is not None and thread_by_sender:
            raise ValueError("an incoming webhook cannot post in threads")
        self.token = token
        self.webhook_url = webhook_url
        self.channel = channel
        self.thread_by_sender = thread_by_sender
        # one thread per texter needs that texter's messages to go one at a time, in order
        self.ordered = thread_by_sender
        self.api_url = api_url if api_url.endswith("/") else api_url + "/"
        self.username = username
        self.icon_emoji = icon_emoji
        self.timeout = timeout
        # an invalid_blocks answer may cost a second post; uploads take their own
        self.attempt_timeout = (4 if upload_media else 2) * timeout + 5.0
        self._web: AsyncWebClient | None = None
        self._webhook: AsyncWebhookClient | None = None
        # what a reply's thread shows (`show`): two small Web API calls, on connections of their own
        self._api: http1.Client | None = None
        self._state: ConversationState | None = None
        self._media: MediaFiles | None = None

    @classmethod
    def is_ordered(cls, options: SlackOptions) -> bool:
        return options.thread_by_sender  # one thread per texter: their messages one at a time, in order

    @classmethod
    def parse(cls, options: dict[str, Any], path: str, r: Reader) -> SlackOptions | None:
        errors_before = len(r.errors)
        token = webhook_url = None
        if "token" in options and "webhook_url" in options:
            r.error(path, "set token (a bot token) or webhook_url (an incoming webhook), not both")
        elif "token" not in options and "webhook_url" not in options:
            r.error(path, "needs token (a bot token, xoxb-...) or webhook_url (an incoming webhook URL)")
        if "token" in options:
            token = r.secret(options["token"], f"{path}.token")
            if token is not None and not token.reveal().strip().startswith("xox"):
                r.error(f"{path}.token", "is not a Slack token (a bot token starts with xoxb-)")
        if "webhook_url" in options:
            webhook_url = r.secret(options["webhook_url"], f"{path}.webhook_url")
            # never echo the value: the URL is the credential
            if webhook_url is not None and not is_url(webhook_url.reveal()):
                r.error(f"{path}.webhook_url", "is not an http(s) URL (like https://hooks.slack.com/services/...)")

        channel = r.string(options["channel"], f"{path}.channel") if "channel" in options else None
        if "token" in options and "channel" not in options:
            r.error(f"{path}.channel", "is required with token (a name like #sms-inbox or an id like C0123456789)")
        if "webhook_url" in options:
            if "channel" in options:
                r.error(f"{path}.channel", "an incoming webhook posts to the channel it was made for; use token")
            if "api_url" in options:
                r.error(f"{path}.api_url", "is for token; webhook_url is the whole address")

        thread_by_sender = "token" in options
        if "thread_by_sender" in options:
            value = r.boolean(options["thread_by_sender"], f"{path}.thread_by_sender")
            if value and "webhook_url" in options:
                r.error(f"{path}.thread_by_sender", "needs token: an incoming webhook cannot reply in threads")
            thread_by_sender = bool(value) and "webhook_url" not in options

        api_url = r.url(options["api_url"], f"{path}.api_url") if "api_url" in options else API_URL
        username = r.string(options["username"], f"{path}.username") if "username" in options else None
        icon_emoji = r.string(options["icon_emoji"], f"{path}.icon_emoji") if "icon_emoji" in options else None
        if icon_emoji is not None and not re.fullmatch(r":[a-z0-9_+'-]+:", icon_emoji):
            r.error(f"{path}.icon_emoji", f"expected an emoji name like :speech_balloon:, got {icon_emoji!r}")
        timeout = r.duration(options["timeout"], f"{path}.timeout") if "timeout" in options else 10.0
        replies = None
        if "replies" in options:
            replies = parse_replies(options["replies"], f"{path}.replies", r)
            if "token" not in options:
                r.error(f"{path}.replies", "needs token: replies are read from the threads a bot token starts")
            elif not thread_by_sender:
                r.error(f"{path}.replies", "needs thread_by_sender: a reply is an answer in a texter's thread")
        template = (
            parse_templates(options["template"], f"{path}.template", r, TEMPLATES) if "template" in options else None
        )
        upload_media = False
        if "upload_media" in options:
            upload_media = bool(r.boolean(options["upload_media"], f"{path}.upload_media"))
            if upload_media and "webhook_url" in options:
                r.error(f"{path}.upload_media", "needs token: an incoming webhook cannot upload files")
        if len(r.errors) > errors_before or api_url is None or timeout is None:
            return None
        return SlackOptions(
            token=token,
            webhook_url=webhook_url,
            channel=channel,
            thread_by_sender=thread_by_sender,
            api_url=api_url,
            username=username,
            icon_emoji=icon_emoji,
            timeout=timeout,
            replies=replies,
            template=template,
            upload_media=upload_media,
        )

    def describe(self) -> str:
        if self.webhook_url is not None:
            return f"incoming webhook {mask_url(self.webhook_url.reveal())} (timeout {self.timeout:g}s)"
        threads = ", one thread per sender" if self.thread_by_sender else ""
        replies = f", replies sent with {self.replies.send_with}" if self.replies else ""
        return f"chat.postMessage to {self.channel} via {self.api_url}{threads}{replies} (timeout {self.timeout:g}s)"

    def _payload(self, message: Message) -> dict[str, Any]:
        # Customers' texts hold URLs; Slack must not fetch them to unfurl previews.
        payload: dict[str, Any] = {**message, "unfurl_links": False, "unfurl_media": False}
        if self.username:
            payload["username"] = self.username
        if self.icon_emoji:
            payload["icon_emoji"] = self.icon_emoji
        return payload

    def preview(self, event: Event) -> Any:
        message = render(event)
        if self.template is not None:
            out = preview_rendered(self.template, event)
            try:
                if isinstance(out, str):
                    return {"error": out}
                message = templated(message, out)
            except RenderError as exc:
                return {"error": str(exc)}
        payload = self._payload(message)
        if self.webhook_url is not None:
            return {"url": mask_url(self.webhook_url.reveal()), "body": payload}
        body = {"channel": self.channel, **payload}
        if self.thread_by_sender:
            body["thread_ts"] = "(the sender's thread, once it exists)"
        return {"method": "chat.postMessage", "url": self.api_url + "chat.postMessage", "body": body}

    async def open(self, services: Services) -> None:
        self._state = services.state
        self._media = services.media
        # retry_handlers=[]: one attempt per send; the delivery loop owns retries
        if self.token is not None:
            self._web = AsyncWebClient(
                token=self.token.reveal(),
                base_url=self.api_url,
                session=services.http,
                logger=_SDK_LOG,
                retry_handlers=[],
                user_agent_prefix=USER_AGENT,
            )
        else:
            assert self.webhook_url is not None
            self._webhook = AsyncWebhookClient(
                url=self.webhook_url.reveal(),
                session=services.http,
                logger=_SDK_LOG,
                retry_handlers=[],
                user_agent_prefix=USER_AGENT,
            )

    async def close(self) -> None:
        self._web = self._webhook = None  # the session is the server's to close
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def send(self, event: Event, attempt: Attempt) -> Outcome:
        message = render(event, uploads=self.upload_media)
        if self.template is not None:  # all of it rendered before anything is posted
            out = await rendered(self.template, event)
            if isinstance(out, Failed):
                return out
            try:
                message = templated(message, out)
            except RenderError as exc:
                return Failed(reason=str(exc), retryable=False)
        key = f"{self.channel}|{attempt.conversation}"
        thread_ts = None
        if self.thread_by_sender:
            assert self._state is not None, "open() first"
            try:
                thread_ts = await self._state.get_conversation(self.name, key)
            except StoreError as exc:
                return Failed(reason=f"cannot read the sender's thread: {exc}", retryable=True)

        outcome, ts, channel_id = await self._post(message, thread_ts)
        fallback = self.template is None or self.template.get("blocks") is None  # never the template's blocks
        if (
            isinstance(outcome, Failed)
            and outcome.reason.startswith("invalid_blocks")
            and fallback
            and has_images(message)
        ):
            # Slack fetches image blocks as it posts, and Skycore deletes MMS files after a while:
            # post the pictures as links rather than lose the message.
            outcome, ts, channel_id = await self._post(
                {**message, "blocks": render(event, images=False, uploads=self.upload_media)["blocks"]}, thread_ts
            )

        if self._state is not None and self.thread_by_sender and thread_ts is None and ts:
            try:
                # the thread back to its conversation, with the channel's id (Slack's events name
                # the channel by id, the config may by name): how a reply finds its texter
                await self._state.put_conversation(self.name, thread_key(ts), f"{channel_id or ''}|{key}")
                await self._state.put_conversation(self.name, key, ts)
            except StoreError as exc:
                # posted already: retrying would post it twice; the next text starts a new thread
                log.warning(
                    "cannot keep the sender's thread",
                    extra={"event_id": event["id"], "destination": self.name, "error": str(exc)},
                )
        if self.upload_media and isinstance(outcome, Delivered) and ts and channel_id:
            problem = await self._upload(event, channel_id, thread_ts or ts)
            if problem is not None:  # posted already: the files stay links, never a second post
                log.warning("MMS files not uploaded", extra={"event_id": event["id"], "error": problem})
                return Delivered(status=outcome.status, detail=problem)
        return outcome

    async def _upload(self, event: Event, channel_id: str, thread_ts: str) -> str | None:
        """The MMS's kept files into the thread, with files_upload_v2 (files.getUploadURLExternal,
        the upload, files.completeUploadExternal); what went wrong, or None."""
        if self._web is None or self._media is None:
            return None
        uploads = []
        sender = phone_for_people(event.get("from"))
        try:
            for item in event.get("media") or []:
                digest, kind = item.get("sha256"), item.get("content_type")
                if isinstance(digest, str) and isinstance(kind, str) and _kept(item):
                    data = await self._media.get(digest)
                    if data is not None:
                        uploads.append(
                            {"content": data, "filename": filename(kind, digest), "title": f"MMS from {sender}"}
                        )
        except BridgeError as exc:
            return f"files not uploaded (cannot read the kept files: {exc}): linked instead"
        if not uploads:
            return None
        try:
            async with asyncio.timeout(2 * self.timeout):
                await self._web.files_upload_v2(file_uploads=uploads, channel=channel_id, thread_ts=thread_ts)
        except SlackApiError as exc:
            code = error_code(getattr(exc.response, "data", None)) or "error"
            hint = ": add the files:write scope" if code == "missing_scope" else ""
            return f"files not uploaded ({code}{hint}): linked instead"
        except (TimeoutError, SlackClientError, aiohttp.ClientError, ConnectionError) as exc:
            return self._scrub(f"files not uploaded ({type(exc).__name__}: {exc}): linked instead")
        return None

    async def _post(self, message: Message, thread_ts: str | None) -> tuple[Outcome, str | None, str | None]:
        """One HTTP call (the message's ts and channel id when Slack gives them); slack-sdk's
        errors become Failed here and go no further."""
        outcome, ts, channel = await self._post_once(message, thread_ts)
        return outcome, ts, channel

    async def _post_once(self, message: Message, thread_ts: str | None) -> tuple[Outcome, str | None, str | None]:
        try:
            async with asyncio.timeout(self.timeout):
                if self._web is not None:
                    assert self.channel is not None, "a bot token comes with a channel (__init__ checks)"
                    response = await self._web.chat_postMessage(
                        channel=self.channel, thread_ts=thread_ts, **self._payload(message)
                    )
                    return Delivered(status=response.status_code), response.get("ts"), response.get("channel")
                assert self._webhook is not None, "open() first"
                answer = await self._webhook.send_dict(self._payload(message))
                code = None if 200 <= answer.status_code < 300 else error_code(answer.body)
                return classify(answer.status_code, code, answer.headers or {}, time.time()), None, None
        except SlackApiError as exc:
            # a non-ok answer; when Slack's body was not JSON, `response` is aiohttp's
            answer = exc.response
            status = getattr(answer, "status_code", None) or getattr(answer, "status", None)
            code = error_code(getattr(answer, "data", None))
            if code is None and status == 200:
                code = "unknown_error"  # `ok: false` without a code is still not delivered
            return classify(status, code, getattr(answer, "headers", None) or {}, time.time()), None, None
        except TimeoutError:
            return Failed(reason=f"timeout after {self.timeout:g}s", retryable=True), None, None
        except aiohttp.ClientConnectorError as exc:
            return Failed(reason=self._scrub(f"cannot connect: {exc.os_error or exc}"), retryable=True), None, None
        except (aiohttp.ClientError, asyncio.IncompleteReadError, ConnectionError) as exc:
            return Failed(reason=self._scrub(f"{type(exc).__name__}: {exc}"), retryable=True), None, None

    async def show(self, channel: str, ts: str, thread_ts: str | None, emoji: str, say: str | None) -> Outcome:
        """What became of a person's reply (CONTRACT §7): the reaction `emoji` on their message,
        and `say` as a line in its thread. One try each, as any attempt; a reaction that is
        there already (`already_reacted`: an earlier try put it) counts as done, so a retry
        after the line failed puts only the line."""
        if self.token is None:
            return Failed(reason="replies need a bot token", retryable=False)
        if self._api is None:
            self._api = http1.Client()
        reaction = urlencode({"channel": channel, "timestamp": ts, "name": emoji}).encode()
        outcome = await self._call("reactions.add", reaction, _FORM)
        if isinstance(outcome, Failed) or not say:
            return outcome
        line = {"channel": channel, "thread_ts": thread_ts or ts, "text": say, "unfurl_links": False}
        return await self._call("chat.postMessage", json.dumps(line).encode(), _JSON)

    async def _call(self, method: str, body: bytes, content_type: str) -> Outcome:
        """One Web API call as an attempt's outcome (`already_reacted` is done), as slack-sdk's
        client would make it, without its per-call machinery: a POST with the bot token, the
        answer's `ok` and `error` (a 200 that is not JSON is `unknown_error`)."""
        assert self._api is not None and self.token is not None
        headers = {
            "User-Agent": USER_AGENT,
            "Content-Type": content_type,
            "Authorization": f"Bearer {self.token.reveal()}",
        }
        try:
            answer = await self._api.post(self.api_url + method, body, headers, keep=ANSWER_BYTES, timeout=self.timeout)
        except TimeoutError:
            return Failed(reason=f"timeout after {self.timeout:g}s", retryable=True)
        except http1.HTTPError as exc:
            return Failed(reason=self._scrub(f"{type(exc).__name__}: {exc}"), retryable=True)
        if answer.broken and answer.status == 200:
            # a 200 whose answer broke off (short of its Content-Length, a chunked body without
            # its last chunk, a head cut off): `ok` was never read, so as a broken connection,
            # tried again. Any other status decides as it would whole (a 429 keeps its
            # Retry-After, a 404 is not tried again).
            return Failed(reason=f"Slack's answer to {method} broke off", retryable=True, status=answer.status)
        try:
            data = json.loads(answer.body) if answer.body else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        if answer.status == 200 and data.get("ok"):
            return Delivered(status=200)
        code = error_code(data)
        if code == "already_reacted":
            return Delivered(status=answer.status)
        if code is None and answer.status == 200:
            code = "unknown_error"
        return classify(answer.status, code, answer.headers, time.time())

    def _scrub(self, text: str) -> str:
        """aiohttp's messages may quote the URL, and a webhook URL is a credential."""
        for secret in (self.webhook_url, self.token):
            if secret is not None:
                text = text.replace(secret.reveal(), str(secret))
        return text
