"""Answering texters from Slack (CONTRACT §7), end to end on 127.0.0.1: a fake Slack (threads,
reactions, signed Events API requests made with Slack's algorithm), a fake Skycore (sendSMS),
and the bridge in process between them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge.app import create_app
from bridge.config import build, load
from bridge.errors import ConfigError, StoreError
from bridge.runtime import RUNTIME, Patience
from bridge.smstext import length, plain, segments
from bridge.store import DeliveryFilter, EventFilter
from tests.conftest import eventually, post
from tests.skycore_fake import API_KEY, FakeSkycore, fake_skycore
from tests.slack_fake import (
    APP_TOKEN,
    CUT_OFF,
    SIGNING_SECRET,
    TOKEN,
    FakeSlack,
    fake_slack,
    message_event,
    signed,
)
from tests.test_store_contract import pg_url  # noqa: F401

TEXTER, SHORT_CODE = "15551234888", "60856"
RETRY = {"initial": "50ms", "max_interval": "200ms", "max_age": "1h"}


def mo(n: int, text: str, at: str = "2026-12-01T10:00:00Z") -> bytes:
    return (
        f"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><CODE>N211</CODE><FROM>{TEXTER}</FROM><TO>{SHORT_CODE}</TO>"
        f"<TEXT>{text}</TEXT><RECEIVED>{at}</RECEIVED><TRANSACTIONID>rep-{n}</TRANSACTIONID></POSTBACK>"
    ).encode()


def report(code: str, tracking_id: str, status: str = "Message Sent/Delivered") -> bytes:
    return (
        f"<POSTBACK><ORIGIN>SMS_MT</ORIGIN><CODE>{code}</CODE><STATUS>{status}</STATUS><FROM>{SHORT_CODE}</FROM>"
        f"<TO>{TEXTER}</TO><TRACKINGID>{tracking_id}</TRACKINGID><TIMESTAMP>2026-12-01T10:05:00Z</TIMESTAMP></POSTBACK>"
    ).encode()


def config(tmp_path: Path, slack: FakeSlack, skycore: FakeSkycore, **replies: Any) -> dict[str, Any]:
    return {
        "store": f"sqlite:///{tmp_path / 'bridge.db'}",
        "retry": RETRY,
        "destinations": {
            "sms": {"type": "skycore", "api_key": API_KEY, "api_url": skycore.api_url},
            "inbox": {
                "type": "slack",
                "token": TOKEN,
                "channel": "#sms-inbox",
                "api_url": slack.api_url,
                "replies": {"send_with": "sms", "signing_secret": SIGNING_SECRET, **replies},
            },
            "crm": {"type": "log", "path": str(tmp_path / "crm.jsonl")},
        },
        "routes": [
            {"name": "both-sides", "match": {"type": ["sms.received", "sms.reply"]}, "to": ["crm"], "continue": True},
            {"name": "everything", "match": {"shortcode": SHORT_CODE}, "to": ["inbox"]},
        ],
        "default": ["inbox"],
    }


class Bridge:
    def __init__(self, client: Any, slack: FakeSlack, skycore: FakeSkycore) -> None:
        self.client, self.slack, self.skycore = client, slack, skycore
        self.store = client.app[RUNTIME].store
        self._ts = 1714579300

    async def postback(self, body: bytes) -> dict[str, Any]:
        response = await self.client.post("/postback", data=body)
        assert response.status == 200, await response.text()
        return await response.json()

    async def thread(self) -> str:
        """The texter's thread: a text from them, posted in Slack."""
        await self.postback(mo(1, "Are you open tomorrow?"))
        (call,) = await self.slack.wait_for(1)
        await self.settled()
        assert call.ok and call.ts
        return call.ts

    def next_ts(self) -> str:
        self._ts += 1
        return f"{self._ts}.000100"

    async def event(self, payload: dict[str, Any], *, headers: dict[str, str] | None = None) -> Any:
        body = json.dumps(payload).encode()
        return await self.client.post("/slack/events", data=body, headers=headers or signed(body))

    async def reply(self, text: str, thread: str, **extra: Any) -> str:
        ts = self.next_ts()
        self.slack.person_says("C0FAKE", ts)
        response = await self.event(message_event(text, thread_ts=thread, ts=ts, **extra))
        assert response.status == 200, await response.text()
        return ts

    async def replies(self) -> list[dict[str, Any]]:
        return await self.store.list_events(EventFilter(type="sms.reply"))

    async def settled(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            rows = await self.store.list_deliveries(DeliveryFilter())
            if all(d.status != "pending" for d in rows):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not settled: {rows}")
            await asyncio.sleep(0.05)

    async def metric(self, name: str, **labels: str) -> float:
        """The value of one series on /metrics (an error when it is not there)."""
        text = await (await self.client.get("/metrics")).text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        raise AssertionError(f"{name}{labels} is not on /metrics")

    async def reactions(self, ts: str, count: int, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.slack.reactions_on(ts)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"reactions on {ts}: {self.slack.reactions_on(ts)}")
            await asyncio.sleep(0.05)
        return self.slack.reactions_on(ts)


@pytest.fixture
async def peers() -> AsyncIterator[tuple[FakeSlack, FakeSkycore]]:
    async with fake_slack() as slack, fake_skycore() as skycore:
        yield slack, skycore


@pytest.fixture
def start(aiohttp_client, tmp_path: Path, peers):
    slack, skycore = peers

    async def start(**replies: Any) -> Bridge:
        app = create_app(build(config(tmp_path, slack, skycore, **replies), environ={}))
        return Bridge(await aiohttp_client(app), slack, skycore)

    return start


# ---------------------------------------------------------------------------- text (pure)


def test_slack_markup_becomes_plain_text():
    text = "Hi <@U012|ann>, see <https://x.co/a?b=1&amp;c=2|our menu> in <#C1|sales> &lt;3 &amp; <!here> "
    text += "<mailto:a@b.co|a@b.co>"
    assert plain(text) == "Hi @ann, see our menu (https://x.co/a?b=1&c=2) in #sales <3 & @here a@b.co"
    assert plain("<https://x.co>") == "https://x.co" and plain("<@U012>") == "@U012"
    assert plain("&lt;@U012&gt;") == "<@U012>"  # typed, not markup


@pytest.mark.parametrize(
    ("text", "count", "shape"),
    [
        ("a" * 160, 1, ("GSM-7", 160)),
        ("a" * 161, 2, ("GSM-7", 161)),
        ("a" * 306, 2, ("GSM-7", 306)),
        ("a" * 307, 3, ("GSM-7", 307)),
        ("€" * 80, 1, ("GSM-7", 160)),  # an extension character counts two
        ("€" * 81, 2, ("GSM-7", 162)),
        ("é" * 160, 1, ("GSM-7", 160)),  # in GSM-7's own table
        ("ł" * 70, 1, ("UCS-2", 70)),
        ("ł" * 71, 2, ("UCS-2", 71)),
        ("ł" * 135, 3, ("UCS-2", 135)),
        ("😀" * 35, 1, ("UCS-2", 70)),  # outside the BMP: two units each
        ("😀" * 400, 12, ("UCS-2", 800)),
    ],
)
def test_segments(text, count, shape):
    assert segments(text) == count and length(text) == shape


# ---------------------------------------------------------------------------- config


def errors_of(tmp_path: Path, **inbox: Any) -> list[str]:
    raw = {
        "destinations": {
            "sms": {"type": "skycore", "api_key": "k"},
            "hook": {"type": "log"},
            "inbox": {"type": "slack", "token": TOKEN, "channel": "#c", **inbox},
        },
        "default": ["hook"],
    }
    with pytest.raises(ConfigError) as caught:
        build(raw, environ={})
    return caught.value.problems


@pytest.mark.parametrize(
    ("inbox", "place", "words"),
    [
        ({"replies": {"signing_secret": "s"}}, "destinations.inbox.replies.send_with", "is required"),
        ({"replies": {"send_with": "nope", "signing_secret": "s"}}, "destinations.inbox.replies.send_with", "nope"),
        ({"replies": {"send_with": "hook", "signing_secret": "s"}}, "destinations.inbox.replies.send_with", "log"),
        ({"replies": {"send_with": "sms"}}, "destinations.inbox.replies", "signing_secret"),
        (
            {"replies": {"send_with": "sms", "signing_secret": "s", "max_segments": 0}},
            "destinations.inbox.replies.max_segments",
            "",
        ),
        (
            {"replies": {"send_with": "sms", "signing_secret": "s", "secret": "x"}},
            "destinations.inbox.replies.secret",
            "unknown",
        ),
        (
            {"replies": {"send_with": "sms", "signing_secret": "s"}, "thread_by_sender": False},
            "destinations.inbox.replies",
            "thread_by_sender",
        ),
        ({"replies": "sms"}, "destinations.inbox.replies", "mapping"),
    ],
)
def test_replies_config_errors_name_their_place(tmp_path, inbox, place, words):
    problems = errors_of(tmp_path, **inbox)
    assert any(p.startswith(place) and words in p for p in problems), problems


async def test_no_events_endpoint_without_replies(aiohttp_client, tmp_path):
    raw = {"store": f"sqlite:///{tmp_path / 'b.db'}", "destinations": {"l": {"type": "log"}}, "default": ["l"]}
    client = await aiohttp_client(create_app(build(raw, environ={})))
    body = b'{"type": "url_verification", "challenge": "x"}'
    assert (await client.post("/slack/events", data=body, headers=signed(body))).status == 404


# ---------------------------------------------------------------------------- the Events API


async def test_url_verification_is_answered(start):
    bridge = await start()
    response = await bridge.event(
        {"type": "url_verification", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}
    )
    assert response.status == 200
    assert (await response.json())["challenge"] == "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"


async def test_a_reply_goes_to_the_texter_with_the_right_xml_and_the_thread_shows_it(start):
    bridge = await start()
    thread = await bridge.thread()
    ts = await bridge.reply("Yes, <@U0ANN|ann> opens at 9 &amp; closes at 5 <https://x.co/h|hours>", thread)
    (call,) = await bridge.skycore.wait_for(1)
    assert call.request == {
        "ACTION": "sendSMS",
        "API_KEY": API_KEY,
        "TO": TEXTER,
        "FROM": SHORT_CODE,
        "TEXT": "Yes, @ann opens at 9 & closes at 5 hours (https://x.co/h)",
    }
    assert await bridge.reactions(ts, 1) == ["outbox_tray"]
    (event,) = await bridge.replies()
    assert (event["from"], event["to"], event["origin"]) == (SHORT_CODE, "+" + TEXTER, "SLACK")
    await bridge.settled()
    rows = await bridge.store.event_deliveries(event["id"])
    assert sorted((d.destination, d.route, d.status) for d in rows) == [
        ("crm", "both-sides", "delivered"),  # a route naming sms.reply gets it
        ("sms", "replies", "delivered"),  # and never the Slack inbox (default, or a route without the type)
        ("~feedback", "sent", "delivered"),  # the thread's 📤, a delivery of its own (durable, retried)
    ]
    assert next(d for d in rows if d.destination == "sms").tracking_id == call.tracking_id
    assert len(bridge.slack.posted()) == 1  # the texter's message; the reply was not posted back

    # the delivery reports go where their routes say (here: the inbox, by default)

    # the delivery report for its TRACKINGID: a check mark
    await bridge.postback(report("N201", call.tracking_id, "Message Sent"))
    await bridge.postback(report("N202", call.tracking_id))
    assert await bridge.reactions(ts, 2) == ["outbox_tray", "white_check_mark"]


async def test_only_the_reports_on_a_replys_sms_get_a_feedback_delivery(start):
    """Skycore sends delivery reports for every message the account sends, and nearly none is a
    reply's: those go where their routes say and leave nothing for a thread to show (no
    `~feedback` delivery to claim, attempt and record for each)."""
    bridge = await start()
    thread = await bridge.thread()
    ts = await bridge.reply("On my way", thread)
    (call,) = await bridge.skycore.wait_for(1)
    await bridge.settled()
    for n, code in enumerate(("N202", "E713", "N202")):
        await bridge.postback(report(code, f"campaign-{n}"))  # messages the bridge never sent
    await bridge.postback(report("E713", call.tracking_id, "Message Failed"))  # the reply's
    await bridge.settled()
    feedback = await bridge.store.list_deliveries(DeliveryFilter(destination="~feedback"))
    assert sorted(row.route for row in feedback) == ["report", "sent"]
    assert await bridge.reactions(ts, 2) == ["outbox_tray", "x"]


async def test_a_report_whose_reply_lookup_hangs_is_a_503_within_patience(aiohttp_client, tmp_path, peers, monkeypatch):
    """Whether a report is on a reply's SMS is a store lookup before the report is stored: it
    counts against the store's patience as the write does, so a store that hangs there gets
    Skycore's retry (503) in time, not an answer after the lookup's own timeouts."""
    slack, skycore = peers
    app = create_app(build(config(tmp_path, slack, skycore), environ={}))
    app[RUNTIME].patience = Patience(0.3, every=0.05)  # before it starts: its sweep is started then
    bridge = Bridge(await aiohttp_client(app), slack, skycore)
    stuck = asyncio.Event()

    async def hangs(tracking_id: str) -> Any:
        await stuck.wait()

    monkeypatch.setattr(bridge.store, "delivery_by_tracking_id", hangs)
    began = time.monotonic()
    async with asyncio.timeout(5):
        response = await bridge.client.post("/postback", data=report("N202", "some-message"))
    assert response.status == 503, await response.text()
    assert time.monotonic() - began < 2
    monkeypatch.undo()  # the store answers again: Skycore's retry is taken
    await bridge.postback(report("N202", "some-message"))


async def test_a_reply_whose_sms_dies_unattempted_past_max_age_says_so_in_its_thread(aiohttp_client, tmp_path, peers):
    """A reply that waits behind the texter's earlier one (Skycore takes that one and never
    answers) and is never attempted: when max_age passes, the check marks it dead, and its
    thread shows why, as for any dead reply."""
    slack, skycore = peers
    raw = config(tmp_path, slack, skycore)
    raw["destinations"]["sms"].update({"retry": {**RETRY, "max_age": "1s"}, "timeout": "30s"})
    bridge = Bridge(await aiohttp_client(create_app(build(raw, environ={}))), slack, skycore)
    thread = await bridge.thread()
    skycore.script = ["hang"]
    await bridge.reply("First", thread)
    await skycore.wait_for(1)
    ts = await bridge.reply("Second, behind it", thread)
    assert await bridge.reactions(ts, 1, timeout=10) == ["x"]
    assert any("max_age 1s passed after 0 attempts" in line for line in slack.thread_lines(thread))
    assert len(skycore.calls) == 1  # the second was never sent


async def from_file(aiohttp_client: Any, tmp_path: Path, peers: Any, raw: dict[str, Any]) -> tuple[Bridge, Path]:
    """A bridge in this process whose config is a file (`raw`), which a reload reads again."""
    slack, skycore = peers
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return Bridge(await aiohttp_client(create_app(load(str(path)))), slack, skycore), path


@pytest.mark.parametrize("replies", ["with another", "gone"])
async def test_a_reply_whose_sms_destination_is_removed_says_so_in_its_thread(aiohttp_client, tmp_path, peers, replies):
    """Skycore is down and a reply waits for its retry; a reload removes that skycore
    destination. The SMS is dead (`destination removed`) and, while the config still takes
    replies (here sent with another skycore destination), its thread shows that as for any dead
    reply: a `~feedback` delivery stored with its death. With replies gone altogether nothing
    is posted."""
    slack, skycore = peers
    raw = config(tmp_path, slack, skycore)
    raw["retry"] = {**RETRY, "initial": "1h", "max_interval": "1h"}  # waiting, not being sent, at the reload
    bridge, path = await from_file(aiohttp_client, tmp_path, peers, raw)
    thread = await bridge.thread()
    skycore.script = [503] * 10_000  # Skycore is down: the reply waits, retried
    ts = await bridge.reply("Sorry for the wait", thread)
    await skycore.wait_for(1)

    async def waiting() -> bool:  # the attempt's verdict is recorded: no longer leased
        (row,) = await bridge.store.list_deliveries(DeliveryFilter(destination="sms"))
        return row.last_error is not None

    await eventually(waiting)
    sms = raw["destinations"].pop("sms")
    if replies == "gone":
        del raw["destinations"]["inbox"]["replies"]
    else:
        raw["destinations"]["sms-new"] = sms
        raw["destinations"]["inbox"]["replies"]["send_with"] = "sms-new"
    path.write_text(yaml.safe_dump(raw))
    response = await bridge.client.post("/admin/reload")
    assert response.status == 200, await response.text()
    if replies == "gone":
        await bridge.settled()
        await asyncio.sleep(0.5)
        assert slack.reactions_on(ts) == [] and slack.thread_lines(thread) == []
        assert await bridge.store.list_deliveries(DeliveryFilter(destination="~feedback")) == []
    else:
        assert await bridge.reactions(ts, 1) == ["x"]
        await bridge.settled()
        assert slack.thread_lines(thread) == ["Not sent: destination removed"]
        (shown,) = await bridge.store.list_deliveries(DeliveryFilter(destination="~feedback"))
        assert (shown.route, shown.status) == ("dead", "delivered")
    (row,) = await bridge.store.list_deliveries(DeliveryFilter(destination="sms"))
    assert (row.status, row.last_error) == ("dead", "destination removed")
    assert await bridge.metric("bridge_deliveries_died_total", destination="sms", reason="destination_removed") == 1
    assert skycore.sent() == []


async def reload_without_sms(bridge: Bridge, raw: dict[str, Any], path: Path) -> None:
    """Reload with the skycore destination `sms` renamed (`send_with` follows it): the
    deliveries to `sms` are to a destination the config no longer has."""
    raw["destinations"]["sms-new"] = raw["destinations"].pop("sms")
    raw["destinations"]["inbox"]["replies"]["send_with"] = "sms-new"
    path.write_text(yaml.safe_dump(raw))
    response = await bridge.client.post("/admin/reload")
    assert response.status == 200, await response.text()


async def test_a_reload_that_removes_the_sms_destination_lets_a_send_in_flight_finish(aiohttp_client, tmp_path, peers):
    """The reload comes while the SMS is with Skycore, which answers a second later: the old
    config's loop finishes that attempt, and its verdict stands (Skycore took it: 📤, never
    `x` or a line saying it was not sent)."""
    slack, skycore = peers
    raw = config(tmp_path, slack, skycore)
    bridge, path = await from_file(aiohttp_client, tmp_path, peers, raw)
    thread = await bridge.thread()
    skycore.script = ["slow"]
    sending = await bridge.reply("On my way", thread)
    await skycore.wait_for(1)
    await reload_without_sms(bridge, raw, path)
    assert await bridge.reactions(sending, 1) == ["outbox_tray"]
    await bridge.settled()
    assert slack.thread_lines(thread) == []
    (row,) = await bridge.store.list_deliveries(DeliveryFilter(destination="sms"))
    assert row.status == "delivered" and len(skycore.sent()) == 1


async def test_what_the_old_loop_gave_back_at_a_reload_dies_with_its_line(aiohttp_client, tmp_path, peers):
    """Skycore hangs on one SMS and the next waits behind it (one send at a time) when a reload
    removes their destination. The waiting one dies with the reload, with its line; the one in
    flight is left to its attempt, which the old config's loop gives back when it stops (its
    grace run out), and the reload's second sweep makes it dead with its line too, not pending
    for a destination nobody sends to."""
    slack, skycore = peers
    raw = config(tmp_path, slack, skycore)
    raw["destinations"]["sms"]["concurrency"] = 1
    bridge, path = await from_file(aiohttp_client, tmp_path, peers, raw)
    thread = await bridge.thread()
    skycore.script = ["hang"]
    first = await bridge.reply("On my way", thread)
    await skycore.wait_for(1)
    second = await bridge.reply("And a second thing", thread)
    await reload_without_sms(bridge, raw, path)  # takes the old loop's grace (5 s)
    assert await bridge.reactions(first, 1) == ["x"]
    assert await bridge.reactions(second, 1) == ["x"]
    await bridge.settled()
    assert slack.thread_lines(thread) == ["Not sent: destination removed"] * 2
    rows = await bridge.store.list_deliveries(DeliveryFilter(destination="sms"))
    assert [(r.status, r.last_error) for r in rows] == [("dead", "destination removed")] * 2
    assert skycore.sent() == []


async def test_a_replys_sms_and_its_feedback_are_claimed_with_the_writes_not_by_a_claim_round(start, monkeypatch):
    """The SMS is claimed in the transaction that stores the reply and handed to its loop; the
    thread's feedback in the one that records the sendSMS answer: neither waits for (nor costs)
    a claim round of its loop."""
    bridge = await start()
    thread = await bridge.thread()
    await bridge.settled()
    store, by_claim_round = bridge.store, []
    claim = store.claim

    async def counted(destination: str, **kwargs: Any) -> Any:
        claims = await claim(destination, **kwargs)
        by_claim_round.extend((destination, c.route) for c in claims)
        return claims

    monkeypatch.setattr(store, "claim", counted)
    for n in range(3):  # one after the other: none waits behind the texter's previous one
        ts = await bridge.reply(f"Reply {n}", thread)
        assert await bridge.reactions(ts, 1) == ["outbox_tray"]
    await bridge.settled()
    assert len(bridge.skycore.calls) == 3
    assert [c for c in by_claim_round if c[0] in ("sms", "~feedback")] == []


async def test_slacks_retry_of_one_event_makes_one_sms(start):
    bridge = await start()
    thread = await bridge.thread()
    ts = bridge.next_ts()
    bridge.slack.person_says("C0FAKE", ts)
    payload = message_event("See you then", thread_ts=thread, ts=ts)
    body = json.dumps(payload).encode()
    for retry in range(3):
        headers = {
            **signed(body),
            **({"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"} if retry else {}),
        }
        assert (await bridge.client.post("/slack/events", data=body, headers=headers)).status == 200
    await bridge.skycore.wait_for(1)
    await bridge.settled()
    await asyncio.sleep(0.3)
    assert len(bridge.skycore.calls) == 1 and len(await bridge.replies()) == 1


@pytest.mark.parametrize("how", ["wrong secret", "stale", "missing", "tampered", "not a number", "not ascii"])
async def test_a_bad_signature_is_401_and_nothing_is_stored(start, how):
    bridge = await start()
    thread = await bridge.thread()
    ts = bridge.next_ts()
    body = json.dumps(message_event("Sneaky", thread_ts=thread, ts=ts)).encode()
    headers = {
        "wrong secret": signed(body, secret="not-the-secret"),
        "stale": signed(body, at=time.time() - 301),
        "missing": {"Content-Type": "application/json"},
        "tampered": signed(body.replace(b"Sneaky", b"Snaaky")),
        "not a number": {**signed(body), "X-Slack-Request-Timestamp": "soon"},
        "not ascii": {**signed(body), "X-Slack-Signature": "v0=é"},
    }[how]
    response = await bridge.client.post("/slack/events", data=body, headers=headers)  # tampered: signed another
    assert response.status == 401
    await asyncio.sleep(0.2)
    assert await bridge.replies() == [] and bridge.skycore.calls == []


@pytest.mark.parametrize(
    "change",
    [
        {"bot_id": "B0BRIDGE"},
        {"subtype": "message_changed"},
        {"subtype": "bot_message"},
        {"thread_ts": None},  # not in a thread
        {"thread_ts": "1714579999.000001"},  # a thread the bridge did not start
        {"channel": "C0OTHER"},  # the bridge's thread's ts, in another channel
        {"text": "   "},
    ],
)
async def test_what_is_not_a_reply_is_ignored(start, change):
    bridge = await start()
    thread = await bridge.thread()
    ts = bridge.next_ts()
    payload = message_event("Not for the texter", thread_ts=thread, ts=ts)
    for key, value in change.items():
        if value is None:
            payload["event"].pop(key)
        else:
            payload["event"][key] = value
    response = await bridge.event(payload)
    assert response.status == 200
    await asyncio.sleep(0.3)
    assert await bridge.replies() == [] and bridge.skycore.calls == []


async def test_a_billing_problem_is_dead_with_x_and_the_reason_in_the_thread(start):
    bridge = await start()
    thread = await bridge.thread()
    bridge.skycore.script = ["E713"]
    ts = await bridge.reply("We can help", thread)
    assert await bridge.reactions(ts, 1) == ["x"]
    await bridge.settled()
    for _ in range(100):
        lines = bridge.slack.thread_lines(thread)
        if lines:
            break
        await asyncio.sleep(0.05)
    assert lines == ["Not sent: E713: There is a billing problem on your account"]


async def test_a_failed_delivery_report_is_x_with_its_code(start):
    bridge = await start()
    thread = await bridge.thread()
    ts = await bridge.reply("We can help", thread)
    (call,) = await bridge.skycore.wait_for(1)
    await bridge.reactions(ts, 1)
    await bridge.postback(report("E402", call.tracking_id, "Message Failed"))
    assert await bridge.reactions(ts, 2) == ["outbox_tray", "x"]
    for _ in range(100):
        if "Not delivered: E402 Message Failed" in bridge.slack.thread_lines(thread):
            break
        await asyncio.sleep(0.05)
    assert "Not delivered: E402 Message Failed" in bridge.slack.thread_lines(thread)


async def test_skycore_down_then_back_sends_once(start):
    bridge = await start()
    thread = await bridge.thread()
    bridge.skycore.script = [503, "E106"]
    ts = await bridge.reply("Back soon", thread)
    assert await bridge.reactions(ts, 1) == ["outbox_tray"]
    assert len(bridge.skycore.calls) == 3 and len(bridge.skycore.sent()) == 1


async def test_stop_then_a_reply_is_never_sent_and_start_then_it_is(start):
    bridge = await start()
    thread = await bridge.thread()
    await bridge.postback(mo(2, "Stop.", at="2026-12-01T10:01:00Z"))
    await bridge.settled()
    refused = await bridge.reply("But we have a sale!", thread)
    assert await bridge.reactions(refused, 1) == ["no_entry"]
    await asyncio.sleep(0.5)
    assert bridge.skycore.calls == []
    (stored,) = await bridge.replies()
    # the CRM still sees it; the thread's ⛔ is a delivery of its own, stored with the reply
    assert sorted((d.destination, d.route) for d in await bridge.store.event_deliveries(stored["id"])) == [
        ("crm", "both-sides"),
        ("~feedback", "not_sent"),
    ]
    assert any("opted out" in line for line in bridge.slack.thread_lines(thread))

    await bridge.postback(mo(3, "START", at="2026-12-01T10:02:00Z"))
    await bridge.settled()
    sent = await bridge.reply("Welcome back", thread)
    (call,) = await bridge.skycore.wait_for(1)
    assert call.request["TEXT"] == "Welcome back"
    assert await bridge.reactions(sent, 1) == ["outbox_tray"]


async def test_too_long_is_refused_and_says_how_long(start):
    bridge = await start(max_segments=3)
    thread = await bridge.thread()
    ts = await bridge.reply("😀" * 400, thread)
    assert await bridge.reactions(ts, 1) == ["no_entry"]
    await asyncio.sleep(0.3)
    assert bridge.skycore.calls == []
    assert any("800 UCS-2 characters, 12 SMS segments" in line for line in bridge.slack.thread_lines(thread))
    fits = await bridge.reply("a" * 459, thread)  # 3 GSM-7 segments
    assert await bridge.reactions(fits, 1) == ["outbox_tray"]


async def test_slack_down_then_back_the_thread_still_shows_it_once(start):
    bridge = await start()
    thread = await bridge.thread()
    bridge.slack.down = True
    bridge.skycore.script = ["E713"]
    ts = await bridge.reply("We can help", thread)
    await bridge.skycore.wait_for(1)

    async def feedback() -> list[Any]:
        response = await bridge.client.get("/admin/deliveries", params={"destination": "~feedback"})
        assert response.status == 200
        return (await response.json())["deliveries"]

    deadline = time.monotonic() + 10
    while not (rows := await feedback()) or rows[0]["attempts"] < 2:  # Slack refused it twice: retried
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.05)
    assert rows[0]["status"] == "pending" and rows[0]["route"] == "dead" and "503" in rows[0]["last_error"]
    assert bridge.slack.reactions_on(ts) == []
    bridge.slack.down = False
    assert await bridge.reactions(ts, 1) == ["x"]
    await bridge.settled()
    assert bridge.slack.thread_lines(thread) == ["Not sent: E713: There is a billing problem on your account"]
    assert [row["status"] for row in await feedback()] == ["delivered"]


