"""`type: email`: each event as a readable mail (plain text and HTML) over SMTP, threaded per
texter.

Threading: every mail's Message-ID is derived from the event id (a retried send is the same
mail), and the first mail of a conversation is remembered in the store, so later mails carry
`In-Reply-To`/`References` to it. For that the first mail must be settled before the next one is
sent, so deliveries of one conversation go in order (`ordered = True`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import html
import ipaddress
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any

import aiosmtplib

from bridge.destinations.base import (
    Attempt,
    ConversationState,
    Destination,
    MediaFiles,
    Services,
    preview_rendered,
    rendered,
)
from bridge.errors import BridgeError, StoreError
from bridge.event import Event, parse_time
from bridge.mediatypes import filename
from bridge.retry import Delivered, Failed, Outcome
from bridge.secret import Secret
from bridge.templates import Templates, parse_templates, readable_phone
from bridge.validate import Reader

SECURITY = ("none", "starttls", "tls")
DEFAULT_PORTS = {"none": 25, "starttls": 587, "tls": 465}
DEFAULT_SUBJECT = "[{to}] {keyword} from {from}"
SUBJECT_FIELDS = frozenset({"id", "type", "origin", "code", "from", "to", "keyword", "text", "carrier"})
_SMTP_KEYS = frozenset({"host", "port", "security", "username", "password", "timeout", "ca_file", "local_hostname"})
# what EHLO may name: a domain (letters, digits, hyphens, dots) or an address literal [192.0.2.1]
_EHLO_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_SUBJECT_MAX = 200
TEMPLATES = {"subject": "text", "text": "text", "html": "html"}  # `template:` keys and their kinds
ATTACH_MAX_BYTES = 10 * 1024 * 1024  # the kept files one mail carries at most, in all; the rest are links
QUIT_TIMEOUT = 5.0
_LABELS = {
    "sms.received": "SMS",
    "mms.received": "MMS",
    "sms.status": "SMS status",
    "mms.status": "MMS status",
    "subscriber.opted_in": "Opt-in",
    "subscriber.opted_out": "Opt-out",
    "email_subscriber.opted_in": "Email opt-in",
    "email_subscriber.opted_out": "Email opt-out",
}


# ---------------------------------------------------------------------------- the message (pure)


@dataclass(frozen=True)
class Envelope:
    """Who a mail is from and to; the addresses as given in the config."""

    sender: Address
    to: tuple[Address, ...]
    cc: tuple[Address, ...] = ()

    @property
    def recipients(self) -> list[str]:
        """Everyone to name in RCPT TO, each once."""
        return list(dict.fromkeys(a.addr_spec for a in (*self.to, *self.cc)))


def pretty_phone(number: str | None) -> str:
    """`+15552312102` -> `+1 555-231-2102` (North American numbers); others as they are."""
    return readable_phone(number) or "unknown"


def sender_fact(number: str | None) -> str:
    """For people and for searching: `+1 555-231-2102 (+15552312102)`; other numbers once."""
    shown = pretty_phone(number)
    return f"{shown} ({number})" if number and shown != number else shown


def subject_fields(template: str) -> list[str]:
    """The placeholder names a subject template uses (`{from}` -> `from`)."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(template) if m.group(1) is not None]


def render_subject(template: str, event: Event) -> str:
    """The template with `{field}`s filled in, on one line (a postback's newlines must not end
    the header) and at most 200 characters."""
    text = event["text"] or ""
    values: dict[str, str] = {
        "id": event["id"],
        "type": event["type"],
        "origin": event["origin"],
        "code": event["code"] or "",
        "from": pretty_phone(event["from"]),
        "to": event["to"] or "",
        "keyword": str(event["keyword"] or _LABELS.get(event["type"], event["type"])),
        "text": text,
        "carrier": event["carrier"] or "",
    }

    def sub(m: re.Match[str]) -> str:
        if m.group(1) is None:
            return m.group(0)[0]
        return values[m.group(1)]

    return one_line(_PLACEHOLDER.sub(sub, template))


