"""Postback fields -> the normalized event (CONTRACT §5), its dedup key (§6) and its id."""

from __future__ import annotations

import csv
import json
import re
import time
from datetime import UTC, datetime
from urllib.parse import urlencode

import pytest

from bridge.carriers import Carriers
from bridge.event import KEY_VERSION, dedup_key, normalize, parse_time, phone
from bridge.ids import _encode, event_id, timestamp, ulid
from bridge.postback import parse
from tests.conftest import POSTBACKS, SPID_TABLE, dedup_key_v1
from tests.golden import regen

RECEIVED = datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC)
CARRIERS = Carriers()


def event_of(xml: str | bytes, carriers: Carriers = CARRIERS, event_id: str = "evt_TEST") -> dict:
    body = xml.encode() if isinstance(xml, str) else xml
    return normalize(parse(body), event_id=event_id, received_at=RECEIVED, carriers=carriers)


def postback(**elements: str) -> str:
    """A postback with these elements, in order; ORIGIN defaults to SMS_MO."""
    elements = {"ORIGIN": "SMS_MO", **elements}
    return "<POSTBACK>" + "".join(f"<{k}>{v}</{k}>" for k, v in elements.items()) + "</POSTBACK>"


# ---------------------------------------------------------------------------- golden files


@pytest.mark.parametrize("source", regen.inputs(), ids=lambda p: p.name)
def test_golden(source):
    expected = json.loads(regen.expected_path(source).read_text(encoding="utf-8"))
    event = event_of(source.read_bytes())
    assert {k: v for k, v in event.items() if k not in regen.VOLATILE} == expected


def test_every_input_has_a_golden_file_and_every_golden_file_an_input():
    inputs = regen.inputs()
    assert len(inputs) >= len(list(POSTBACKS.glob("*.xml"))) + 4  # the reference set and both seeds' examples
    golden = {p.name for p in regen.HERE.glob("*.json")}
    assert golden == {regen.expected_path(p).name for p in inputs}


def test_the_seed_examples_in_the_inputs_are_those_of_the_seed_pages():
    for name, xml in regen.seed_inputs().items():
        assert (regen.INPUTS / name).read_text(encoding="utf-8") == xml


def test_the_first_seed_keeps_its_html_entities_decoded():
    xml = (regen.INPUTS / "seed000_2_mms_mo.xml").read_text(encoding="utf-8")
    assert "<FILE>…URL of Content Here…</FILE>" in xml
    assert "<br" not in xml and "&lt;" not in xml


def test_event_has_exactly_the_contract_keys_in_order():
    event = event_of((POSTBACKS / "sms_mo_transactionid.xml").read_bytes())
    assert list(event) == [
        "id", "type", "origin", "code", "from", "to", "keyword", "text", "subject", "media", "spid",
        "carrier", "transaction_id", "tracking_id", "occurred_at", "received_at", "fields",
    ]  # fmt: skip
    assert event["id"] == "evt_TEST"
    assert event["received_at"] == "2026-11-22T10:00:00.123Z"


def test_event_is_json_as_is():
    event = event_of((POSTBACKS / "mms_mo_subject.xml").read_bytes())
    assert json.loads(json.dumps(event)) == event


# ---------------------------------------------------------------------------- type

TYPES = [
    ("SMS_MO", "N211", "sms.received"),
    ("SMS_MO", "N999", "sms.received"),  # the type comes from ORIGIN
    ("SMS_MO", None, "sms.received"),
    ("MMS_MO", "N401", "mms.received"),
    ("SMS_MT", "N202", "sms.status"),
    ("SMS_MT", "N203", "sms.status"),
    ("MMS_MT", "N501", "mms.status"),
    ("SUB", "N301", "subscriber.opted_in"),
    ("SUB", "N302", "subscriber.opted_out"),
    ("SUB", "N303", "postback.received"),  # an EMAIL_SUB code under SUB
    ("SUB", "N399", "postback.received"),
    ("SUB", None, "postback.received"),
    ("EMAIL_SUB", "N303", "email_subscriber.opted_in"),
    ("EMAIL_SUB", "N304", "email_subscriber.opted_out"),
    ("EMAIL_SUB", "N301", "postback.received"),
    ("VOICE_MO", "N601", "postback.received"),
    ("SOMETHING_NEW", None, "postback.received"),
    ("sms_mo", "N211", "sms.received"),
    (" SUB ", " N302 ", "subscriber.opted_out"),
]


