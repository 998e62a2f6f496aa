"""Numbers from outside are ASCII digits only (issue 17, section 5).

`str.isdigit()` is true of '²' (Latin-1 superscript two) and '٣' (Arabic-Indic three): float('²')
raises and int('٣') is 3. Each place that reads a number from a peer, a request, the config or
the command line is tried with both: the one must be refused the way any other non-number is
(no exception escaping), the other must not be read as a number.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from bridge.carriers import spid_key
from bridge.cli import _parser, whole_number
from bridge.config import build, load, parse_listen
from bridge.destinations.base import Attempt
from bridge.destinations.email import pretty_phone
from bridge.destinations.slack import classify as slack_classify
from bridge.destinations.webhook import WebhookDestination
from bridge.digits import is_digits, parse_uint
from bridge.errors import ConfigError
from bridge.retry import Failed, RetryAt, RetryPolicy, classify_http, decide, parse_retry_after
from bridge.validate import parse_duration
from tests.conftest import read_request

NOW = 1_700_000_000.0
SUPERSCRIPT_TWO = "\u00b2"  # '²': isdigit() yes, isdecimal() no, float() refuses it
ARABIC_THREE = "\u0663"  # '٣': isdigit() and isdecimal(), int() reads 3
ADMIN = "adm_Q2w9Ztk4"


def test_the_helpers_take_ascii_digits_only():
    assert is_digits("0123456789")
    for text in ("", SUPERSCRIPT_TWO, ARABIC_THREE, "1" + SUPERSCRIPT_TWO, "+1", " 1", "1_0", "½"):
        assert not is_digits(text), text
    assert parse_uint("42") == 42 and parse_uint("9" * 18) == 10**18 - 1
    assert parse_uint("9" * 19) is None and parse_uint("1" * 5000) is None  # int() raises past 4,300
    assert parse_uint(ARABIC_THREE) is None and parse_uint("0042", max_digits=3) is None


# ---------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize("value", [SUPERSCRIPT_TWO, ARABIC_THREE, "1" + SUPERSCRIPT_TWO, " " + SUPERSCRIPT_TWO + " "])
def test_a_retry_after_of_other_digits_is_unusable_not_an_exception(value):
    assert parse_retry_after(value, NOW) is None
    outcome = classify_http(503, CIMultiDict({"Retry-After": value}), NOW)
    assert isinstance(outcome, Failed) and outcome.retryable and outcome.retry_after is None


def test_slacks_429_path_shares_the_parser():
    outcome = slack_classify(429, None, {"Retry-After": SUPERSCRIPT_TWO}, NOW)
    assert isinstance(outcome, Failed) and outcome.retryable and outcome.retry_after is None


async def test_a_webhook_answered_503_with_retry_after_superscript_is_retried_not_dead():
    """Through the real client and a real socket: the header arrives as the Latin-1 byte 0xB2."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 503 Busy\r\nRetry-After: \xb2\r\nContent-Length: 4\r\n\r\nbusy")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    destination = WebhookDestination("crm", f"http://127.0.0.1:{port}/hook", timeout=5)
    await destination.open(None)  # type: ignore[arg-type]  (a webhook needs no services)
    try:
        attempt = Attempt(delivery_id=1, number=1, conversation="c", event_id="evt_1")
        outcome = await destination.send_stored('{"id":"evt_1"}', attempt)
    finally:
        await destination.close()
        server.close()
    assert isinstance(outcome, Failed) and outcome.retryable and outcome.status == 503
    decision = decide(outcome, attempt=1, created_at=NOW, now=NOW, policy=RetryPolicy())
    assert isinstance(decision, RetryAt)


# ---------------------------------------------------------------------------- /admin


@pytest.fixture
async def admin_client(app_client: Any, tmp_path: Path) -> AsyncIterator[Any]:
    raw = {
        "server": {"admin_token": ADMIN},
        "store": f"sqlite:///{tmp_path / 'bridge.db'}",
        "destinations": {"audit": {"type": "log", "path": str(tmp_path / "events.jsonl")}},
        "default": ["audit"],
    }
    yield await app_client(raw)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/events?limit=%C2%B2"),
        ("GET", "/admin/events?limit=%D9%A3"),  # would have listed 3
        ("GET", "/admin/deliveries?limit=%C2%B2"),
        ("GET", "/admin/dead-letters?limit=%C2%B2"),
        ("GET", "/admin/deliveries?limit=" + "1" * 5000),
        ("GET", "/admin/deliveries/%C2%B2"),
        ("GET", "/admin/deliveries/%D9%A3"),
        ("GET", "/admin/deliveries/99999999999999999999"),  # past a 64-bit row id
        ("POST", "/admin/deliveries/%C2%B2/replay"),
        ("POST", "/admin/deliveries/99999999999999999999/replay"),
        ("POST", "/admin/replay?destination=audit&limit=%C2%B2"),
    ],
)
async def test_admin_numbers_of_other_digits_are_a_400(admin_client, method, path):
    response = await admin_client.request(method, path, headers={"Authorization": f"Bearer {ADMIN}"})
    body = await response.json()
    assert response.status == 400, body
    assert "error" in body


async def test_admin_ascii_numbers_still_work(admin_client):
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    assert (await admin_client.get("/admin/events?limit=3", headers=bearer)).status == 200
    assert (await admin_client.get("/admin/deliveries/3", headers=bearer)).status == 404  # no such delivery


# ---------------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize("text", [SUPERSCRIPT_TWO, ARABIC_THREE + "s", "1" + SUPERSCRIPT_TWO + "m", "1.\u00b2"])
def test_durations_of_other_digits_are_refused_with_the_usual_message(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    "text", [":" + SUPERSCRIPT_TWO, ":" + ARABIC_THREE, "0.0.0.0:8" + ARABIC_THREE, ":" + "8" * 5000]
)
def test_a_listen_port_of_other_digits_is_refused_with_the_usual_message(text):
    with pytest.raises(ValueError, match="is not host:port"):
        parse_listen(text)


@pytest.mark.parametrize("value", [SUPERSCRIPT_TWO, ARABIC_THREE, "1" * 5000])
def test_an_integer_from_the_environment_of_other_digits_is_a_config_error(value):
    raw = {"server": {"max_body_bytes": "${MAX}"}}
    with pytest.raises(ConfigError, match=r"server\.max_body_bytes: expected an integer"):
        build(raw, environ={"MAX": value})
    assert build(raw, environ={"MAX": " 2048 "}).server.max_body_bytes == 2048


def test_a_config_file_number_of_thousands_of_digits_is_a_config_error(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  max_body_bytes: " + "1" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 2, column 19: a number of 5000 digits"):
        load(path)
    path.write_text("server:\n  max_body_bytes: 65_536\n")
    assert load(path).server.max_body_bytes == 65536


def test_cli_ids_and_limits_are_ascii_numbers():
    assert _parser().parse_args(["replay", "12", "--limit", "5"]).ids == [12]
    with pytest.raises(argparse.ArgumentTypeError):
        whole_number(ARABIC_THREE)
    for argv in (["replay", ARABIC_THREE], ["deliveries", "--limit", ARABIC_THREE], ["replay", "9" * 30]):
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)


def test_spids_and_phone_numbers_of_other_digits_are_left_as_they_are():
    assert spid_key("12") == "0000012"
    assert spid_key(ARABIC_THREE) == ARABIC_THREE  # not zero-filled as if it were a SPID
    number = "+1" + ARABIC_THREE * 10
    assert pretty_phone(number) == number
    assert pretty_phone("+15552312102") == "+1 555-231-2102"