async def test_the_line_failing_after_the_reaction_puts_only_the_line_again(start):
    bridge = await start()
    thread = await bridge.thread()
    bridge.skycore.script = ["E713"]
    bridge.slack.script = [None, 500]  # the reaction is taken, the line is not: the whole is retried
    ts = await bridge.reply("We can help", thread)
    await bridge.settled()
    assert bridge.slack.reactions_on(ts) == ["x"]  # already_reacted the second time counts as done
    assert bridge.slack.thread_lines(thread) == ["Not sent: E713: There is a billing problem on your account"]
    assert [c.kind for c in bridge.slack.calls[1:]] == [
        "reactions.add", "chat.postMessage", "reactions.add", "chat.postMessage"
    ]  # fmt: skip


@pytest.mark.parametrize("cut", CUT_OFF)
async def test_a_slack_answer_that_breaks_off_mid_body_is_retried(start, cut):
    """Slack takes the reaction and its 200 breaks off mid-body (sent chunked without its last
    chunk, or short of its Content-Length): its `ok` was never read, so the feedback is tried
    again as after a broken connection, not dead. The reaction there already counts as done,
    and the line follows once Slack answers whole."""
    bridge = await start()
    thread = await bridge.thread()
    bridge.skycore.script = ["E713"]
    bridge.slack.script = [cut]  # the answer to the reaction
    ts = await bridge.reply("We can help", thread)
    await bridge.settled()
    assert bridge.slack.reactions_on(ts) == ["x"]
    assert bridge.slack.thread_lines(thread) == ["Not sent: E713: There is a billing problem on your account"]
    assert [c.kind for c in bridge.slack.calls[1:]] == ["reactions.add", "reactions.add", "chat.postMessage"]
    (row,) = await bridge.store.list_deliveries(DeliveryFilter(destination="~feedback"))
    assert (row.status, row.attempts) == ("delivered", 2)
    first, second = await bridge.store.attempts(row.id)
    assert (first.outcome, first.status, first.error) == ("retry", 200, "Slack's answer to reactions.add broke off")
    assert second.outcome == "delivered"


