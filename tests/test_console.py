"""The web console's sign-in, cookies, CSRF and headers, in process (the browser tests in
test_console_browser.py drive the pages themselves)."""

from __future__ import annotations

import hashlib
import re
from html import unescape as html_unescape
from pathlib import Path
from typing import Any

import pytest

from bridge.console import session as sessions
from bridge.console.pages import reply_state
from bridge.console.render import CSP, flatten, readable_phone
from bridge.store import DeliveryRow
from bridge.store.sqlite import SQLiteStore
from tests.conftest import eventually, free_port, sms
from tests.skycore_fake import fake_skycore
from tests.slack_fake import fake_slack
from tests.test_replies import SHORT_CODE, TEXTER, Bridge, mo, report
from tests.test_replies import config as replies_config
from tests.test_store_contract import pg_url  # noqa: F401  (a fixture: a fresh PostgreSQL schema)

ADMIN = "console-admin-token-0123456789"
ROOT = Path(__file__).resolve().parent.parent


def raw(tmp_path: Path, **server: Any) -> dict[str, Any]:
    return {
        "server": {"admin_token": ADMIN, **server},
        "store": f"sqlite:///{tmp_path / 'bridge.db'}",
        "destinations": {"crm": {"type": "webhook", "url": "http://127.0.0.1:9/crm"}},
        "default": ["crm"],
    }


async def login_form(client: Any, **headers: str) -> str:
    response = await client.get("/ui/login", headers=headers)
    assert response.status == 200
    return re.search(r'name="csrf" value="([^"]+)"', await response.text()).group(1)


async def sign_in(client: Any, token: str = ADMIN, **headers: str) -> Any:
    csrf = await login_form(client, **headers)
    return await client.post(
        "/ui/login", data={"csrf": csrf, "token": token, "next": "/ui/events"}, headers=headers, allow_redirects=False
    )


# ---------------------------------------------------------------------------- sessions


def test_a_session_cookie_is_read_back_only_with_the_same_key_and_before_it_expires():
    key = sessions.signing_key(ADMIN)
    made, cookie = sessions.new_session(key, now=1000.0)
    assert sessions.read_session(key, cookie, now=1001.0) == made
    assert sessions.read_session(key, cookie, now=made.expires) is None  # expired
    assert sessions.read_session(sessions.signing_key("another token"), cookie, now=1001.0) is None
    body, _, signature = cookie.rpartition(".")
    later = body.replace(str(int(made.expires)), str(int(made.expires) + 10**6))
    assert sessions.read_session(key, f"{later}.{signature}", now=1001.0) is None  # tampered
    for junk in ("", "v1", "a.b.c.d", "x" * 500, cookie + "x"):
        assert sessions.read_session(key, junk, now=1001.0) is None


def test_a_csrf_token_belongs_to_one_session_and_one_purpose():
    key = sessions.signing_key(ADMIN)
    token = sessions.csrf_token(key, "session-a")
    assert sessions.csrf_ok(key, "session-a", token)
    assert not sessions.csrf_ok(key, "session-b", token)
    assert not sessions.csrf_ok(key, "session-a", token, "login")
    assert not sessions.csrf_ok(key, "session-a", None) and not sessions.csrf_ok(key, None, token)


def test_wrong_tokens_are_limited_per_client_within_the_window():
    attempts = sessions.Attempts(allowed=3, window=60.0, clients=2)
    for t in (0.0, 1.0, 2.0):
        assert attempts.wait("a", now=t) == 0.0
        attempts.failed("a", now=t)
    assert attempts.wait("a", now=3.0) == pytest.approx(57.0)
    assert attempts.wait("b", now=3.0) == 0.0  # another client is not held up
    assert attempts.wait("a", now=60.5) == 0.0  # the first failure has left the window
    attempts.failed("b", now=4.0)
    attempts.failed("c", now=5.0)  # a third client: the table keeps two, the oldest goes
    assert attempts.wait("a", now=6.0) == 0.0


@pytest.mark.parametrize(
    ("number", "shown"),
    [("+15552312102", "+1 555-231-2102"), ("86717", "86717"), ("+447911123456", "+447911123456"), (None, "-")],
)
def test_phone_numbers_are_readable(number, shown):
    assert readable_phone(number) == shown