@pytest.mark.parametrize(("origin", "code", "expected"), TYPES)
def test_type(origin, code, expected):
    elements = {"ORIGIN": origin} | ({"CODE": code} if code is not None else {})
    event = event_of(postback(**elements))
    assert event["type"] == expected
    assert event["origin"] == origin.strip()
    assert event["code"] == (code.strip() if code else None)


def test_unknown_origin_keeps_every_field():
    event = event_of(postback(ORIGIN="VOICE_MO", CODE="N601", CALLER="15552312102", SECONDS="12"))
    assert event["type"] == "postback.received"
    assert event["fields"] == {"ORIGIN": "VOICE_MO", "CODE": "N601", "CALLER": "15552312102", "SECONDS": "12"}
    assert event["from"] is None and event["to"] is None and event["occurred_at"] is None


# ---------------------------------------------------------------------------- from, to

PHONES = [
    ("15552312102", "+15552312102"),  # 11 digits
    ("5552312102", "+5552312102"),  # 10 digits
    ("447700900123", "+447700900123"),
    ("+15552312102", "+15552312102"),
    (" 15552312102\n", "+15552312102"),
    ("86717", "86717"),  # short codes stay as they are
    ("123456", "123456"),
    ("555231210", "555231210"),  # 9 digits is not a phone number we can vouch for
    ("1-555-231-2102", "1-555-231-2102"),
    ("alice@example.com", "alice@example.com"),
    (
        "\uff11\uff15\uff15\uff15\uff12\uff13\uff11\uff12\uff11\uff10\uff12",
        "\uff11\uff15\uff15\uff15\uff12\uff13\uff11\uff12\uff11\uff10\uff12",
    ),  # full-width digits are not E.164's
    (
        "\u0661\u0665\u0665\u0665\u0662\u0663\u0661\u0662\u0661\u0660\u0662",
        "\u0661\u0665\u0665\u0665\u0662\u0663\u0661\u0662\u0661\u0660\u0662",
    ),  # nor Arabic-Indic ones
    ("", None),
]


@pytest.mark.parametrize(("raw", "expected"), PHONES)
def test_from_and_to(raw, expected):
    event = event_of(postback(FROM=raw, TO=raw))
    assert event["from"] == expected
    assert event["to"] == expected


def test_phone_of_nothing():
    assert phone(None) is None


def test_sub_takes_mobile_and_shortcode():
    event = event_of(postback(ORIGIN="SUB", CODE="N301", MOBILE="16501112222", SHORTCODE="12345", FROM="1", TO="2"))
    assert (event["from"], event["to"]) == ("+16501112222", "12345")


def test_email_sub_takes_mobile_and_shortcode_too():
    event = event_of(postback(ORIGIN="EMAIL_SUB", CODE="N303", MOBILE="16501112222", SHORTCODE="74700"))
    assert (event["type"], event["from"], event["to"]) == ("email_subscriber.opted_in", "+16501112222", "74700")


@pytest.mark.parametrize("origin", ["SUB", "EMAIL_SUB"])
def test_an_opt_in_with_only_from_and_to_keeps_them(origin):
    event = event_of(postback(ORIGIN=origin, CODE="N301", FROM="16501112222", TO="74700"))
    assert (event["from"], event["to"]) == ("+16501112222", "74700")


