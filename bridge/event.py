"""Postback fields -> the normalized event (CONTRACT §5). Pure: no I/O."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from bridge.carriers import Carriers
from bridge.digits import is_digits
from bridge.postback import Fields

Event = dict[str, Any]

_TYPES = {
    "SMS_MO": "sms.received",
    "MMS_MO": "mms.received",
    "SMS_MT": "sms.status",
    "MMS_MT": "mms.status",
}
_CODE_TYPES = {
    ("SUB", "N301"): "subscriber.opted_in",
    ("SUB", "N302"): "subscriber.opted_out",
    ("EMAIL_SUB", "N303"): "email_subscriber.opted_in",
    ("EMAIL_SUB", "N304"): "email_subscriber.opted_out",
}
UNKNOWN_TYPE = "postback.received"  # an ORIGIN (or SUB code) we do not know: forwarded as is
REPLY_TYPE = "sms.reply"  # a person's answer from Slack, to be sent to the texter (CONTRACT §7)
ORIGINS = frozenset({*_TYPES, *(origin for origin, _ in _CODE_TYPES)})  # the ORIGINs Skycore documents
TYPES = frozenset({*_TYPES.values(), *_CODE_TYPES.values(), UNKNOWN_TYPE, REPLY_TYPE})


def says_delivered_or_failed(event: Event) -> bool:
    """An SMS delivery report that a reply's thread shows (CONTRACT §7): SMS_MT N202
    (delivered) or an `E` code (failed), naming the TRACKINGID its send was given."""
    if event["type"] != "sms.status" or not event.get("tracking_id"):
        return False
    code = (event.get("code") or "").upper()
    return code == "N202" or code.startswith("E")


def text_of(value: Any) -> str | None:
    """An element's text as sent; None when absent. Mixed content keeps its text part."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        inner = value.get("#text")
        return inner if isinstance(inner, str) else None
    if isinstance(value, list) and value:
        return text_of(value[0])
    return None


def _stripped(fields: Fields, name: str) -> str | None:
    value = text_of(fields.get(name))
    if value is None:
        return None
    value = value.strip()
    return value or None


def phone(value: str | None) -> str | None:
    """E.164 for numbers of 10+ digits; short codes and anything else as they are."""
    if value is None:
        return None
    digits = value[1:] if value.startswith("+") else value
    if len(digits) >= 10 and is_digits(digits):  # E.164 has ASCII digits only
        return "+" + digits
    return value


def parse_time(value: str | None) -> datetime | None:
    """ISO 8601 in UTC. Hour-only offsets (`-04`) are fine; no offset at all is taken as UTC.
    None when it does not parse, or when it is outside the years 1-9999 once in UTC."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace(" ", "T", 1))
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # 9999-12-31T23:00:00-04:00 is past year 9999 in UTC
        return None


def format_time(moment: datetime, *, millis: bool = False) -> str:
    m = moment.astimezone(UTC)  # f-string, not strftime: this runs for every postback
    stamp = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
    return f"{stamp}.{m.microsecond // 1000:03d}Z" if millis else f"{stamp}Z"


def event_type(origin: str, code: str | None) -> str:
    origin, code = origin.upper(), (code or "").upper()
    if origin in _TYPES:
        return _TYPES[origin]
    return _CODE_TYPES.get((origin, code), UNKNOWN_TYPE)


def _media(fields: Fields) -> list[dict[str, str]]:
    content = fields.get("CONTENT")
    if not isinstance(content, dict):
        return []
    files = content.get("FILE", [])
    urls = (text_of(f) for f in (files if isinstance(files, list) else [files]))
    return [{"url": url.strip()} for url in urls if url and url.strip()]


def _keyword(fields: Fields, text: str | None) -> str | None:
    keyword = _stripped(fields, "KEYWORD")
    if keyword is None and text:
        words = text.split(None, 1)
        keyword = words[0] if words else None
    return keyword.upper() if keyword else None


def normalize(fields: Fields, *, event_id: str, received_at: datetime, carriers: Carriers) -> Event:
    origin = _stripped(fields, "ORIGIN") or ""
    code = _stripped(fields, "CODE")
    if origin.upper() in ("SUB", "EMAIL_SUB"):  # MOBILE and SHORTCODE; FROM and TO if that is all they carry
        sender = _stripped(fields, "MOBILE") or _stripped(fields, "FROM")
        recipient = _stripped(fields, "SHORTCODE") or _stripped(fields, "TO")
    else:
        sender, recipient = _stripped(fields, "FROM"), _stripped(fields, "TO")
    text = text_of(fields.get("TEXT"))
    spid = _stripped(fields, "SPID")
    occurred = parse_time(_stripped(fields, "RECEIVED") or _stripped(fields, "TIMESTAMP"))
    return {
        "id": event_id,
        "type": event_type(origin, code),
        "origin": origin,
        "code": code,
        "from": phone(sender),
        "to": phone(recipient),
        "keyword": _keyword(fields, text),
        "text": text,
        "subject": text_of(fields.get("SUBJECT")),
        "media": _media(fields),
        "spid": spid,
        "carrier": carriers.lookup(spid),
        "transaction_id": _stripped(fields, "TRANSACTIONID"),
        "tracking_id": _stripped(fields, "TRACKINGID"),
        "occurred_at": format_time(occurred) if occurred else None,
        "received_at": format_time(received_at, millis=True),
        "fields": fields,
    }


# Keys this version makes start with it. Those of earlier versions are 64 bare hex digits: the
# two can never be equal, so a stored event keeps its old key and no new event can match it by
# accident (CONTRACT §6: events stored under an earlier version's key keep it).
KEY_VERSION = "v2:"


def dedup_key(event: Event) -> str:
    """CONTRACT §6: ORIGIN and CODE, plus TRANSACTIONID if present, else TRACKINGID, else a
    digest of every field as sent.

    CODE is in it because Skycore reuses an id across the steps of one story: the N201 "sent"
    and the N202 "delivered" report of one message share a TRACKINGID. A postback with neither
    id (SUB, EMAIL_SUB, an SMS_MO of an old account) is told apart by all of its fields, so two
    opt-ins that differ only in EMAIL, MOBILE or CAMPAIGNID are two events, while Skycore's retry,
    byte for byte the same, is one. The digest is of the fields as parsed (names sorted, values
    as sent, repeated elements in their order), not of the body: its shape (the 2014 wrapper,
    indentation, a form or raw XML) does not change it."""
    if event["transaction_id"]:
        parts = ["tx", event["transaction_id"]]
    elif event["tracking_id"]:
        parts = ["trk", event["tracking_id"]]
    else:
        parts = ["fields", json.dumps(event["fields"], sort_keys=True, ensure_ascii=True, separators=(",", ":"))]
    raw = "\x1f".join([event["origin"], event["code"] or "", *parts])  # XML text cannot hold \x1f
    return KEY_VERSION + hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()
