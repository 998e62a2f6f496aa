"""The web console (CONTRACT §8) in a real browser: Debian's Chromium driven by Playwright,
against the real `postback-bridge serve`, real postbacks, and a webhook sink on 127.0.0.1 that
fails when a test tells it to. One browser and one bridge for the module (the tests run in
order and build on each other's events). axe-core checks every page.

`BRIDGE_CONSOLE_SCREENSHOTS=docs/img/console pytest tests/test_console_browser.py` also saves
a screenshot of each page there (the docs' pictures)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import DATA, POSTBACKS, BridgeProcess, free_port, sms
from tests.skycore_fake import API_KEY, FakeSkycore, fake_skycore
from tests.slack_fake import SIGNING_SECRET, TOKEN, FakeSlack, fake_slack, message_event, signed

CHROMIUM = Path("/usr/bin/chromium")
ADMIN = "console-admin-token-0123456789"
ZONE = "America/Chicago"
AXE = DATA / "vendor" / "axe.min.js"
SHOTS = os.environ.get("BRIDGE_CONSOLE_SCREENSHOTS")

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[test]')")


# ---------------------------------------------------------------------------- a sink that fails on demand


class Sink:
    """Webhook receiver: answers each path with the status set for it (200 by default)."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.received: list[tuple[str, dict[str, Any]]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                sink.received.append((self.path, json.loads(body or b"{}")))
                status = sink.status.get(self.path, 200)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no" if status >= 300 else b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.server.shutdown()


class Peers:
    """The fake Slack and Skycore (tests/slack_fake.py, tests/skycore_fake.py) on an event loop
    of their own, in a thread: the browser tests are synchronous."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self._stack = contextlib.AsyncExitStack()
        self.slack: FakeSlack = self.run(self._stack.enter_async_context(fake_slack()))
        self.skycore: FakeSkycore = self.run(self._stack.enter_async_context(fake_skycore()))

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self) -> None:
        self.run(self._stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    both = Peers()
    yield both
    both.close()


TEXTER, SHORT_CODE = "15551234888", "60856"


def config(sink_url: str, peers: Peers) -> dict[str, Any]:
    return {
        "server": {"admin_token": ADMIN},
        "retry": {"initial": "50ms", "max_interval": "200ms", "max_age": "1h"},
        "destinations": {
            "crm": {"type": "webhook", "url": sink_url + "/crm"},
            "audit": {"type": "webhook", "url": sink_url + "/audit"},
            "inbox": {
                "type": "slack",
                "token": TOKEN,
                "channel": "#sms-inbox",
                "api_url": peers.slack.api_url,
                "replies": {"send_with": "sms", "signing_secret": SIGNING_SECRET},
            },
            "sms": {"type": "skycore", "api_key": API_KEY, "api_url": peers.skycore.api_url},
        },
        "routes": [
            {"name": "opt-out", "match": {"keyword": ["STOP", "UNSUBSCRIBE"]}, "to": ["crm"]},
            {"name": "promo", "match": {"keyword": "PIZZA"}, "to": ["crm", "audit"]},
            {"name": "texts", "match": {"shortcode": SHORT_CODE}, "to": ["inbox"]},
        ],
        "default": ["audit"],
    }


@pytest.fixture(scope="module")
def bridge(sink: Sink, peers: Peers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeProcess]:
    workdir = tmp_path_factory.mktemp("console")
    port = free_port()
    raw = config(sink.url, peers)
    raw["server"]["listen"] = f"127.0.0.1:{port}"
    raw["store"] = f"sqlite:///{workdir / 'bridge.db'}"
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PYTHONUNBUFFERED": "1"}
    process = BridgeProcess(path, workdir, port, env)
    process.start()
    yield process
    process.stop()


def admin(bridge: BridgeProcess, path: str) -> Any:
    request = urllib.request.Request(bridge.url + path, headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def dead(bridge: BridgeProcess, *event_ids: str) -> None:
    """Until each event has a dead delivery (asked through the admin API, not the page, so
    that a page opened after it shows them at once)."""
    wait_until(
        lambda: set(event_ids) <= {d["event_id"] for d in admin(bridge, "/admin/dead-letters?limit=1000")["deliveries"]}
    )


def post(bridge: BridgeProcess, body: bytes, path: str = "/postback", **headers: str) -> dict[str, Any]:
    request = urllib.request.Request(bridge.url + path, data=body, method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"{}")


def texted(n: int, text: str) -> bytes:
    return (
        f"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><CODE>N211</CODE><FROM>{TEXTER}</FROM><TO>{SHORT_CODE}</TO>"
        f"<TEXT>{text}</TEXT><RECEIVED>2026-12-01T10:00:00Z</RECEIVED><TRANSACTIONID>conv-{n}</TRANSACTIONID>"
        "</POSTBACK>"
    ).encode()


def delivery_report(tracking_id: str) -> bytes:
    return (
        f"<POSTBACK><ORIGIN>SMS_MT</ORIGIN><CODE>N202</CODE><STATUS>Message Sent/Delivered</STATUS>"
        f"<FROM>{SHORT_CODE}</FROM><TO>{TEXTER}</TO><TRACKINGID>{tracking_id}</TRACKINGID>"
        "<TIMESTAMP>2026-12-01T10:05:00Z</TIMESTAMP></POSTBACK>"
    ).encode()


def reply_in_slack(bridge: BridgeProcess, peers: Peers, thread: str, text: str, ts: str) -> None:
    """A person answers in the texter's Slack thread: Slack's Events API calls the bridge."""
    peers.slack.person_says("C0FAKE", ts)
    body = json.dumps(message_event(text, thread_ts=thread, ts=ts)).encode()
    post(bridge, body, "/slack/events", **signed(body))


# ---------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium for the module. Not for the session: Playwright's sync API runs an event loop
    in this thread while it is open, and the asyncio tests after this module need the thread's."""
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def page(browser: Any, bridge: BridgeProcess) -> Iterator[Any]:
    """A signed-in page; every CSP violation it reports is collected in `page.csp`."""
    # a zone that is not UTC: times on the page are in it once console.js has run
    context = browser.new_context(base_url=bridge.url, viewport={"width": 1280, "height": 900}, timezone_id=ZONE)
    tab = context.new_page()
    tab.set_default_timeout(10_000)
    tab.csp = []
    tab.on("console", lambda m: tab.csp.append(m.text) if "Content Security Policy" in m.text else None)
    sign_in(tab, ADMIN)
    yield tab
    context.close()


