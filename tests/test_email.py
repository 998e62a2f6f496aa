"""The email destination against a real SMTP server (aiosmtpd) on 127.0.0.1: plain, STARTTLS and
implicit TLS with certificates made here (trustme), AUTH, SMTP replies through the real delivery
loop and SQLite store, and threading through the real `serve` process."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from bridge import config
from bridge.carriers import Carriers
from bridge.delivery import Dispatcher
from bridge.destinations.base import Attempt, Services, conversation_key
from bridge.destinations.email import EmailDestination
from bridge.destinations.registry import build as build_destination
from bridge.errors import ConfigError
from bridge.event import Event, dedup_key, normalize
from bridge.ids import event_id
from bridge.postback import parse
from bridge.retry import Delivered, Failed
from bridge.store import DeliveryFilter, NewDelivery
from bridge.store.sqlite import SQLiteStore
from tests.conftest import eventually, free_port, post, sms

FAST_RETRY = {"initial": "50ms", "max_interval": "200ms", "max_age": "1h"}
PASSWORD = "hunter2-very-secret"


# ---------------------------------------------------------------------------- the SMTP peer


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    message: EmailMessage
    tls: bool
    login: str | None
    ehlo: str | None = None  # the name the client gave in EHLO/HELO


@dataclass
class MailServer:
    """Records accepted mail. `data_replies` are answered to DATA one each before accepting;
    `refuse` recipients get 550 at RCPT."""

    port: int = 0
    mails: list[Mail] = field(default_factory=list)
    data_replies: list[str] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    data_seen: int = 0
    message_ids: list[str] = field(default_factory=list)  # of every DATA, accepted or not

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 <%s>: no such user here" % address  # noqa: UP031 (aiosmtpd reply text)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        self.data_seen += 1
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        self.message_ids.append(message["Message-ID"])
        if self.data_replies:
            return self.data_replies.pop(0)
        tls = server.transport.get_extra_info("ssl_object") is not None
        login = session.auth_data.login.decode() if session.authenticated else None
        self.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), message, tls, login, session.host_name))
        return "250 2.0.0 queued"

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[Mail]:
        await eventually(
            lambda: len(self.mails) >= count, timeout, lambda: f"{count} mails (got {len(self.mails)})", interval=0.02
        )
        return self.mails


def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data.login == b"bridge" and data.password == PASSWORD.encode()
    return AuthResult(success=ok, handled=False, auth_data=data if ok else None)  # the server answers 235/535


async def start_mail_server(
    port: int = 0, *, implicit_tls: ssl.SSLContext | None = None, **smtp_options: Any
) -> tuple[MailServer, asyncio.Server]:
    peer = MailServer()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(peer, hostname="mail.test", **smtp_options), "127.0.0.1", port, ssl=implicit_tls
    )
    peer.port = server.sockets[0].getsockname()[1]
    return peer, server


@pytest.fixture
async def mail_servers() -> AsyncIterator[list[asyncio.Server]]:
    """Servers appended here are closed after the test."""
    servers: list[asyncio.Server] = []
    yield servers
    for server in servers:
        server.close()


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, str]:
    """A server context with a certificate for 127.0.0.1 and the CA file that trusts it."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return server_context, str(ca_file)


# ---------------------------------------------------------------------------- the bridge side


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "bridge.db"))
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def services(store: SQLiteStore) -> AsyncIterator[Services]:
    async with aiohttp.ClientSession() as http:
        yield Services(http=http, state=store)


