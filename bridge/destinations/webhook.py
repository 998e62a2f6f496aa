"""`type: webhook`: POST the event as JSON or as a structured CloudEvent, optionally signed
with Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`).

`client:` says what sends it: `builtin` (bridge.http1, a third of aiohttp's CPU per POST) or
`aiohttp` (the app's shared ClientSession), the way back should our own client ever get a peer
wrong. Both send the same request and read the answer by the same rules as far as aiohttp lets
them; docs/destinations/webhook.md says where they differ.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from bridge import http1
from bridge.destinations.base import USER_AGENT, Attempt, Destination, Services, preview_rendered, rendered
from bridge.event import Event
from bridge.jsonout import dumps
from bridge.retry import Failed, Outcome, classify_http
from bridge.secret import Secret, redact
from bridge.templates import Templates, parse_templates
from bridge.validate import Reader, item_place

REASON_BYTES = 512  # of a peer's error answer, kept as the delivery's reason


def reason_text(body: bytes, secrets: Sequence[Secret], *, whole: bool) -> str:
    """A peer's answer as a reason: every secret masked, then cut to REASON_BYTES (on a character
    boundary). Masking after the cut would leave a secret that straddles it partly in the
    reason; and when `body` is only the start of the answer (`whole` False), its last characters
    may be the start of a secret, so they are dropped before the cut."""
    text = redact(body.decode("utf-8", "replace"), secrets)
    if not whole:
        longest = max((len(s.reveal()) for s in secrets), default=0)
        text = text[: len(text) - longest] if longest else text
    return text.encode()[:REASON_BYTES].decode("utf-8", "ignore").strip()


FORMATS = ("event", "cloudevents")
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(?: *;[^\r\n\0]*)?")
TEMPLATE_TYPE = "application/json"  # a template body's Content-Type unless `template.content_type` says


def is_json_type(content_type: str) -> bool:
    """application/json, or a JSON-based type (`application/cloudevents+json`)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


CLIENTS = ("builtin", "aiohttp")
# bridge.http1 asks for neither: without them aiohttp's request is the same, and no receiver
# compresses an error answer that would then be decompressed here (http1 takes it as it comes)
_SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding"})
_NO_TIMEOUT = aiohttp.ClientTimeout()  # `timeout:` bounds the whole exchange, not aiohttp's defaults
_RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "transfer-encoding",
        "connection",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)


