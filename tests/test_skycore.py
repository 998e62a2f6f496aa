"""`type: skycore` (CONTRACT §7): an SMS sent with Skycore's sendSMS, against a fake Skycore on
127.0.0.1 (tests/skycore_fake.py) that answers Success, Failure with each class of code, 5xx,
or hangs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from bridge.app import create_app
from bridge.config import build
from bridge.destinations.base import Attempt, Services
from bridge.destinations.registry import build as build_destination
from bridge.destinations.skycore import RETRYABLE_CODES, SkycoreDestination, classify_answer, request_xml
from bridge.errors import ConfigError, StoreError
from bridge.event import Event
from bridge.ids import event_id
from bridge.retry import Delivered, Failed, Outcome
from bridge.runtime import RUNTIME
from bridge.store import DeliveryFilter, DeliveryRow, NewDelivery
from tests.conftest import free_port
from tests.skycore_fake import API_KEY, FakeSkycore, fake_skycore

RETRY = {"initial": "50ms", "max_interval": "200ms", "max_age": "1h"}
PERMANENT = ["E100", "E101", "E104", "E107", "E110", "E111", "E112", "E114", "E628", "E713", "E714", "E715"]


def reply(text: str = "We open at 9 tomorrow", *, to: str = "+15551234888", short_code: str = "60856") -> Event:
    return {
        "id": event_id(),
        "type": "sms.reply",
        "origin": "SLACK",
        "code": None,
        "from": short_code,
        "to": to,
        "keyword": None,
        "text": text,
        "subject": None,
        "media": [],
        "spid": None,
        "carrier": None,
        "transaction_id": None,
        "tracking_id": None,
        "occurred_at": None,
        "received_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "fields": {},
    }


def config_errors(options: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        build({"destinations": {"sms": {"type": "skycore", **options}}, "default": ["sms"]}, environ={})
    return caught.value.problems


def destination(options: dict[str, Any]) -> SkycoreDestination:
    config = build({"destinations": {"sms": {"type": "skycore", **options}}, "default": ["sms"]}, environ={})
    built = build_destination(config.destinations["sms"])
    assert isinstance(built, SkycoreDestination)
    return built


# ---------------------------------------------------------------------------- pure


def test_request_xml_has_numbers_without_plus_and_escaped_text():
    xml = request_xml(reply("Fish & <chips> \x07ok"), "k&y", "77676")
    assert xml == (
        "<REQUEST><ACTION>sendSMS</ACTION><API_KEY>k&amp;y</API_KEY><TO>15551234888</TO><FROM>60856</FROM>"
        "<CAMPAIGNREF>77676</CAMPAIGNREF><TEXT>Fish &amp; &lt;chips&gt; ok</TEXT></REQUEST>"
    )
    assert "<CAMPAIGNREF>" not in request_xml(reply(), "k", None)


@pytest.mark.parametrize("code", sorted(RETRYABLE_CODES))
def test_busy_codes_are_retried(code):
    outcome = classify_answer(f"<RESPONSE><STATUS>Failure</STATUS><ERRORCODE>{code}</ERRORCODE></RESPONSE>")
    assert outcome == Failed(reason=code, retryable=True)


@pytest.mark.parametrize("code", PERMANENT)
def test_other_codes_are_dead_with_code_and_info(code):
    body = f"<RESPONSE><STATUS>Failure</STATUS><ERRORCODE>{code}</ERRORCODE><ERRORINFO> It  failed </ERRORINFO>"
    assert classify_answer(body + "</RESPONSE>") == Failed(reason=f"{code}: It failed", retryable=False)


def test_success_keeps_the_tracking_id():
    body = "<RESPONSE>\n <STATUS>Success</STATUS>\n <TRACKINGID>U01TXzc2Nzg2Nw==</TRACKINGID><TO>1</TO></RESPONSE>"
    assert classify_answer(body) == Delivered(
        status=200, detail="TRACKINGID U01TXzc2Nzg2Nw==", tracking_id="U01TXzc2Nzg2Nw=="
    )


@pytest.mark.parametrize(
    "body", ["", "<html>Bad gateway</html>", "<RESPONSE><STATUS>Maybe</STATUS></RESPONSE>", "<!DOCTYPE x><x/>"]
)
def test_an_answer_that_is_not_skycores_is_retried(body):
    outcome = classify_answer(body)
    assert isinstance(outcome, Failed) and outcome.retryable


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("options", "place", "words"),
    [
        ({}, "destinations.sms.api_key", "required"),
        ({"api_key": ""}, "destinations.sms.api_key", ""),
        ({"api_key": "k", "api_url": "ftp://x"}, "destinations.sms.api_url", ""),
        ({"api_key": "k", "timeout": "soon"}, "destinations.sms.timeout", ""),
        ({"api_key": "k", "campaignref": []}, "destinations.sms.campaignref", ""),
        ({"api_key": "k", "apikey": "k"}, "destinations.sms.apikey", ""),
    ],
)
def test_config_errors_name_their_place(options, place, words):
    errors = config_errors(options)
    assert any(e.startswith(place) and words in e for e in errors), errors


def test_the_api_key_is_never_shown():
    sms = destination({"api_key": API_KEY, "campaignref": 77676, "timeout": "3s"})
    assert sms.campaignref == "77676" and sms.timeout == 3.0
    assert sms.api_url == "https://secure.skycore.com/API/wxml/1.3/index.php"
    shown = sms.describe() + repr(sms.preview(reply())) + repr(sms.api_key)
    assert API_KEY not in shown and "**********" in shown


# ---------------------------------------------------------------------------- one attempt, by hand


@pytest.fixture
async def skycore() -> AsyncIterator[FakeSkycore]:
    async with fake_skycore() as fake:
        yield fake


async def send_once(services: Services, options: dict[str, Any], event: Event) -> Outcome:
    sms = destination(options)
    await sms.open(services)
    try:
        return await sms.send(event, Attempt(delivery_id=1, number=1, conversation="x"))
    finally:
        await sms.close()


async def test_a_reply_is_sent_with_the_right_form(services, skycore):
    options = {"api_key": API_KEY, "api_url": skycore.api_url, "campaignref": "77676"}
    outcome = await send_once(services, options, reply("Yes, 9am & <not> later"))
    (call,) = skycore.calls
    assert isinstance(outcome, Delivered) and outcome.tracking_id == call.tracking_id is not None
    assert list(call.form) == ["xml"]
    assert call.request == {
        "ACTION": "sendSMS",
        "API_KEY": API_KEY,
        "TO": "15551234888",
        "FROM": "60856",
        "CAMPAIGNREF": "77676",
        "TEXT": "Yes, 9am & <not> later",
    }
    assert call.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert call.headers["User-Agent"].startswith("postback-bridge/")


@pytest.mark.parametrize(
    ("script", "retryable", "reason"),
    [
        (["E713"], False, "E713: There is a billing problem on your account"),
        (["E106"], True, "E106: You can call API every 1 seconds"),
        (["E503"], True, "E503: Internal error"),
        ([503], True, "HTTP 503"),
        ([429], True, "HTTP 429"),
        ([404], False, "HTTP 404"),
    ],
)
async def test_each_class_of_answer(services, skycore, script, retryable, reason):
    skycore.script = script
    outcome = await send_once(services, {"api_key": API_KEY, "api_url": skycore.api_url}, reply())
    assert isinstance(outcome, Failed) and outcome.retryable is retryable and outcome.reason.startswith(reason)


async def test_a_wrong_key_is_dead_and_the_key_is_in_no_reason(services, skycore):
    outcome = await send_once(services, {"api_key": "wrong-key-123456", "api_url": skycore.api_url}, reply())
    assert outcome == Failed(reason="E104: User authentication failed", retryable=False, status=200)


async def test_a_hang_and_a_closed_port_are_retried(services, skycore):
    skycore.script = ["hang"]
    options = {"api_key": API_KEY, "api_url": skycore.api_url, "timeout": "200ms"}
    assert await send_once(services, options, reply()) == Failed(reason="timeout after 0.2s", retryable=True)
    closed = {"api_key": API_KEY, "api_url": f"http://127.0.0.1:{free_port()}/API"}
    refused = await send_once(services, closed, reply())
    assert isinstance(refused, Failed) and refused.retryable and refused.reason.startswith("cannot connect")


# ---------------------------------------------------------------------------- the bridge, in process


class Bridge:
    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.store = client.app[RUNTIME].store

    async def queue(self, event: Event) -> None:
        """Stored like a reply is: the event and one delivery to `sms`."""
        key = event["to"] + "|" + event["from"]
        result = await self.store.ingest(event, "reply:" + event["id"], [NewDelivery("sms", "replies", key, True)])
        assert result.status == "accepted"
        self.client.app[RUNTIME].dispatcher.notify(["sms"])

    async def settled(self, count: int, timeout: float = 20.0) -> list[DeliveryRow]:
        deadline = time.monotonic() + timeout
        while True:
            rows = sorted(await self.store.list_deliveries(DeliveryFilter(destination="sms")), key=lambda d: d.id)
            if len(rows) >= count and all(d.status != "pending" for d in rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"not settled: {rows}")
            await asyncio.sleep(0.05)


@pytest.fixture
def start(aiohttp_client, tmp_path: Path, skycore: FakeSkycore):
    async def start(**options: Any) -> Bridge:
        config = build(
            {
                "store": f"sqlite:///{tmp_path / 'bridge.db'}",
                "retry": RETRY,
                "destinations": {"sms": {"type": "skycore", "api_key": API_KEY, "api_url": skycore.api_url, **options}},
                "routes": [{"match": {"type": "sms.received"}, "to": []}],
            },
            environ={},
        )
        return Bridge(await aiohttp_client(create_app(config)))

    return start


async def test_delivered_with_its_tracking_id_shown_by_the_admin_api(start, skycore):
    bridge = await start()
    await bridge.queue(reply())
    (row,) = await bridge.settled(1)
    (call,) = skycore.sent()
    assert row.status == "delivered" and row.tracking_id == call.tracking_id
    listing = await (await bridge.client.get("/admin/deliveries?destination=sms")).json()
    assert [d["tracking_id"] for d in listing["deliveries"]] == [call.tracking_id]
    found = await bridge.store.delivery_by_tracking_id(call.tracking_id)
    assert found is not None and found.id == row.id


async def test_skycore_down_then_back_sends_once(start, skycore):
    skycore.script = [503, "E113", "hang"]
    bridge = await start(timeout="300ms")
    await bridge.queue(reply())
    (row,) = await bridge.settled(1)
    assert row.status == "delivered" and row.attempts == 4
    assert len(skycore.calls) == 4 and len(skycore.sent()) == 1


async def test_a_billing_problem_is_dead_at_once_and_replay_sends_it(start, skycore):
    skycore.script = ["E713"]
    bridge = await start()
    await bridge.queue(reply())
    (row,) = await bridge.settled(1)
    assert row.status == "dead" and row.last_error == "E713: There is a billing problem on your account"
    assert len(skycore.calls) == 1 and row.tracking_id is None
    replayed = await bridge.client.post(f"/admin/deliveries/{row.id}/replay")
    assert replayed.status == 200, await replayed.text()
    await asyncio.sleep(0.1)
    (row,) = await bridge.settled(1)
    assert row.status == "delivered" and len(skycore.sent()) == 1 and row.tracking_id == skycore.sent()[0].tracking_id


class Ledger:
    def __init__(self, stopped: bool | Exception) -> None:
        self.stopped = stopped
        self.asked: list[tuple[str, str]] = []

    async def opted_out(self, texter: str, short_code: str) -> bool:
        self.asked.append((texter, short_code))
        if isinstance(self.stopped, Exception):
            raise self.stopped
        return self.stopped


@pytest.mark.parametrize(
    ("ledger", "expected"),
    [
        (Ledger(True), Failed(reason="opted out: +15551234888 texted STOP to 60856; not sent", retryable=False)),
        (Ledger(StoreError("down")), Failed(reason="cannot read the opt-out ledger: down", retryable=True)),
    ],
)
async def test_nothing_is_sent_past_the_ledger(services, skycore, ledger, expected):
    sms = destination({"api_key": API_KEY, "api_url": skycore.api_url})
    await sms.open(Services(http=services.http, state=services.state, ledger=ledger))
    outcome = await sms.send(reply(), Attempt(delivery_id=1, number=1, conversation="x"))
    assert outcome == expected and skycore.calls == [] and ledger.asked == [("+15551234888", "60856")]