def email_config(port: int, smtp: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    spec = {
        "type": "email",
        "smtp": {"host": "127.0.0.1", "port": port, "security": "none", "timeout": "10s", **(smtp or {})},
        "from": "Postback Bridge <bridge@example.com>",
        "to": ["compliance@example.com"],
        **options,
    }
    return {"retry": FAST_RETRY, "destinations": {"mail": spec}, "default": ["mail"]}


async def destination(services: Services, port: int, smtp: dict[str, Any] | None = None, **options: Any) -> Any:
    built = build_destination(config.build(email_config(port, smtp, **options), environ={}).destinations["mail"])
    assert isinstance(built, EmailDestination)
    await built.open(services)
    return built


def event_of(body: bytes) -> Event:
    return normalize(parse(body), event_id=event_id(), received_at=datetime.now(UTC), carriers=Carriers())


async def send(dest: EmailDestination, event: Event) -> Delivered | Failed:
    return await dest.send(event, Attempt(delivery_id=1, number=1, conversation=conversation_key(event)))


def parts(message: EmailMessage) -> tuple[str, str]:
    text, html = message.iter_parts()
    assert text.get_content_type() == "text/plain" and html.get_content_type() == "text/html"
    return text.get_content(), html.get_content()


# ---------------------------------------------------------------------------- the message


async def test_plain_smtp_mail_names_everything_in_both_parts(services, mail_servers):
    peer, server = await start_mail_server()
    mail_servers.append(server)
    dest = await destination(services, peer.port, cc="audit@example.com")
    event = event_of(sms(1, text="STOP", sender="15552312102", to="86717"))

    assert await send(dest, event) == Delivered()

    (mail,) = peer.mails
    assert mail.sender == "bridge@example.com"
    assert mail.recipients == ["compliance@example.com", "audit@example.com"]
    m = mail.message
    assert m["Subject"] == "[86717] STOP from +1 555-231-2102"
    assert m["From"] == "Postback Bridge <bridge@example.com>"
    assert m["To"] == "compliance@example.com" and m["Cc"] == "audit@example.com"
    assert m["Message-ID"] == f"<{event['id']}.mail@example.com>"
    assert m["Date"] is not None and m["In-Reply-To"] is None
    assert m.get_content_type() == "multipart/alternative"
    for part in parts(m):
        facts = ("+1 555-231-2102", "+15552312102", "86717", "STOP", "2024-05-01 16:00:00 UTC", event["id"], "Carrier")
        for fact in facts:  # the sender as people read it and as E.164 (event["from"]), to search for
            assert fact in part


async def test_html_part_escapes_the_texters_markup(services, mail_servers):
    peer, server = await start_mail_server()
    mail_servers.append(server)
    dest = await destination(services, peer.port)
    text = "&lt;script&gt;alert('hi')&lt;/script&gt; &amp; &lt;b&gt;"  # XML-escaped in the postback
    event = event_of(sms(1, text=text))
    assert event["text"] == "<script>alert('hi')</script> & <b>"

    assert isinstance(await send(dest, event), Delivered)

    plain, html = parts(peer.mails[0].message)
    assert "<script>alert('hi')</script> & <b>" in plain
    assert "<script" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(&#x27;hi&#x27;)&lt;/script&gt; &amp; &lt;b&gt;" in html


async def test_mms_media_are_links_and_other_files_text(services, mail_servers):
    peer, server = await start_mail_server()
    mail_servers.append(server)
    dest = await destination(services, peer.port)
    body = (
        b"<POSTBACK><ORIGIN>MMS_MO</ORIGIN><CODE>N401</CODE><FROM>15552312102</FROM><TO>86717</TO>"
        b"<KEYWORD>contest</KEYWORD><TRACKINGID>m1</TRACKINGID><CONTENT>"
        b"<FILE>https://media.example.com/1.jpg?a=1&amp;b=2</FILE><FILE>javascript:alert(1)</FILE>"
        b"<FILE>photo.jpg</FILE></CONTENT></POSTBACK>"
    )

    assert isinstance(await send(dest, event_of(body)), Delivered)

    plain, html = parts(peer.mails[0].message)
    assert '<a href="https://media.example.com/1.jpg?a=1&amp;b=2">' in html
    assert html.count("<a href=") == 1  # neither javascript: nor a bare file name is a link
    assert "<li>javascript:alert(1)</li>" in html and "<li>photo.jpg</li>" in html
    assert "https://media.example.com/1.jpg?a=1&b=2" in plain and "photo.jpg (not a link)" in plain
    assert peer.mails[0].message["Subject"] == "[86717] CONTEST from +1 555-231-2102"


async def test_subject_template(services, mail_servers):
    peer, server = await start_mail_server()
    mail_servers.append(server)
    dest = await destination(services, peer.port, subject="{{SMS}} {keyword}: {text} ({carrier})")
    assert isinstance(await send(dest, event_of(sms(1, text="HELP\n  me please"))), Delivered)
    assert peer.mails[0].message["Subject"] == "{SMS} HELP: HELP me please ()"


# ---------------------------------------------------------------------------- TLS and AUTH


async def test_the_ehlo_name_is_local_hostname_when_set(services, mail_servers):
    # some relays refuse an EHLO of "localhost" or a bare container id: the name can be set
    peer, server = await start_mail_server()
    mail_servers.append(server)
    event = event_of(sms(1))
    named = await destination(services, peer.port, {"local_hostname": "bridge.example.com"})
    assert await send(named, event) == Delivered()
    default = await destination(services, peer.port)
    assert await send(default, event) == Delivered()
    assert peer.mails[0].ehlo == "bridge.example.com"
    assert peer.mails[1].ehlo and peer.mails[1].ehlo != "bridge.example.com"  # this machine's name
    assert errors_of(
        {
            "smtp": {"host": "smtp.example.com", "local_hostname": "bad name!"},
            "from": "a@example.com",
            "to": "b@example.com",
        }
    ) == ["destinations.mail.smtp.local_hostname: 'bad name!' is not a host name or an [address] literal"]


async def test_starttls_with_auth(services, mail_servers, tls):
    server_context, ca_file = tls
    peer, server = await start_mail_server(
        tls_context=server_context, require_starttls=True, authenticator=authenticator, auth_required=True
    )
    mail_servers.append(server)
    smtp = {"security": "starttls", "ca_file": ca_file, "username": "bridge", "password": PASSWORD}
    dest = await destination(services, peer.port, smtp)

    assert isinstance(await send(dest, event_of(sms(1))), Delivered)

    (mail,) = peer.mails
    assert mail.tls and mail.login == "bridge"


async def test_implicit_tls(services, mail_servers, tls):
    server_context, ca_file = tls
    peer, server = await start_mail_server(implicit_tls=server_context)
    mail_servers.append(server)
    dest = await destination(services, peer.port, {"security": "tls", "ca_file": ca_file})

    assert isinstance(await send(dest, event_of(sms(1))), Delivered)

    assert peer.mails[0].tls


async def test_an_untrusted_certificate_is_refused(services, mail_servers, tls):
    server_context, _ = tls
    peer, server = await start_mail_server(implicit_tls=server_context)
    mail_servers.append(server)
    dest = await destination(services, peer.port, {"security": "tls"})  # the system CAs only

    outcome = await send(dest, event_of(sms(1)))

    assert isinstance(outcome, Failed) and outcome.retryable
    assert "certificate" in outcome.reason.lower()
    assert peer.mails == []


async def test_starttls_not_offered_is_permanent(services, mail_servers):
    peer, server = await start_mail_server()
    mail_servers.append(server)
    dest = await destination(services, peer.port, {"security": "starttls"})

    outcome = await send(dest, event_of(sms(1)))

    assert isinstance(outcome, Failed) and not outcome.retryable
    assert "STARTTLS" in outcome.reason


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_auth_over_plain_loopback_and_a_wrong_password(services, mail_servers):
    peer, server = await start_mail_server(authenticator=authenticator, auth_required=True, auth_require_tls=False)
    mail_servers.append(server)
    good = await destination(services, peer.port, {"username": "bridge", "password": PASSWORD})
    bad = await destination(services, peer.port, {"username": "bridge", "password": "wrong-password"})

    assert isinstance(await send(good, event_of(sms(1))), Delivered)
    outcome = await send(bad, event_of(sms(2)))

    assert peer.mails[0].login == "bridge"
    assert isinstance(outcome, Failed) and not outcome.retryable
    assert "535" in outcome.reason and "wrong-password" not in outcome.reason
    assert len(peer.mails) == 1


# ---------------------------------------------------------------------------- retries, for real


async def deliver(store: SQLiteStore, dest: EmailDestination, event: Event) -> int:
    await store.ingest(event, dedup_key(event), [NewDelivery(dest.name, "test", conversation_key(event))])
    (row,) = await store.list_deliveries(DeliveryFilter(event_id=event["id"]))
    return row.id


async def settled(store: SQLiteStore, delivery_id: int, timeout: float = 20.0) -> Any:
    row: Any = None

    async def done() -> Any:
        nonlocal row
        (row,) = await store.list_deliveries(DeliveryFilter(ids=(delivery_id,)))
        return row.status != "pending"

    what = f"delivery {delivery_id} to settle"
    await eventually(done, timeout, lambda: f"{what} (still pending after {row.attempts} attempts)", interval=0.05)
    return row


@pytest.fixture
async def dispatcher(store: SQLiteStore) -> AsyncIterator[Any]:
    started: list[Dispatcher] = []

    def start(dest: EmailDestination) -> Dispatcher:
        d = Dispatcher(store, {dest.name: dest})
        d.start()
        started.append(d)
        return d

    yield start
    for d in started:
        await d.stop()


async def test_451_then_accepted_is_one_mail(services, store, dispatcher, mail_servers):
    peer, server = await start_mail_server()
    mail_servers.append(server)
    peer.data_replies = ["451 4.3.0 try again later"]
    dest = await destination(services, peer.port)
    delivery = await deliver(store, dest, event_of(sms(1)))
    dispatcher(dest)

    row = await settled(store, delivery)

    assert row.status == "delivered" and row.attempts == 2
    assert peer.data_seen == 2 and len(peer.mails) == 1
    assert peer.message_ids[0] == peer.message_ids[1]  # the retry is recognisably the same mail
    attempts = await store.attempts(delivery)
    assert attempts[0].outcome == "retry" and "451 4.3.0 try again later" in (attempts[0].error or "")


async def test_550_is_dead_with_the_reply_and_not_retried(services, store, dispatcher, mail_servers):
    peer, server = await start_mail_server()
    mail_servers.append(server)
    peer.data_replies = ["550 5.7.1 message rejected as spam"]
    dest = await destination(services, peer.port)
    delivery = await deliver(store, dest, event_of(sms(1)))
    dispatcher(dest)

    row = await settled(store, delivery)
    await asyncio.sleep(0.5)  # several retry intervals: nothing more may arrive

    assert row.status == "dead" and row.attempts == 1
    assert "550 5.7.1 message rejected as spam" in row.last_error
    assert peer.data_seen == 1 and peer.mails == []


async def test_a_refused_recipient_sends_nobody_anything(services, store, dispatcher, mail_servers):
    peer, server = await start_mail_server()
    mail_servers.append(server)
    peer.refuse = {"gone@example.com"}
    dest = await destination(services, peer.port, to=["compliance@example.com", "gone@example.com"])
    delivery = await deliver(store, dest, event_of(sms(1)))
    dispatcher(dest)

    row = await settled(store, delivery)

    assert row.status == "dead"
    assert "gone@example.com" in row.last_error and "550 5.1.1" in row.last_error
    assert peer.data_seen == 0


async def test_server_down_then_up_is_delivered(services, store, dispatcher, mail_servers):
    port = free_port()
    dest = await destination(services, port)
    delivery = await deliver(store, dest, event_of(sms(1)))
    dispatcher(dest)
    await eventually(lambda: store.attempts(delivery), 15, "an attempt while the server was down", interval=0.05)

    peer, server = await start_mail_server(port)
    mail_servers.append(server)
    row = await settled(store, delivery)

    assert row.status == "delivered" and row.attempts >= 2
    assert len(peer.mails) == 1
    first = (await store.attempts(delivery))[0]
    assert first.outcome == "retry" and "cannot connect" in (first.error or "")


# ---------------------------------------------------------------------------- threading


async def test_a_burst_threads_to_the_first_even_when_it_is_retried(services, store, dispatcher, mail_servers):
    peer, server = await start_mail_server()
    mail_servers.append(server)
    peer.data_replies = ["451 4.7.1 greylisted, come back later"]
    dest = await destination(services, peer.port)
    first, second, third = (event_of(sms(n, text=f"part {n}")) for n in (1, 2, 3))
    for event in (first, second, third):
        await deliver(store, dest, event)
    dispatcher(dest)

    mails = await peer.wait_for(3)

    assert [m.message["X-Postback-Bridge-Event"] for m in mails] == [first["id"], second["id"], third["id"]]
    root = mails[0].message["Message-ID"]
    assert mails[0].message["In-Reply-To"] is None
    assert [m.message["In-Reply-To"] for m in mails[1:]] == [root, root]
    assert [m.message["References"] for m in mails[1:]] == [root, root]


async def test_one_texters_mails_thread_to_their_first(bridge_factory, mail_servers):
    peer, server = await start_mail_server()
    mail_servers.append(server)
    bridge = bridge_factory(email_config(peer.port))
    bridge.start()

    ids = []
    for n, sender in ((1, "15552312102"), (2, "15552312102"), (3, "15550000000"), (4, "15552312102")):
        status, body = await post(bridge.url + "/postback", sms(n, sender=sender))
        assert status == 200
        ids.append(body["id"])
        await peer.wait_for(n)  # in order, so "first" is well defined across texters

    by_event = {m.message["X-Postback-Bridge-Event"]: m.message for m in peer.mails}
    first, second, other, fourth = (by_event[i] for i in ids)
    assert first["Message-ID"] == f"<{ids[0]}.mail@example.com>"
    assert first["In-Reply-To"] is None and other["In-Reply-To"] is None
    for reply in (second, fourth):
        assert reply["In-Reply-To"] == first["Message-ID"] == reply["References"]
    assert bridge.stop() == 0


# ---------------------------------------------------------------------------- config


def errors_of(spec: dict[str, Any]) -> list[str]:
    raw = {"destinations": {"mail": {"type": "email", **spec}}, "default": ["mail"]}
    with pytest.raises(ConfigError) as info:
        config.build(raw, environ={})
    return info.value.problems


def test_config_errors_name_their_place(tmp_path):
    errors = errors_of(
        {
            "smtp": {"host": "smtp.example.com", "port": 70000, "security": "ssl", "timeout": "soon", "tls": 1},
            "from": "not an address",
            "to": ["ok@example.com", 42, ""],
            "cc": [],
            "subject": "{sender} texted",
        }
    )
    text = "\n".join(errors)
    for place in (
        "destinations.mail.smtp.port:",
        "destinations.mail.smtp.security: expected one of none, starttls, tls",
        "destinations.mail.smtp.timeout:",
        "destinations.mail.smtp.tls: unknown key",
        "destinations.mail.from:",
        "destinations.mail.to[1]:",
        "destinations.mail.to[2]: must not be empty",
        "destinations.mail.cc: needs at least one address",
        "destinations.mail.subject: unknown field {sender}",
    ):
        assert place in text, f"{place!r} not in:\n{text}"


def test_config_requires_the_basics_and_pairs():
    text = "\n".join(errors_of({"smtp": {"port": 25}}))
    assert "destinations.mail.from: is required" in text
    assert "destinations.mail.to: is required" in text
    assert "destinations.mail.smtp.host: is required" in text

    text = "\n".join(errors_of({"smtp": {"host": "h", "username": "u"}, "from": "a@b.c", "to": "d@e.f"}))
    assert "destinations.mail.smtp.password: is required with username" in text

    text = "\n".join(
        errors_of({"smtp": {"host": "h", "ca_file": "/nonexistent/ca.pem"}, "from": "a@b.c", "to": "d@e.f"})
    )
    assert "destinations.mail.smtp.ca_file: cannot load" in text


def test_a_password_is_never_sent_in_the_clear_nor_shown():
    spec = {"smtp": {"host": "smtp.example.com", "security": "none", "username": "u", "password": PASSWORD}}
    errors = errors_of({**spec, "from": "a@example.com", "to": "b@example.com"})
    assert any("destinations.mail.smtp.security: none would send the password" in e for e in errors)
    assert PASSWORD not in "\n".join(errors)

    raw = email_config(25, {"host": "smtp.example.com", "security": "starttls", "username": "u", "password": PASSWORD})
    dest = build_destination(config.build(raw, environ={}).destinations["mail"])
    assert dest.smtp.port == 25 and dest.smtp.password.reveal() == PASSWORD
    shown = dest.describe() + json.dumps(dest.preview(event_of(sms(1)))) + repr(dest.smtp)
    assert PASSWORD not in shown and "smtp.example.com:25 (starttls, as u)" in shown


def test_port_follows_security_and_one_to_is_a_list():
    for security, port in (("none", 25), ("starttls", 587), ("tls", 465)):
        raw = {"type": "email", "smtp": {"host": "h", "security": security}, "from": "a@b.c", "to": "d@e.f"}
        dest = build_destination(config.build({"destinations": {"m": raw}}, environ={}).destinations["m"])
        assert dest.smtp.port == port
        assert dest.envelope.recipients == ["d@e.f"]