async def test_a_refusal_from_slack_that_breaks_off_is_still_a_refusal(start):
    """A 404 whose body breaks off is decided by its status, as it would be whole: not tried
    again as a broken 200 would be."""
    bridge = await start()
    thread = await bridge.thread()
    bridge.slack.script = ["cut_off_404"]  # the answer to the reaction
    await bridge.reply("We can help", thread)
    await bridge.settled()
    (row,) = await bridge.store.list_deliveries(DeliveryFilter(destination="~feedback"))
    assert (row.status, row.attempts) == ("dead", 1), row
    (attempt,) = await bridge.store.attempts(row.id)
    assert attempt.status == 404


async def test_feedback_slack_refuses_is_dead_listed_and_replayable(start):
    bridge = await start()
    thread = await bridge.thread()
    bridge.slack.script = ["missing_scope"]  # reactions:write not granted (yet)
    ts = await bridge.reply("See you", thread)
    await bridge.settled()
    (row,) = await bridge.store.list_deliveries(DeliveryFilter(destination="~feedback"))
    assert (row.status, row.route) == ("dead", "sent") and row.last_error and "missing_scope" in row.last_error
    assert bridge.slack.reactions_on(ts) == []
    response = await bridge.client.post(f"/admin/deliveries/{row.id}/replay")  # the scope is granted now
    assert response.status == 200, await response.text()
    assert await bridge.reactions(ts, 1) == ["outbox_tray"]
    assert len(bridge.skycore.sent()) == 1