def sign_in(tab: Any, token: str) -> Any:
    tab.goto("/ui/")
    tab.get_by_label("Admin token").fill(token)
    with tab.expect_navigation():
        tab.get_by_role("button", name="Sign in").click()
    return tab


def axe(tab: Any) -> list[str]:
    """axe-core's serious and critical violations on the page, as `rule: target` lines."""
    # the page's polling holds still while axe reads it (a region swapped mid-run is no finding)
    tab.evaluate("document.addEventListener('htmx:beforeRequest', (e) => e.preventDefault())")
    tab.wait_for_function("!document.querySelector('.htmx-request, .htmx-swapping, .htmx-settling')")
    if not tab.evaluate("typeof window.axe !== 'undefined'"):
        tab.evaluate(AXE.read_text(encoding="utf-8"))
    result = tab.evaluate("axe.run(document, {resultTypes: ['violations']})")
    return [
        f"{v['id']} ({v['impact']}): {node['target']}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
        for node in v["nodes"]
    ]


def shot(tab: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def wait_until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


# ---------------------------------------------------------------------------- the tests


def test_a_wrong_token_gets_a_calm_error_and_no_session(browser, bridge):
    context = browser.new_context(base_url=bridge.url)
    tab = context.new_page()
    response = tab.goto("/ui/events")
    assert tab.url.endswith("/ui/login?next=%2Fui%2Fevents") and response.status == 200
    assert axe(tab) == []
    shot(tab, "login")
    tab.get_by_label("Admin token").fill("not-the-token")
    with tab.expect_navigation() as navigation:
        tab.get_by_role("button", name="Sign in").click()
    assert navigation.value.status == 401
    assert tab.get_by_role("alert").inner_text() == "Sign-in failed. Check the token and try again."
    assert [c["name"] for c in context.cookies() if c["name"] == "pb_console"] == []
    assert tab.goto("/ui/events").url.endswith("/ui/login?next=%2Fui%2Fevents")
    context.close()


def test_sign_in_sets_a_strict_httponly_session_cookie_and_lands_where_asked(browser, bridge):
    context = browser.new_context(base_url=bridge.url)
    tab = context.new_page()
    tab.goto("/ui/deliveries")
    tab.get_by_label("Admin token").fill(ADMIN)
    with tab.expect_navigation():
        tab.get_by_role("button", name="Sign in").click()
    assert tab.url.endswith("/ui/deliveries")
    (cookie,) = [c for c in context.cookies() if c["name"] == "pb_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]
    assert 11 * 3600 < cookie["expires"] - time.time() <= 12 * 3600
    tab.get_by_role("button", name="Sign out").click()
    tab.wait_for_url(re.compile(r"/ui/login$"))
    assert tab.goto("/ui/").url.endswith("/ui/login?next=%2Fui%2F")
    context.close()


@pytest.mark.slow  # up to one poll: 5 s
def test_an_event_arrives_live_on_the_events_page(page, bridge):
    page.goto("/ui/events")
    assert page.get_by_role("heading", name="Events").is_visible()
    accepted = post(bridge, (POSTBACKS / "sms_mo_v1.3.xml").read_bytes())
    row = page.get_by_role("link", name=accepted["id"])
    row.wait_for(timeout=8_000)  # the page polls every 5 s; nobody reloads it
    assert page.locator("tr", has=row).locator("td.mono").first.inner_text() == "+1 555-231-2102"
    local = page.locator("tr", has=row).locator("time").first
    assert local.get_attribute("data-local") == ""  # console.js put it in this browser's zone
    assert re.search(r"\b(CST|CDT|GMT-[56])$", local.inner_text()), local.inner_text()
    assert local.get_attribute("title").endswith(" UTC")  # the time as the server wrote it
    assert page.csp == []


def test_a_dead_delivery_replayed_from_its_event_page_is_delivered(page, bridge, sink):
    sink.status["/crm"] = 400  # not retryable: dead at the first attempt
    accepted = post(bridge, sms(101, text="STOP"))
    dead(bridge, accepted["id"])
    page.goto(f"/ui/events/{accepted['id']}")
    crm = page.get_by_role("region", name=re.compile(r"^crm"))
    assert crm.locator("h3 .badge").inner_text() == "dead"
    attempt = crm.locator("tbody tr").first
    assert attempt.locator("td").nth(3).inner_text() == "400"
    assert "HTTP 400" in attempt.locator("td").nth(4).inner_text()
    assert axe(page) == []
    sink.status["/crm"] = 200
    with page.expect_navigation():
        crm.get_by_role("button", name="Replay to crm").click()
    assert page.get_by_role("status").inner_text() == "Replayed 1 delivery: due now."
    wait_until(lambda: admin(bridge, f"/admin/events/{accepted['id']}")["deliveries"][0]["status"] == "delivered")
    page.reload()  # (the page would show it by itself within 5 s: the events page test waits for that)
    assert page.get_by_role("region", name=re.compile(r"^crm")).locator("h3 .badge").inner_text() == "delivered"
    sent = len(sink.received)
    with page.expect_navigation():  # a delivered one can be sent again, on purpose
        page.get_by_role("button", name="Send again to crm").click()
    assert page.get_by_role("status").inner_text() == "Replayed 1 delivery: due now."
    wait_until(lambda: any(b.get("id") == accepted["id"] for _, b in sink.received[sent:]))
    crm = page.get_by_role("region", name=re.compile(r"^crm"))
    assert [cell.inner_text() for cell in crm.locator("tbody tr td:nth-child(4)").all()] == ["400", "200"]
    shot(page, "event")


def test_bulk_replay_of_a_filter_says_how_many_then_replays_them(page, bridge, sink):
    sink.status["/crm"] = 400
    ids = [post(bridge, sms(200 + n, text="STOP", sender=f"1555000010{n}"))["id"] for n in range(3)]
    dead(bridge, *ids)
    page.goto("/ui/dead-letters?destination=crm")
    for event_id in ids:
        assert page.get_by_role("link", name=event_id).is_visible()
    assert axe(page) == []
    shot(page, "dead-letters")
    page.get_by_role("button", name="Replay all that this filter shows…").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Replay 3 deliveries?"
    assert axe(page) == []
    shot(page, "confirm")
    sink.status["/crm"] = 200
    with page.expect_navigation():
        page.get_by_role("button", name="Replay 3 deliveries").click()
    assert page.get_by_role("status").inner_text() == "Replayed 3 deliveries: due now."
    page.get_by_text("No deliveries match.").wait_for(timeout=8_000)  # live: they leave the list
    replayed = {body["id"] for path, body in sink.received if path == "/crm"}
    assert set(ids) <= replayed


def test_replay_of_ticked_deliveries_asks_first(page, bridge, sink):
    sink.status["/audit"] = 400
    first, second = (post(bridge, sms(300 + n, text=f"hello {n}"))["id"] for n in range(2))
    dead(bridge, first, second)
    page.goto("/ui/deliveries?status=dead&destination=audit")
    page.locator("tr", has=page.get_by_role("link", name=first)).get_by_role("checkbox").check()
    page.get_by_role("button", name="Replay selected…").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Replay 1 delivery?"
    sink.status["/audit"] = 200
    with page.expect_navigation():
        page.get_by_role("button", name="Replay 1 delivery").click()
    assert page.get_by_role("status").inner_text() == "Replayed 1 delivery: due now."
    page.get_by_role("link", name=first).wait_for(state="detached", timeout=8_000)
    assert page.get_by_role("link", name=second).is_visible()  # not ticked: still dead


def test_the_overview_shows_a_destination_that_is_down_and_its_backlog(page, bridge, sink):
    sink.status["/audit"] = 503  # retryable: after 5 failures in a row it is probed, one at a time
    before = len(sink.received)
    for n in range(3):
        post(bridge, sms(500 + n, text=f"Order {n} ready?", sender=f"1555020{n:04d}"))
    wait_until(lambda: sum(1 for p, _ in sink.received[before:] if p == "/audit") >= 6)
    try:
        page.goto("/ui/")
        assert page.get_by_role("heading", name="Overview").is_visible()
        assert page.get_by_role("row", name=re.compile(r"^crm webhook up")).is_visible()
        assert page.get_by_role("row", name=re.compile(r"^audit webhook probing ")).is_visible()
        assert page.get_by_role("row", name=re.compile(r"^audit ")).locator("td.num").first.inner_text() == "3"
        assert axe(page) == []
        shot(page, "overview")
    finally:
        sink.status["/audit"] = 200
    dead(bridge)  # (nothing new is dead: the backlog drains once the sink answers)


def test_the_deliveries_page(page, bridge):
    page.goto("/ui/deliveries")
    assert page.locator("tbody tr").count() >= 5
    assert axe(page) == []
    shot(page, "deliveries")
    page.goto("/ui/events")
    assert axe(page) == []
    shot(page, "events")
    assert page.csp == []


def test_a_conversation_shows_texts_and_replies_with_their_state(page, bridge, peers):
    post(bridge, texted(1, "Hi! Are you open tomorrow?"))
    wait_until(lambda: len(peers.slack.posted()) >= 1)
    thread = peers.slack.posted()[0].ts
    reply_in_slack(bridge, peers, thread, "Yes, from 9 to 5. See you!", "1764842000.000100")
    wait_until(lambda: len(peers.skycore.calls) >= 1)
    wait_until(lambda: peers.skycore.calls[0].tracking_id is not None)
    post(bridge, delivery_report(peers.skycore.calls[0].tracking_id))
    post(bridge, texted(2, "Great, can I bring my dog?"))
    reply_in_slack(bridge, peers, thread, "Of course, dogs are welcome.", "1764842001.000100")
    wait_until(lambda: len(peers.skycore.calls) >= 2)
    page.goto("/ui/conversations")
    assert axe(page) == []
    page.get_by_role("link", name="+1 555-123-4888 and 60856").click()
    assert page.get_by_role("heading", level=1).inner_text() == "+1 555-123-4888 and 60856"
    page.locator("li.outbound .badge.sent").wait_for(timeout=8_000)  # Skycore took the second one
    texts = page.locator("ol.messages p.text").all_inner_texts()
    assert texts == [
        "Hi! Are you open tomorrow?",
        "Yes, from 9 to 5. See you!",
        "Great, can I bring my dog?",
        "Of course, dogs are welcome.",
    ]
    assert page.locator("li.outbound .badge").all_inner_texts() == ["delivered", "sent"]
    assert page.locator("p .badge").inner_text() == "may be texted"
    assert axe(page) == []
    shot(page, "conversation")
    page.goto("/ui/conversations?texter=%2B15552312102&short_code=86717")
    assert page.locator("p .badge").inner_text() == "opted out"  # it texted STOP (tx-101)


def test_a_search_by_texter(page, bridge):
    page.goto("/ui/events")
    page.get_by_label("Texter").fill("+1 555-000-0101")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(re.compile(r"texter="))
    assert page.locator("tbody tr").count() == 1
    assert page.locator("tbody tr td.mono").first.inner_text() == "+1 555-000-0101"


def test_a_pasted_postback_is_routed_as_the_route_command_says(page, bridge):
    page.goto("/ui/routes")
    assert page.get_by_role("rowheader", name="opt-out").is_visible()
    assert axe(page) == []
    page.get_by_label("Postback XML, as Skycore sends it").fill((POSTBACKS / "sms_mo_v1.3.xml").read_text())
    page.get_by_role("button", name="Route it").click()
    printed = bridge.cli("route", "-c", str(bridge.config_path), str(POSTBACKS / "sms_mo_v1.3.xml")).stdout
    (matched,) = re.findall(r"^routes matched: (.*)$", printed, re.M)
    assert page.locator("#routes-matched").inner_text() == matched
    for name, kind in re.findall(r"^-> (\S+) \[(\w+)\] via", printed, re.M):
        assert page.get_by_role("heading", name=re.compile(rf"^{name} \[{kind}\]")).is_visible()
    assert axe(page) == []
    shot(page, "routes")


def test_a_bad_config_is_refused_on_reload_and_the_old_one_keeps_running(page, bridge, sink):
    good = bridge.config_path.read_text()
    raw = yaml.safe_load(good)
    raw["routes"][0]["to"] = ["nowhere"]
    bridge.config_path.write_text(yaml.safe_dump(raw))
    try:
        page.goto("/ui/routes")
        page.get_by_role("button", name="Reload the config").click()
        alert = page.get_by_role("alert")
        assert "The config was not reloaded" in alert.inner_text() and "nowhere" in alert.inner_text()
        assert page.get_by_role("rowheader", name="opt-out").is_visible()
        assert axe(page) == []
    finally:
        bridge.config_path.write_text(good)
    accepted = post(bridge, sms(400, text="STOP"))
    wait_until(lambda: any(b["id"] == accepted["id"] for p, b in sink.received if p == "/crm"))


def test_a_form_without_its_csrf_token_is_refused(page, bridge):
    page.goto("/ui/routes")
    token = page.locator("input[name=csrf]").first.input_value()
    missing = page.request.post("/ui/routes/reload", form={})
    assert missing.status == 403 and "CSRF" in missing.text()
    wrong = page.request.post("/ui/routes/reload", form={"csrf": token[:-2] + "xx"})
    assert wrong.status == 403
    replay = page.request.post("/ui/replay", form={"confirm": "yes", "ids": "1"})
    assert replay.status == 403
    assert page.request.post("/ui/routes/reload", form={"csrf": token}).status == 200


def test_the_events_page_lists_events_without_javascript(browser, bridge, page):
    context = browser.new_context(base_url=bridge.url, java_script_enabled=False)
    context.add_cookies([c for c in page.context.cookies() if c["name"] == "pb_console"])
    tab = context.new_page()
    tab.goto("/ui/events")
    rows = tab.locator("tbody tr")
    assert rows.count() >= 6
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", rows.first.locator("time").inner_text())
    context.close()