def one_line(subject: str) -> str:
    """A subject on one line (a newline must not end the header), at most 200 characters."""
    subject = " ".join(subject.split())
    return subject if len(subject) <= _SUBJECT_MAX else subject[: _SUBJECT_MAX - 1] + "…"


def message_id(event: Event, destination: str, sender: Address) -> str:
    """Stable per (event, destination): a resent mail is recognisably the same one, and two email
    destinations sending one event do not collide in a shared mailbox."""
    local = re.sub(r"[^A-Za-z0-9_-]", "-", destination)
    return f"<{event['id']}.{local}@{sender.domain or 'postback-bridge'}>"


def _when(event: Event) -> str:
    moment = parse_time(event["occurred_at"] or event["received_at"])
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "unknown"


def _carrier(event: Event) -> str:
    name = event["carrier"] or "unknown"
    return f"{name} (SPID {event['spid']})" if event["spid"] else name


def _is_link(value: str) -> bool:
    """Only web links become <a href>; anything else (a file name, `javascript:`) is text."""
    return value.lower().startswith(("https://", "http://"))


def _headline(event: Event) -> str:
    label = _LABELS.get(event["type"], f"Postback ({event['origin'] or 'no ORIGIN'})")
    return f"{label} from {pretty_phone(event['from'])} to {event['to'] or 'unknown'}"


def _facts(event: Event) -> list[tuple[str, str]]:
    facts = [
        ("From", sender_fact(event["from"])),
        ("Short code", event["to"] or "unknown"),
        ("Keyword", event["keyword"] or "(none)"),
    ]
    if event["subject"]:
        facts.append(("Subject", event["subject"]))
    facts += [
        ("Carrier", _carrier(event)),
        ("Time", _when(event)),
        ("Type", f"{event['type']} ({' '.join(filter(None, [event['origin'], event['code']]))})"),
        ("Event", event["id"]),
    ]
    return facts


def render_text(event: Event) -> str:
    lines = [_headline(event), "", event["text"] if event["text"] is not None else "(no text)", ""]
    width = max(len(label) for label, _ in _facts(event)) + 2
    lines += [f"{label + ':':<{width}}{value}" for label, value in _facts(event)]
    if event["media"]:
        lines += ["", "Media:"]
        for item in event["media"]:
            lines.append(f"  {item['url']}" + ("" if _is_link(item["url"]) else " (not a link)"))
            if item.get("archived_url"):
                lines.append(f"    kept copy: {item['archived_url']}")
    return "\n".join(lines) + "\n"


def _media_html(item: dict[str, Any]) -> str:
    e, url, kept = html.escape, item["url"], item.get("archived_url") or ""
    shown = f'<a href="{e(url)}">{e(url)}</a>' if _is_link(url) else e(url)
    return shown + (f' (<a href="{e(kept)}">kept copy</a>)' if _is_link(kept) else "")