def test_mt_from_is_the_short_code_and_to_the_phone():
    event = event_of((POSTBACKS / "sms_mt_n202_delivered.xml").read_bytes())
    assert (event["from"], event["to"]) == ("60856", "+16503333058")


# ---------------------------------------------------------------------------- keyword, text, subject

KEYWORDS = [
    ({"TEXT": "STOP"}, "STOP"),
    ({"TEXT": "stop"}, "STOP"),
    ({"TEXT": "Join the club"}, "JOIN"),
    ({"TEXT": "  \n join\tnow"}, "JOIN"),
    ({"TEXT": "contest\nentry"}, "CONTEST"),
    ({"TEXT": ""}, None),
    ({"TEXT": "   "}, None),
    ({}, None),
    ({"KEYWORD": "testoffer"}, "TESTOFFER"),
    ({"KEYWORD": " all "}, "ALL"),
    ({"KEYWORD": "all", "TEXT": "something else"}, "ALL"),  # KEYWORD wins over TEXT
    ({"KEYWORD": "", "TEXT": "Win big"}, "WIN"),  # an empty KEYWORD is no keyword
    ({"KEYWORD": "", "TEXT": ""}, None),
    ({"SUBJECT": "Hello there"}, None),  # not from the subject
]


@pytest.mark.parametrize(("elements", "expected"), KEYWORDS)
def test_keyword(elements, expected):
    assert event_of(postback(ORIGIN="MMS_MO", **elements))["keyword"] == expected


@pytest.mark.parametrize("text", ["STOP", "  Hello \n world  ", "\tline one\r\nline two\n", "café ☕", "", " "])
def test_text_is_kept_as_sent(text):
    assert event_of(postback(TEXT=text))["text"] == text.replace("\r\n", "\n")  # XML normalizes line ends


def test_text_and_subject_are_null_when_absent():
    event = event_of(postback(FROM="15552312102"))
    assert event["text"] is None and event["subject"] is None


def test_subject():
    assert event_of((POSTBACKS / "mms_mo_subject.xml").read_bytes())["subject"] == "Hello there"


# ---------------------------------------------------------------------------- media

MEDIA = [
    ("<CONTENT><FILE>https://m/1.jpg</FILE></CONTENT>", ["https://m/1.jpg"]),
    ("<CONTENT><FILE>https://m/1.jpg</FILE><FILE>https://m/2.txt</FILE><FILE>https://m/3.smil</FILE></CONTENT>",
     ["https://m/1.jpg", "https://m/2.txt", "https://m/3.smil"]),
    ("<CONTENT>\n  <FILE>\n  https://m/1.jpg  \n</FILE>\n</CONTENT>", ["https://m/1.jpg"]),
    ("<CONTENT></CONTENT>", []),
    ("<CONTENT/>", []),
    ("<CONTENT><FILE/><FILE>https://m/2.jpg</FILE></CONTENT>", ["https://m/2.jpg"]),
    ("", []),
]  # fmt: skip


@pytest.mark.parametrize(("content", "urls"), MEDIA)
def test_media(content, urls):
    body = f"<POSTBACK><ORIGIN>MMS_MO</ORIGIN>{content}</POSTBACK>"
    event = event_of(body)
    assert event["media"] == [{"url": u} for u in urls]


def test_fields_keep_file_as_a_list_even_for_one():
    event = event_of("<POSTBACK><ORIGIN>MMS_MO</ORIGIN><CONTENT><FILE>https://m/1.jpg</FILE></CONTENT></POSTBACK>")
    assert event["fields"]["CONTENT"] == {"FILE": ["https://m/1.jpg"]}


# ---------------------------------------------------------------------------- spid, carrier


