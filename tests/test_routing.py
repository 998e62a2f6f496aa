"""Event -> routes and destinations (CONTRACT §3): a pure function over a table of cases."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.carriers import Carriers
from bridge.config import build
from bridge.event import normalize
from bridge.postback import parse
from bridge.routing import Decision, route
from tests.conftest import POSTBACKS

DESTINATIONS = {name: {"type": "log"} for name in ("inbox", "crm", "compliance", "audit")}

# The CONTRACT §3 example.
CONTRACT_ROUTES = [
    {"name": "opt-out", "match": {"keyword": ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"]},
     "to": ["compliance", "crm"]},
    {"name": "contest", "match": {"origin": "MMS_MO", "keyword": "CONTEST"}, "to": ["inbox"], "continue": True},
    {"name": "main-shortcode", "match": {"shortcode": ["86717", "74700"]}, "to": ["inbox", "crm"]},
]  # fmt: skip


def decide(event: dict[str, Any], routes: list[dict], default: list[str] | None = None) -> Decision:
    raw: dict[str, Any] = {"destinations": DESTINATIONS, "routes": routes}
    if default is not None:
        raw["default"] = default
    config = build(raw, environ={})
    return route(event, config.routes, config.default)


def event(**elements: str) -> dict[str, Any]:
    elements = {"ORIGIN": "SMS_MO", "CODE": "N211", "FROM": "15552312102", "TO": "86717", **elements}
    xml = "<POSTBACK>" + "".join(f"<{k}>{v}</{k}>" for k, v in elements.items()) + "</POSTBACK>"
    return normalize(parse(xml.encode()), event_id="evt_T", received_at=datetime.now(UTC), carriers=Carriers())


def reference(name: str) -> dict[str, Any]:
    fields = parse((POSTBACKS / name).read_bytes())
    return normalize(fields, event_id="evt_T", received_at=datetime.now(UTC), carriers=Carriers())


# ---------------------------------------------------------------------------- the contract example

CONTRACT_CASES = [
    # (event, routes matched, destinations in order with the route that first named each)
    (event(TEXT="STOP"), ["opt-out"], [("compliance", "opt-out"), ("crm", "opt-out")]),
    (event(TEXT="stop please"), ["opt-out"], [("compliance", "opt-out"), ("crm", "opt-out")]),
    (event(TEXT="Quit"), ["opt-out"], [("compliance", "opt-out"), ("crm", "opt-out")]),
    (event(TEXT="STOPS"), ["main-shortcode"], [("inbox", "main-shortcode"), ("crm", "main-shortcode")]),
    (event(TEXT="hello"), ["main-shortcode"], [("inbox", "main-shortcode"), ("crm", "main-shortcode")]),
    (event(ORIGIN="MMS_MO", KEYWORD="contest"), ["contest", "main-shortcode"],
     [("inbox", "contest"), ("crm", "main-shortcode")]),
    (event(ORIGIN="MMS_MO", KEYWORD="contest", TO="11111"), ["contest"], [("inbox", "contest")]),
    (event(TEXT="CONTEST"), ["main-shortcode"], [("inbox", "main-shortcode"), ("crm", "main-shortcode")]),
    (event(TEXT="hello", TO="74700"), ["main-shortcode"], [("inbox", "main-shortcode"), ("crm", "main-shortcode")]),
    (reference("sms_mo_transactionid.xml"), ["opt-out"], [("compliance", "opt-out"), ("crm", "opt-out")]),
    (reference("mms_mo_v1.3.xml"), ["main-shortcode"], [("inbox", "main-shortcode"), ("crm", "main-shortcode")]),
]  # fmt: skip


@pytest.mark.parametrize(("evt", "routes", "destinations"), CONTRACT_CASES)
def test_contract_example(evt, routes, destinations):
    decision = decide(evt, CONTRACT_ROUTES, default=["audit"])
    assert list(decision.routes) == routes
    assert list(decision.destinations) == destinations
    assert not decision.defaulted


def test_unmatched_goes_to_default():
    decision = decide(event(TEXT="hello", TO="99999"), CONTRACT_ROUTES, default=["audit"])
    assert decision == Decision((), (("audit", "default"),), defaulted=True)


def test_unmatched_without_default_is_dropped():
    decision = decide(event(TEXT="hello", TO="99999"), CONTRACT_ROUTES)
    assert decision.routes == () and decision.dropped and not decision.defaulted


# ---------------------------------------------------------------------------- each match key

SMS = event(TEXT="Hello World", SPID="0001470")
SHORT_SPID = event(TEXT="Hello World", SPID="1470")
MMS = reference("mms_mo_v1.3.xml")  # SPID 0001650 (Sprint), no TEXT
SUB = reference("sub_n302_unsubscribed.xml")
MT = reference("sms_mt_n202_delivered.xml")

MATCH_CASES = [
    # (match, event, matches?)
    ({}, SMS, True),
    ({"origin": "SMS_MO"}, SMS, True),
    ({"origin": "sms_mo"}, SMS, True),
    ({"origin": ["MMS_MO", "SUB"]}, SMS, False),
    ({"origin": ["MMS_MO", "SUB"]}, SUB, True),
    ({"type": "subscriber.opted_out"}, SUB, True),
    ({"type": ["sms.status", "mms.status"]}, MT, True),
    ({"type": "sms.received"}, MT, False),
    ({"code": "N302"}, SUB, True),
    ({"code": "n202"}, MT, True),
    ({"code": "N301"}, SUB, False),
    ({"keyword": "hello"}, SMS, True),
    ({"keyword": "HELLO"}, SMS, True),
    ({"keyword": ["stop", "hello"]}, SMS, True),
    ({"keyword": "HELLO WORLD"}, SMS, False),  # the keyword is one word
    ({"keyword": "TESTOFFER"}, MMS, True),
    ({"keyword": "STOP"}, SUB, False),  # no keyword at all
    ({"shortcode": "86717"}, SMS, True),
    ({"shortcode": 86717}, SMS, True),  # YAML number
    ({"shortcode": "123456"}, SUB, True),  # SUB: the SHORTCODE
    ({"shortcode": "86718"}, SMS, False),
    ({"from": "+1555*"}, SMS, True),
    ({"from": "+15552312102"}, SMS, True),
    ({"from": ["+44*", "+1???2312102"]}, SMS, True),
    ({"from": "+1650*"}, SUB, True),  # SUB: the MOBILE
    ({"from": "+44*"}, SMS, False),
    ({"from": "60856"}, MT, True),  # a short code sender
    ({"text": "world"}, SMS, True),  # search, not full match
    ({"text": "^hello\\s+W"}, SMS, True),  # case-insensitive
    ({"text": "^world"}, SMS, False),
    ({"text": ["nope", "o w"]}, SMS, True),
    ({"text": "."}, MMS, False),  # no text never matches a text rule
    ({"spid": "0001470"}, SMS, True),
    ({"spid": "0001650"}, SMS, False),
    ({"spid": "0001650"}, MMS, True),
    ({"spid": 1470}, SMS, True),  # zero-padded like `carriers:` keys: the SPID 0001470
    ({"spid": "1470"}, SMS, True),
    ({"spid": [1650, 1470]}, SMS, True),
    ({"spid": 14700}, SMS, False),
    ({"spid": "0001470"}, SHORT_SPID, True),  # a sender that dropped the leading zeros
    ({"spid": 1470}, SHORT_SPID, True),
    ({"spid": "1470"}, SUB, False),  # no SPID at all
    ({"carrier": "AT&T"}, SMS, True),
    ({"carrier": "at&t"}, SMS, True),
    ({"carrier": ["Sprint", "Verizon"]}, MMS, True),
    ({"carrier": "Sprint"}, SUB, False),  # unknown carrier
    ({"origin": "MMS_MO", "keyword": "TESTOFFER", "shortcode": "86717", "spid": "0001650"}, MMS, True),
    ({"origin": "MMS_MO", "keyword": "TESTOFFER", "shortcode": "74700"}, MMS, False),  # all keys must hold
]


@pytest.mark.parametrize(("match", "evt", "matches"), MATCH_CASES)
def test_match(match, evt, matches):
    decision = decide(evt, [{"name": "r", "match": match, "to": ["crm"]}], default=["audit"])
    if matches:
        assert decision.routes == ("r",) and decision.destinations == (("crm", "r"),)
    else:
        assert decision.defaulted and decision.destinations == (("audit", "default"),)


def test_a_route_without_match_takes_everything():
    for evt in (SMS, MMS, SUB, MT):
        assert decide(evt, [{"name": "all", "to": ["crm"]}]).routes == ("all",)


# ---------------------------------------------------------------------------- order, continue, drop, default


def test_first_match_wins():
    routes = [
        {"name": "a", "match": {"origin": "SMS_MO"}, "to": ["inbox"]},
        {"name": "b", "match": {"origin": "SMS_MO"}, "to": ["crm"]},
    ]
    assert decide(SMS, routes).destinations == (("inbox", "a"),)


def test_continue_goes_on_to_later_routes_until_one_without_it():
    routes = [
        {"name": "a", "to": ["inbox"], "continue": True},
        {"name": "skip", "match": {"origin": "SUB"}, "to": ["audit"]},
        {"name": "b", "to": ["crm", "inbox"], "continue": True},
        {"name": "c", "to": ["compliance"]},
        {"name": "never", "to": ["audit"]},
    ]
    decision = decide(SMS, routes, default=["audit"])
    assert decision.routes == ("a", "b", "c")
    assert decision.destinations == (("inbox", "a"), ("crm", "b"), ("compliance", "c"))  # each destination once


def test_continue_on_the_last_matching_route_ends_the_walk():
    decision = decide(SMS, [{"name": "a", "to": ["inbox"], "continue": True}], default=["audit"])
    assert decision.routes == ("a",) and decision.destinations == (("inbox", "a"),) and not decision.defaulted


def test_to_empty_drops_on_purpose_and_skips_default():
    routes = [{"name": "quiet", "match": {"type": "sms.status"}, "to": []}, {"name": "all", "to": ["crm"]}]
    decision = decide(MT, routes, default=["audit"])
    assert decision.routes == ("quiet",)
    assert decision.dropped and not decision.defaulted


def test_to_empty_with_continue_still_reaches_later_routes():
    routes = [{"name": "tag", "to": [], "continue": True}, {"name": "all", "to": ["crm"]}]
    assert decide(SMS, routes).destinations == (("crm", "all"),)


def test_default_is_not_used_when_a_route_matched():
    decision = decide(SMS, [{"name": "a", "to": ["crm"]}], default=["audit"])
    assert "audit" not in dict(decision.destinations)


def test_default_names_each_destination_once():
    decision = decide(SMS, [], default=["audit", "crm", "audit"])
    assert decision.destinations == (("audit", "default"), ("crm", "default"))


def test_no_routes_no_default_drops():
    decision = decide(SMS, [])
    assert decision == Decision((), ()) and decision.dropped


def test_unnamed_routes_are_named_by_their_place():
    decision = decide(SMS, [{"match": {"origin": "SUB"}, "to": ["audit"]}, {"to": ["crm"]}])
    assert decision.destinations == (("crm", "routes[1]"),)


def test_a_long_code_written_as_skycore_sends_it_matches_the_e164_event():
    config = build(
        {
            "destinations": {"crm": {"type": "log"}},
            "routes": [{"name": "long", "match": {"shortcode": 15551234567}, "to": ["crm"]}],
        },
        environ={},
    )
    event = {**_EVENT_FOR_LONG_CODE, "to": "+15551234567"}
    assert route(event, config.routes, config.default).routes == ("long",)
    assert route({**event, "to": "+15551234568"}, config.routes, config.default).routes == ()


_EVENT_FOR_LONG_CODE = {
    "origin": "SMS_MO",
    "type": "sms.received",
    "code": "N211",
    "keyword": "HI",
    "from": "+15552312102",
    "spid": None,
    "carrier": None,
    "text": "hi",
}