def render_html(event: Event) -> str:
    """Everything from the postback is escaped: a texter's `<script>` arrives as text."""
    e = html.escape
    text = event["text"] if event["text"] is not None else "(no text)"
    rows = "".join(
        f'<tr><th align="left" style="padding-right:1em">{e(label)}</th><td>{e(value)}</td></tr>'
        for label, value in _facts(event)
    )
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"></head><body>',
        f"<p><strong>{e(_headline(event))}</strong></p>",
        f'<blockquote style="white-space:pre-wrap">{e(text)}</blockquote>',
        f"<table>{rows}</table>",
    ]
    if event["media"]:
        items = "".join(f"<li>{_media_html(item)}</li>" for item in event["media"])
        parts.append(f"<p>Media:</p><ul>{items}</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_message(
    event: Event,
    *,
    destination: str,
    envelope: Envelope,
    subject: str = DEFAULT_SUBJECT,
    thread_root: str | None = None,
    templated: Mapping[str, str] | None = None,
    attachments: Sequence[tuple[str, str, bytes]] = (),
) -> EmailMessage:
    """The mail for one event; `thread_root` is the Message-ID of the conversation's first mail.
    `templated`: what the destination's templates rendered (subject, text, html). With a text or
    html template the mail has those parts only; without either, both built-in ones.
    `attachments` are (file name, content type, bytes): the MMS's kept files (`attach_media`)."""
    templated = templated or {}
    msg = EmailMessage()
    msg["From"] = envelope.sender
    msg["To"] = envelope.to
    if envelope.cc:
        msg["Cc"] = envelope.cc
    msg["Subject"] = one_line(templated["subject"]) if "subject" in templated else render_subject(subject, event)
    received = parse_time(event["received_at"])
    if received is not None:
        msg["Date"] = format_datetime(received)  # fixed per event, so a resend is the same mail
    own_id = message_id(event, destination, envelope.sender)
    msg["Message-ID"] = own_id
    if thread_root and thread_root != own_id:
        msg["In-Reply-To"] = thread_root
        msg["References"] = thread_root
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: vacation responders stay quiet
    msg["X-Postback-Bridge-Event"] = event["id"]
    # quoted-printable keeps any text 7-bit and its lines short, whatever the server offers
    if "text" not in templated and "html" not in templated:
        msg.set_content(render_text(event), cte="quoted-printable")
        msg.add_alternative(render_html(event), subtype="html", cte="quoted-printable")
    elif "text" in templated:
        msg.set_content(templated["text"], cte="quoted-printable")
        if "html" in templated:
            msg.add_alternative(templated["html"], subtype="html", cte="quoted-printable")
    else:
        msg.set_content(templated["html"], subtype="html", cte="quoted-printable")
    for name, content_type, data in attachments:
        maintype, _, subtype = content_type.partition(";")[0].partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg


# ---------------------------------------------------------------------------- SMTP answers (pure)


def classify_smtp(exc: Exception) -> Failed:
    """An SMTP failure -> retryable (no connection, timeout, 4xx) or permanent (5xx, or a server
    that cannot do what the config asks, such as STARTTLS or AUTH)."""
    if isinstance(exc, TimeoutError):
        return Failed(reason=f"timeout: {exc}" if str(exc) else "timeout", retryable=True)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _reply(exc.code, exc.message, _command(exc))
    if isinstance(exc, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPServerDisconnected | OSError):
        return Failed(reason=f"cannot connect: {exc}", retryable=True)
    return Failed(reason=f"SMTP: {exc}", retryable=False)