async def test_reply_metrics_count_received_ignored_refused_sent_and_failed(start):
    bridge = await start(max_segments=1)
    for name, labels in [
        ("bridge_replies_received_total", {"source": "events_api"}),
        ("bridge_replies_received_total", {"source": "socket_mode"}),
        ("bridge_replies_ignored_total", {"why": "bot"}),
        ("bridge_replies_refused_total", {"why": "opted_out"}),
        ("bridge_replies_sent_total", {}),
        ("bridge_replies_failed_total", {}),
    ]:
        assert await bridge.metric(name, **labels) == 0  # there from the start
    thread = await bridge.thread()
    sent = await bridge.reply("Yes", thread)
    await bridge.reactions(sent, 1)
    again = message_event("Yes", thread_ts=thread, ts=sent)  # Slack's retry of it
    assert (await bridge.event(again)).status == 200
    assert (await bridge.event(message_event("beep", thread_ts=thread, ts=bridge.next_ts(), bot_id="B1"))).status == 200
    assert (await bridge.event(message_event("hi", thread_ts="1714579999.000001", ts=bridge.next_ts()))).status == 200
    refused = await bridge.reply("a" * 161, thread)  # 2 segments
    await bridge.reactions(refused, 1)
    bridge.skycore.script = ["E713"]
    failed = await bridge.reply("No", thread)
    await bridge.reactions(failed, 1)
    await bridge.settled()
    assert await bridge.metric("bridge_replies_received_total", source="events_api") == 3
    assert await bridge.metric("bridge_replies_ignored_total", why="duplicate") == 1
    assert await bridge.metric("bridge_replies_ignored_total", why="bot") == 1
    assert await bridge.metric("bridge_replies_ignored_total", why="not_a_texters_thread") == 1
    assert await bridge.metric("bridge_replies_refused_total", why="too_long") == 1
    assert await bridge.metric("bridge_replies_refused_total", why="opted_out") == 0
    assert await bridge.metric("bridge_replies_sent_total") == 1
    assert await bridge.metric("bridge_replies_failed_total") == 1
    # the bridge's own ~feedback has the per-destination series of any destination
    assert await bridge.metric("bridge_deliveries_pending", destination="~feedback") == 0
    assert await bridge.metric("bridge_delivery_attempts_total", destination="~feedback", outcome="delivered") == 3


