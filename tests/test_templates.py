"""Message templates (CONTRACT §9): what each destination sends with a `template:`, checked at
its real peer on 127.0.0.1 (the fake Slack, aiosmtpd, a webhook sink, the fake Skycore) through
the bridge's own delivery loop; the config errors with their places; a template that fails at
send time, or tries to leave the sandbox, makes the delivery dead with the error and sends
nothing; and `route` / `check-config` from the command line."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

import pytest
import yaml
from standardwebhooks.webhooks import Webhook

from bridge import templates
from bridge.config import build
from bridge.destinations.base import Attempt, Services
from bridge.destinations.registry import build as build_destination
from bridge.errors import ConfigError
from bridge.retry import Delivered, Failed
from bridge.runtime import RUNTIME
from bridge.store import DeliveryFilter, DeliveryRow
from bridge.templates import RenderError, compile_template
from bridge.validate import Reader
from tests.conftest import POSTBACKS, Sink, eventually, sms
from tests.skycore_fake import FakeSkycore, fake_skycore
from tests.slack_fake import TOKEN, FakeSlack, fake_slack
from tests.test_config import run_cli
from tests.test_email import MailServer, start_mail_server
from tests.test_skycore import API_KEY, reply

RETRY = {"initial": "50ms", "max_interval": "200ms", "max_age": "1h"}
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TEXTER = "Hi <b>there</b> & <!channel>"

SANDBOX_ESCAPES = [
    "{{ event.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ event.fields.update({'X': 1}) }}",
    "{{ namespace.__init__.__globals__['os'] }}",
    "{{ (event.text | attr('__class__')) }}",
    "{{ 'x' * 1000000000 }}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
]


def template(source: str, kind: str = "text") -> templates.Template:
    r = Reader()
    compiled = compile_template(source, "destinations.x.template.text", "template.text", kind, r)
    assert compiled is not None, r.errors
    return compiled


EVENT: dict[str, Any] = {
    "id": "evt_1",
    "type": "sms.received",
    "from": "+15552312102",
    "to": "86717",
    "keyword": None,
    "text": TEXTER,
    "media": [],
    "fields": {"TEXT": TEXTER},
}


# ---------------------------------------------------------------------------- rendering (pure)


@pytest.mark.parametrize(
    ("source", "kind", "out"),
    [
        ("{{ event.from | phone }} to {{ event.to | phone }}", "text", "+1 555-231-2102 to 86717"),
        ("[{{ event.keyword }}]", "text", "[]"),  # null prints as nothing, not None
        ("{{ event.text }}", "text", TEXTER),  # no escaping outside HTML
        ("{{ event.text | mrkdwn }}", "text", "Hi &lt;b&gt;there&lt;/b&gt; &amp; &lt;!channel&gt;"),
        ("<p>{{ event.text }}</p>", "html", "<p>Hi &lt;b&gt;there&lt;/b&gt; &amp; &lt;!channel&gt;</p>"),
        ('{"t": {{ event.text | tojson }}}', "json", json.dumps({"t": TEXTER}, ensure_ascii=False)),
        ("{{ event.fields.CAMPAIGN | default('none') }}", "text", "none"),
        ("{{ '%5d' % 42 }}|{{ 'ab' * 3 }}|{{ 2 ** 10 }}", "text", "   42|ababab|1024"),
    ],
)
def test_render(source, kind, out):
    assert template(source, kind).render(EVENT) == out


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("{{ event.txt }}", "line 1: 'dict object' has no attribute 'txt'"),  # StrictUndefined
        ("ok\n{{ 1 // 0 }}", "line 2: ZeroDivisionError"),
        ("{{ 'x' | center(1000000000) }}", "refused by the sandbox"),
        ("{{ '%999999999d' % 1 }}", "refused by the sandbox"),
        ("{{ '{:>999999999}'.format(1) }}", "refused by the sandbox"),
        ("{{ 9 ** 99999 }}", "too large a number"),
        ("{{ range(1000000) | list }}", "MAX_RANGE"),
        ("{% for i in range(20000) %}{{ 'x' * 100 }}{% endfor %}", f"more than {templates.MAX_OUTPUT} characters"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "too deep a recursion"),
    ],
)
def test_a_template_that_fails_says_where_and_why(source, words):
    with pytest.raises(RenderError) as caught:
        template(source).render(EVENT)
    assert str(caught.value).startswith("template.text: ") and words in str(caught.value)


@pytest.mark.parametrize(
    ("source", "loops"),
    [
        ("{{ event.text | upper }}", False),
        ("{% if event.text %}{{ event.media | map(attribute='url') | join(' ') }}{% endif %}", False),
        ("{% for m in event.media %}{{ m.url }}{% endfor %}", True),
        ("{% macro f() %}x{% endmacro %}{{ f() }}", True),
    ],
)
def test_only_a_template_with_a_loop_or_a_macro_is_timed(source, loops):
    """Without either, a template runs once through its own length: it needs no deadline (nor
    a thread), and is spared the trace that makes a render ~10x slower."""
    assert template(source).loops is loops


def test_a_loop_in_a_loop_ends_at_the_render_deadline(monkeypatch):
    monkeypatch.setattr(templates, "RENDER_SECONDS", 0.2)
    loops = template("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}")
    started = time.monotonic()
    with pytest.raises(RenderError, match=r"took longer than 0\.2s"):
        loops.render(EVENT)
    assert time.monotonic() - started < 1.0


# ---------------------------------------------------------------------------- config errors


def config_errors(spec: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        build({"destinations": {"inbox": spec}, "default": ["inbox"]}, environ={})
    return caught.value.problems


SLACK = {"type": "slack", "token": TOKEN, "channel": "#c"}
HOOK = {"type": "webhook", "url": "http://127.0.0.1:9/hook"}
MAIL = {"type": "email", "smtp": {"host": "127.0.0.1", "security": "none"}, "from": "b@example.com", "to": "c@x.com"}


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (
            {**SLACK, "template": {"text": "{{ event.from }"}},
            "destinations.inbox.template.text: line 1: unexpected '}'",
        ),
        (
            {**SLACK, "template": {"text": "a\n{{ event.from | fone }}"}},
            "destinations.inbox.template.text: line 2: unknown filter 'fone'",
        ),
        (  # Jinja itself only notices this one when the `if` runs
            {**MAIL, "template": {"html": "{% if event.text %}{{ event.text | shout }}{% endif %}"}},
            "destinations.inbox.template.html: line 1: unknown filter 'shout'",
        ),
        (
            {**HOOK, "template": {"body": "{% if event is phone_number %}x{% endif %}"}},
            "destinations.inbox.template.body: line 1: unknown test 'phone_number'",
        ),
        (
            {**SLACK, "template": {"text": "{% include 'secrets.txt' %}"}},
            "destinations.inbox.template.text: line 1: a template cannot extend, include or import another",
        ),
        ({**SLACK, "template": {"txt": "x"}}, "destinations.inbox.template.txt: unknown key (did you mean 'text'?)"),
        ({**SLACK, "template": {}}, "destinations.inbox.template: names no template (any of: text, blocks)"),
        (
            {**SLACK, "template": "{{ event.text }}"},
            "destinations.inbox.template: expected a mapping, got '{{ event.text }}'",
        ),
        ({**SLACK, "template": {"text": ["x"]}}, "destinations.inbox.template.text: expected a string"),
        ({**HOOK, "template": {"content_type": "text/plain"}}, "destinations.inbox.template.body: is required"),
        (
            {**HOOK, "template": {"body": "x", "content_type": "plain text"}},
            "destinations.inbox.template.content_type: 'plain text' is not a media type like text/plain",
        ),
        (
            {**HOOK, "format": "cloudevents", "template": {"body": "{}"}},
            "destinations.inbox.format: a template's body is what is sent: leave format out",
        ),
        (
            {**MAIL, "subject": "{from}", "template": {"subject": "x"}},
            "destinations.inbox.subject: template.subject is given too: use one or the other",
        ),
        ({"type": "log", "template": {"text": "x"}}, "destinations.inbox.template: unknown key"),
        (
            {"type": "skycore", "api_key": "k", "template": {"text": "{% for %}"}},
            "destinations.inbox.template.text: line 1: Expected an expression",
        ),
    ],
)
def test_config_errors_name_their_place(spec, problem):
    problems = config_errors(spec)
    assert any(p.startswith(problem) for p in problems), problems


# ---------------------------------------------------------------------------- through the delivery loop


async def start_bridge(app_client: Any, tmp_path: Path, spec: dict[str, Any]) -> Any:
    raw = {
        "store": f"sqlite:///{tmp_path / 'bridge.db'}",
        "retry": RETRY,
        "destinations": {"out": spec},
        "default": ["out"],
    }
    return await app_client(raw)


async def settled(client: Any, count: int = 1) -> list[DeliveryRow]:
    store = client.app[RUNTIME].store
    rows: list[DeliveryRow] = []

    async def done() -> bool:
        nonlocal rows
        rows = await store.list_deliveries(DeliveryFilter(destination="out"))
        return len(rows) >= count and all(row.status != "pending" for row in rows)

    await eventually(done, 15.0, lambda: f"{count} deliveries settled: {rows}", interval=0.05)
    return rows


async def post_sms(client: Any, text: str = TEXTER) -> str:
    response = await client.post("/postback", data=sms(1, text=xml_escape(text)))
    assert response.status == 200, await response.text()
    return str((await response.json())["id"])


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with fake_slack() as fake:
        yield fake


@pytest.fixture
async def mail() -> AsyncIterator[MailServer]:
    peer, server = await start_mail_server()
    yield peer
    server.close()


def slack_spec(slack: FakeSlack, **template: str) -> dict[str, Any]:
    return {"type": "slack", "token": TOKEN, "channel": "#sms-inbox", "api_url": slack.api_url, "template": template}


def mail_spec(mail: MailServer, **template: str) -> dict[str, Any]:
    smtp = {"host": "127.0.0.1", "port": mail.port, "security": "none"}
    return {
        "type": "email",
        "smtp": smtp,
        "from": "bridge@example.com",
        "to": "inbox@example.com",
        "template": template,
    }


def hook_spec(sink: Sink, **template: str) -> dict[str, Any]:
    return {"type": "webhook", "url": sink.url + "/hook", "secret": SECRET, "template": template}


async def test_slack_text_and_blocks(app_client, tmp_path, slack):
    blocks = (
        '[{"type": "section", "text": {"type": "mrkdwn", "text": {{ ("*" ~ (event.from | phone) ~ "*: "'
        " ~ (event.text | mrkdwn)) | tojson }}}}]"
    )
    client = await start_bridge(
        app_client,
        tmp_path,
        slack_spec(slack, text="{{ event.from | phone }}: {{ event.text | mrkdwn }}", blocks=blocks),
    )
    await post_sms(client)
    (call,) = await slack.wait_for(1)
    assert call.body["text"] == "+1 555-231-2102: Hi &lt;b&gt;there&lt;/b&gt; &amp; &lt;!channel&gt;"
    assert call.body["blocks"] == [
        {"type": "section", "text": {"type": "mrkdwn", "text": "*+1 555-231-2102*: " + call.body["text"][17:]}}
    ]
    assert call.body["unfurl_links"] is False  # what the destination adds stays
    (row,) = await settled(client)
    assert row.status == "delivered"


async def test_slack_text_alone_is_a_text_message(app_client, tmp_path, slack):
    client = await start_bridge(app_client, tmp_path, slack_spec(slack, text="New text from {{ event.from }}"))
    await post_sms(client)
    (call,) = await slack.wait_for(1)
    assert call.body["text"] == "New text from +15552312102" and "blocks" not in call.body


@pytest.mark.parametrize(
    ("blocks", "reason"),
    [
        ("[{{ event.text }}]", "template.blocks: did not render JSON"),
        ('{"type": "section"}', "template.blocks: must render a JSON list of blocks"),
        ("[]", "template.blocks: rendered 0 blocks (1 to 50)"),
    ],
)
async def test_slack_blocks_that_slack_cannot_take_are_dead_and_not_posted(app_client, tmp_path, slack, blocks, reason):
    client = await start_bridge(app_client, tmp_path, slack_spec(slack, blocks=blocks))
    await post_sms(client)
    (row,) = await settled(client)
    assert row.status == "dead" and row.attempts == 1 and row.last_error.startswith(reason), row.last_error
    assert slack.calls == []


async def test_email_subject_text_and_html(app_client, tmp_path, mail):
    spec = mail_spec(
        mail,
        subject="Text from {{ event.from | phone }}\nto {{ event.to }}",  # a newline cannot end the header
        text="{{ event.text }}\n-- {{ event.id }}",
        html="<p><b>{{ event.from | phone }}</b> wrote:</p><blockquote>{{ event.text }}</blockquote>",
    )
    client = await start_bridge(app_client, tmp_path, spec)
    event_id = await post_sms(client)
    (sent,) = await mail.wait_for(1)
    message = sent.message
    assert message["Subject"] == "Text from +1 555-231-2102 to 86717"
    text, html = (part.get_content().replace("\r\n", "\n") for part in message.iter_parts())
    assert text == f"{TEXTER}\n-- {event_id}\n"
    assert html == (
        "<p><b>+1 555-231-2102</b> wrote:</p>"
        "<blockquote>Hi &lt;b&gt;there&lt;/b&gt; &amp; &lt;!channel&gt;</blockquote>\n"
    )
    assert message["Message-ID"].startswith(f"<{event_id}.out@")  # threading is the destination's as before


async def test_email_text_alone_is_a_plain_text_mail_with_the_built_in_subject(app_client, tmp_path, mail):
    client = await start_bridge(app_client, tmp_path, mail_spec(mail, text="{{ event.text | upper }}"))
    await post_sms(client, "hello")
    (sent,) = await mail.wait_for(1)
    assert not sent.message.is_multipart() and sent.message.get_content_type() == "text/plain"
    assert sent.message.get_content().replace("\r\n", "\n") == "HELLO\n"
    assert sent.message["Subject"] == "[86717] HELLO from +1 555-231-2102"


async def test_webhook_body_is_sent_as_it_renders_and_signed(app_client, tmp_path, sink):
    body = '{"phone": {{ event.from | tojson }}, "message": {{ event.text | tojson }}, "tags": ["sms"]}'
    client = await start_bridge(app_client, tmp_path, hook_spec(sink, body=body))
    event_id = await post_sms(client)
    (request,) = await sink.wait_for(1)
    assert request.body == json.dumps({"phone": "+15552312102", "message": TEXTER, "tags": ["sms"]}).encode()
    assert request.headers["Content-Type"] == "application/json"
    Webhook(SECRET).verify(request.body, request.headers)  # the signature covers the body as sent
    assert request.headers["webhook-id"] == event_id


async def test_webhook_body_of_another_content_type(app_client, tmp_path, sink):
    spec = hook_spec(sink, body="from={{ event.from | urlencode }}&text={{ event.text | urlencode }}")
    spec["template"]["content_type"] = "application/x-www-form-urlencoded"
    client = await start_bridge(app_client, tmp_path, spec)
    await post_sms(client, "a b&c")
    (request,) = await sink.wait_for(1)
    assert request.body == b"from=%2B15552312102&text=a%20b%26c"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"


async def test_a_runtime_error_is_dead_with_the_error_and_nothing_is_sent(app_client, tmp_path, sink, mail, slack):
    """Three destinations, each failing in a different template: the mail's subject renders but
    its html does not, so no mail at all (never half a message)."""
    raw = {
        "store": f"sqlite:///{tmp_path / 'bridge.db'}",
        "retry": RETRY,
        "destinations": {
            "hook": hook_spec(sink, body='{"campaign": {{ event.fields.CAMPAIGNID | tojson }}}'),
            "mail": mail_spec(mail, subject="ok", html="<p>{{ event.text | int // 0 }}</p>"),
            "inbox": slack_spec(slack, text="fine", blocks='[{"type": "section", "x": {{ event.nope }}}]'),
        },
        "default": ["hook", "mail", "inbox"],
    }
    client = await app_client(raw)
    await post_sms(client, "12")
    store = client.app[RUNTIME].store
    rows: list[DeliveryRow] = []

    async def all_dead() -> bool:
        nonlocal rows
        rows = await store.list_deliveries(DeliveryFilter())
        return len(rows) == 3 and all(row.status == "dead" for row in rows)

    await eventually(all_dead, 15.0, lambda: f"three dead deliveries: {rows}", interval=0.05)
    reasons = {row.destination: row.last_error for row in rows}
    assert reasons == {
        "hook": "template.body: line 1: 'dict object' has no attribute 'CAMPAIGNID'",
        "mail": "template.html: line 1: ZeroDivisionError: integer division or modulo by zero",
        "inbox": "template.blocks: line 1: 'dict object' has no attribute 'nope'",
    }
    assert all(row.attempts == 1 for row in rows)
    await asyncio.sleep(0.2)  # a retry would come within 50 ms
    assert sink.received == [] and mail.mails == [] and mail.data_seen == 0 and slack.calls == []
    assert (await client.get("/healthz")).status == 200  # the bridge is fine


@pytest.mark.parametrize("source", SANDBOX_ESCAPES)
async def test_an_escape_from_the_sandbox_is_refused_dead_and_leaks_nothing(
    app_client, tmp_path, sink, monkeypatch, source
):
    monkeypatch.setattr(templates, "RENDER_SECONDS", 0.3)
    client = await start_bridge(app_client, tmp_path, hook_spec(sink, body=source, content_type="text/plain"))
    await post_sms(client)
    (row,) = await settled(client)
    assert row.status == "dead" and row.attempts == 1
    assert row.last_error.startswith("template.body: ")
    words = ("refused by the sandbox", "unsafe", "took longer than")
    assert any(w in row.last_error for w in words), row.last_error
    for leak in ("<class", "<function", "<module", "__builtins__", "object at 0x", "subprocess"):
        assert leak not in row.last_error
    await asyncio.sleep(0.1)
    assert sink.received == []


async def test_skycore_text(services: Services):
    async with fake_skycore() as skycore:
        await check_skycore_text(services, skycore)


async def check_skycore_text(services: Services, skycore: FakeSkycore) -> None:
    spec = {"type": "skycore", "api_key": API_KEY, "api_url": skycore.api_url}
    spec["template"] = {"text": "{{ event.text }} -- Acme <{{ event.from }}>"}
    config = build({"destinations": {"sms": spec}, "default": ["sms"]}, environ={})
    sender = build_destination(config.destinations["sms"])
    await sender.open(services)
    attempt = Attempt(delivery_id=1, number=1, conversation="x")
    assert isinstance(await sender.send(reply("We open at 9"), attempt), Delivered)
    (call,) = skycore.calls
    assert call.request["TEXT"] == "We open at 9 -- Acme <60856>"
    spec["template"] = {"text": "{% if event.text == 'x' %}{% endif %}"}  # renders nothing: nothing to send
    config = build({"destinations": {"sms": spec}, "default": ["sms"]}, environ={})
    empty = build_destination(config.destinations["sms"])
    await empty.open(services)
    outcome = await empty.send(reply("We open at 9"), attempt)
    assert isinstance(outcome, Failed) and not outcome.retryable and outcome.reason.startswith("nothing to send")
    assert len(skycore.calls) == 1


# ---------------------------------------------------------------------------- the commands


async def test_route_shows_each_destination_rendered_and_check_config_names_places(tmp_path):
    crm = {"type": "webhook", "url": "http://127.0.0.1:9/h", "template": {"body": '{"t": {{ event.text | tojson }}}'}}
    config = {
        "destinations": {
            "inbox": {**SLACK, "template": {"text": "{{ event.from | phone }}"}},
            "crm": crm,
            "mail": {**MAIL, "template": {"subject": "SMS {{ event.keyword }}", "html": "<i>{{ event.text }}</i>"}},
            "broken": {"type": "webhook", "url": "http://127.0.0.1:9/b", "template": {"body": "{{ event.nope }}"}},
        },
        "default": ["inbox", "crm", "mail", "broken"],
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    done = await asyncio.to_thread(
        run_cli, "route", "-c", str(path), "--json", str(POSTBACKS / "sms_mo_v1.3.xml"), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)
    sends = {name: send["would_send"] for name, send in report["destinations"].items()}
    text = report["event"]["text"]
    assert sends["inbox"]["body"]["text"] == "+1 555-231-2102" and "blocks" not in sends["inbox"]["body"]
    assert sends["crm"]["body"] == {"t": text}
    assert sends["mail"]["headers"]["Subject"] == f"SMS {report['event']['keyword']}"
    assert sends["mail"]["html"] == f"<i>{text}</i>\n" and "text" not in sends["mail"]
    assert sends["broken"] == {"error": "template.body: line 1: 'dict object' has no attribute 'nope'"}

    done = await asyncio.to_thread(run_cli, "check-config", "-c", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "inbox [slack] chat.postMessage to #c" in done.stdout and "; template: text\n" in done.stdout
    assert "; template: subject, html\n" in done.stdout

    config["destinations"]["inbox"]["template"] = {"text": "{{ event.from | phone }", "blocks": "{{ x | nope }}"}
    path.write_text(yaml.safe_dump(config))
    done = await asyncio.to_thread(run_cli, "check-config", "-c", str(path), cwd=tmp_path)
    assert done.returncode == 1
    assert "destinations.inbox.template.text: line 1: unexpected '}'" in done.stderr
    assert "destinations.inbox.template.blocks: line 1: unknown filter 'nope'" in done.stderr
    assert "Traceback" not in done.stderr