def _command(exc: aiosmtplib.SMTPResponseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
        return f"RCPT TO <{exc.recipient}>"
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return f"MAIL FROM <{exc.sender}>"
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return "AUTH"
    if isinstance(exc, aiosmtplib.SMTPDataError):
        return "DATA"
    return "SMTP"


def _reply(code: int, message: str, command: str) -> Failed:
    # 4xx is the server's "try again later" (greylisting, a full queue); 5xx will not heal
    return Failed(reason=f"{command}: {code} {message}".strip(), retryable=not 500 <= code < 600)


def refused(failures: list[aiosmtplib.SMTPRecipientRefused]) -> Failed:
    """Some recipients refused: nothing was sent, so permanent if any refusal is (no resend could
    ever reach everyone), else retry all of them later."""
    outcomes = [_reply(f.code, f.message, f"RCPT TO <{f.recipient}>") for f in failures]
    return Failed(
        reason="; ".join(o.reason for o in outcomes),
        retryable=all(o.retryable for o in outcomes),
    )


# ---------------------------------------------------------------------------- config and I/O


@dataclass(frozen=True)
class SMTPSettings:
    host: str
    port: int
    security: str = "starttls"
    username: str | None = None
    password: Secret | None = None
    timeout: float = 30.0
    ca_file: str | None = None
    local_hostname: str | None = None  # the EHLO name; None: this machine's fully qualified name

    def describe(self) -> str:
        who = f", as {self.username}" if self.username else ""
        return f"{self.host}:{self.port} ({self.security}{who})"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _address(value: Any, path: str, r: Reader) -> Address | None:
    text = r.string(value, path)
    if text is None:
        return None
    name, addr = parseaddr(text)
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain or not addr.isascii() or " " in addr:
        r.error(path, f"{text!r} is not an email address like alerts@example.com or 'Alerts <alerts@example.com>'")
        return None
    try:
        return Address(display_name=name, addr_spec=addr)
    except (ValueError, IndexError) as exc:  # the email package's parser raises both
        r.error(path, f"{text!r} is not a valid email address: {exc}")
        return None


def _addresses(value: Any, path: str, r: Reader) -> tuple[Address, ...] | None:
    items = value if isinstance(value, list) else [value]
    if not items:
        r.error(path, "needs at least one address")
        return None
    paths = [f"{path}[{i}]" for i in range(len(items))] if isinstance(value, list) else [path]
    out = [_address(item, where, r) for item, where in zip(items, paths, strict=True)]
    return tuple(a for a in out if a is not None) if all(out) else None


def _smtp(raw: Any, path: str, r: Reader) -> SMTPSettings | None:
    data = r.mapping(raw, path, _SMTP_KEYS, {"host"})
    if data is None or "host" not in data:
        return None
    ok = True
    host = r.string(data["host"], f"{path}.host")
    security = data.get("security", "starttls")
    if security not in SECURITY:
        r.error(f"{path}.security", f"expected one of {', '.join(SECURITY)}, got {security!r}")
        ok = False
        security = "starttls"
    port: int | None = DEFAULT_PORTS[security]
    if "port" in data:
        port = r.integer(data["port"], f"{path}.port", minimum=1)
        if port is not None and port > 65535:
            r.error(f"{path}.port", "must be at most 65535")
            port = None
    timeout = r.duration(data["timeout"], f"{path}.timeout") if "timeout" in data else 30.0
    username = r.string(data["username"], f"{path}.username") if "username" in data else None
    password = r.secret(data["password"], f"{path}.password") if "password" in data else None
    if ("username" in data) != ("password" in data):
        missing = "password" if "username" in data else "username"
        r.error(f"{path}.{missing}", "is required with " + ("username" if missing == "password" else "password"))
        ok = False
    if password is not None and security == "none" and host is not None and not _loopback(host):
        r.error(f"{path}.security", "none would send the password in the clear; use starttls or tls")
        ok = False
    ca_file = None
    if "ca_file" in data:
        ca_file = r.string(data["ca_file"], f"{path}.ca_file")
        if ca_file is not None and security == "none":
            r.error(f"{path}.ca_file", "is only used with security: starttls or tls")
            ok = False
        elif ca_file is not None:
            try:
                ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                r.error(f"{path}.ca_file", f"cannot load CA certificates from {ca_file!r}: {exc}")
                ok = False
    local_hostname = None
    if "local_hostname" in data:
        local_hostname = r.string(data["local_hostname"], f"{path}.local_hostname")
        if local_hostname is not None and not _EHLO_NAME.fullmatch(local_hostname):
            r.error(f"{path}.local_hostname", f"{local_hostname!r} is not a host name or an [address] literal")
            ok = False
    if not ok or host is None or port is None or timeout is None:
        return None
    return SMTPSettings(host, port, security, username, password, timeout, ca_file, local_hostname)


@dataclass(frozen=True)
class EmailOptions:
    """`type: email`, validated."""

    smtp: SMTPSettings
    envelope: Envelope
    subject: str = DEFAULT_SUBJECT
    template: Templates | None = None
    attach_media: bool = False
    attach_max_bytes: int = ATTACH_MAX_BYTES


class EmailDestination(Destination):
    type_name = "email"
    config_keys = frozenset({"smtp", "from", "to", "cc", "subject", "template", "attach_media", "attach_max_bytes"})
    required_keys = frozenset({"smtp", "from", "to"})
    default_concurrency = 4  # one SMTP connection each; relays throttle many at once
    ordered = True  # a conversation's first mail must be known before replies point at it

    def __init__(
        self,
        name: str,
        smtp: SMTPSettings,
        envelope: Envelope,
        *,
        subject: str = DEFAULT_SUBJECT,
        template: Templates | None = None,
        attach_media: bool = False,
        attach_max_bytes: int = ATTACH_MAX_BYTES,
        **common: Any,
    ) -> None:
        super().__init__(name, **common)
        self.smtp = smtp
        self.envelope = envelope
        self.subject = subject
        self.template = template
        self.attach_media = attach_media
        self.attach_max_bytes = attach_max_bytes
        self._media: MediaFiles | None = None
        self.attempt_timeout = smtp.timeout + QUIT_TIMEOUT + 5.0
        self._tls = ssl.create_default_context(cafile=smtp.ca_file) if smtp.security != "none" else None
        self._state: ConversationState | None = None

    @classmethod
    def parse(cls, options: dict[str, Any], path: str, r: Reader) -> EmailOptions | None:
        smtp = _smtp(options["smtp"], f"{path}.smtp", r) if "smtp" in options else None
        sender = _address(options["from"], f"{path}.from", r) if "from" in options else None
        to = _addresses(options["to"], f"{path}.to", r) if "to" in options else None
        cc = _addresses(options["cc"], f"{path}.cc", r) if "cc" in options else ()
        subject: str | None = DEFAULT_SUBJECT
        if "subject" in options:
            subject = r.string(options["subject"], f"{path}.subject")
            unknown = sorted(set(subject_fields(subject or "")) - SUBJECT_FIELDS)
            if unknown:
                r.error(
                    f"{path}.subject",
                    f"unknown field {{{unknown[0]}}} (known: {', '.join(sorted(SUBJECT_FIELDS))}; "
                    "write {{ and }} for braces)",
                )
                subject = None
        template = None
        if "template" in options:
            template = parse_templates(options["template"], f"{path}.template", r, TEMPLATES)
            if template is not None and template.get("subject") is not None and "subject" in options:
                r.error(f"{path}.subject", "template.subject is given too: use one or the other")
                template = None
        attach = r.boolean(options["attach_media"], f"{path}.attach_media") if "attach_media" in options else False
        cap: int | None = ATTACH_MAX_BYTES
        if "attach_max_bytes" in options:
            cap = r.integer(options["attach_max_bytes"], f"{path}.attach_max_bytes", minimum=1)
        if smtp is None or sender is None or to is None or cc is None or subject is None:
            return None
        if "template" in options and template is None:
            return None
        if attach is None or cap is None:
            return None
        return EmailOptions(smtp, Envelope(sender, to, cc), subject, template, attach, cap)

    def describe(self) -> str:
        recipients = ", ".join(self.envelope.recipients)
        return f"SMTP {self.smtp.describe()} from {self.envelope.sender.addr_spec} to {recipients}"

    def _message(
        self,
        event: Event,
        thread_root: str | None,
        templated: Mapping[str, str] | None = None,
        attachments: Sequence[tuple[str, str, bytes]] = (),
    ) -> EmailMessage:
        return build_message(
            event,
            destination=self.name,
            envelope=self.envelope,
            subject=self.subject,
            thread_root=thread_root,
            templated=templated,
            attachments=attachments,
        )

    async def _attachments(self, event: Event) -> list[tuple[str, str, bytes]]:
        """The MMS's kept files, in order, while they fit in attach_max_bytes together; the rest
        stay links (each file's kept copy is linked in the text either way)."""
        if not self.attach_media or self._media is None:
            return []
        out, total = [], 0
        for item in event.get("media") or []:
            digest, size, kind = item.get("sha256"), item.get("size"), item.get("content_type")
            if not (isinstance(digest, str) and isinstance(size, int) and isinstance(kind, str)):
                continue  # not kept: its link is in the text
            if total + size > self.attach_max_bytes:
                continue
            data = await self._media.get(digest)  # MediaStoreError: a retry, as the store's own
            if data is not None:
                out.append((filename(kind, digest), kind, data))
                total += len(data)
        return out

    def preview(self, event: Event) -> Any:
        # no conversation state in a dry run: shown as the first mail of its conversation
        out = preview_rendered(self.template, event) if self.template is not None else None
        if isinstance(out, str):
            return {"error": out}
        msg = self._message(event, None, out)
        if msg.is_multipart():
            parts = {part.get_content_subtype(): part.get_content() for part in msg.iter_parts()}
        else:  # a text or html template alone: one part
            parts = {msg.get_content_subtype(): msg.get_content()}
        return {
            "smtp": self.smtp.describe(),
            "envelope": {"from": self.envelope.sender.addr_spec, "to": self.envelope.recipients},
            "headers": {k: str(v) for k, v in msg.items() if not k.startswith("Content-")},
            **{("text" if subtype == "plain" else subtype): body for subtype, body in parts.items()},
        }

    async def open(self, services: Services) -> None:
        self._state = services.state
        self._media = services.media

    async def send(self, event: Event, attempt: Attempt) -> Outcome:
        assert self._state is not None, "open() first"
        out: dict[str, str] | None = None
        if self.template is not None:  # all of it rendered before the server is called
            result = await rendered(self.template, event)
            if isinstance(result, Failed):
                return result
            out = result
        try:
            root = await self._state.get_conversation(self.name, attempt.conversation)
        except StoreError as exc:
            return Failed(reason=f"cannot read the conversation's thread: {exc}", retryable=True)
        try:
            attachments = await self._attachments(event)
        except BridgeError as exc:  # the media store cannot answer now
            return Failed(reason=f"cannot read the kept files: {exc}", retryable=True)
        msg = self._message(event, root, out, attachments)
        s = self.smtp
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=s.timeout,
            use_tls=s.security == "tls",
            start_tls=s.security == "starttls",
            tls_context=self._tls,
            local_hostname=s.local_hostname,
        )
        try:
            async with asyncio.timeout(s.timeout):
                failed = await self._transmit(client, msg)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return classify_smtp(exc)
        finally:
            await _goodbye(client)
        if failed is not None:
            return failed
        if root is None:
            try:
                await self._state.put_conversation(self.name, attempt.conversation, msg["Message-ID"])
            except StoreError as exc:
                # the mail is out; only threading suffers (the next mail starts a new thread)
                return Delivered(detail=f"sent, but the thread was not remembered: {exc}")
        return Delivered()

    async def _transmit(self, client: aiosmtplib.SMTP, msg: EmailMessage) -> Failed | None:
        """One SMTP transaction. Every recipient must be accepted before DATA, so a mail reaches
        all of them or none, and a refused address never makes the others get a second copy."""
        await client.connect()  # and STARTTLS
        if self.smtp.username is not None and self.smtp.password is not None:
            await client.login(self.smtp.username, self.smtp.password.reveal())
        await client.mail(self.envelope.sender.addr_spec)
        failures = []
        for recipient in self.envelope.recipients:
            try:
                await client.rcpt(recipient)
            except aiosmtplib.SMTPRecipientRefused as exc:
                failures.append(exc)
        if failures:
            await client.rset()
            return refused(failures)
        await client.data(msg.as_bytes(policy=email.policy.SMTP))
        return None


async def _goodbye(client: aiosmtplib.SMTP) -> None:
    """QUIT politely but briefly, outside the send's timeout: once DATA is accepted the mail is
    out, and a slow goodbye must not turn it into a retry (and a second copy)."""
    if client.is_connected:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await client.quit(timeout=QUIT_TIMEOUT)
    client.close()
