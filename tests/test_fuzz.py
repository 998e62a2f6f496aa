"""Fuzzing the real HTTP app (issue 6): random bytes, mutated postbacks and arbitrary text.

One app (create_app, a real SQLite file, a `log` file destination) serves every example of a
test, so a crash or a wedged store in one example shows up in the next. The answer is always
200 or a 4xx, never a 5xx; the app keeps serving; and an accepted event is stored with its
text exactly as sent.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge.runtime import RUNTIME
from tests.conftest import POSTBACKS, sms

Client = TestClient[web.Request, web.Application]

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

CONTENT_TYPES = [
    None,
    "text/xml",
    "application/xml; charset=utf-8",
    "application/x-www-form-urlencoded",
    "text/plain; charset=latin-1",
    "multipart/form-data; boundary=zz",
    "application/json",
    "",
]

# characters that have broken XML pipelines before: emoji (and ZWJ sequences), RTL text and
# overrides, combining marks, C0 and C1 controls, Unicode line separators, BOM, non-characters
SPECIAL = (
    "😀👍🏽👩‍👩‍👧🇺🇸مرحبا שלום \u200f\u202e\u2066e\u0301n\u0303".join(chr(c) for c in range(1, 32))
    + "\x7f\x85\x9f\u2028\u2029\ufeff\ufffe\uffff\U0010ffff"
    + "&<>\"']]>&amp;&#x41;"
    + " \t\n"
)
TEXT = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8", exclude_characters="\x00"), st.sampled_from(SPECIAL)),
    max_size=300,
)
VALID = [sms(0), *(p.read_bytes() for p in sorted(POSTBACKS.glob("*.xml")))]


def xml_char(ch: str) -> bool:
    """XML 1.0 `Char`: what a postback can carry at all (as text or a character reference)."""
    cp = ord(ch)
    return cp in (0x9, 0xA, 0xD) or 0x20 <= cp <= 0xD7FF or 0xE000 <= cp <= 0xFFFD or 0x10000 <= cp <= 0x10FFFF


def escaped(text: str) -> str:
    """Text as a careful sender writes it; CR as a reference, since a raw one reads as LF."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


@pytest.fixture
async def client(app_client: Any, tmp_path: Path) -> Client:
    raw = {
        "server": {"max_body_bytes": 16384},
        "store": f"sqlite:///{tmp_path / 'fuzz.db'}",
        "destinations": {"audit": {"type": "log", "path": str(tmp_path / "events.jsonl")}},
        "default": ["audit"],
    }
    return await app_client(raw)


async def send(client: Client, body: bytes, content_type: str | None, path: str = "/postback") -> tuple[int, Any]:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    async with client.post(path, data=body, headers=headers) as response:
        status = response.status
        answer = await response.json() if response.content_type == "application/json" else await response.text()
    assert status == 200 or 400 <= status < 500, (status, answer, body[:200])
    async with client.get("/healthz") as health:
        assert health.status == 200, "the app stopped serving"
    return status, answer


async def stored(client: Client, event_id: str) -> dict[str, Any]:
    store = client.server.app[RUNTIME].store
    assert store is not None
    event = await store.get_event(event_id)
    assert event is not None, f"{event_id} was answered 200 but is not in the store"
    return event


_serial = itertools.count()


@FUZZ
@given(text=TEXT, cdata=st.booleans(), form=st.booleans(), content_type=st.sampled_from(CONTENT_TYPES))
@example(text="👩‍👩‍👧 مرحبا שלום \u202eabc\u202c e\u0301", cdata=False, form=False, content_type=None)
@example(text="\t tabs\r\nand CRLF\x7f\x85\u2028 ", cdata=False, form=True, content_type=None)
@example(text="  leading and trailing  ", cdata=True, form=False, content_type="text/xml")
@example(text="bell\x07", cdata=False, form=False, content_type=None)
@pytest.mark.slow
async def test_text_round_trips_exactly(client, text, cdata, form, content_type):
    n = next(_serial)
    as_cdata = cdata and "]]>" not in text and "\r" not in text
    written = f"<![CDATA[{text}]]>" if as_cdata else escaped(text)
    xml = (
        "<POSTBACK><ORIGIN>SMS_MO</ORIGIN><CODE>N211</CODE><FROM>15552312102</FROM><TO>86717</TO>"
        f"<TEXT>{written}</TEXT><TRANSACTIONID>fuzz-{n}</TRANSACTIONID></POSTBACK>"
    )
    body = ("xml=" + quote(xml)).encode() if form else xml.encode()
    status, answer = await send(client, body, "application/x-www-form-urlencoded" if form else content_type)
    if all(xml_char(ch) for ch in text):
        assert status == 200, answer
        assert answer["status"] == "accepted"
        event = await stored(client, answer["id"])
        assert event["text"] == text
        assert event["fields"]["TEXT"] == text
    else:
        assert status == 400, answer
        assert "error" in answer


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    body = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(body)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "repeat", "tag"]))
        if kind == "flip" and at < len(body):
            body[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del body[at : at + draw(st.integers(1, 32))]
        elif kind == "truncate":
            del body[at:]
        elif kind == "repeat":
            body[at:at] = body[at : at + draw(st.integers(1, 200))] * draw(st.integers(1, 50))
        elif kind == "tag":
            body[at:at] = draw(
                st.sampled_from(
                    [b"<POSTBACK>", b"</POSTBACK>", b"<![CDATA[", b"]]>", b"<!DOCTYPE x>", b"&x;", b"&#0;", b"<?pi?>"]
                )
            )
    return bytes(body)


@FUZZ
@given(body=mutated(), content_type=st.sampled_from(CONTENT_TYPES))
async def test_mutated_postbacks_are_200_or_4xx_and_accepted_ones_are_stored(client, body, content_type):
    status, answer = await send(client, body, content_type)
    if status == 200:
        assert answer["status"] in ("accepted", "duplicate")
        event = await stored(client, answer["id"])
        assert event["id"] == answer["id"]
    else:
        assert isinstance(answer, dict) and answer.get("error"), answer


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=512).map(lambda b: b"<POSTBACK><ORIGIN>SMS_MO</ORIGIN>" + b + b"</POSTBACK>"),
        st.binary(max_size=512).map(lambda b: b"xml=" + b),
        st.text(max_size=512).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ),
    content_type=st.sampled_from(CONTENT_TYPES),
    path=st.sampled_from(["/postback", "/postback/x", "/postback?token=x"]),
)
async def test_random_bytes_are_never_a_5xx(client, body, content_type, path):
    status, answer = await send(client, body, content_type, path)
    if status == 200:
        await stored(client, answer["id"])


async def test_after_the_fuzz_a_plain_postback_still_gets_through(client):
    status, answer = await send(client, sms(10**9), None)
    assert status == 200
    assert (await stored(client, answer["id"]))["text"] == "HELLO there"
