"""What a webhook receives, read back with the readers its receivers use (CONTRACT §6)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_structured_event
from cloudevents.v1.http import from_http

from bridge.carriers import Carriers
from bridge.destinations.webhook import render
from bridge.event import normalize
from bridge.postback import parse
from tests.conftest import POSTBACKS

NO_SENDER = b"<POSTBACK><ORIGIN>EMAIL_SUB</ORIGIN><CODE>N303</CODE><EMAIL>a@example.com</EMAIL></POSTBACK>"
BODIES = [pytest.param(path.read_bytes(), id=path.stem) for path in sorted(POSTBACKS.glob("*.xml"))]
BODIES.append(pytest.param(NO_SENDER, id="no-sender"))


def event_of(body: bytes) -> dict:
    received = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    return normalize(parse(body), event_id="evt_01JD7Q0000000000000000000", received_at=received, carriers=Carriers())


@pytest.mark.parametrize("body", BODIES)
def test_cloudevents_read_by_both_sdk_readers(body):
    event = event_of(body)
    payload, content_type = render(event, "cloudevents")
    headers = {"Content-Type": content_type}
    old = from_http(headers, payload)
    new = from_structured_event(HTTPMessage(headers=headers, body=payload))
    assert old["id"] == new.get_id() == event["id"]
    assert old["type"] == new.get_type() == f"com.skycore.{event['type']}"
    assert new.get_data() == old.data == event
    assert old.get("subject") == new.get_subject() == event["from"]  # the sender; none without one