@pytest.mark.parametrize(
    ("spid", "carrier"),
    [
        ("0001470", "AT&T"),
        ("0001650", "Sprint"),
        ("1470", "AT&T"),  # leading zeros dropped by the sender
        (" 0001470 ", "AT&T"),
        ("9999999", None),
        ("", None),
        ("abc", None),
    ],
)
def test_carrier_from_the_builtin_table(spid, carrier):
    event = event_of(postback(ORIGIN="MMS_MO", SPID=spid))
    assert event["carrier"] == carrier
    assert event["spid"] == (spid.strip() or None)


def test_every_spid_of_skycores_table_gives_its_carrier_as_the_table_names_it():
    """Appendix E as Skycore ships it (tests/data/skycore-spid.csv): "All Carriers" rows included, as the
    table says it; where an SPID is listed twice, its first row."""
    with SPID_TABLE.open(encoding="utf-8") as table:
        rows = list(csv.DictReader(table))
    expected: dict[str, str] = {}
    for row in rows:
        expected.setdefault(row["spid"], row["carrier"])
    assert len(expected) > 500
    got = {spid: event_of(postback(ORIGIN="MMS_MO", SPID=spid))["carrier"] for spid in expected}
    assert got == expected


def test_no_spid_no_carrier():
    event = event_of(postback())
    assert event["spid"] is None and event["carrier"] is None


def test_carriers_extended_and_overridden_by_config():
    carriers = Carriers({"0009999": "Local Telco", "1470": "AT&T Mobility", "abc": "Lettered"})
    assert event_of(postback(SPID="9999"), carriers)["carrier"] == "Local Telco"
    assert event_of(postback(SPID="0001470"), carriers)["carrier"] == "AT&T Mobility"
    assert event_of(postback(SPID="0001650"), carriers)["carrier"] == "Sprint"  # the rest of the table stays
    assert event_of(postback(SPID="abc"), carriers)["carrier"] == "Lettered"
    assert event_of(postback(SPID="0001470"))["carrier"] == "AT&T"  # the built-in table is not changed


# ---------------------------------------------------------------------------- occurred_at

TIMES = [
    ("2011-09-28T17:31:02-04:00", "2011-09-28T21:31:02Z"),
    ("2014-07-02T14:32:23-04", "2014-07-02T18:32:23Z"),  # hour-only offset
    ("2014-07-02T14:32:23+0530", "2014-07-02T09:02:23Z"),
    ("2014-07-02T14:32:23Z", "2014-07-02T14:32:23Z"),
    ("2014-07-02T14:32:23+00:00", "2014-07-02T14:32:23Z"),
    ("2014-07-02T14:32:23", "2014-07-02T14:32:23Z"),  # no offset: taken as UTC
    ("2014-07-02 14:32:23-04:00", "2014-07-02T18:32:23Z"),
    ("2014-07-02T14:32:23.987-04:00", "2014-07-02T18:32:23Z"),
    ("2014-12-31T22:00:00-04:00", "2015-01-01T02:00:00Z"),  # across a year
    (" 2014-07-02T14:32:23-04 ", "2014-07-02T18:32:23Z"),
    ("9999-12-31T23:59:59Z", "9999-12-31T23:59:59Z"),
    ("yesterday", None),
    ("2014-13-02T00:00:00", None),
    ("9999-12-31T23:59:59-14:00", None),  # past year 9999 once in UTC: null, not an error
    ("0001-01-01T00:00:00+14:00", None),  # before year 1 once in UTC
    ("", None),
]


@pytest.mark.parametrize(("raw", "expected"), TIMES)
def test_occurred_at_from_received(raw, expected):
    assert event_of(postback(RECEIVED=raw))["occurred_at"] == expected


@pytest.mark.parametrize(("raw", "expected"), TIMES)
def test_occurred_at_from_timestamp(raw, expected):
    assert event_of(postback(ORIGIN="SUB", TIMESTAMP=raw))["occurred_at"] == expected


def test_received_wins_over_timestamp():
    event = event_of(postback(RECEIVED="2011-01-01T00:00:00Z", TIMESTAMP="2012-01-01T00:00:00Z"))
    assert event["occurred_at"] == "2011-01-01T00:00:00Z"