def test_a_destination_or_route_cannot_name_the_bridges_own():
    raw = {"destinations": {"~feedback": {"type": "log"}, "l": {"type": "log"}}, "default": ["l"]}
    with pytest.raises(ConfigError) as caught:
        build(raw, environ={})
    assert any(p.startswith("destinations.~feedback") and "the bridge's own" in p for p in caught.value.problems)
    raw = {"destinations": {"l": {"type": "log"}}, "routes": [{"match": {}, "to": ["~feedback"]}], "default": ["l"]}
    with pytest.raises(ConfigError) as caught:
        build(raw, environ={})
    assert any("~feedback" in p for p in caught.value.problems), caught.value.problems


def test_with_replies_no_route_takes_the_name_a_replys_sms_is_stored_under():
    """A reply's SMS is stored under the route `replies`: a route of the config's by that name
    would have its deliveries taken for replies' (told in a thread, their reports matched)."""
    destinations = {
        "sms": {"type": "skycore", "api_key": "k"},
        "inbox": {"type": "slack", "token": "xoxb-1", "channel": "C1",
                  "replies": {"send_with": "sms", "signing_secret": "shh"}},
    }  # fmt: skip
    raw = {"destinations": destinations, "routes": [{"name": "replies", "match": {}, "to": ["sms"]}]}
    with pytest.raises(ConfigError) as caught:
        build(raw, environ={})
    assert any(p.startswith("routes[0].name") and "'replies'" in p for p in caught.value.problems), caught.value
    del destinations["inbox"]["replies"]  # without replies the name is the user's
    assert build(raw, environ={}).routes[0].name == "replies"


