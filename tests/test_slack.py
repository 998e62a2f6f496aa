"""The Slack destination: rendering and error translation as tables, then the whole bridge
(in process, and the real `serve` process) against a fake Slack on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

import pytest
from aiohttp.test_utils import TestClient

from bridge.carriers import Carriers
from bridge.config import build
from bridge.destinations.base import Attempt, Services, conversation_key
from bridge.destinations.registry import build as build_destination
from bridge.destinations.slack import (
    BODY_LIMIT,
    MAX_IMAGES,
    SlackDestination,
    classify,
    cut,
    escape,
    phone_for_people,
    render,
)
from bridge.errors import ConfigError
from bridge.event import Event, normalize
from bridge.postback import parse
from bridge.retry import Delivered, Failed, Outcome
from bridge.runtime import RUNTIME
from bridge.store import DeliveryFilter, DeliveryRow
from tests.conftest import POSTBACKS, eventually, free_port, post, sms
from tests.retry_table import STATUS_TABLE, kind
from tests.slack_fake import TOKEN, WEBHOOK_PATH, FakeSlack, fake_slack

RETRY = {"initial": "50ms", "max_interval": "5s", "max_age": "1h"}


def event_of(xml: bytes | str, carriers: dict[str, str] | None = None) -> Event:
    body = xml.encode() if isinstance(xml, str) else xml
    fields = parse(body, "application/xml")
    return normalize(fields, event_id="evt_test", received_at=datetime.now(UTC), carriers=Carriers(carriers))


def mms(*files: str, sender: str = "15552312102", n: int = 1) -> bytes:
    content = "".join(f"<FILE>{xml_escape(f)}</FILE>" for f in files)
    return (
        f"<POSTBACK><ORIGIN>MMS_MO</ORIGIN><CODE>N401</CODE><FROM>{sender}</FROM><TO>86717</TO>"
        f"<KEYWORD>photo</KEYWORD><TRACKINGID>MMS_{n}</TRACKINGID><SPID>0001470</SPID>"
        f"<TIMESTAMP>2024-05-01T12:00:00-04:00</TIMESTAMP><CONTENT>{content}</CONTENT></POSTBACK>"
    ).encode()


def blocks_of(message: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [b for b in message["blocks"] if b["type"] == kind]


# ---------------------------------------------------------------------------- pure: rendering


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("plain", "plain"),
        ("AT&T", "AT&amp;T"),
        ("<!channel> now", "&lt;!channel&gt; now"),
        ("<http://evil|click>", "&lt;http://evil|click&gt;"),
        ("<@U024BE7LH> & <#C123>", "&lt;@U024BE7LH&gt; &amp; &lt;#C123&gt;"),
        ("&amp; already", "&amp;amp; already"),
    ],
)
def test_escape(text, escaped):
    assert escape(text) == escaped


@pytest.mark.parametrize(
    ("text", "limit", "out", "omitted"),
    [
        ("hello", 10, "hello", 0),
        ("hello", 5, "hello", 0),
        ("hello", 3, "hel", 2),
        ("a&b", 3, "a", 2),  # never half an entity
        ("a&b", 6, "a&amp;", 1),
        ("<<", 4, "&lt;", 1),
        ("", 3, "", 0),
    ],
)
def test_cut(text, limit, out, omitted):
    assert cut(text, limit) == (out, omitted)


@pytest.mark.parametrize(
    ("number", "shown"),
    [
        ("+15552312102", "+1 555-231-2102"),
        ("+447700900123", "+447700900123"),
        ("86717", "86717"),
        (None, "unknown"),
    ],
)
def test_phone_for_people(number, shown):
    assert phone_for_people(number) == shown


@pytest.mark.parametrize(
    ("postback", "fallback", "types"),
    [
        (
            sms(1),
            "SMS from +1 555-231-2102 to 86717: HELLO there",
            ["section", "section", "section", "context"],
        ),
        (
            (POSTBACKS / "mms_mo_v1.3.xml").read_bytes(),
            "MMS from +1 555-231-2102 to 86717 (3 attachments)",
            ["section", "section", "image", "section", "context"],
        ),
        (
            (POSTBACKS / "sub_n302_unsubscribed.xml").read_bytes(),
            "+1 650-242-4956 opted out of 123456",
            ["section", "context"],
        ),
        (
            (POSTBACKS / "sub_n301_subscribed.xml").read_bytes(),
            "+1 650-111-2222 opted in to 123456",
            ["section", "context"],
        ),
        (
            (POSTBACKS / "sms_mt_n202_delivered.xml").read_bytes(),
            "SMS to +1 650-333-3058: Message Sent/Delivered (N202)",
            ["section", "context"],
        ),
        (
            b"<POSTBACK><ORIGIN>NEW_THING</ORIGIN><FROM>15552312102</FROM><TO>86717</TO><TEXT>hi</TEXT></POSTBACK>",
            "NEW_THING from +1 555-231-2102 to 86717: hi",
            ["section", "section", "section", "context"],
        ),
    ],
)
def test_render_kinds(postback, fallback, types):
    message = render(event_of(postback))
    assert message["text"] == fallback
    assert [b["type"] for b in message["blocks"]] == types
    assert "`evt_test`" in message["blocks"][-1]["elements"][0]["text"]


def test_sms_shows_who_where_what_and_when():
    event = event_of(sms(1, text="Is the  store open?\nThanks").replace(b"</TO>", b"</TO><SPID>0001470</SPID>"))
    message = json.dumps(render(event))
    for shown in ["+1 555-231-2102", "86717", "*Keyword*\\nIS", "AT&amp;T", "Is the  store open?\\nThanks"]:
        assert shown in message
    assert "<!date^1714579200^{date_short_pretty} at {time}|2024-05-01 16:00 UTC>" in message


def test_opt_out_is_one_line_of_its_own_kind():
    message = render(event_of((POSTBACKS / "sub_n302_unsubscribed.xml").read_bytes()))
    line = message["blocks"][0]["text"]["text"]
    assert line == ":no_entry_sign: *+1 650-242-4956* opted out of *123456* · My Campaign Name (via MO)"
    assert "\n" not in line


def test_mms_images_links_and_non_url_files():
    event = event_of(
        mms(
            "https://m.example/a/1.JPG", "https://m.example/a/2.txt", "…URL of Content Here…", "https://m.example/b.png"
        )
    )
    message = render(event)
    assert [b["image_url"] for b in blocks_of(message, "image")] == [
        "https://m.example/a/1.JPG",
        "https://m.example/b.png",
    ]
    attachments = message["blocks"][-2]["text"]["text"]
    assert attachments == "*Attachments*\n• <https://m.example/a/2.txt|2.txt>\n• …URL of Content Here…"

    without = render(event, images=False)
    assert not blocks_of(without, "image")
    assert "<https://m.example/a/1.JPG|1.JPG>" in without["blocks"][-2]["text"]["text"]


def test_many_images_stay_within_slacks_block_limit():
    event = event_of(mms(*[f"https://m.example/{i}.jpg" for i in range(60)]))
    message = render(event)
    assert len(blocks_of(message, "image")) == MAX_IMAGES
    assert len(message["blocks"]) <= 50
    assert "https://m.example/59.jpg" in message["blocks"][-2]["text"]["text"]


def test_long_text_is_cut_with_a_note():
    text = "x&" * 4000
    message = render(event_of(sms(1, text=xml_escape(text))))
    body = message["blocks"][2]["text"]
    assert body["type"] == "plain_text" and len(body["text"]) <= 3000
    shown, note = body["text"].split("\n")
    assert text.startswith(shown) and len(shown) == BODY_LIMIT
    assert note == f"… {len(text) - BODY_LIMIT} more characters not shown; the whole text is in event evt_test"
    assert len(message["text"]) < 300


def test_the_text_is_plain_text_so_a_texters_stars_are_not_formatting():
    """Slack would show `*bold*` in bold and `~y~` struck through in mrkdwn: the text is shown
    exactly as sent instead, spaces and lines too."""
    text = "hello *bold* _x_ ~y~ `code` :tada: AT&T <3\n  second   line"
    blocks = render(event_of(sms(1, text=xml_escape(text))))["blocks"]
    (section,) = [b for b in blocks if b.get("text", {}).get("type") == "plain_text"]
    assert section["text"] == {"type": "plain_text", "text": text, "emoji": False}


def test_link_cannot_be_broken_by_a_pipe_or_bracket():
    message = render(event_of(mms("https://m.example/x|y>z.txt")))
    assert "<https://m.example/x%7Cy&gt;z.txt|x|y&gt;z.txt>" in message["blocks"][-2]["text"]["text"]


# ---------------------------------------------------------------------------- pure: errors

PERMANENT = [
    "invalid_auth",
    "not_authed",
    "token_revoked",
    "account_inactive",
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "msg_too_long",
    "invalid_blocks",
]


@pytest.mark.parametrize(
    ("status", "code", "headers", "expected"),
    [
        (200, None, {}, Delivered(status=200)),
        (429, "ratelimited", {"Retry-After": "7"}, Failed("ratelimited", True, 429, 7.0)),
        (429, None, {}, Failed("ratelimited", True, 429, None)),
        (200, "ratelimited", {"Retry-After": "3"}, Failed("ratelimited", True, 200, 3.0)),
        (200, "internal_error", {}, Failed("internal_error", True, 200)),
        (200, "fatal_error", {}, Failed("fatal_error", True, 200)),
        (200, "service_unavailable", {}, Failed("service_unavailable", True, 200)),
        (500, None, {}, Failed("HTTP 500", True, 500)),
        (503, None, {"Retry-After": "9"}, Failed("HTTP 503", True, 503)),
        (408, None, {}, Failed("HTTP 408", True, 408)),
        (400, None, {}, Failed("HTTP 400", False, 400)),
        (200, "msg_too_long", {}, Failed("msg_too_long", False, 200)),
        (200, "some_new_error", {}, Failed("some_new_error", False, 200)),
        (
            404,
            "no_service",
            {},
            Failed("no_service (HTTP 404): the incoming webhook was removed; create a new one", False, 404),
        ),
        (502, "oops", {}, Failed("oops (HTTP 502)", True, 502)),  # a proxy's page: the status says more
    ],
)
def test_classify(status, code, headers, expected):
    assert classify(status, code, headers, time.time()) == expected


@pytest.mark.parametrize("code", PERMANENT)
def test_permanent_errors_keep_slacks_code_as_the_reason(code):
    outcome = classify(200, code, {}, time.time())
    assert isinstance(outcome, Failed) and not outcome.retryable
    assert outcome.reason.split(":")[0] == code


# ---------------------------------------------------------------------------- config


def config_errors(options: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        build({"destinations": {"inbox": {"type": "slack", **options}}}, environ={})
    return caught.value.problems


def slack_destination(options: dict[str, Any]) -> SlackDestination:
    config = build({"destinations": {"inbox": {"type": "slack", **options}}}, environ={})
    destination = build_destination(config.destinations["inbox"])
    assert isinstance(destination, SlackDestination)
    return destination


@pytest.mark.parametrize(
    ("options", "place", "words"),
    [
        ({"token": TOKEN, "webhook_url": "https://hooks.slack.com/services/X"}, "destinations.inbox", "not both"),
        ({"channel": "#x"}, "destinations.inbox", "needs token"),
        ({"token": TOKEN}, "destinations.inbox.channel", "is required with token"),
        (
            {"webhook_url": "https://hooks.slack.com/services/X", "thread_by_sender": True},
            "destinations.inbox.thread_by_sender",
            "cannot reply in threads",
        ),
        (
            {"webhook_url": "https://hooks.slack.com/services/X", "channel": "#x"},
            "destinations.inbox.channel",
            "use token",
        ),
        ({"token": "hunter2-SECRET", "channel": "#x"}, "destinations.inbox.token", "not a Slack token"),
        ({"webhook_url": "hooks.slack.com/SECRET"}, "destinations.inbox.webhook_url", "not an http(s) URL"),
        ({"token": TOKEN, "channel": "#x", "icon_emoji": "smile"}, "destinations.inbox.icon_emoji", "emoji name"),
        ({"token": TOKEN, "channel": "#x", "thread_by_sender": "yes"}, "destinations.inbox.thread_by_sender", "true"),
        ({"token": TOKEN, "channel": "#x", "colour": "red"}, "destinations.inbox.colour", "unknown key"),
    ],
)
def test_config_errors_name_their_place(options, place, words):
    problems = config_errors(options)
    assert any(p.startswith(place + ":") and words in p for p in problems), problems
    assert "SECRET" not in "\n".join(problems) and TOKEN not in "\n".join(problems)


def test_config_defaults_and_no_secret_in_describe_or_preview():
    bot = slack_destination({"token": TOKEN, "channel": "#sms-inbox"})
    assert bot.thread_by_sender and bot.ordered
    assert bot.api_url == "https://slack.com/api/"
    unthreaded = slack_destination({"token": TOKEN, "channel": "#sms-inbox", "thread_by_sender": False})
    assert not unthreaded.ordered
    hook = slack_destination({"webhook_url": "https://hooks.slack.com" + WEBHOOK_PATH})
    assert not hook.thread_by_sender and not hook.ordered

    event = event_of(sms(1))
    shown = " ".join([bot.describe(), hook.describe(), json.dumps(bot.preview(event)), json.dumps(hook.preview(event))])
    assert TOKEN not in shown and "fakeWebhookSecretPath" not in shown
    assert "#sms-inbox" in shown and "hooks.slack.com" in shown
    assert bot.preview(event)["body"]["blocks"] == render(event)["blocks"]


# ---------------------------------------------------------------------------- one attempt, by hand


async def send_once(services: Services, options: dict[str, Any], event: Event) -> Outcome:
    destination = slack_destination(options)
    await destination.open(services)
    try:
        return await destination.send(event, Attempt(delivery_id=1, number=1, conversation=conversation_key(event)))
    finally:
        await destination.close()


@pytest.mark.parametrize("mode", ["token", "webhook_url"])
@pytest.mark.parametrize(("status", "expected"), STATUS_TABLE)
async def test_shared_status_table(services, slack, mode, status, expected):
    slack.script = [status]
    options = {"token": TOKEN, "channel": "#c", "api_url": slack.api_url, "thread_by_sender": False}
    if mode == "webhook_url":
        options = {"webhook_url": slack.webhook_url}
    assert kind(await send_once(services, options, event_of(sms(1)))) == expected
    assert len(slack.calls) == 1


async def test_timeout_and_connection_errors_are_retryable(services, slack):
    slack.delay = 2.0
    options = {"token": TOKEN, "channel": "#c", "api_url": slack.api_url, "timeout": "200ms"}
    slow = await send_once(services, options, event_of(sms(1)))
    assert slow == Failed(reason="timeout after 0.2s", retryable=True)

    closed = f"http://127.0.0.1:{free_port()}"
    for options in (
        {"token": TOKEN, "channel": "#c", "api_url": closed + "/api/"},
        {"webhook_url": closed + WEBHOOK_PATH},
    ):
        refused = await send_once(services, options, event_of(sms(1)))
        assert isinstance(refused, Failed) and refused.retryable and refused.reason.startswith("cannot connect")
        assert "fakeWebhookSecretPath" not in refused.reason


# ---------------------------------------------------------------------------- the bridge, in process


@dataclass
class Bridge:
    client: TestClient

    async def post(self, body: bytes) -> dict[str, Any]:
        response = await self.client.post("/postback", data=body)
        assert response.status == 200, await response.text()
        return await response.json()

    async def deliveries(self) -> list[DeliveryRow]:
        store = self.client.app[RUNTIME].store
        return sorted(await store.list_deliveries(DeliveryFilter(destination="inbox")), key=lambda d: d.id)

    async def settled(self, count: int, timeout: float = 20.0) -> list[DeliveryRow]:
        """The deliveries, once `count` of them are delivered or dead."""
        rows: list[DeliveryRow] = []

        async def settled() -> bool:
            nonlocal rows
            rows = await self.deliveries()
            return len(rows) >= count and all(d.status != "pending" for d in rows)

        await eventually(settled, timeout, lambda: f"{count} deliveries settled: {rows}", interval=0.05)
        return rows

    async def text_of(self, event_id: str) -> str:
        event = await self.client.app[RUNTIME].store.get_event(event_id)
        assert event is not None
        return event["text"]


Start = Callable[..., Awaitable[Bridge]]


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with fake_slack() as fake:
        yield fake


@pytest.fixture
def start(app_client, tmp_path: Path, slack: FakeSlack) -> Start:
    async def start(**options: Any) -> Bridge:
        if "webhook_url" not in options:
            options = {"token": TOKEN, "channel": "#sms-inbox", "api_url": slack.api_url, **options}
        raw = {
            "store": f"sqlite:///{tmp_path / 'bridge.db'}",
            "retry": RETRY,
            "destinations": {"inbox": {"type": "slack", **options}},
            "default": ["inbox"],
        }
        return Bridge(await app_client(raw))

    return start


async def test_sms_payload(start, slack):
    bridge = await start()
    accepted = await bridge.post(sms(1, text="Is the store open today?"))
    (call,) = await slack.wait_for(1)
    assert call.kind == "chat.postMessage" and call.ok
    assert call.headers["Authorization"] == f"Bearer {TOKEN}"
    assert call.headers["User-Agent"].startswith("postback-bridge/")
    body = call.body
    assert body["channel"] == "#sms-inbox"
    assert "thread_ts" not in body
    assert body["unfurl_links"] is False and body["unfurl_media"] is False
    assert body["text"] == "SMS from +1 555-231-2102 to 86717: Is the store open today?"
    assert body["blocks"][2]["text"]["text"] == "Is the store open today?"
    assert accepted["id"] in body["blocks"][-1]["elements"][0]["text"]
    (row,) = await bridge.settled(1)
    assert row.status == "delivered" and row.attempts == 1


async def test_mms_with_images_payload(start, slack):
    bridge = await start()
    await bridge.post((POSTBACKS / "mms_mo_v1.3.xml").read_bytes())
    (call,) = await slack.wait_for(1)
    assert call.ok
    images = [b for b in call.body["blocks"] if b["type"] == "image"]
    assert [b["image_url"] for b in images] == ["https://media.example.com/mms/vp8Vsf2M/1.jpg"]
    dump = call.dump()
    assert "<https://media.example.com/mms/vp8Vsf2M/2.txt|2.txt>" in dump
    assert "<https://media.example.com/mms/vp8Vsf2M/3.smil|3.smil>" in dump
    assert "Sprint" in dump and "TESTOFFER" in dump
    assert (await bridge.settled(1))[0].status == "delivered"


async def test_mms_with_a_file_that_is_not_a_url_is_still_posted(start, slack):
    bridge = await start()
    await bridge.post(mms("…URL of Content Here…", "https://media.example.com/x/1.gif"))
    (call,) = await slack.wait_for(1)
    assert call.ok, "Slack refused the message"
    assert "…URL of Content Here…" in call.dump()
    assert [b["image_url"] for b in call.body["blocks"] if b["type"] == "image"] == [
        "https://media.example.com/x/1.gif"
    ]
    assert (await bridge.settled(1))[0].status == "delivered"


async def test_images_slack_cannot_fetch_are_posted_as_links(start, slack):
    slack.reject_images = True  # Slack answers invalid_blocks when an image URL is gone
    bridge = await start()
    await bridge.post((POSTBACKS / "mms_mo_v1.3.xml").read_bytes())
    (row,) = await bridge.settled(1)
    assert row.status == "delivered" and row.attempts == 1
    first, second = slack.calls
    assert not first.ok and second.ok
    assert all(b["type"] != "image" for b in second.body["blocks"])
    assert "<https://media.example.com/mms/vp8Vsf2M/1.jpg|1.jpg>" in second.dump()


async def test_opt_out_payload(start, slack):
    bridge = await start()
    await bridge.post((POSTBACKS / "sub_n302_unsubscribed.xml").read_bytes())
    (call,) = await slack.wait_for(1)
    assert call.ok
    assert call.body["text"] == "+1 650-242-4956 opted out of 123456"
    assert call.body["blocks"][0]["text"]["text"].startswith(":no_entry_sign: *+1 650-242-4956* opted out of")
    await bridge.settled(1)


async def test_mrkdwn_injection_is_shown_literally(start, slack):
    bridge = await start()
    text = "<!channel> win <http://evil.example|click here> & <@U024BE7LH>"
    await bridge.post(sms(1, text=xml_escape(text)))
    (call,) = await slack.wait_for(1)
    mrkdwn = "\n".join(call.mrkdwn())
    for forged in ("<!channel>", "<http://evil", "<@U024BE7LH>"):
        assert forged not in mrkdwn
    # the text itself is plain text, which Slack never parses for mentions or links
    assert call.body["blocks"][2]["text"] == {"type": "plain_text", "text": text, "emoji": False}
    assert call.body["text"].endswith(escape(text))


async def test_one_sender_one_thread(start, slack):
    bridge = await start()
    for n in range(3):
        await bridge.post(sms(n, text=f"message {n}"))
    first, second, third = await slack.wait_for(3)
    assert "thread_ts" not in first.body
    assert second.body["thread_ts"] == third.body["thread_ts"] == first.ts
    assert [c.body["text"][-9:] for c in slack.calls] == ["message 0", "message 1", "message 2"]
    assert all(c.ok for c in slack.calls)


async def test_two_senders_two_threads(start, slack):
    bridge = await start()
    await bridge.post(sms(1, sender="15550000001", text="a1"))
    await bridge.post(sms(2, sender="15550000002", text="b1"))
    await bridge.post(sms(3, sender="15550000001", text="a2"))
    await bridge.post(sms(4, sender="15550000002", text="b2"))
    await slack.wait_for(4)
    by_text = {c.body["text"][-2:]: c for c in slack.calls}
    assert by_text["a1"].ts != by_text["b1"].ts
    assert "thread_ts" not in by_text["a1"].body and "thread_ts" not in by_text["b1"].body
    assert by_text["a2"].body["thread_ts"] == by_text["a1"].ts
    assert by_text["b2"].body["thread_ts"] == by_text["b1"].ts


async def test_burst_from_one_sender_is_one_thread_in_order(start, slack):
    slack.delay = 0.05  # slow Slack: a second thread would be started if two ran at once
    bridge = await start()
    await asyncio.gather(*[bridge.post(sms(n, text=f"burst {n}")) for n in range(10)])
    await slack.wait_for(10)
    rows = await bridge.settled(10)
    assert all(r.status == "delivered" for r in rows)
    starters = [c for c in slack.calls if "thread_ts" not in c.body]
    assert len(starters) == 1
    assert all(c.body["thread_ts"] == starters[0].ts for c in slack.calls if c is not starters[0])
    stored_order = [await bridge.text_of(r.event_id) for r in rows]
    posted_order = [re.search(r"burst \d", c.body["text"]).group(0) for c in slack.calls]
    assert posted_order == stored_order


async def test_delivery_report_lands_in_the_texters_thread(start, slack):
    bridge = await start()
    await bridge.post(sms(1, sender="16503333058", to="60856", text="hi"))
    await bridge.post((POSTBACKS / "sms_mt_n202_delivered.xml").read_bytes())
    first, report = await slack.wait_for(2)
    assert report.body["thread_ts"] == first.ts
    assert "Message Sent/Delivered" in report.body["text"]


async def test_429_with_retry_after_then_ok(start, slack):
    slack.script = [("ratelimited", "1")]
    bridge = await start()
    await bridge.post(sms(1))
    first, second = await slack.wait_for(2)
    assert not first.ok and second.ok
    assert second.at - first.at >= 0.95
    (row,) = await bridge.settled(1)
    assert row.status == "delivered" and row.attempts == 2


@pytest.mark.parametrize("answer", ["internal_error", "fatal_error", "service_unavailable", 503])
async def test_slack_trouble_is_retried(start, slack, answer):
    slack.script = [answer]
    bridge = await start()
    await bridge.post(sms(1))
    (row,) = await bridge.settled(1)
    assert row.status == "delivered" and row.attempts == 2
    assert [c.ok for c in slack.calls] == [False, True]


@pytest.mark.parametrize("code", PERMANENT)
async def test_permanent_error_is_one_call_and_dead_with_the_reason(start, slack, code):
    slack.script = [code]
    bridge = await start()
    await bridge.post(sms(1))
    (row,) = await bridge.settled(1)
    await asyncio.sleep(0.3)  # a retry would come within 50ms-ish
    assert len(slack.calls) == 1
    assert row.status == "dead"
    assert row.last_error is not None and row.last_error.split(":")[0] == code


async def test_wrong_token_is_dead_and_the_token_is_nowhere(start, slack):
    bridge = await start(token="xoxb-9999-wrongTokenValue")
    await bridge.post(sms(1))
    (row,) = await bridge.settled(1)
    assert row.status == "dead" and row.last_error.startswith("invalid_auth")
    assert "wrongTokenValue" not in row.last_error
    assert slack.calls[0].headers["Authorization"] == "Bearer xoxb-9999-wrongTokenValue"


async def test_webhook_mode(start, slack):
    bridge = await start(webhook_url=slack.webhook_url)
    accepted = await bridge.post(sms(1, text="via webhook"))
    (call,) = await slack.wait_for(1)
    assert call.kind == "webhook" and call.ok
    assert "channel" not in call.body and "thread_ts" not in call.body and "token" not in call.body
    assert call.body["text"].endswith("via webhook")
    assert accepted["id"] in call.dump()
    assert (await bridge.settled(1))[0].status == "delivered"


async def test_webhook_mode_429_then_ok(start, slack):
    slack.script = [("ratelimited", "1")]
    bridge = await start(webhook_url=slack.webhook_url)
    await bridge.post(sms(1))
    first, second = await slack.wait_for(2)
    assert not first.ok and second.ok
    assert second.at - first.at >= 0.95
    assert (await bridge.settled(1))[0].status == "delivered"


async def test_webhook_mode_removed_webhook_is_dead(start, slack):
    slack.script = ["no_service"]
    bridge = await start(webhook_url=slack.webhook_url)
    await bridge.post(sms(1))
    (row,) = await bridge.settled(1)
    await asyncio.sleep(0.3)
    assert len(slack.calls) == 1
    assert row.status == "dead" and row.last_error.startswith("no_service")
    assert "fakeWebhookSecretPath" not in row.last_error


# ---------------------------------------------------------------------------- the real process


@pytest.mark.slow
async def test_threads_survive_a_restart_and_secrets_stay_out_of_logs(slack, bridge_factory):
    config = {
        "retry": RETRY,
        "destinations": {
            "inbox": {
                "type": "slack",
                "token": "${SLACK_BOT_TOKEN}",
                "channel": "#sms-inbox",
                "api_url": slack.api_url,
            },
            "hook": {"type": "slack", "webhook_url": "${SLACK_WEBHOOK_URL}"},
        },
        "routes": [{"match": {"shortcode": "86717"}, "to": ["inbox"]}, {"match": {"shortcode": "555"}, "to": ["hook"]}],
    }
    env = {"SLACK_BOT_TOKEN": TOKEN, "SLACK_WEBHOOK_URL": slack.webhook_url, "BRIDGE_LOG_LEVEL": "debug"}
    bridge = bridge_factory(config, env)
    check = bridge.cli("check-config", "-c", str(bridge.config_path))
    assert "slack" in check.stdout

    bridge.start()
    status, _ = await post(bridge.url + "/postback", sms(1, text="before"))
    assert status == 200
    (first,) = await slack.wait_for(1)
    assert bridge.stop() == 0

    bridge.start()
    await post(bridge.url + "/postback", sms(2, text="after"))
    await post(bridge.url + "/postback", sms(3, to="555", text="hooked"))
    await slack.wait_for(3)
    after = next(c for c in slack.calls if c.body["text"].endswith("after"))
    assert after.body["thread_ts"] == first.ts
    assert any(c.kind == "webhook" and c.ok for c in slack.calls)
    assert bridge.stop() == 0

    seen = check.stdout + check.stderr + bridge.stdout() + bridge.stderr()
    assert "delivery attempt" in seen  # the logs were written, at debug level
    assert TOKEN not in seen and "fakeWebhookSecretPath" not in seen


async def test_show_answers_each_web_api_outcome_as_slack_sdk_would(slack, services):
    """What a reply's thread shows (`show`): reactions.add and the line, each one POST with the
    bot token; Slack's answers classified as the rest of the destination classifies them."""
    inbox = slack_destination({"token": TOKEN, "channel": "#sms-inbox", "api_url": slack.api_url})
    await inbox.open(services)
    try:
        thread = "1714579200.000001"
        slack.person_says("C0FAKE", "1714579300.000001")
        slack.threads.setdefault("C0FAKE", set()).add(thread)
        show = lambda emoji, say=None: inbox.show("C0FAKE", "1714579300.000001", thread, emoji, say)  # noqa: E731
        assert await show("x", "Not sent: E713") == Delivered(status=200)
        reaction, line = slack.calls[-2:]
        assert reaction.kind == "reactions.add" and reaction.ok
        assert reaction.body == {"channel": "C0FAKE", "timestamp": "1714579300.000001", "name": "x"}
        assert reaction.headers["Authorization"] == f"Bearer {TOKEN}"
        assert reaction.headers["User-Agent"].startswith("postback-bridge/")
        assert line.kind == "chat.postMessage" and line.ok
        assert line.body == {"channel": "C0FAKE", "thread_ts": thread, "text": "Not sent: E713", "unfurl_links": False}
        assert await show("x") == Delivered(status=200)  # already_reacted: an earlier try put it
        slack.script = [("ratelimited", "7")]
        limited = await show("white_check_mark")
        assert isinstance(limited, Failed) and limited.retryable and limited.status == 429
        assert limited.retry_after == 7.0
        slack.script = [503]
        assert await show("white_check_mark") == Failed(reason="HTTP 503", retryable=True, status=503)
        slack.script = ["missing_scope"]
        refused = await show("white_check_mark")
        assert isinstance(refused, Failed) and not refused.retryable and refused.reason.startswith("missing_scope")
        slack.script = [None, "channel_not_found"]  # the reaction goes, the line does not
        lost = await show("outbox_tray", "a line")
        assert isinstance(lost, Failed) and not lost.retryable and lost.reason.startswith("channel_not_found")
        assert slack.reactions_on("1714579300.000001") == ["x", "outbox_tray"]
        slack.down = True
        assert await show("no_entry") == Failed(reason="HTTP 503", retryable=True, status=503)
    finally:
        await inbox.close()
    token_less = slack_destination({"webhook_url": slack.webhook_url})
    assert await token_less.show("C0FAKE", "1.2", None, "x", None) == Failed(
        reason="replies need a bot token", retryable=False
    )