def test_no_time_is_null():
    assert event_of(postback())["occurred_at"] is None


def test_parse_time_of_nothing():
    assert parse_time(None) is None


# ---------------------------------------------------------------------------- fields


def test_fields_are_the_postback_as_sent():
    xml = postback(CODE="N211", FROM="15552312102", TEXT=" Hi ", EMPTY="", NEW_FIELD="kept")
    assert event_of(xml)["fields"] == {
        "ORIGIN": "SMS_MO",
        "CODE": "N211",
        "FROM": "15552312102",
        "TEXT": " Hi ",
        "EMPTY": "",
        "NEW_FIELD": "kept",
    }


def test_same_field_names_with_or_without_the_wrapper():
    plain = event_of((POSTBACKS / "mms_mo_v1.3.xml").read_bytes())
    wrapped_xml = (POSTBACKS / "mms_mo_v1.3.xml").read_text().replace("<POSTBACK>", "<POSTBACK><NOTIFICATION>")
    wrapped = event_of(wrapped_xml.replace("</POSTBACK>", "</NOTIFICATION></POSTBACK>"))
    assert wrapped == plain


# ---------------------------------------------------------------------------- dedup key (CONTRACT §6)

SMS_TX = postback(CODE="N211", FROM="15552312102", TO="86717", TEXT="STOP", RECEIVED="2011-09-28T17:31:02-04:00",
                  TRANSACTIONID="TX-1")  # fmt: skip
SMS_PLAIN = postback(CODE="N211", FROM="15552312102", TO="86717", TEXT="STOP", RECEIVED="2011-09-28T17:31:02-04:00")
MMS_TRK = postback(ORIGIN="MMS_MO", FROM="15552312102", TO="86717", TRACKINGID="MMS_MO_1",
                   TIMESTAMP="2011-09-28T15:25:30-04:00")  # fmt: skip
SENT = (
    (POSTBACKS / "sms_mt_n202_delivered.xml")
    .read_text()
    .replace("N202", "N201")
    .replace("Message Sent/Delivered", "Message Sent")
)
DELIVERED = (POSTBACKS / "sms_mt_n202_delivered.xml").read_text()
OPT_IN = (POSTBACKS / "sub_n301_subscribed.xml").read_text()
EMAIL_IN = postback(ORIGIN="EMAIL_SUB", CODE="N303", EMAIL="ann@example.com", CAMPAIGNID="1478",
                    TIMESTAMP="2014-07-02T14:32:23-04", SHORTCODE="123456", SOURCE="WEB")  # fmt: skip


def key(xml: str, **kwargs) -> str:
    return dedup_key(event_of(xml, **kwargs))


def test_the_same_postback_sent_again_is_a_duplicate():
    for xml in (SMS_TX, SMS_PLAIN, MMS_TRK, SENT, DELIVERED, OPT_IN, EMAIL_IN):
        assert key(xml, event_id="evt_A") == key(xml, event_id="evt_B")


def test_the_key_does_not_depend_on_when_the_bridge_received_it():
    for xml in (SMS_TX, SMS_PLAIN, EMAIL_IN):
        first = normalize(parse(xml.encode()), event_id="evt_A", received_at=RECEIVED, carriers=CARRIERS)
        later = normalize(parse(xml.encode()), event_id="evt_B", received_at=datetime.now(UTC), carriers=CARRIERS)
        assert dedup_key(first) == dedup_key(later)


