"""Bad input through the in-process app (CONTRACT §4): each body gets its documented 4xx with a
JSON error saying what is wrong, never a 5xx, and events stored before it are all delivered."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from urllib.parse import urlencode

import pytest

from tests.conftest import BILLION_LAUGHS, POSTBACKS, sms
from tests.test_postback import MULTIPART, multipart

MAX_BODY = 1024

# (body, Content-Type, status, what the error says)
BAD = [
    pytest.param(b"", "", 400, "empty body", id="empty"),
    pytest.param(b"\r\n  \n", "text/plain", 400, "empty body", id="whitespace"),
    pytest.param(b"Hello, this is not XML", "text/plain", 400, "body is text, not XML", id="text"),
    pytest.param(b'{"ORIGIN": "SMS_MO", "TEXT": "STOP"}', "application/json", 400, "body is JSON, not XML", id="json"),
    pytest.param(b"<html><head><title>Hi</title></head><body>Hi</body></html>", "text/html", 400,
                 "root element is <html>, expected <POSTBACK>", id="html"),
    pytest.param(b"<!DOCTYPE html>\n<html><body>Hi</body></html>", "text/html", 400, "DTD", id="html-doctype"),
    pytest.param(sms(90)[:-20], "application/xml", 400, "malformed XML", id="truncated-xml"),
    pytest.param(BILLION_LAUGHS, "application/xml", 400, "DTDs and entity declarations are not accepted",
                 id="billion-laughs"),
    pytest.param(b"<NOTIFICATION><ORIGIN>SMS_MO</ORIGIN></NOTIFICATION>", "application/xml", 400,
                 "root element is <NOTIFICATION>, expected <POSTBACK>", id="wrong-root"),
    pytest.param(b"<POSTBACK><CODE>N211</CODE><FROM>15552312102</FROM><TEXT>hi</TEXT></POSTBACK>", "", 400,
                 "no <ORIGIN>", id="no-origin"),
    pytest.param(b"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><TEXT>caf\xe9</TEXT></POSTBACK>", "application/xml", 400,
                 "not valid UTF-8", id="invalid-utf8-latin1"),
    pytest.param(b"\xff\xfe<\x00P\x00", "", 400, "not valid UTF-8", id="invalid-utf8-utf16"),
    pytest.param(b"account=42&message=hi", "application/x-www-form-urlencoded", 400, "no field named 'xml'",
                 id="form-without-xml"),
    pytest.param(b"xml=not+xml", "application/x-www-form-urlencoded", 400, "form field 'xml' does not hold XML",
                 id="form-xml-not-xml"),
    pytest.param(b"<POSTBACK>" + b"x" * (MAX_BODY + 1) + b"</POSTBACK>", "application/xml", 413,
                 f"larger than max_body_bytes ({MAX_BODY} bytes)", id="oversized"),
    pytest.param(random.Random(3).randbytes(512), "application/octet-stream", 400, "", id="random-bytes"),
]  # fmt: skip

# Accepted whatever their shape; each gets a distinct TRANSACTIONID.
GOOD = [
    pytest.param(lambda n: sms(n), "", id="raw-no-content-type"),
    pytest.param(lambda n: sms(n), "application/json", id="raw-wrong-content-type"),
    pytest.param(lambda n: urlencode({"xml": sms(n).decode()}).encode(), "application/x-www-form-urlencoded",
                 id="form-field-xml"),
    pytest.param(lambda n: multipart(("xml", sms(n).decode(), None)), MULTIPART, id="multipart-field-xml"),
    pytest.param(lambda n: b"\xef\xbb\xbf<?xml version='1.0' encoding='UTF-8'?>\n" + sms(n) + b"\n", "text/xml",
                 id="bom-declaration-whitespace"),
    pytest.param(lambda n: sms(n).replace(b"<POSTBACK>", b"<POSTBACK><NOTIFICATION>").replace(
        b"</POSTBACK>", b"</NOTIFICATION></POSTBACK>"), "application/xml", id="notification-wrapper"),
    pytest.param(lambda n: sms(n).replace(b"SMS_MO", b"FUTURE_MO"), "", id="unknown-origin"),
    pytest.param(lambda n: sms(n).replace(b"<TEXT>", b"<RECEIVED>9999-12-31T23:59:59-14:00</RECEIVED><TEXT>"), "",
                 id="time-past-year-9999"),  # occurred_at null: once a 503, which Skycore would retry forever
]  # fmt: skip


@pytest.fixture(params=["aiohttp", "lane"])
async def bridge(app_client, sink, tmp_path, request):
    """The app on a real SQLite file, delivering every event to the sink; served by aiohttp
    alone, and with the postback lane in front as `serve` runs it."""
    raw = {
        "server": {"max_body_bytes": MAX_BODY},
        "store": f"sqlite:///{tmp_path / 'bridge.db'}",
        "retry": {"initial": "50ms", "max_interval": "200ms", "max_age": "1h"},
        "destinations": {"crm": {"type": "webhook", "url": sink.url + "/hook"}},
        "default": ["crm"],
    }
    return await app_client(raw, request.param)


async def post(client, body, content_type: str = ""):
    headers = {"Content-Type": content_type} if content_type else {"Content-Type": ""}
    async with client.post("/postback", data=body, headers=headers) as response:
        raw = await response.read()
    # every answer, accepted or refused, is one JSON line: curl's output ends before the prompt
    assert raw.endswith(b"}\n") and raw.count(b"\n") == 1, raw
    return response.status, response.headers.get("Content-Type", ""), json.loads(raw)


async def delivered_ids(sink, count: int) -> list[str]:
    received = await sink.wait_for(count)
    await asyncio.sleep(0.3)  # nothing more may come
    return [r.json()["id"] for r in received]


@pytest.mark.parametrize(("body", "content_type", "status", "message"), BAD)
async def test_bad_input_is_refused_and_earlier_events_still_delivered(
    bridge, sink, body, content_type, status, message
):
    before = await post(bridge, sms(1), "application/xml")
    assert before[0] == 200 and before[2]["status"] == "accepted"

    got_status, got_type, got_body = await post(bridge, body, content_type)
    assert got_status == status
    assert got_type.startswith("application/json")
    assert set(got_body) == {"error"} and message in got_body["error"] and got_body["error"]

    after = await post(bridge, sms(2), "application/xml")
    assert after[0] == 200
    assert sorted(await delivered_ids(sink, 2)) == sorted([before[2]["id"], after[2]["id"]])


async def test_oversized_chunked_body_is_413(bridge, sink):
    async def chunks():
        for _ in range(8):
            yield b"<POSTBACK>" + b"x" * 500

    async with bridge.post("/postback", data=chunks()) as response:
        assert response.status == 413
        assert "max_body_bytes" in (await response.json())["error"]
    assert (await post(bridge, sms(1)))[0] == 200
    assert len(await delivered_ids(sink, 1)) == 1


async def test_external_entities_are_neither_read_nor_fetched(bridge, sink, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    os.utime(secret, (0, time.time()))  # atime before mtime: any read moves it (relatime)
    control = tmp_path / "control.txt"
    control.write_text("x")
    os.utime(control, (0, time.time()))
    control.read_text()
    atime_tracked = control.stat().st_atime > 0

    bodies = [
        f'<!DOCTYPE POSTBACK [<!ENTITY x SYSTEM "{secret.as_uri()}">]>'
        "<POSTBACK><ORIGIN>SMS_MO</ORIGIN><TEXT>&x;</TEXT></POSTBACK>",
        f'<!DOCTYPE POSTBACK [<!ENTITY x SYSTEM "{secret}">]><POSTBACK><ORIGIN>&x;</ORIGIN></POSTBACK>',
        f'<!DOCTYPE POSTBACK [<!ENTITY x SYSTEM "{sink.url}/xxe">]><POSTBACK><ORIGIN>&x;</ORIGIN></POSTBACK>',
        f'<!DOCTYPE POSTBACK [<!ENTITY % p SYSTEM "{sink.url}/dtd"> %p;]><POSTBACK><ORIGIN>X</ORIGIN></POSTBACK>',
        f'<!DOCTYPE POSTBACK SYSTEM "{sink.url}/external.dtd"><POSTBACK><ORIGIN>SMS_MO</ORIGIN></POSTBACK>',
    ]
    for body in bodies:
        status, _, answer = await post(bridge, body.encode(), "application/xml")
        assert status == 400
        assert "DTD" in answer["error"] and "TOP-SECRET" not in answer["error"]

    assert (await post(bridge, sms(1)))[0] == 200
    (delivery,) = await sink.wait_for(1)
    await asyncio.sleep(0.3)
    assert [r.path for r in sink.received] == ["/hook"]  # no entity or DTD was fetched
    assert b"TOP-SECRET" not in delivery.body
    if atime_tracked:
        assert secret.stat().st_atime == 0  # the file was never opened for reading


@pytest.mark.parametrize(("make", "content_type"), GOOD)
async def test_every_shape_is_accepted_and_delivered(bridge, sink, make, content_type):
    status, _, answer = await post(bridge, make(7), content_type)
    assert status == 200 and answer["status"] == "accepted" and answer["id"].startswith("evt_")
    (delivery,) = await sink.wait_for(1)
    event = delivery.json()
    assert event["id"] == answer["id"]
    assert event["transaction_id"] == "tx-7"
    assert event["fields"]["TEXT"] == "HELLO there"


async def test_a_run_of_bad_input_between_good_postbacks(bridge, sink):
    """Many good postbacks (every shape), every bad one, a duplicate: all good ones arrive once."""
    accepted = []
    for n, (make, content_type) in enumerate(p.values for p in GOOD):
        status, _, answer = await post(bridge, make(100 + n), content_type)
        assert status == 200 and answer["status"] == "accepted"
        accepted.append(answer["id"])
    for body, content_type, status, _message in (p.values for p in BAD):
        got = await post(bridge, body, content_type)
        assert got[0] == status and 400 <= got[0] < 500
    status, _, answer = await post(bridge, sms(100), "")  # Skycore retrying the first one
    assert status == 200 and answer == {"status": "duplicate", "id": accepted[0]}
    for ref in sorted(POSTBACKS.glob("*.xml")):
        status, _, answer = await post(bridge, ref.read_bytes(), "")
        assert status == 200, ref.name
        if answer["status"] == "accepted":  # the wrapper and the subject example share a TRACKINGID
            accepted.append(answer["id"])
    assert sorted(await delivered_ids(sink, len(accepted))) == sorted(accepted)


def test_bad_table_covers_the_issue():
    ids = {p.id for p in BAD}
    wanted = {
        "empty",
        "text",
        "json",
        "html",
        "truncated-xml",
        "billion-laughs",
        "wrong-root",
        "no-origin",
        "oversized",
    }
    assert wanted <= ids
