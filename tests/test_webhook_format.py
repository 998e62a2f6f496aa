"""What a webhook receives, read back with the readers its receivers use (CONTRACT §6)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_structured_event
from cloudevents.v1.http import from_http

from bridge.carriers import Carriers
from bridge.destinations.webhook import WebhookDestination, render
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


@pytest.mark.parametrize(
    ("url", "secret", "shown"),
    [
        (
            "https://bridge:s3cret-Pa55@crm.example.com/in",
            "s3cret-Pa55",
            "https://bridge:**********@crm.example.com/in",
        ),
        ("https://key_4f9Qx2LmZ@crm.example.com/in", "key_4f9Qx2LmZ", "https://**********@crm.example.com/in"),
    ],
)
def test_url_credentials_are_masked_in_describe_and_preview(url, secret, shown):
    """A URL's user:password (or an API key as its user) is sent as Basic auth; check-config and
    route show the URL and that header masked."""
    hook = WebhookDestination("crm", url)
    preview = hook.preview(event_of(POSTBACKS.joinpath("sms_mo_v1.3.xml").read_bytes()))
    assert shown in hook.describe() and preview["url"] == shown
    assert preview["headers"]["Authorization"] == "Basic **********"
    assert secret not in hook.describe() + json.dumps(preview)


def test_plain_url_is_shown_as_it_is():
    hook = WebhookDestination("crm", "https://crm.example.com/in?team=7")
    preview = hook.preview(event_of(POSTBACKS.joinpath("sms_mo_v1.3.xml").read_bytes()))
    assert preview["url"] == hook.url and hook.url in hook.describe()
    assert "Authorization" not in preview["headers"]