@pytest.mark.parametrize("xml", [SMS_TX, SMS_PLAIN, EMAIL_IN, OPT_IN], ids=["tx", "plain", "email_sub", "sub"])
def test_the_key_does_not_depend_on_the_shape(xml):
    """The digest is of the fields, not of the body: wrapper, indentation, XML declaration, BOM
    and a form's `xml` field all give the same key."""
    indented = xml.replace("><", ">\n  <")
    wrapped = xml.replace("<POSTBACK>", "<POSTBACK><NOTIFICATION>").replace("</POSTBACK>", "</NOTIFICATION></POSTBACK>")
    declared = "\ufeff<?xml version='1.0'?>" + xml.removeprefix("<?xml version='1.0'?>")
    form = dedup_key(normalize(parse(urlencode({"xml": xml}).encode()), event_id="evt_F", received_at=RECEIVED,
                               carriers=CARRIERS))  # fmt: skip
    assert key(xml) == key(indented) == key(wrapped) == key(declared) == form


def test_transaction_id_decides_with_origin_and_code():
    assert key(SMS_TX) == key(SMS_TX.replace("STOP", "HELLO").replace("17:31:02", "18:00:00"))
    assert key(SMS_TX) != key(SMS_TX.replace("TX-1", "TX-2"))
    assert key(SMS_TX) != key(SMS_TX.replace("N211", "N212"))


def test_transaction_id_wins_over_tracking_id():
    a = postback(TRANSACTIONID="TX-1", TRACKINGID="T-1")
    assert key(a) == key(postback(TRANSACTIONID="TX-1", TRACKINGID="T-2"))
    assert key(a) != key(postback(TRANSACTIONID="TX-2", TRACKINGID="T-1"))


def test_tracking_id_decides_with_origin_and_code_when_there_is_no_transaction_id():
    assert key(MMS_TRK) == key(MMS_TRK.replace("15:25:30", "16:00:00"))
    assert key(MMS_TRK) != key(MMS_TRK.replace("MMS_MO_1", "MMS_MO_2"))
    assert key(MMS_TRK) != key(MMS_TRK.replace("<TRACKINGID>", "<CODE>N401</CODE><TRACKINGID>"))


def test_the_sent_and_the_delivered_report_of_one_message_are_two_events():
    """Issue 17: the N202 of a message was answered `duplicate` of its N201 (same TRACKINGID)."""
    assert event_of(SENT)["tracking_id"] == event_of(DELIVERED)["tracking_id"] == "U01TXzgwNjc4"
    assert key(SENT) != key(DELIVERED)
    assert key(DELIVERED) != key(DELIVERED.replace("N202", "E210"))  # a failure report after it, too


def test_two_email_subs_of_two_addresses_are_two_events():
    """Issue 17: EMAIL_SUBs have no FROM, TO or TEXT, so every one after the first shared its key."""
    assert key(EMAIL_IN) != key(EMAIL_IN.replace("ann@example.com", "bob@example.com"))
    assert key(EMAIL_IN) != key(EMAIL_IN.replace("N303", "N304"))


@pytest.mark.parametrize(
    ("old", "new"), [("16501112222", "16501113333"), ("1478", "1479")], ids=["MOBILE", "CAMPAIGNID"]
)
def test_two_subs_that_differ_in_one_field_are_two_events(old, new):
    assert key(OPT_IN) != key(OPT_IN.replace(old, new, 1))


def test_origin_is_part_of_the_key():
    assert key(SMS_TX) != key(SMS_TX.replace("SMS_MO", "SMS_MT"))
    assert key(MMS_TRK) != key(MMS_TRK.replace("MMS_MO</ORIGIN>", "MMS_MT</ORIGIN>"))
    assert key(EMAIL_IN) != key(EMAIL_IN.replace("EMAIL_SUB", "SUB"))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("15552312102", "15552312103"),  # FROM
        ("86717", "86718"),  # TO
        ("STOP", "STOP "),  # TEXT, whitespace included
        ("STOP", "stop"),
        ("17:31:02", "17:31:03"),  # RECEIVED
        ("N211", "N212"),  # CODE
        ("</POSTBACK>", "<EXTRA>1</EXTRA></POSTBACK>"),  # a field the bridge does not know
        ("</POSTBACK>", "<EXTRA></EXTRA></POSTBACK>"),  # an empty one
        ("<TEXT>STOP</TEXT>", "<TEXT>STOP</TEXT><TEXT>STOP</TEXT>"),  # a repeated one
    ],
)
def test_without_ids_every_field_decides(old, new):
    assert key(SMS_PLAIN) != key(SMS_PLAIN.replace(old, new, 1))