# ---------------------------------------------------------------------------- real processes


def process_config(slack: FakeSlack, skycore: FakeSkycore, **sms: Any) -> dict[str, Any]:
    return {
        "retry": RETRY,
        "destinations": {
            "sms": {"type": "skycore", "api_key": "${SKYCORE_API_KEY}", "api_url": skycore.api_url, **sms},
            "inbox": {
                "type": "slack",
                "token": "${SLACK_BOT_TOKEN}",
                "channel": "#sms-inbox",
                "api_url": slack.api_url,
                "replies": {"send_with": "sms", "signing_secret": "${SLACK_SIGNING_SECRET}"},
            },
        },
        "default": ["inbox"],
    }


ENV = {"SKYCORE_API_KEY": API_KEY, "SLACK_BOT_TOKEN": TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET}


async def send_event(url: str, payload: dict[str, Any]) -> int:
    body = json.dumps(payload).encode()
    status, _ = await post(url + "/slack/events", body, headers=signed(body))
    return status


async def thread_kept(url: str) -> None:
    """Once the texter's message is delivered to the inbox, its thread is kept (the Slack
    destination keeps it before its attempt ends): a person can answer in it."""
    deadline = time.monotonic() + 20
    while True:
        listing = url + "/admin/deliveries?destination=inbox&status=delivered"
        async with aiohttp.ClientSession() as session, session.get(listing) as response:
            if (await response.json())["deliveries"]:
                return
        if time.monotonic() > deadline:
            raise AssertionError("the inbox delivery did not finish")
        await asyncio.sleep(0.05)


async def until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


async def test_check_config_names_what_the_slack_app_needs(peers, bridge_factory):
    slack, skycore = peers
    bridge = bridge_factory(process_config(slack, skycore), ENV)
    shown = bridge.cli("check-config", "-c", str(bridge.config_path)).stdout
    for needed in ("/slack/events", "chat:write", "reactions:write", "channels:history", "groups:history",
                   "message.channels", "message.groups", "#sms-inbox", "~feedback"):  # fmt: skip
        assert needed in shown, shown
    assert API_KEY not in shown and SIGNING_SECRET not in shown


async def test_killed_between_storing_the_reply_and_sending_it_sends_it_once_after_restart(peers, bridge_factory):
    slack, skycore = peers
    bridge = bridge_factory(process_config(slack, skycore, timeout="5s"), ENV)
    bridge.start()
    status, _ = await post(bridge.url + "/postback", mo(1, "Hello?"))
    assert status == 200
    (call,) = await slack.wait_for(1)
    await thread_kept(bridge.url)
    skycore.script = ["hang"]  # Skycore takes the request and never answers: the attempt is in flight
    ts = "1714579400.000100"
    slack.person_says("C0FAKE", ts)
    assert await send_event(bridge.url, message_event("Yes we are", thread_ts=call.ts, ts=ts)) == 200
    await skycore.wait_for(1)
    bridge.kill()  # kill -9: the reply is stored, its SMS not sent
    assert skycore.sent() == []

    bridge.start()
    await until(lambda: len(skycore.sent()) == 1)
    await until(lambda: slack.reactions_on(ts) == ["outbox_tray"])
    assert await send_event(bridge.url, message_event("Yes we are", thread_ts=call.ts, ts=ts)) == 200  # a late retry
    await asyncio.sleep(1.0)
    assert len(skycore.sent()) == 1 and skycore.sent()[0].request["TEXT"] == "Yes we are"
    assert bridge.stop() == 0
    seen = bridge.stdout() + bridge.stderr()
    assert API_KEY not in seen and SIGNING_SECRET not in seen and TOKEN not in seen