def test_raw_fields_are_flattened_with_their_place():
    fields = {"ORIGIN": "MMS_MO", "CONTENT": {"FILE": ["a.jpg", "b.jpg"]}, "EMPTY": ""}
    assert flatten(fields) == [
        ("ORIGIN", "MMS_MO"),
        ("CONTENT.FILE[0]", "a.jpg"),
        ("CONTENT.FILE[1]", "b.jpg"),
        ("EMPTY", ""),
    ]


def test_the_vendored_htmx_is_the_released_file_with_its_license_header():
    text = (ROOT / "bridge" / "console" / "static" / "htmx.min.js").read_text(encoding="utf-8")
    header, _, body = text.partition(" */\n")
    assert "Zero-Clause BSD" in header and "htmx.org@2.0.11" in header
    expected = re.search(r"sha256 ([0-9a-f]{64})", header).group(1)
    assert hashlib.sha256(body.encode()).hexdigest() == expected


# ---------------------------------------------------------------------------- over HTTP


async def test_signing_in_sets_a_strict_httponly_cookie_that_another_instance_accepts(app_client, tmp_path):
    client = await app_client(raw(tmp_path))
    response = await sign_in(client)
    assert response.status == 303 and response.headers["Location"] == "/ui/events"
    cookie = response.cookies[sessions.SESSION_COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and not cookie["secure"]
    assert cookie["path"] == "/ui/" and int(cookie["max-age"]) == sessions.SESSION_SECONDS
    # a second instance on the same config (several on one PostgreSQL) takes the same cookie
    other = await app_client(raw(tmp_path), store=SQLiteStore(str(tmp_path / "bridge.db")))
    answer = await other.get(
        "/ui/events", headers={"Cookie": f"{sessions.SESSION_COOKIE}={cookie.value}"}, allow_redirects=False
    )
    assert answer.status == 200 and "<h1>Events</h1>" in await answer.text()


async def test_the_cookie_is_secure_when_a_trusted_proxy_says_https(app_client, tmp_path):
    client = await app_client(raw(tmp_path, auth={"trusted_proxies": ["127.0.0.1/32"]}))
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    form = await client.get("/ui/login", headers=proxied)
    nonce = form.cookies[sessions.LOGIN_COOKIE]
    assert nonce["secure"]  # so the test client's jar keeps it to itself over http: sent by hand
    csrf = re.search(r'name="csrf" value="([^"]+)"', await form.text()).group(1)
    response = await client.post(
        "/ui/login",
        data={"csrf": csrf, "token": ADMIN},
        headers={**proxied, "Cookie": f"{sessions.LOGIN_COOKIE}={nonce.value}"},
        allow_redirects=False,
    )
    assert response.status == 303 and response.cookies[sessions.SESSION_COOKIE]["secure"]
    plain = await app_client(raw(tmp_path))  # the peer is not a trusted proxy: the header says nothing
    response = await sign_in(plain, **{"X-Forwarded-Proto": "https"})
    assert response.status == 303 and not response.cookies[sessions.SESSION_COOKIE]["secure"]


async def test_wrong_tokens_get_one_calm_answer_then_429(app_client, tmp_path):
    client = await app_client(raw(tmp_path))
    for _ in range(5):
        response = await sign_in(client, token="guess")
        assert response.status == 401
        assert "Sign-in failed. Check the token and try again." in await response.text()
        assert sessions.SESSION_COOKIE not in response.cookies
    response = await sign_in(client, token=ADMIN)  # even the right one waits: the limit is per client
    assert response.status == 429 and "Too many attempts" in await response.text()
    assert sessions.SESSION_COOKIE not in response.cookies


async def test_a_sign_in_without_its_form_token_is_refused(app_client, tmp_path):
    client = await app_client(raw(tmp_path))
    response = await client.post("/ui/login", data={"token": ADMIN}, allow_redirects=False)
    assert response.status == 403 and sessions.SESSION_COOKIE not in response.cookies


async def test_after_sign_in_only_our_own_pages_are_a_destination(app_client, tmp_path):
    client = await app_client(raw(tmp_path))
    for target in ("https://evil.example/", "//evil.example/ui/", "/ui/\\evil", "/ui/\r\nSet-Cookie: a=b"):
        client.session.cookie_jar.clear()
        csrf = await login_form(client)
        response = await client.post(
            "/ui/login", data={"csrf": csrf, "token": ADMIN, "next": target}, allow_redirects=False
        )
        assert response.headers["Location"] == "/ui/"


async def test_pages_need_a_session_and_carry_a_strict_csp(app_client, tmp_path):
    client = await app_client(raw(tmp_path))
    for path in ("/ui/", "/ui/events", "/ui/deliveries", "/ui/dead-letters", "/ui/routes", "/ui/events/evt_x"):
        response = await client.get(path, allow_redirects=False)
        assert response.status == 303 and response.headers["Location"].startswith("/ui/login?next=")
    polled = await client.get("/ui/events?part=live", headers={"HX-Request": "true"}, allow_redirects=False)
    assert polled.status == 401 and polled.headers["HX-Redirect"].startswith("/ui/login")
    await sign_in(client)
    for path in ("/ui/", "/ui/events", "/ui/deliveries", "/ui/dead-letters", "/ui/routes"):
        response = await client.get(path)
        assert response.status == 200, path
        assert response.headers["Content-Security-Policy"] == CSP
        html = await response.text()
        assert "<script>" not in html and "style=" not in html and "<style" not in html
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP
    missing = await client.get("/ui/events/evt_nothing")
    assert missing.status == 404
    bad = await client.get("/ui/deliveries?since=yesterday")
    assert bad.status == 400 and "since" in await bad.text()


async def test_state_changing_forms_need_the_session_csrf_token(app_client, tmp_path):
    client = await app_client(raw(tmp_path))
    await sign_in(client)
    for path in ("/ui/routes/reload", "/ui/replay", "/ui/deliveries/1/replay", "/ui/events/evt_x/replay", "/ui/logout"):
        response = await client.post(path, data={"confirm": "yes", "ids": "1"}, allow_redirects=False)
        assert response.status == 403, path
        assert "CSRF" in await response.text()


async def test_without_an_admin_token_the_console_is_off(app_client, tmp_path):
    config = raw(tmp_path)
    del config["server"]["admin_token"]
    client = await app_client(config)
    for path in ("/ui/", "/ui/login"):
        response = await client.get(path, allow_redirects=False)
        assert response.status == 404 and "server.admin_token" in await response.text()
    response = await client.post("/ui/login", data={"token": ""}, allow_redirects=False)
    assert response.status == 404


async def test_static_files_are_served_from_the_package_and_nothing_else(app_client, tmp_path):
    client = await app_client(raw(tmp_path))
    css = await client.get("/ui/static/console.css")
    assert css.status == 200 and css.headers["Content-Type"].startswith("text/css")
    for name in ("..%2Fpages.py", "pages.py", "nothing.js", ".hidden.js", "..%2F..%2Fconfig.py"):
        assert (await client.get(f"/ui/static/{name}", allow_redirects=False)).status == 404, name
    assert (await client.get("/ui", allow_redirects=False)).headers["Location"] == "/ui/"


# ---------------------------------------------------------------------------- a conversation


async def test_a_conversation_shows_texts_and_replies_with_their_state_and_the_opt_out(app_client, tmp_path):
    """Through the real reply path (Slack's Events API -> an sms.reply -> Skycore), as
    tests/test_replies.py drives it: delivered (N202 report), failed (E report), not sent (STOP)."""
    async with fake_slack() as slack, fake_skycore() as skycore:
        await _a_conversation(app_client, tmp_path, slack, skycore)


async def _a_conversation(app_client: Any, tmp_path: Path, slack: Any, skycore: Any) -> None:
    client = await app_client({**replies_config(tmp_path, slack, skycore), "server": {"admin_token": ADMIN}})
    bridge = Bridge(client, slack, skycore)
    thread = await bridge.thread()  # the texter: "Are you open tomorrow?"
    await bridge.reply("Yes, from 9 to 5.", thread)
    await bridge.reply("Bring the coupon!", thread)
    first, second = await skycore.wait_for(2)
    await bridge.settled()
    await bridge.postback(report("N202", first.tracking_id))
    await bridge.postback(report("E301", second.tracking_id, "Failed"))
    await bridge.postback(mo(2, "STOP"))
    await bridge.reply("Sorry to see you go", thread)
    await bridge.settled()

    assert (await sign_in(client)).status == 303
    response = await client.get(f"/ui/conversations?texter={TEXTER}&short_code={SHORT_CODE}")
    html = await response.text()
    assert response.status == 200 and "<h1>+1 555-123-4888 and 60856</h1>" in html
    said = re.findall(r'<p class="text">([^<]*)</p>', html)
    assert said == ["Are you open tomorrow?", "Yes, from 9 to 5.", "Bring the coupon!", "STOP", "Sorry to see you go"]
    states = re.findall(r'<span class="badge ([a-z-]+)">', html)
    assert states == ["out", "delivered", "failed", "not-sent"]  # the opt-out state, then each reply's
    assert "opted out of 60856 (STOP)" in html and "delivery report E301" in html
    listing = await client.get("/ui/conversations")
    assert f"texter=%2B{TEXTER}&amp;short_code={SHORT_CODE}" in await listing.text()  # among the recent ones


async def test_an_earlier_page_of_a_conversation_shows_its_replies_state(app_client, tmp_path):
    """The page reads the delivery reports from its oldest message on (bench/console.py: a busy
    texter's older ones cost 30-50 ms): a reply two pages back still finds its report."""
    async with fake_slack() as slack, fake_skycore() as skycore:
        client = await app_client({**replies_config(tmp_path, slack, skycore), "server": {"admin_token": ADMIN}})
        bridge = Bridge(client, slack, skycore)
        thread = await bridge.thread()
        await bridge.reply("Yes, from 9 to 5.", thread)
        (sent,) = await skycore.wait_for(1)
        await bridge.settled()
        await bridge.postback(report("N202", sent.tracking_id))
        for n in range(10, 60):  # a page (50) of newer texts
            await bridge.postback(mo(n, f"text {n}"))
        await bridge.settled()
        await sign_in(client)
        newest = await (await client.get(f"/ui/conversations?texter={TEXTER}&short_code={SHORT_CODE}")).text()
        assert "Yes, from 9 to 5." not in newest
        earlier = re.search(r'<a href="([^"]+)">Earlier messages</a>', newest).group(1)
        html = await (await client.get(html_unescape(earlier))).text()
        assert "Yes, from 9 to 5." in html
        assert re.findall(r'<span class="badge ([a-z-]+)">', html) == ["in", "delivered"]  # not opted out; the reply


def test_a_reply_is_sending_while_its_sms_waits():
    reply = {"fields": {"slack": {"user": "U1"}}}
    waiting = DeliveryRow(1, "evt_1", "sms", "replies", "pending", 1, 0.0, 5.0, 0.0, "HTTP 503")
    assert reply_state(reply, [waiting], {}) == ("sending", "HTTP 503")
    crm_only = DeliveryRow(2, "evt_1", "crm", "both-sides", "delivered", 1, 0.0, None, 0.0, None)
    assert reply_state(reply, [crm_only], {})[0] == "not sent"


# ---------------------------------------------------------------------------- the same data as the admin API


def linked(html: str, prefix: str) -> list[str]:
    """Ids linked from the table rows, in order (`/ui/events/<id>`)."""
    return re.findall(rf'<a (?:class="mono" )?href="{prefix}([^"?]+)"', html)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The `store:` URL: SQLite, and PostgreSQL when BRIDGE_TEST_POSTGRES_URL is set."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bridge.db'}"
    return request.getfixturevalue("pg_url")


async def test_pages_list_what_the_admin_api_lists_and_page_with_its_cursors(app_client, tmp_path, backend):
    client = await app_client({**raw(tmp_path), "store": backend})
    for n in range(57):
        response = await client.post("/postback", data=sms(n, sender=f"1555010{n % 3:04d}", text=f"hi {n}"))
        assert response.status == 200
    await sign_in(client)
    bearer = {"Authorization": f"Bearer {ADMIN}"}

    async def admin_events(query: str) -> tuple[list[str], str | None]:
        body = await (await client.get(f"/admin/events?{query}", headers=bearer)).json()
        return [e["id"] for e in body["events"]], body["next"]

    first = await client.get("/ui/events")
    html = await first.text()
    expected, cursor = await admin_events("limit=50")
    assert linked(html, "/ui/events/") == expected and cursor is not None
    older = html_unescape(re.search(r'<a href="([^"]+)">Older events</a>', html).group(1))
    rest = await (await client.get(older)).text()
    assert linked(rest, "/ui/events/") == (await admin_events(f"limit=50&cursor={cursor}"))[0]
    assert len(linked(rest, "/ui/events/")) == 7 and "Older events" not in rest

    search = "texter=%2B1+555-010-0001&text=HI+1"
    found = linked(await (await client.get(f"/ui/events?{search}")).text(), "/ui/events/")
    assert found == (await admin_events(f"{search}&limit=50"))[0] and len(found) == 5  # n = 19, 16, 13, 10, 1

    pages = await (await client.get("/ui/deliveries")).text()
    body = await (await client.get("/admin/deliveries?limit=50", headers=bearer)).json()
    ids = re.findall(r'<td class="num">(\d+)</td>\s*<td><a class="mono"', pages)
    assert [int(i) for i in ids] == [d["id"] for d in body["deliveries"]]
    assert f"before_id={body['next']}" in pages


async def test_a_bad_cursor_or_filter_is_a_400_page(app_client, tmp_path):
    client = await app_client(raw(tmp_path))
    await sign_in(client)
    for path in (
        "/ui/events?cursor=nonsense",
        "/ui/events?since=soon",
        "/ui/deliveries?before_id=x",
        "/ui/deliveries?status=lost",
    ):
        response = await client.get(path)
        assert response.status == 400 and response.content_type == "text/html", path


async def test_while_the_store_cannot_be_reached_pages_say_so_with_a_503(app_client, tmp_path):
    config = {**raw(tmp_path), "store": f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"}
    client = await app_client(config)
    await sign_in(client)  # the sign-in does not need the store
    for path in ("/ui/", "/ui/events", "/ui/deliveries", "/ui/conversations?texter=1&short_code=2"):
        response = await client.get(path)
        assert response.status == 503, path
        assert "The store is not reachable" in await response.text() and response.content_type == "text/html"


async def test_a_replay_that_cannot_be_done_says_why_on_the_page(app_client, tmp_path, sink):
    config = raw(tmp_path)
    config["destinations"]["crm"]["url"] = sink.url + "/crm"
    client = await app_client(config)
    accepted = await (await client.post("/postback", data=sms(1))).json()
    await sink.wait_for(1)
    await sign_in(client)
    page = await (await client.get(f"/ui/events/{accepted['id']}")).text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    back = f"/ui/events/{accepted['id']}"

    async def replay(delivery: str, **form: str) -> str:
        response = await client.post(f"/ui/deliveries/{delivery}/replay", data={"csrf": csrf, "back": back, **form})
        assert response.status == 200 and response.url.path == back
        return re.search(r'<p class="notice" role="status">([^<]*)</p>', await response.text()).group(1)

    async def delivered() -> bool:
        response = await client.get("/admin/deliveries/1", headers={"Authorization": f"Bearer {ADMIN}"})
        return (await response.json())["status"] == "delivered"

    await eventually(delivered)
    assert await replay("1") == "Not replayed: it is delivered already, or its destination is no longer in the config."
    assert await replay("999") == "Nothing to replay: there is no such delivery."
    assert await replay("1", force="1") == "Replayed 1 delivery: due now."
    await sink.wait_for(2)
    nothing = await client.post("/ui/replay", data={"csrf": csrf, "confirm": "yes", "back": "/ui/deliveries"})
    assert "Nothing was replayed" in await nothing.text()


async def test_the_bulk_replay_confirmation_says_which_deliveries_the_filter_takes(app_client, tmp_path, sink):
    config = raw(tmp_path)
    sink.default = 400  # dead at once
    config["destinations"] = {
        "crm": {"type": "webhook", "url": sink.url + "/crm"},
        "flaky": {"type": "webhook", "url": "http://127.0.0.1:9/x", "retry": {"initial": "1h", "max_interval": "1h"}},
    }
    config["default"] = ["crm", "flaky"]
    client = await app_client(config)
    await client.post("/postback", data=sms(1))
    auth = {"Authorization": f"Bearer {ADMIN}"}

    async def settled() -> bool:
        dead = await (await client.get("/admin/deliveries?status=dead", headers=auth)).json()
        failed = await (await client.get("/admin/deliveries?status=failed", headers=auth)).json()
        return len(dead["deliveries"]) == 1 and len(failed["deliveries"]) == 1

    await eventually(settled)
    await sign_in(client)
    csrf = re.search(r'name="csrf" value="([^"]+)"', await (await client.get("/ui/deliveries")).text()).group(1)

    async def confirmation(**filters: str) -> str:
        form = {"csrf": csrf, "scope": "filter", "back": "/ui/deliveries", **filters}
        text = await (await client.post("/ui/replay", data=form)).text()
        return html_unescape(re.search(r"<p>These are ([^<]*)</p>", text).group(1))

    said = " Each is sent again now, as a new series of attempts, with the same event id."
    failed = "waiting for a retry after a failed attempt"
    shows = "all that this filter shows"
    assert await confirmation(status="dead") == f"{shows} (status dead): only dead deliveries.{said}"
    assert await confirmation(status="failed") == f"{shows} (status failed): only deliveries {failed}.{said}"
    assert await confirmation() == f"all that the list shows (no filter): the dead deliveries and those {failed}.{said}"