def test_without_ids_nested_fields_and_their_order_count():
    mms = postback(ORIGIN="MMS_MO", CODE="N401", FROM="15552312102",
                   CONTENT="<FILE>https://x/1.jpg</FILE><FILE>https://x/2.jpg</FILE>")  # fmt: skip
    assert key(mms) == key(mms)
    assert key(mms) != key(mms.replace("2.jpg", "3.jpg"))
    assert key(mms) != key(mms.replace("1.jpg</FILE><FILE>https://x/2.jpg", "2.jpg</FILE><FILE>https://x/1.jpg"))
    assert key(mms) != key(mms.replace("<CONTENT>", "<CONTENT><NAME>a</NAME>"))


def test_without_ids_names_and_values_cannot_run_into_each_other():
    assert key(postback(FROM="15552312102", TO="86717", TEXT="A B")) != key(
        postback(FROM="15552312102", TO="86717 A", TEXT="B")
    )
    assert key(postback(A="x", B="")) != key(postback(A="", B="x"))
    assert key(postback(A="B")) != key(postback(B="A"))


def test_without_ids_timestamp_counts():
    a = postback(
        ORIGIN="SUB", CODE="N301", MOBILE="16501112222", SHORTCODE="123456", TIMESTAMP="2014-07-02T14:32:23-04"
    )
    assert key(a) == key(a)
    assert key(a) != key(a.replace("14:32:23", "14:32:24"))


@pytest.mark.parametrize("name", ["TRANSACTIONID", "TRACKINGID"])
@pytest.mark.parametrize("empty", ["", "  "])
def test_empty_ids_are_no_ids(name, empty):
    """Postbacks whose id element is empty do not all share the key of that empty id."""
    assert key(postback(**{name: empty}, TEXT="x", FROM="1")) != key(postback(**{name: empty}, TEXT="y", FROM="1"))


def test_keys_of_this_version_cannot_be_those_of_an_earlier_one():
    """Events stored before keep their key (64 hex digits); the keys made now are marked."""
    for xml in (SMS_TX, MMS_TRK, SMS_PLAIN, DELIVERED, EMAIL_IN):
        made = key(xml)
        assert made.startswith(KEY_VERSION) and len(made) == len(KEY_VERSION) + 64
        assert made != dedup_key_v1(event_of(xml))
        assert re.fullmatch("[0-9a-f]{64}", dedup_key_v1(event_of(xml)))


# ---------------------------------------------------------------------------- event ids


def test_event_ids_are_unique_and_sort_in_creation_order():
    ids = [event_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(i.startswith("evt_") and len(i) == 30 for i in ids)


def test_event_ids_carry_their_time():
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    before = int(time.time() * 1000)
    made = event_id()
    millis = 0
    for char in made[4:14]:
        millis = millis * 32 + alphabet.index(char)
    assert before <= millis <= int(time.time() * 1000)
    assert timestamp(made) == millis / 1000  # what the delivery latency metric counts from


def test_ids_that_are_not_ulids_have_no_time():
    assert timestamp("evt_0001") is None
    assert timestamp("evt_" + "U" * 26) is None  # not Crockford base32
    assert timestamp(_encode((1_700_000_000_123 << 80) | 12345)) == 1_700_000_000.123


def test_later_ids_sort_after_earlier_ones():
    now = int(time.time() * 1000)  # no earlier id was made later than this
    first, second, later = ulid(now), ulid(now), ulid(now + 1)
    assert first < second < later
    assert first[:10] == second[:10] != later[:10]
