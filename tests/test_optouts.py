"""The opt-out ledger (CONTRACT §7), tested like the legal duty it is: which postbacks opt a
texter out of a short code or back in, that the latest word wins on both stores whatever order
the postbacks arrive in, and that the bridge keeps it before it answers 200 and lists it
(`/admin/optouts`, `postback-bridge optouts`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest

from bridge.app import create_app
from bridge.carriers import Carriers
from bridge.config import build
from bridge.event import normalize
from bridge.optouts import OPT_IN_WORDS, OPT_OUT_WORDS, bare, word_of
from bridge.postback import parse
from bridge.runtime import RUNTIME
from bridge.store import OptOutRow, Store
from tests.conftest import DATA, post
from tests.test_store_contract import pg_url, store, store_url  # noqa: F401

TEXTER, SHORT_CODE = "15551234888", "60856"


def mo(
    n: int, text: str, *, at: str = "2026-12-01T10:00:00Z", keyword: str | None = None, sender: str = TEXTER
) -> bytes:
    key = f"<KEYWORD>{escape(keyword)}</KEYWORD>" if keyword is not None else ""
    return (
        f"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><CODE>N211</CODE><FROM>{sender}</FROM><TO>{SHORT_CODE}</TO>{key}"
        f"<TEXT>{escape(text)}</TEXT><RECEIVED>{at}</RECEIVED><TRANSACTIONID>opt-{n}</TRANSACTIONID></POSTBACK>"
    ).encode()


def sub(code: str, *, at: str = "2026-12-01T10:00:00Z") -> bytes:
    return (
        f"<POSTBACK><ORIGIN>SUB</ORIGIN><CODE>{code}</CODE><MOBILE>{TEXTER}</MOBILE><CAMPAIGNID>1478</CAMPAIGNID>"
        f"<TIMESTAMP>{at}</TIMESTAMP><SHORTCODE>{SHORT_CODE}</SHORTCODE></POSTBACK>"
    ).encode()


def said(body: bytes) -> tuple[bool, str] | None:
    event = normalize(parse(body), event_id="evt_1", received_at=datetime.now(UTC), carriers=Carriers({}))
    word = word_of(event)
    if word is None:
        return None
    assert (word.texter, word.short_code) == ("+" + TEXTER, SHORT_CODE)
    return word.opted_out, word.word


# ---------------------------------------------------------------------------- the words (pure)


@pytest.mark.parametrize("word", sorted(OPT_OUT_WORDS))
@pytest.mark.parametrize("shape", ["{}", "{}.", "{}!", " {} ", '"{}"', "*{}*", "{}🙏"])
def test_every_opt_out_word_in_any_case_and_punctuation(word, shape):
    for cased in (word, word.lower(), word.capitalize()):
        assert said(mo(1, shape.format(cased))) == (True, word)


@pytest.mark.parametrize("word", sorted(OPT_IN_WORDS))
def test_every_opt_in_word(word):
    for cased in (word, word.lower(), word.capitalize() + "!"):
        assert said(mo(1, cased)) == (False, word)


@pytest.mark.parametrize(
    ("text", "keyword", "expected"),
    [
        ("stop texting me", None, (True, "STOP")),  # the keyword is the first word
        ("Please stop", None, None),  # not a keyword: Skycore would not take it as one either
        ("STOPPED by the store", None, None),
        ("Ending soon?", None, None),
        ("YESTERDAY was fine", None, None),
        ("ＳＴＯＰ", None, (True, "STOP")),  # full-width, as some phones send it
        ("stop", "PIZZA", (True, "STOP")),  # Skycore named another keyword: the text's first word still counts
        ("pizza", "stop", (True, "STOP")),
        ("START", "STOP", (True, "STOP")),  # the two disagree: the opt-out wins
        ("", None, None),
        ("hello", None, None),
    ],
)
def test_what_an_sms_says(text, keyword, expected):
    assert said(mo(1, text, keyword=keyword)) == expected


def test_sub_n302_opts_out_and_n301_back_in():
    assert said(sub("N302")) == (True, "N302")
    assert said(sub("N301")) == (False, "N301")
    for name in ("sub_n302_unsubscribed.xml", "sub_n301_subscribed.xml"):
        event = normalize(parse((DATA / "postbacks" / name).read_bytes()), event_id="e", received_at=datetime.now(UTC),
                          carriers=Carriers({}))  # fmt: skip
        word = word_of(event)
        assert word is not None and word.short_code == "123456" and word.opted_out == ("n302" in name)


def test_delivery_reports_and_other_subscriber_codes_say_nothing():
    report = (DATA / "postbacks" / "sms_mt_n202_delivered.xml").read_bytes()
    assert said(report) is None
    assert said(sub("N303")) is None


def test_bare():
    assert bare("¡STOP!") == "STOP" and bare("S-T-O-P") == "S-T-O-P" and bare("...") == ""


# ---------------------------------------------------------------------------- the ledger (both stores)


def row(opted_out: bool, at: float, word: str = "", texter: str = "+" + TEXTER, event: str = "e") -> OptOutRow:
    return OptOutRow(texter, SHORT_CODE, opted_out, word or ("STOP" if opted_out else "START"), at, event)


async def test_the_latest_word_wins_in_whatever_order_it_arrives(store: Store):  # noqa: F811
    assert await store.opted_out("+" + TEXTER, SHORT_CODE) is False  # never said anything
    await store.record_optout(row(True, 100.0, event="stop"))
    assert await store.opted_out("+" + TEXTER, SHORT_CODE) is True
    await store.record_optout(row(False, 50.0, event="old-start"))  # said before the STOP, arrived late
    assert await store.opted_out("+" + TEXTER, SHORT_CODE) is True
    await store.record_optout(row(False, 200.0, event="start"))
    assert await store.opted_out("+" + TEXTER, SHORT_CODE) is False
    await store.record_optout(row(True, 100.0, event="stop"))  # Skycore's retry of the old STOP
    assert await store.opted_out("+" + TEXTER, SHORT_CODE) is False
    await store.record_optout(row(True, 200.0, event="same-moment-stop"))  # a tie: the opt-out wins
    assert await store.opted_out("+" + TEXTER, SHORT_CODE) is True
    await store.record_optout(row(False, 200.0, event="same-moment-start"))
    assert await store.opted_out("+" + TEXTER, SHORT_CODE) is True
    assert await store.opted_out("+" + TEXTER, "99999") is False  # per short code
    assert await store.opted_out("+15550000000", SHORT_CODE) is False  # per texter


async def test_the_ledger_lists_newest_first_and_by_number(store: Store):  # noqa: F811
    await store.record_optout(row(True, 100.0, texter="+15550000001"))
    await store.record_optout(row(False, 300.0, texter="+15550000002"))
    await store.record_optout(OptOutRow("+15550000001", "777", True, "N302", 200.0, "e2"))
    listed = await store.list_optouts()
    assert [(r.texter, r.short_code, r.opted_out) for r in listed] == [
        ("+15550000002", SHORT_CODE, False),
        ("+15550000001", "777", True),
        ("+15550000001", SHORT_CODE, True),
    ]
    assert [r.short_code for r in await store.list_optouts("+15550000001")] == ["777", SHORT_CODE]
    assert [r.texter for r in await store.list_optouts("777")] == ["+15550000001"]
    assert listed[1].as_json() == {
        "texter": "+15550000001", "short_code": "777", "opted_out": True, "word": "N302",
        "at": "1970-01-01T00:03:20.000Z", "event_id": "e2",
    }  # fmt: skip


# ---------------------------------------------------------------------------- the bridge


@pytest.fixture
async def client(aiohttp_client, tmp_path: Path) -> Any:
    config = build(
        {"store": f"sqlite:///{tmp_path / 'bridge.db'}", "default": ["crm"],
         "destinations": {"crm": {"type": "log", "path": str(tmp_path / "log")}}},
        environ={},
    )  # fmt: skip
    return await aiohttp_client(create_app(config))


async def ledger(client: Any, number: str | None = None) -> list[dict[str, Any]]:
    response = await client.get("/admin/optouts" + (f"?number={number}" if number else ""))
    assert response.status == 200
    return (await response.json())["optouts"]


async def test_stop_then_start_through_the_postback_path(client):
    kept = client.app[RUNTIME].store
    stop = await client.post("/postback", data=mo(1, "Stop.", at="2026-12-01T10:00:00Z"))
    assert stop.status == 200
    stop_id = (await stop.json())["id"]
    assert await kept.opted_out("+" + TEXTER, SHORT_CODE) is True
    (entry,) = await ledger(client, TEXTER)  # without the +
    assert entry == {"texter": "+" + TEXTER, "short_code": SHORT_CODE, "opted_out": True, "word": "STOP",
                     "at": "2026-12-01T10:00:00.000Z", "event_id": stop_id}  # fmt: skip

    assert (await client.post("/postback", data=mo(2, "start", at="2026-12-01T11:00:00Z"))).status == 200
    assert await kept.opted_out("+" + TEXTER, SHORT_CODE) is False
    # Skycore sends the old STOP again (it did not see our 200): a duplicate, and still START
    again = await client.post("/postback", data=mo(1, "Stop.", at="2026-12-01T10:00:00Z"))
    assert (await again.json())["status"] == "duplicate"
    assert await kept.opted_out("+" + TEXTER, SHORT_CODE) is False
    assert [e["word"] for e in await ledger(client)] == ["START"]

    assert (await client.post("/postback", data=sub("N302", at="2026-12-01T12:00:00Z"))).status == 200
    assert await kept.opted_out("+" + TEXTER, SHORT_CODE) is True
    assert (await client.post("/postback", data=mo(3, "hello", at="2026-12-01T13:00:00Z"))).status == 200
    assert await kept.opted_out("+" + TEXTER, SHORT_CODE) is True  # talking is not opting back in
    assert (await client.post("/postback", data=sub("N301", at="2026-12-01T14:00:00Z"))).status == 200
    assert await kept.opted_out("+" + TEXTER, SHORT_CODE) is False
    assert await ledger(client, "15550000000") == []


async def test_a_stop_whose_ledger_write_fails_is_not_acknowledged(client, monkeypatch):
    kept = client.app[RUNTIME].store
    from bridge.errors import StoreError

    async def broken(row: OptOutRow) -> None:
        raise StoreError("disk full")

    monkeypatch.setattr(kept, "record_optout", broken)
    refused = await client.post("/postback", data=mo(1, "STOP"))
    assert refused.status == 503  # Skycore sends it again
    monkeypatch.undo()
    again = await client.post("/postback", data=mo(1, "STOP"))
    assert again.status == 200 and (await again.json())["status"] == "duplicate"
    assert await kept.opted_out("+" + TEXTER, SHORT_CODE) is True


async def test_the_cli_lists_the_ledger(bridge_factory):
    bridge = bridge_factory({"destinations": {"out": {"type": "log"}}, "default": ["out"]})
    bridge.start()
    status, _ = await post(bridge.url + "/postback", mo(1, "STOP"))
    assert status == 200
    status, _ = await post(bridge.url + "/postback", mo(2, "unstop", sender="15550000009"))
    assert status == 200
    assert bridge.stop() == 0
    table = bridge.cli("optouts", "-c", str(bridge.config_path)).stdout.splitlines()
    assert table[0].split() == ["TEXTER", "SHORT", "CODE", "STATE", "WORD", "AT", "EVENT"]
    assert sorted(line.split()[:5] for line in table[1:]) == [
        ["+15550000009", SHORT_CODE, "opted", "in", "UNSTOP"],
        ["+" + TEXTER, SHORT_CODE, "opted", "out", "STOP"],
    ]
    only = json.loads(bridge.cli("optouts", "-c", str(bridge.config_path), "--number", TEXTER, "--json").stdout)
    assert [(r["texter"], r["opted_out"]) for r in only] == [("+" + TEXTER, True)]