async def test_killed_between_sending_the_reply_and_its_reaction_shows_it_after_restart(peers, bridge_factory):
    slack, skycore = peers
    bridge = bridge_factory(process_config(slack, skycore), ENV)
    bridge.start()
    status, _ = await post(bridge.url + "/postback", mo(1, "Hello?"))
    assert status == 200
    (call,) = await slack.wait_for(1)
    await thread_kept(bridge.url)
    slack.down = True  # the SMS goes, its 📤 cannot
    ts = "1714579400.000100"
    slack.person_says("C0FAKE", ts)
    assert await send_event(bridge.url, message_event("On our way", thread_ts=call.ts, ts=ts)) == 200
    await until(lambda: len(skycore.sent()) == 1 and any(c.kind == "reactions.add" for c in slack.calls))
    bridge.kill()  # kill -9: sent, and what the thread should show is only in the store
    slack.down = False

    bridge.start()
    await until(lambda: slack.reactions_on(ts) == ["outbox_tray"])
    await asyncio.sleep(0.5)
    assert len(skycore.sent()) == 1 and slack.reactions_on(ts) == ["outbox_tray"]
    assert bridge.stop() == 0


async def test_two_instances_on_postgresql_send_one_sms_per_reply(pg_url, peers, bridge_factory):  # noqa: F811
    slack, skycore = peers
    first = bridge_factory({**process_config(slack, skycore), "store": pg_url}, ENV)
    first.start()
    second = bridge_factory({**process_config(slack, skycore), "store": pg_url}, ENV)
    second.start()
    status, _ = await post(first.url + "/postback", mo(1, "Hello?"))
    assert status == 200
    (call,) = await slack.wait_for(1)
    await thread_kept(first.url)
    texts = [f"Answer {n}" for n in range(10)]
    for n, text in enumerate(texts):
        ts = f"{1714579500 + n}.000100"
        slack.person_says("C0FAKE", ts)
        payload = message_event(text, thread_ts=call.ts, ts=ts)
        # Slack sends it, then retries it: the two land on different instances, at once
        results = await asyncio.gather(send_event(first.url, payload), send_event(second.url, payload))
        assert results == [200, 200]
    await until(lambda: len(skycore.sent()) >= len(texts))
    await asyncio.sleep(1.0)
    assert sorted(c.request["TEXT"] for c in skycore.calls) == sorted(texts)
    assert [c.request["TEXT"] for c in skycore.calls] == texts  # one texter's replies in the order written
    # and one 📤 each: the thread's feedback is a delivery, sent by one instance
    await until(lambda: len(slack.reactions) == len(texts))
    await asyncio.sleep(0.5)
    assert sorted(c.body["timestamp"] for c in slack.calls if c.kind == "reactions.add") == [
        f"{1714579500 + n}.000100" for n in range(len(texts))
    ]
    assert first.stop() == 0 and second.stop() == 0


def test_the_docs_manifest_asks_for_what_the_bridge_needs():
    import re as _re

    import yaml

    from bridge import replies

    page = (Path(__file__).parent.parent / "docs" / "replies.md").read_text()
    block = next(b for b in _re.findall(r"```yaml\n(.*?)```", page, _re.S) if "oauth_config" in b)
    manifest = yaml.safe_load(block)
    assert manifest["oauth_config"]["scopes"]["bot"] == list(replies.SCOPES)
    events = manifest["settings"]["event_subscriptions"]
    assert events["bot_events"] == list(replies.EVENTS)
    assert events["request_url"].endswith(replies.PATH)