def signing_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (`whsec_` + base64)."""
    return base64.b64decode(secret.removeprefix("whsec_"), validate=True)


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def cloudevent(event: Event) -> dict[str, Any]:
    """A structured CloudEvent. `subject` is the sender, left out when there is none: readers
    (the `cloudevents` SDK's core reader among them) refuse a null or empty subject."""
    envelope: dict[str, Any] = {
        "specversion": "1.0",
        "id": event["id"],
        "source": "postback-bridge",
        "type": f"com.skycore.{event['type']}",
    }
    if event["from"]:
        envelope["subject"] = event["from"]
    envelope["time"] = event["occurred_at"] or event["received_at"]
    envelope["datacontenttype"] = "application/json"
    envelope["data"] = event
    return envelope


def render(event: Event, fmt: str) -> tuple[bytes, str]:
    """The body and its Content-Type."""
    if fmt == "cloudevents":
        payload, content_type = cloudevent(event), "application/cloudevents+json"
    else:
        payload, content_type = event, "application/json"
    return dumps(payload).encode(), content_type


@dataclass(frozen=True)
class WebhookOptions:
    """`type: webhook`, validated: the keyword arguments of WebhookDestination."""

    url: str
    secrets: tuple[Secret, ...] = ()
    fmt: str = "event"
    headers: tuple[tuple[str, Secret], ...] = ()
    timeout: float = 10.0
    client: str = "builtin"  # or aiohttp: the way back from bridge.http1
    template: Templates | None = None  # `body` (sent as it renders) and its `content_type`


class WebhookDestination(Destination):
    type_name = "webhook"
    # Attempts in flight at once. Under load each attempt waits for a busy event loop (5-10 ms
    # here), and in-flight / latency caps the rate: at 16 deliveries fell behind a bridge taking
    # in ~2,800 postbacks/s; at 32 they keep up. A receiver that wants fewer says 429 or sets
    # `concurrency:`.
    default_concurrency = 32
    bounds_itself = True  # the POST, connecting included, runs under `timeout`
    config_keys = frozenset({"url", "secret", "format", "headers", "timeout", "client", "template"})
    required_keys = frozenset({"url"})

    def __init__(
        self,
        name: str,
        url: str,
        *,
        secrets: Sequence[Secret] = (),
        fmt: str = "event",
        headers: Mapping[str, Secret] | Sequence[tuple[str, Secret]] = (),
        timeout: float = 10.0,
        client: str = "builtin",
        template: Templates | None = None,
        **common: Any,
    ) -> None:
        super().__init__(name, **common)
        self.url = url
        self.template = template
        self.content_type = (template.option("content_type") if template else None) or TEMPLATE_TYPE
        self.client = client
        self.secrets = tuple(secrets)  # each signs; more than one while the receiver rotates
        self.format = fmt
        self.headers = dict(headers)
        self.timeout = timeout
        self.attempt_timeout = timeout + 5.0
        self._keys = [signing_key(secret.reveal()) for secret in self.secrets]
        self._client: http1.Client | None = None
        self._session: aiohttp.ClientSession | None = None  # client: aiohttp, the app's shared one
        self._revealed: dict[str, str] | None = None
        self.shown_url, self._url_secrets = _url_credentials(url)
        # for aiohttp: the URL without its user:password, sent as http1 sends them (aiohttp would
        # encode them in Latin-1, http1 and the masking in UTF-8)
        self._bare_url = URL(url).with_user(None)
        basic = http1.basic_credentials(URL(url))
        self._basic = {"Authorization": f"Basic {basic}"} if basic else {}
        # what a peer may echo back of the request, masked in its answer before it is cut to
        # REASON_BYTES; enough more of the answer is read to see whole any secret that starts
        # within those bytes
        self._masked = [*self.headers.values(), *self._url_secrets, *self.secrets]
        self._keep = REASON_BYTES + 4 * max((len(s.reveal()) for s in self._masked), default=0)

    @classmethod
    def parse(cls, options: dict[str, Any], path: str, r: Reader) -> WebhookOptions | None:
        url = r.url(options["url"], f"{path}.url") if "url" in options else None  # else "is required" said it
        secrets = _secrets(options.get("secret"), f"{path}.secret", r)
        fmt = options.get("format", "event")
        if fmt not in FORMATS:
            r.error(f"{path}.format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
        headers: dict[str, Secret] = {}
        raw_headers = options.get("headers") or {}
        if not isinstance(raw_headers, dict):
            r.error(f"{path}.headers", "expected a mapping of header name to value")
        else:
            for key, value in raw_headers.items():
                text = r.string(value, f"{path}.headers.{key}", empty_ok=True)
                if str(key).lower() in _RESERVED_HEADERS:
                    r.error(f"{path}.headers.{key}", "is set by the bridge itself")
                elif text is not None:
                    if not http1.is_token(str(key)):
                        r.error(f"{path}.headers.{key}", "is not an HTTP header name")
                        continue
                    if any(c in text for c in "\r\n\0"):
                        r.error(f"{path}.headers.{key}", "has a line break in its value")
                        continue
                    headers[str(key)] = Secret(text)
            if url is not None and URL(url).user is not None and any(k.lower() == "authorization" for k in headers):
                r.error(f"{path}.headers.Authorization", "the url has a user:password already: use one or the other")
        timeout = r.duration(options["timeout"], f"{path}.timeout") if "timeout" in options else 10.0
        client = options.get("client", "builtin")
        if client not in CLIENTS:
            r.error(f"{path}.client", f"expected one of {', '.join(CLIENTS)}, got {client!r}")
        template = None
        if "template" in options:
            template = _template(options["template"], f"{path}.template", r)
            if "format" in options:
                r.error(f"{path}.format", "a template's body is what is sent: leave format out")
        if url is None or timeout is None or fmt not in FORMATS or client not in CLIENTS:
            return None
        if "template" in options and (template is None or "format" in options):
            return None
        return WebhookOptions(url, tuple(secrets), fmt, tuple(headers.items()), timeout, client, template)

    def describe(self) -> str:
        signed = {0: "", 1: ", signed"}.get(len(self.secrets), f", signed with {len(self.secrets)} secrets")
        client = "" if self.client == "builtin" else f", client {self.client}"
        shape = self.format if self.template is None else f"template body, {self.content_type}"
        return f"POST {self.shown_url} ({shape}{signed}, timeout {self.timeout:g}s{client})"

    def _configured(self, *, reveal: bool) -> dict[str, str]:
        """`headers:` (revealed or masked), with our User-Agent unless they name their own."""
        headers = {k: (v.reveal() if reveal else str(v)) for k, v in self.headers.items()}
        if not any(k.lower() == "user-agent" for k in headers):
            headers["User-Agent"] = USER_AGENT
        return headers

    def _headers(self, event_id: str, body: bytes, content_type: str, *, reveal: bool) -> dict[str, str]:
        if reveal:
            if self._revealed is None:  # the same for every request: worked out once
                self._revealed = self._configured(reveal=True)
            headers = dict(self._revealed)
        else:
            headers = self._configured(reveal=False)
            if self._url_secrets:  # what bridge.http1 adds from the URL's user:password
                headers["Authorization"] = "Basic **********"
        headers["Content-Type"] = content_type
        headers["webhook-id"] = event_id  # signed or not: receivers deduplicate on it
        if self._keys:
            timestamp = int(time.time())
            headers["webhook-timestamp"] = str(timestamp)
            # one signature per secret, space-separated: a receiver that knows either verifies
            signatures = (sign(key, event_id, timestamp, body) if reveal else "v1,**********" for key in self._keys)
            headers["webhook-signature"] = " ".join(signatures)
        return headers

    def preview(self, event: Event) -> Any:
        if self.template is not None:
            out = preview_rendered(self.template, event)
            if isinstance(out, str):
                return {"error": out}
            body, content_type = out["body"].encode(), self.content_type
        else:
            body, content_type = render(event, self.format)
        return {
            "method": "POST",
            "url": self.shown_url,
            "headers": self._headers(event["id"], body, content_type, reveal=False),
            "body": json.loads(body) if is_json_type(content_type) else body.decode(),
        }

    async def open(self, services: Services) -> None:
        if self.client == "aiohttp":
            self._session = services.http  # the app's: opened and closed with it, not by us
            return
        # its own keep-alive connections (bridge.http1): a POST per delivery is most of what
        # delivering costs, and aiohttp's client costs three times as much CPU per request
        self._client = http1.Client()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def send(self, event: Event, attempt: Attempt) -> Outcome:
        if self.template is not None:  # the transformation: its body sent as it renders
            out = await rendered(self.template, event)
            if isinstance(out, Failed):
                return out
            return await self._post(event["id"], out["body"].encode(), self.content_type)
        body, content_type = render(event, self.format)
        return await self._post(event["id"], body, content_type)

    async def send_stored(self, body: str, attempt: Attempt) -> Outcome:
        if self.format == "event" and attempt.event_id and self.template is None:
            # the stored JSON is the body, byte for byte what render() would make of it
            return await self._post(attempt.event_id, body.encode(), "application/json")
        return await super().send_stored(body, attempt)

    async def _post(self, event_id: str, body: bytes, content_type: str) -> Outcome:
        headers = self._headers(event_id, body, content_type, reveal=True)
        try:
            if self._session is not None:
                response = await self._post_with_aiohttp(self._session, body, headers)
            else:
                assert self._client is not None, "open() first"
                # the client keeps the timeout: a status that came in time decides, even if the rest
                # of the response does not (a 410 whose body drips past it is dead, not retried)
                response = await self._client.post(self.url, body, headers, keep=self._keep, timeout=self.timeout)
        except TimeoutError:
            return Failed(reason=f"timeout after {self.timeout:g}s", retryable=True)
        except http1.ConnectError as exc:
            return Failed(reason=f"cannot connect: {exc}", retryable=True)
        except http1.HTTPError as exc:
            return Failed(reason=str(exc), retryable=True)
        text = ""
        if not 200 <= response.status < 300:  # kept as the reason: masked first, then cut
            text = reason_text(response.body, self._masked, whole=len(response.body) < self._keep)
        outcome = classify_http(response.status, response.headers, time.time(), text)
        if isinstance(outcome, Failed) and outcome.status and 300 <= outcome.status < 400:
            return Failed(
                reason=f"HTTP {outcome.status}: redirects are not followed", retryable=False, status=outcome.status
            )
        return outcome

    async def _post_with_aiohttp(
        self, session: aiohttp.ClientSession, body: bytes, headers: dict[str, str]
    ) -> http1.Response:
        """What `http1.Client.post` does, with aiohttp: the same request, no redirects followed,
        `timeout` over all of it; once the head is in, its status decides and the body (the first
        `keep` bytes kept) gets BODY_PATIENCE. aiohttp's errors become http1's, so that `_post`
        reports both clients' alike."""
        kept = bytearray()
        decided: tuple[int, str, http1.Headers] | None = None
        try:
            async with (
                asyncio.timeout(self.timeout) as deadline,
                session.post(
                    self._bare_url,
                    data=body,
                    headers={**self._basic, **headers},
                    allow_redirects=False,
                    skip_auto_headers=_SKIP_AUTO_HEADERS,
                    timeout=_NO_TIMEOUT,
                ) as response,
            ):
                if response.status == 101:
                    raise http1.HTTPError("peer switched protocols")  # as http1 has it: retried
                decided = response.status, response.reason or "", _headers_of(response)
                end = asyncio.get_running_loop().time() + http1.BODY_PATIENCE
                when = deadline.when()
                if when is None or end < when:
                    deadline.reschedule(end)
                await _read_body(response, self._keep, kept)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise http1.ConnectError(str(exc.certificate_error)) from exc
        except aiohttp.ClientConnectorError as exc:  # refused, unreachable, DNS, TLS
            raise http1.ConnectError(str(exc.os_error) or type(exc.os_error).__name__) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            if decided is None:  # the head did not come (in time, or well-formed)
                if isinstance(exc, TimeoutError):
                    raise
                raise http1.HTTPError(str(exc) or type(exc).__name__) from exc
            # the status has decided: the answer stands with the body as far as it came
        assert decided is not None
        status, reason, answer = decided
        return http1.Response(status, reason, answer, bytes(kept))


def _headers_of(response: aiohttp.ClientResponse) -> http1.Headers:
    """aiohttp's response headers as bridge.http1 gives them: by lower-case name, repeats joined
    with ', ', except Retry-After, whose first value counts."""
    headers = http1.Headers()
    for name, value in response.headers.items():
        key = name.lower()
        if key not in headers:
            headers[key] = value
        elif key != "retry-after":
            headers[key] += ", " + value
    return headers


async def _read_body(response: aiohttp.ClientResponse, keep: int, kept: bytearray) -> None:
    """The first `keep` bytes of the body into `kept`; the rest read and dropped (at most
    MAX_DRAIN, as http1 does), so that aiohttp can reuse the connection."""
    total = 0
    while chunk := await response.content.read(64 * 1024):
        total += len(chunk)
        if len(kept) < keep:
            kept += chunk[: keep - len(kept)]
        if total > http1.MAX_DRAIN:
            return  # not worth the connection: aiohttp closes it on release


def _template(raw: Any, path: str, r: Reader) -> Templates | None:
    """`template:`: `body`, and its `content_type` (application/json by default). A JSON type's
    body must render JSON (checked at each send: never a broken body labelled as JSON)."""
    content_type = raw.get("content_type") if isinstance(raw, dict) else None
    if isinstance(content_type, str) and not _MEDIA_TYPE.fullmatch(content_type):
        r.error(f"{path}.content_type", f"{content_type!r} is not a media type like text/plain")
    kind = "json" if is_json_type(str(content_type or TEMPLATE_TYPE)) else "text"
    template = parse_templates(raw, path, r, {"body": kind}, {"content_type": ()})
    if template is not None and template.get("body") is None:
        r.error(f"{path}.body", "is required")
        return None
    return template


def _secrets(raw: Any, path: str, r: Reader) -> list[Secret]:
    """`secret:` as one Standard Webhooks secret, or a list of them (to rotate: the new one is
    added, receivers move to it, the old one is removed)."""
    if raw is None:
        return []
    if raw == []:
        r.error(path, "expected a Standard Webhooks secret or a list of them, got an empty list")
    secrets = []
    for i, item in enumerate(raw if isinstance(raw, list) else [raw]):
        place = item_place(path, raw, i)
        secret = r.secret(item, place)
        if secret is None:
            continue
        try:
            if not signing_key(secret.reveal()):
                raise ValueError
        except (binascii.Error, ValueError):
            r.error(place, "expected a Standard Webhooks secret: whsec_ followed by base64")
            continue
        secrets.append(secret)
    return secrets


def _url_credentials(url: str) -> tuple[str, list[Secret]]:
    """The URL to show, with its password (or a user alone, an API key as some services take
    it) masked, and what to mask in a peer's answer: those, and the Basic credentials they make."""
    u = URL(url)
    basic = http1.basic_credentials(u)
    if basic is None:
        return url, []
    if u.password:
        return str(u.with_password("**********")), [Secret(basic), Secret(u.password), Secret(u.raw_password or "")]
    return str(u.with_user("**********")), [Secret(basic), Secret(u.user or ""), Secret(u.raw_user or "")]
