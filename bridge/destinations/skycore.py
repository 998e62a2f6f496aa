"""`type: skycore`: an event (an `sms.reply`) sent to its texter as an SMS through Skycore's
sendSMS API (CONTRACT §7, tests/data/skycore-api/sendSMS.md).

One POST per attempt, the request XML in the form field `xml` (the API key stays out of URLs
and logs), on keep-alive connections of the destination's own (bridge.http1: a third of
aiohttp's CPU per request, and a reply's SMS is one request). Skycore's answer decides:
`Success` with a TRACKINGID is delivered, and the tracking id is kept on the delivery (the
SMS_MT postbacks that follow name it); connection errors, timeouts, HTTP 429/5xx and the busy
codes E106, E113, E120, E503 are retried like any delivery; any other `Failure` is dead at once
with `CODE: INFO` as its reason.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode
from xml.sax.saxutils import escape

from bridge import http1
from bridge.destinations.base import (
    USER_AGENT,
    Attempt,
    Destination,
    OptOutLedger,
    Services,
    preview_rendered,
    rendered,
)
from bridge.errors import PostbackError, StoreError
from bridge.event import Event, text_of
from bridge.postback import read_xml
from bridge.retry import Delivered, Failed, Outcome, classify_http
from bridge.secret import Secret, redact
from bridge.templates import Templates, parse_templates
from bridge.validate import Reader

API_URL = "https://secure.skycore.com/API/wxml/1.3/index.php"
RETRYABLE_CODES = frozenset({"E106", "E113", "E120", "E503"})  # Skycore or the account is busy
REASON_CHARS = 300
ANSWER_BYTES = 64 * 1024  # of Skycore's answer, read (a sendSMS answer is a few hundred)
_HEADERS = {"User-Agent": USER_AGENT, "Content-Type": "application/x-www-form-urlencoded"}
OPTED_OUT = "opted out"  # how the reason of an SMS the ledger stopped starts
# what XML 1.0 cannot hold at all (escaping does not help): left out of the text
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def number(value: str | None) -> str:
    """A number as Skycore takes it: international digits, no `+`."""
    return (value or "").strip().removeprefix("+")


def request_xml(event: Event, api_key: str, campaignref: str | None, text: str | None = None) -> str:
    """The sendSMS request for `event`: TO its `to` (the texter), FROM its `from` (the short
    code), TEXT its `text` (or `text`, what the destination's template made of it)."""
    text = event.get("text") if text is None else text
    parts = [
        "<REQUEST>",
        "<ACTION>sendSMS</ACTION>",
        f"<API_KEY>{escape(api_key)}</API_KEY>",
        f"<TO>{escape(number(event.get('to')))}</TO>",
        f"<FROM>{escape(number(event.get('from')))}</FROM>",
    ]
    if campaignref:
        parts.append(f"<CAMPAIGNREF>{escape(campaignref)}</CAMPAIGNREF>")
    parts.append(f"<TEXT>{escape(_NOT_XML.sub('', text or ''))}</TEXT>")
    parts.append("</REQUEST>")
    return "".join(parts)


def classify_answer(body: str) -> Outcome:
    """Skycore's answer to a sendSMS (HTTP 200) -> Delivered with the tracking id, or Failed.
    Pure."""
    try:
        root, fields = read_xml(body.strip())
    except (PostbackError, IndexError):
        return Failed(reason=f"unreadable answer from Skycore: {body.strip()[:REASON_CHARS]!r}", retryable=True)
    if root != "RESPONSE" or not isinstance(fields, dict):
        return Failed(reason=f"unexpected answer from Skycore: <{root}>", retryable=True)
    status = (text_of(fields.get("STATUS")) or "").strip()
    if status.lower() == "success":
        tracking_id = (text_of(fields.get("TRACKINGID")) or "").strip() or None
        detail = f"TRACKINGID {tracking_id}" if tracking_id else "accepted, without a TRACKINGID"
        return Delivered(status=200, detail=detail, tracking_id=tracking_id)
    code = (text_of(fields.get("ERRORCODE")) or "").strip().upper()
    info = " ".join((text_of(fields.get("ERRORINFO")) or "").split())
    if status.lower() != "failure" or not code:
        return Failed(reason=f"unexpected answer from Skycore: STATUS {status!r}", retryable=True)
    reason = f"{code}: {info}" if info else code
    return Failed(reason=reason[:REASON_CHARS], retryable=code in RETRYABLE_CODES)


@dataclass(frozen=True)
class SkycoreOptions:
    """`type: skycore`, validated: the keyword arguments of SkycoreDestination."""

    api_key: Secret
    api_url: str = API_URL
    campaignref: str | None = None
    timeout: float = 10.0
    template: Templates | None = None  # `text`: the SMS's text


class SkycoreDestination(Destination):
    type_name = "skycore"
    config_keys = frozenset({"api_key", "api_url", "campaignref", "timeout", "template"})
    required_keys = frozenset({"api_key"})
    default_concurrency = 4  # accounts have a calls-per-second limit (E106, E113)
    ordered = True  # one texter's replies reach them in the order they were written
    bounds_itself = True  # the POST runs under `timeout`

    def __init__(
        self,
        name: str,
        *,
        api_key: Secret,
        api_url: str = API_URL,
        campaignref: str | None = None,
        timeout: float = 10.0,
        template: Templates | None = None,
        **common: Any,
    ) -> None:
        super().__init__(name, **common)
        self.template = template
        self.api_key = api_key
        self.api_url = api_url
        self.campaignref = campaignref
        self.timeout = timeout
        self.attempt_timeout = timeout + 5.0
        self._http: http1.Client | None = None
        self._ledger: OptOutLedger | None = None

    @classmethod
    def parse(cls, options: dict[str, Any], path: str, r: Reader) -> SkycoreOptions | None:
        errors_before = len(r.errors)
        api_key = r.secret(options["api_key"], f"{path}.api_key") if "api_key" in options else None
        api_url = r.url(options["api_url"], f"{path}.api_url") if "api_url" in options else API_URL
        campaignref = None
        if "campaignref" in options:
            raw = options["campaignref"]
            campaignref = r.string(str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw,
                                   f"{path}.campaignref")  # fmt: skip
        timeout = r.duration(options["timeout"], f"{path}.timeout") if "timeout" in options else 10.0
        template = None
        if "template" in options:
            template = parse_templates(options["template"], f"{path}.template", r, {"text": "text"})
        if len(r.errors) > errors_before or api_key is None or api_url is None or timeout is None:
            return None
        return SkycoreOptions(api_key, api_url, campaignref, timeout, template)

    def describe(self) -> str:
        campaign = f", CAMPAIGNREF {self.campaignref}" if self.campaignref else ""
        return f"sendSMS via {self.api_url}{campaign} (timeout {self.timeout:g}s)"

    def preview(self, event: Event) -> Any:
        text = None
        if self.template is not None:
            out = preview_rendered(self.template, event)
            if isinstance(out, str):
                return {"error": out}
            text = out["text"]
        return {
            "method": "POST",
            "url": self.api_url,
            "form": {"xml": request_xml(event, str(self.api_key), self.campaignref, text)},
        }

    async def open(self, services: Services) -> None:
        self._http = http1.Client()
        self._ledger = services.ledger

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def send(self, event: Event, attempt: Attempt) -> Outcome:
        assert self._http is not None, "open() first"
        text = event.get("text")
        if self.template is not None:  # rendered before the ledger is asked or anything is sent
            out = await rendered(self.template, event)
            if isinstance(out, Failed):
                return out
            text = out["text"]
        if not number(event.get("to")) or not number(event.get("from")) or not (text or "").strip():
            return Failed(reason="nothing to send: the event has no texter, short code or text", retryable=False)
        if self._ledger is not None:
            # checked again right before each attempt: a texter may text STOP while their reply
            # waits (Skycore down, a retry pending); nothing is ever sent past an opt-out
            texter, short_code = event.get("to") or "", event.get("from") or ""
            try:
                stopped = await self._ledger.opted_out(texter, short_code)
            except StoreError as exc:
                return Failed(reason=f"cannot read the opt-out ledger: {exc}", retryable=True)
            if stopped:
                return Failed(reason=f"{OPTED_OUT}: {texter} texted STOP to {short_code}; not sent", retryable=False)
        form = urlencode({"xml": request_xml(event, self.api_key.reveal(), self.campaignref, text)}).encode()
        try:
            # no redirects followed; a 200 whose body breaks off is answered as far as it came,
            # which is no sendSMS answer (retried, as a broken connection is)
            response = await self._http.post(self.api_url, form, _HEADERS, keep=ANSWER_BYTES, timeout=self.timeout)
        except TimeoutError:
            return Failed(reason=f"timeout after {self.timeout:g}s", retryable=True)
        except http1.ConnectError as exc:
            return Failed(reason=self._scrub(f"cannot connect: {exc}"), retryable=True)
        except http1.HTTPError as exc:
            return Failed(reason=self._scrub(f"{type(exc).__name__}: {exc}"), retryable=True)
        status, answer_headers = response.status, response.headers
        body = response.body.decode("utf-8", "replace")
        if status != 200:
            outcome = classify_http(status, answer_headers, time.time(), self._scrub(body.strip())[:REASON_CHARS])
            if isinstance(outcome, Delivered):  # a 2xx that is not 200: no sendSMS answer
                return Failed(reason=f"HTTP {status}: not a sendSMS answer", retryable=True, status=status)
            return outcome
        outcome = classify_answer(body)
        if isinstance(outcome, Failed):
            return Failed(reason=self._scrub(outcome.reason), retryable=outcome.retryable, status=200)
        return outcome

    def _scrub(self, text: str) -> str:
        """A peer (or aiohttp) may echo the request: the API key is never kept in a reason."""
        return redact(text, [self.api_key])