async def test_slack_gets_an_answer_within_3_seconds_even_when_the_store_hangs(start, monkeypatch):
    bridge = await start()
    thread = await bridge.thread()

    async def hangs(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(30)

    for write in ("ingest", "ingest_and_claim"):  # a reply is stored by the one or the other
        monkeypatch.setattr(bridge.store, write, hangs)
    ts = bridge.next_ts()
    began = time.monotonic()
    response = await bridge.event(message_event("Are you there?", thread_ts=thread, ts=ts))
    assert response.status == 503 and time.monotonic() - began < 3.0  # Slack retries


async def test_a_body_over_the_limit_is_413_before_the_signature_is_checked(start):
    bridge = await start()
    body = b'{"type": "event_callback", "pad": "' + b"x" * (600 * 1024) + b'"}'
    response = await bridge.client.post("/slack/events", data=body, headers=signed(body))
    assert response.status == 413
    assert await bridge.replies() == []


# ---------------------------------------------------------------------------- Socket Mode


async def test_socket_mode_takes_the_same_replies_acks_after_storing_and_reconnects(aiohttp_client, tmp_path, peers):
    slack, skycore = peers
    raw = config(tmp_path, slack, skycore)
    raw["destinations"]["inbox"]["replies"] = {"send_with": "sms", "app_token": APP_TOKEN}
    bridge = Bridge(await aiohttp_client(create_app(build(raw, environ={}))), slack, skycore)
    body = b'{"type": "url_verification", "challenge": "x"}'
    assert (await bridge.client.post("/slack/events", data=body, headers=signed(body))).status == 404  # no Events API
    await asyncio.wait_for(slack.socket_opened.wait(), 10)
    thread = await bridge.thread()

    ts = bridge.next_ts()
    slack.person_says("C0FAKE", ts)
    await slack.envelope(message_event("Hi from the socket", thread_ts=thread, ts=ts), "env-1")
    (call,) = await skycore.wait_for(1)
    assert call.request["TEXT"] == "Hi from the socket" and call.request["TO"] == TEXTER
    await until(lambda: slack.acks == ["env-1"])
    (stored,) = await bridge.replies()
    assert stored["fields"]["slack"]["ts"] == ts

    # the socket drops: the bridge opens a new one, and replies keep coming
    slack.socket_opened.clear()
    socket = slack.live_socket()
    assert socket is not None
    await socket.close()
    await asyncio.wait_for(slack.socket_opened.wait(), 30)
    ts2 = bridge.next_ts()
    slack.person_says("C0FAKE", ts2)
    await slack.envelope(message_event("Still here", thread_ts=thread, ts=ts2), "env-2")
    await skycore.wait_for(2)
    await until(lambda: "env-2" in slack.acks)
    assert [c.request["TEXT"] for c in skycore.calls] == ["Hi from the socket", "Still here"]
    assert await bridge.metric("bridge_replies_received_total", source="socket_mode") == 2
    assert await bridge.metric("bridge_replies_received_total", source="events_api") == 0


async def test_socket_mode_starts_restarts_and_stops_as_reloads_change_the_app_token(aiohttp_client, tmp_path, peers):
    slack, skycore = peers
    other_token = "xapp-1-A0FAKE-2222-anotherAppLevelToken"
    slack.app_tokens.add(other_token)
    raw = config(tmp_path, slack, skycore)
    path = tmp_path / "config.yaml"

    def write(**replies: Any) -> None:
        raw["destinations"]["inbox"]["replies"] = {"send_with": "sms", "signing_secret": SIGNING_SECRET, **replies}
        path.write_text(yaml.safe_dump(raw))

    async def reload() -> None:
        response = await bridge.client.post("/admin/reload")
        assert response.status == 200, await response.text()

    async def reply_by_socket(text: str, envelope_id: str) -> None:
        ts = bridge.next_ts()
        slack.person_says("C0FAKE", ts)
        await slack.envelope(message_event(text, thread_ts=thread, ts=ts), envelope_id)
        await until(lambda: envelope_id in slack.acks)
        await until(lambda: text in [c.request["TEXT"] for c in skycore.calls])

    write()  # the Events API only: no socket
    bridge = Bridge(await aiohttp_client(create_app(load(str(path)))), slack, skycore)
    thread = await bridge.thread()
    assert slack.connections_opened == 0

    write(app_token=APP_TOKEN)  # added: started, no restart needed
    await reload()
    await asyncio.wait_for(slack.socket_opened.wait(), 10)
    await reply_by_socket("By the first socket", "env-1")

    slack.socket_opened.clear()
    write(app_token=other_token)  # changed: the old socket closes, one with the new token opens
    await reload()
    await asyncio.wait_for(slack.socket_opened.wait(), 10)
    assert slack.opened_with == [APP_TOKEN, other_token]
    assert [s.closed for s in slack.sockets] == [True, False]
    await reply_by_socket("By the second socket", "env-2")

    write(app_token=other_token, max_segments=2)  # the same token: the socket stays
    await reload()
    await asyncio.sleep(0.3)
    assert len(slack.opened_with) == 2 and not slack.sockets[-1].closed

    write()  # removed: stopped, and not reconnected
    await reload()
    await until(lambda: all(s.closed for s in slack.sockets))
    await asyncio.sleep(1.5)
    assert len(slack.opened_with) == 2 and all(s.closed for s in slack.sockets)


async def test_a_reload_keeps_what_the_thread_has_yet_to_show(aiohttp_client, tmp_path, peers):
    slack, skycore = peers
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, slack, skycore)))
    bridge = Bridge(await aiohttp_client(create_app(load(str(path)))), slack, skycore)
    thread = await bridge.thread()
    slack.down = True
    ts = await bridge.reply("Noted", thread)
    await skycore.wait_for(1)
    await until(lambda: any(c.kind == "reactions.add" for c in slack.calls))
    response = await bridge.client.post("/admin/reload")  # ~feedback is no destination "removed"
    assert response.status == 200, await response.text()
    slack.down = False
    assert await bridge.reactions(ts, 1) == ["outbox_tray"]
    await bridge.settled()
    (row,) = await bridge.store.list_deliveries(DeliveryFilter(destination="~feedback"))
    assert row.status == "delivered"


async def test_socket_mode_does_not_ack_what_it_could_not_store(aiohttp_client, tmp_path, peers, monkeypatch):
    slack, skycore = peers
    raw = config(tmp_path, slack, skycore)
    raw["destinations"]["inbox"]["replies"] = {"send_with": "sms", "app_token": APP_TOKEN}
    bridge = Bridge(await aiohttp_client(create_app(build(raw, environ={}))), slack, skycore)
    await asyncio.wait_for(slack.socket_opened.wait(), 10)
    thread = await bridge.thread()

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("database is down")

    for write in ("ingest", "ingest_and_claim"):  # a reply is stored by the one or the other
        monkeypatch.setattr(bridge.store, write, down)
    ts = bridge.next_ts()
    slack.person_says("C0FAKE", ts)
    payload = message_event("Wait for it", thread_ts=thread, ts=ts)
    await slack.envelope(payload, "env-1")
    await asyncio.sleep(0.5)
    assert slack.acks == [] and skycore.calls == []
    monkeypatch.undo()
    await slack.envelope(payload, "env-1")  # Slack sends it again
    await until(lambda: slack.acks == ["env-1"])
    await skycore.wait_for(1)


async def test_a_stop_that_comes_while_the_reply_waits_stops_it(start):
    bridge = await start()
    thread = await bridge.thread()
    bridge.skycore.script = [503] * 10_000  # Skycore is down: the reply waits, retried
    ts = await bridge.reply("Sorry for the wait", thread)
    await bridge.skycore.wait_for(2)
    await bridge.postback(mo(2, "STOP", at="2026-12-01T10:01:00Z"))  # texted meanwhile
    await asyncio.sleep(0.5)  # an attempt in flight when it came gets its 503
    calls = len(bridge.skycore.calls)
    bridge.skycore.script = []  # Skycore is back
    assert await bridge.reactions(ts, 1) == ["no_entry"]
    await bridge.settled()
    await asyncio.sleep(0.3)
    assert bridge.skycore.sent() == [] and len(bridge.skycore.calls) == calls  # no request after the STOP
    (row,) = await bridge.store.list_deliveries(DeliveryFilter(destination="sms"))
    assert row.status == "dead" and row.last_error.startswith("opted out: +15551234888 texted STOP to 60856")


async def test_a_thread_started_before_the_bridge_kept_its_channel_is_found_by_its_ts(start, tmp_path):
    import sqlite3

    bridge = await start()
    thread = await bridge.thread()
    conn = sqlite3.connect(tmp_path / "bridge.db")
    with conn:  # as a store of the previous release has it: only conversation -> ts
        assert conn.execute("DELETE FROM conversations WHERE key LIKE 'thread:%'").rowcount == 1
    conn.close()
    ts = await bridge.reply("Found you", thread)
    (call,) = await bridge.skycore.wait_for(1)
    assert call.request["TO"] == TEXTER and await bridge.reactions(ts, 1) == ["outbox_tray"]
