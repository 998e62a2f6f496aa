"""MMS media (CONTRACT §9, issue 22): each file fetched once after the 200 by the `~media` step,
kept under its SHA-256 (a directory, or S3 on moto's server), linked from the event as
`archived_url` (a signed, expiring `/media/<sha256>` link), and the event's deliveries held
until the step ends. A media server on 127.0.0.1 serves pictures, a huge file, a slow one,
redirects and a 404; the SSRF rules are checked with `allow_private` off."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from bridge.config import build
from bridge.media import links
from bridge.media.fetch import Kept, NotFetched, TooLarge, fetch, session
from bridge.media.guard import GuardedResolver, Policy
from bridge.media.stores import FileStore, S3Store
from bridge.mediatypes import sniff
from bridge.runtime import RUNTIME
from tests.conftest import POSTBACKS, eventually, post, serving
from tests.test_email import mail_servers, start_mail_server  # noqa: F401 (mail_servers: the fixture)
from tests.test_slack import mms
from tests.test_store_contract import pg_url  # noqa: F401 (the fixture: a fresh PostgreSQL schema)

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(range(256)) * 8 + b"\xff\xd9"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200)
HUGE = 2 * 1024 * 1024
MAX_BYTES = 64 * 1024
PUBLIC = "https://bridge.example.com"


class MediaServer:
    """Skycore's media host, on 127.0.0.1: what it serves, and every request it got."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # (the address it was asked on, path)
        self.failures: dict[str, int] = {}  # path -> how many 503s before it answers
        self.base = ""
        self.port = 0
        self.closing = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else ("?", 0)
        self.seen.append((sockname[0], request.path))
        name = request.match_info["name"]
        if self.failures.get(name, 0) > 0:
            self.failures[name] -= 1
            return web.Response(status=503)
        if name == "2.txt":  # the files of the MMS_MO shapes in tests/data/postbacks
            return web.Response(text="Hello from the MMS", content_type="text/plain")
        if name == "3.smil":
            return web.Response(text='<smil><body><par><img src="1.jpg"/></par></body></smil>')
        if name in ("pic.jpg", "1.jpg"):  # the origin says HTML: the bridge must not believe it
            return web.Response(body=JPEG, headers={"Content-Type": "text/html"})
        if name == "pic.png":
            return web.Response(body=PNG, content_type="image/png")
        if name == "note.txt":
            return web.Response(body=b"<script>alert(1)</script> just text", content_type="text/html")
        if name == "huge.bin":  # chunked: no Content-Length to refuse it by
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(HUGE // 65536):
                await response.write(b"\0" * 65536)
            await response.write_eof()
            return response
        if name == "slow.jpg":  # answers only once the test is over
            await self.closing.wait()
            return web.Response(body=JPEG)
        if name == "same.jpg":
            return web.Response(status=302, headers={"Location": "/pic.jpg"})
        if name == "elsewhere.jpg":  # the same machine by another name: another host
            return web.Response(status=302, headers={"Location": f"http://localhost:{self.port}/pic.jpg"})
        return web.Response(status=404)


@pytest.fixture
async def media_server() -> AsyncIterator[MediaServer]:
    server = MediaServer()
    app = web.Application()
    app.router.add_get("/{name}", server.handle)
    app.router.add_get("/mms/{id}/{name}", server.handle)
    async with serving(app) as server.base:
        server.port = URL(server.base).port or 0
        yield server
        server.closing.set()  # the slow file's handler ends


def config(tmp_path: Path, sink_url: str, **media: Any) -> dict[str, Any]:
    media.setdefault("public_url", PUBLIC)
    return {
        "store": f"sqlite:///{tmp_path / 'bridge.db'}",
        "retry": {"initial": "50ms", "max_interval": "200ms", "max_age": "1h"},
        "media": {"max_bytes": MAX_BYTES, "timeout": "500ms", "wait": "3s", "allow_private": True, **media},
        "destinations": {"crm": {"type": "webhook", "url": sink_url + "/hook"}},
        "default": ["crm"],
    }


# ---------------------------------------------------------------------------- end to end, in process


async def test_files_are_kept_and_the_webhook_gets_archived_urls(app_client, sink, media_server, tmp_path):
    m = media_server.base
    client = await app_client(config(tmp_path, sink.url, wait="30s"))
    urls = [f"{m}/pic.jpg", f"{m}/huge.bin", f"{m}/missing.jpg", f"{m}/same.jpg", f"{m}/note.txt"]
    started = time.monotonic()
    response = await client.post("/postback", data=mms(*urls))
    assert response.status == 200 and (await response.json())["status"] == "accepted"
    (request,) = await sink.wait_for(1, timeout=10)
    # every file's fate was settled (none to retry): the delivery went at once, not after 30s
    assert time.monotonic() - started < 10
    media = request.json()["media"]
    assert [item["url"] for item in media] == urls
    picture, huge, missing, same, note = media
    digest = hashlib.sha256(JPEG).hexdigest()
    assert picture["sha256"] == digest and picture["content_type"] == "image/jpeg" and picture["size"] == len(JPEG)
    assert picture["archived_url"].startswith(f"{PUBLIC}/media/{digest}?expires=")
    assert same["sha256"] == digest  # a redirect on the same host is followed; the file is kept once
    assert "archived_url" not in huge and "archived_url" not in missing  # too large: linked; 404: gone
    assert note["content_type"] == "text/plain; charset=utf-8"  # sniffed: not the origin's text/html
    assert (tmp_path / "media" / digest).read_bytes() == JPEG
    assert len(list((tmp_path / "media").iterdir())) == 2  # the picture once, and the note
    # the huge file was not read past max_bytes (and is not kept)
    assert not any(p.stat().st_size > MAX_BYTES for p in (tmp_path / "media").iterdir())

    # the link works, from the event, with the sniffed type
    served = await client.get(URL(picture["archived_url"]).path_qs)
    assert served.status == 200 and await served.read() == JPEG
    assert served.headers["Content-Type"] == "image/jpeg"
    assert served.headers["X-Content-Type-Options"] == "nosniff"
    assert served.headers["Content-Disposition"] == "inline"
    text = await client.get(URL(note["archived_url"]).path_qs)
    assert text.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert text.headers["Content-Disposition"].startswith("attachment; filename=")

    # the stored event has them too (what a replay sends), and the step is a delivery like any
    event_id = request.json()["id"]
    stored = await client.app[RUNTIME].store.get_event(event_id)
    assert stored["media"] == media

    async def settled() -> bool:
        rows = await client.app[RUNTIME].store.event_deliveries(event_id)
        return {(r.destination, r.status) for r in rows} == {("~media", "delivered"), ("crm", "delivered")}

    await eventually(settled, 5)


@pytest.mark.parametrize("shape", sorted(p.name for p in POSTBACKS.glob("mms_mo_*.xml")))
async def test_every_mms_shape_gets_its_files_kept(app_client, sink, media_server, tmp_path, shape):
    """Skycore's MMS_MO postbacks as documented (v1.3, the 2014 wrapper, with a SUBJECT), their
    FILE URLs pointed at the media server."""
    body = re.sub(rb"https://media\.example\.com/", f"{media_server.base}/".encode(), (POSTBACKS / shape).read_bytes())
    client = await app_client(config(tmp_path, sink.url, wait="30s"))
    assert (await client.post("/postback", data=body)).status == 200
    (request,) = await sink.wait_for(1, timeout=10)
    kinds = [item.get("content_type") for item in request.json()["media"]]
    assert kinds == ["image/jpeg", "text/plain; charset=utf-8", "application/smil"]
    assert all(item["archived_url"].startswith(PUBLIC) for item in request.json()["media"])


async def test_deliveries_wait_for_a_slow_file_until_media_wait(app_client, sink, media_server, tmp_path):
    client = await app_client(config(tmp_path, sink.url, wait="1500ms"))
    started = time.monotonic()
    response = await client.post("/postback", data=mms(f"{media_server.base}/slow.jpg"))
    assert response.status == 200  # answered at once: a postback never waits for its media
    assert time.monotonic() - started < 1
    (request,) = await sink.wait_for(1, timeout=10)
    waited = time.monotonic() - started
    assert 1.3 < waited < 6, waited
    assert "archived_url" not in request.json()["media"][0]  # not fetched: only its URL

    async def step_dead() -> Any:
        rows = await client.app[RUNTIME].store.event_deliveries(request.json()["id"])
        return next((r for r in rows if r.destination == "~media" and r.status == "dead"), None)

    step = await eventually(step_dead, 5)
    assert "not fetched within 0.5s" in (step.last_error or "")


async def test_a_file_that_fails_at_first_is_fetched_on_a_retry(app_client, sink, media_server, tmp_path):
    media_server.failures["pic.png"] = 1
    client = await app_client(config(tmp_path, sink.url, wait="20s"))
    await client.post("/postback", data=mms(f"{media_server.base}/pic.png"))
    (request,) = await sink.wait_for(1, timeout=10)
    assert request.json()["media"][0]["content_type"] == "image/png"
    assert [path for _, path in media_server.seen] == ["/pic.png", "/pic.png"]


async def test_an_sms_or_an_mms_without_files_is_not_held(app_client, sink, tmp_path):
    client = await app_client(config(tmp_path, sink.url, wait="30s"))
    response = await client.post("/postback", data=mms())
    (request,) = await sink.wait_for(1, timeout=5)
    rows = await client.app[RUNTIME].store.event_deliveries((await response.json())["id"])
    assert [r.destination for r in rows] == ["crm"]
    assert request.json()["media"] == []


# ---------------------------------------------------------------------------- the SSRF rules


async def test_private_addresses_are_refused_without_allow_private(app_client, sink, media_server, tmp_path):
    port = media_server.port
    urls = [
        f"http://127.0.0.1:{port}/pic.jpg",
        f"http://localhost:{port}/pic.jpg",  # a name: refused for what it resolves to
        f"http://[::1]:{port}/pic.jpg",
        f"http://[::ffff:127.0.0.1]:{port}/pic.jpg",
        f"http://0.0.0.0:{port}/pic.jpg",
        f"http://2130706433:{port}/pic.jpg",  # 127.0.0.1 as one number
        f"http://0x7f.0.0.1:{port}/pic.jpg",  # and in hex
        f"http://169.254.169.254:{port}/latest/meta-data",
        f"ftp://127.0.0.1:{port}/pic.jpg",
        "…URL of Content Here…",
    ]
    client = await app_client(config(tmp_path, sink.url, wait="30s", allow_private=False))
    started = time.monotonic()
    response = await client.post("/postback", data=mms(*urls))
    (request,) = await sink.wait_for(1, timeout=10)
    assert time.monotonic() - started < 10  # refused for good: nothing to wait for
    assert all("archived_url" not in item for item in request.json()["media"])
    assert media_server.seen == []  # not one request reached it
    store, event_id = client.app[RUNTIME].store, (await response.json())["id"]

    async def step_recorded() -> bool:
        # the step releases the webhook's delivery before its own verdict is recorded
        rows = await store.event_deliveries(event_id)
        return next(r for r in rows if r.destination == "~media").status == "delivered"

    await eventually(step_recorded, 5, "the ~media step recorded as delivered")
    # why each file was not kept is in the step's attempt record, not only in the log
    shown = await (await client.get(f"/admin/events/{event_id}")).json()
    (step,) = [d for d in shown["deliveries"] if d["destination"] == "~media"]
    assert step["last_error"] is None  # it did its job: a file refused is no failure of the step
    (attempt,) = step["attempt_log"]
    assert attempt["outcome"] == "delivered"
    metadata = f"http://169.254.169.254:{port}/latest/meta-data"
    assert f"{metadata}: 169.254.169.254 is not a public address (link-local)" in attempt["error"]
    assert "…URL of Content Here…: not an http or https URL (no scheme)" in attempt["error"]


async def test_allow_networks_lets_one_in_and_a_redirect_elsewhere_is_refused(app_client, sink, media_server, tmp_path):
    m = media_server.base
    client = await app_client(
        config(tmp_path, sink.url, wait="30s", allow_private=False, allow_networks=["127.0.0.1/32"])
    )
    await client.post("/postback", data=mms(f"{m}/pic.jpg", f"{m}/elsewhere.jpg"))
    (request,) = await sink.wait_for(1, timeout=10)
    kept, redirected = request.json()["media"]
    assert kept["content_type"] == "image/jpeg"
    assert "archived_url" not in redirected  # to localhost: another host, not followed
    assert [path for _, path in media_server.seen] == ["/pic.jpg", "/elsewhere.jpg"]


class ChangingDNS(AbstractResolver):
    """A DNS that answers `media.test` with one address, then with another (DNS rebinding)."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
        assert host == "media.test"
        address = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return [ResolveResult(hostname=host, host=address, port=port, family=socket.AF_INET, proto=0, flags=0)]

    async def close(self) -> None:
        return None


async def test_the_address_is_checked_again_after_a_redirect():
    """A name that resolved to an allowed address and, at the redirect, to another: refused,
    though the other address has a server that would answer."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.transport.get_extra_info("sockname")[0])
        if request.path == "/first":
            return web.Response(status=302, headers={"Location": "/pic.jpg"})
        return web.Response(body=JPEG)

    app = web.Application()
    app.router.add_get("/{name}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    await web.TCPSite(runner, "127.0.0.2", port).start()  # the same server at the second address
    policy = Policy(allow_networks=(ipaddress.ip_network("127.0.0.1/32"),))
    try:
        # each address answers on its own (the test could fail)
        anything = Policy(allow_private=True)
        async with session(anything, GuardedResolver(anything, ChangingDNS("127.0.0.2"))) as open_client:
            url = f"http://media.test:{port}/pic.jpg"
            got = await fetch(open_client, url, policy=anything, max_bytes=MAX_BYTES, within=5)
            assert isinstance(got, Kept) and seen == ["127.0.0.2"]
        seen.clear()
        async with session(policy, GuardedResolver(policy, ChangingDNS("127.0.0.1", "127.0.0.2"))) as client:
            got = await fetch(client, f"http://media.test:{port}/first", policy=policy, max_bytes=MAX_BYTES, within=5)
        assert isinstance(got, NotFetched) and not got.retryable, got
        assert "127.0.0.2" in got.reason
        assert seen == ["127.0.0.1"]
    finally:
        await runner.cleanup()


async def test_fetch_limits(media_server):
    policy = Policy(allow_private=True)
    async with session(policy) as client:
        big = await fetch(client, f"{media_server.base}/huge.bin", policy=policy, max_bytes=MAX_BYTES, within=5)
        slow = await fetch(client, f"{media_server.base}/slow.jpg", policy=policy, max_bytes=MAX_BYTES, within=0.3)
        gone = await fetch(client, f"{media_server.base}/missing.jpg", policy=policy, max_bytes=MAX_BYTES, within=5)
        flaky = await fetch(client, "http://127.0.0.1:1/x.jpg", policy=policy, max_bytes=MAX_BYTES, within=5)
    assert isinstance(big, TooLarge)
    assert isinstance(slow, NotFetched) and slow.retryable
    assert isinstance(gone, NotFetched) and not gone.retryable and gone.reason == "HTTP 404"
    assert isinstance(flaky, NotFetched) and flaky.retryable  # nothing listens: try again


def test_sniffing():
    assert sniff(JPEG) == "image/jpeg" and sniff(PNG) == "image/png"
    assert sniff(b"GIF89a....") == "image/gif"
    assert sniff(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert sniff(b"\0\0\0\x18ftyp3gp4\0\0") == "video/3gpp"
    assert sniff(b"\0\0\0\x18ftypisom\0\0") == "video/mp4"
    assert sniff(b"#!AMR\n\x3c") == "audio/amr"
    assert sniff(b"BEGIN:VCARD\r\nVERSION:3.0") == "text/vcard"
    assert sniff("héllo".encode()) == "text/plain; charset=utf-8"
    assert sniff(b"<svg onload=alert(1)>") == "text/plain; charset=utf-8"  # never image/svg+xml
    assert sniff(b"<html><script>") == "text/plain; charset=utf-8"  # never text/html
    assert sniff(b"\x00\x01\x02binary") == "application/octet-stream"


# ---------------------------------------------------------------------------- the signed link


async def test_signed_links_expire_and_cannot_be_forged(app_client, sink, tmp_path):
    client = await app_client(config(tmp_path, sink.url))
    runtime = client.app[RUNTIME]
    await eventually(lambda: runtime.media_key is not None)
    key = runtime.media_key
    digest = hashlib.sha256(JPEG).hexdigest()
    await runtime.media_store.put(digest, JPEG, "image/jpeg")
    now = int(time.time())
    good = links.path(key, digest, now + 60)
    assert (await client.get(good)).status == 200
    expired = links.path(key, digest, now - 1)
    assert (await client.get(expired)).status == 403
    longer = good.replace(f"expires={now + 60}", f"expires={now + 99999}")  # the same signature, a later expiry
    assert (await client.get(longer)).status == 403
    other = hashlib.sha256(b"another file").hexdigest()
    assert (await client.get(good.replace(digest, other))).status == 403  # another file's link
    assert (await client.get(f"/media/{digest}")).status == 403  # unsigned
    assert (await client.get(links.path(b"another key" * 3, digest, now + 60))).status == 403
    unknown = await client.get(links.path(key, other, now + 60))
    assert unknown.status == 404  # signed, but not kept (or purged)
    for bad in ("/media/..%2F..%2Fetc%2Fpasswd?expires=1&sig=x", f"/media/{digest}?expires=abc&sig=zz"):
        assert (await client.get(bad)).status in (403, 404)


async def test_the_key_is_kept_in_the_store_and_survives_a_restart(app_client, sink, tmp_path):
    first = await app_client(config(tmp_path, sink.url))
    await eventually(lambda: first.app[RUNTIME].media_key is not None)
    key = first.app[RUNTIME].media_key
    await first.close()
    again = await app_client(config(tmp_path, sink.url))
    await eventually(lambda: again.app[RUNTIME].media_key is not None)
    assert again.app[RUNTIME].media_key == key
    configured = await app_client({**config(tmp_path, sink.url, secret="a-secret-of-32-characters-or-so!")})
    await eventually(lambda: configured.app[RUNTIME].media_key is not None)
    assert configured.app[RUNTIME].media_key == links.key_from_secret("a-secret-of-32-characters-or-so!")


async def test_media_is_404_without_a_media_section(app_client, sink, tmp_path):
    raw = config(tmp_path, sink.url)
    del raw["media"]
    client = await app_client(raw)
    assert (await client.get(f"/media/{'0' * 64}?expires=1&sig=x")).status == 404


# ---------------------------------------------------------------------------- stores


async def test_file_store_purges_what_was_kept_before_keep(tmp_path):
    store = FileStore(str(tmp_path / "media"))
    old, new = hashlib.sha256(b"old").hexdigest(), hashlib.sha256(b"new").hexdigest()
    await store.put(old, b"old", "text/plain")
    await store.put(new, b"new", "text/plain")
    past = time.time() - 1000
    import os

    os.utime(tmp_path / "media" / old, (past, past))
    assert await store.purge(time.time() - 500) == 1
    assert await store.get(old) is None and await store.get(new) == b"new"
    with pytest.raises(ValueError):
        await store.get("../../etc/passwd")


@pytest.fixture(scope="module")
def moto_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


async def test_s3_store_on_moto(moto_server, tmp_path, app_client, sink, media_server):
    from aiobotocore.session import get_session

    keys = {"access_key_id": "testing", "secret_access_key": "testing"}
    s3 = {"endpoint_url": moto_server, "region": "us-east-1", **keys}
    async with get_session().create_client(
        "s3", endpoint_url=moto_server, region_name="us-east-1", **{f"aws_{k}": v for k, v in keys.items()}
    ) as raw:
        await raw.create_bucket(Bucket="mms-media")
        client = await app_client(config(tmp_path, sink.url, store="s3://mms-media/bridge/files", s3=s3))
        await client.post("/postback", data=mms(f"{media_server.base}/pic.png"))
        (request,) = await sink.wait_for(1, timeout=10)
        item = request.json()["media"][0]
        listed = await raw.list_objects_v2(Bucket="mms-media", Prefix="bridge/files/")
        assert [o["Key"] for o in listed["Contents"]] == [f"bridge/files/{item['sha256']}"]
        served = await client.get(URL(item["archived_url"]).path_qs)
        assert served.status == 200 and await served.read() == PNG
        assert served.headers["Content-Type"] == "image/png"
        store = client.app[RUNTIME].media_store
        assert isinstance(store, S3Store)
        assert await store.purge(time.time() - 3600) == 0
        assert await store.purge(time.time() + 60) == 1
        assert (await client.get(URL(item["archived_url"]).path_qs)).status == 404


# ---------------------------------------------------------------------------- config


def test_config_errors_name_their_place(tmp_path):
    from bridge.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        build(
            {
                "server": {"listen": "0.0.0.0:8080", "auth": {"token": "t" * 20}},
                "store": "postgresql://bridge@db/bridge",
                "media": {"max_byte": 5, "keep": "soon", "allow_private": "yes", "store": "http://x"},
                "destinations": {"~media": {"type": "log"}},
            },
            environ={},
        )
    problems = caught.value.problems
    assert "media.max_byte: unknown key (did you mean 'max_bytes'?)" in problems
    assert any(p.startswith("media.keep: 'soon' is not a duration") for p in problems)
    assert "media.allow_private: expected true or false, got 'yes'" in problems
    assert any(p.startswith("media.store: 'http://x' is not file:///PATH or s3://") for p in problems)
    assert any(p.startswith("media.public_url: is required to listen on 0.0.0.0:8080") for p in problems)
    assert any(p.startswith("destinations.~media: a name starting with '~' is the bridge's own") for p in problems)
    with pytest.raises(ConfigError) as caught:
        build({"store": "postgresql://bridge@db/bridge", "media": {}}, environ={})
    assert caught.value.problems[0].startswith("media.store: is required with a PostgreSQL store")
    media = build({"store": f"sqlite:///{tmp_path}/b.db", "media": None}, environ={}).media
    assert media is not None and media.store == f"file://{tmp_path}/media" and media.max_bytes == 5 * 1024 * 1024
    assert media.wait == 120 and media.allow_private is False and media.public_url == "http://127.0.0.1:8080"


# ---------------------------------------------------------------------------- Slack and email


async def test_slack_uploads_kept_files_into_the_texters_thread(app_client, media_server, tmp_path):
    from tests.slack_fake import TOKEN, fake_slack

    m = media_server.base
    async with fake_slack() as slack:
        raw = config(tmp_path, "http://unused", wait="30s")
        raw["destinations"] = {
            "inbox": {
                "type": "slack", "token": TOKEN, "channel": "#sms-inbox", "api_url": slack.api_url,
                "upload_media": True,
            },
        }  # fmt: skip
        raw["default"] = ["inbox"]
        client = await app_client(raw)
        await client.post("/postback", data=mms(f"{m}/pic.jpg", f"{m}/missing.jpg", n=1))
        await eventually(lambda: slack.shared, 10, "files shared in Slack")
        (message,) = slack.posted()
        channel, thread_ts, files = slack.shared[0]
        assert channel == "C0FAKE" and thread_ts == message.ts  # in the thread the message started
        digest = hashlib.sha256(JPEG).hexdigest()
        assert files == [(f"{digest[:16]}.jpg", "MMS from +1 555-231-2102", JPEG)]
        dump = message.dump()
        assert f"{PUBLIC}/media/{digest}" in dump and "missing.jpg" in dump  # the kept copy linked, the lost one too
        assert '"type": "image"' not in dump  # shown once: as the uploaded file

        # a second MMS from the texter: its files go into the same thread
        await client.post("/postback", data=mms(f"{m}/pic.png", n=2))
        await eventually(lambda: len(slack.shared) == 2, 10, "the second MMS's files")
        assert slack.shared[1][1] == message.ts and slack.shared[1][2][0][2] == PNG

        # an upload Slack refuses: the message is posted once, with the links (never twice)
        slack.refuse_uploads = "missing_scope"
        response = await client.post("/postback", data=mms(f"{m}/pic.png", n=3, sender="15557654321"))
        event_id = (await response.json())["id"]

        async def settled() -> Any:
            rows = await client.app[RUNTIME].store.event_deliveries(event_id)
            return next((r for r in rows if r.destination == "inbox" and r.status == "delivered"), None)

        await eventually(settled, 10)
        assert len(slack.posted()) == 3 and len(slack.shared) == 2
        assert f"{PUBLIC}/media/{hashlib.sha256(PNG).hexdigest()}" in slack.posted()[-1].dump()


async def test_slack_shows_the_kept_copy_as_the_image(app_client, media_server, tmp_path):
    from tests.slack_fake import TOKEN, fake_slack

    async with fake_slack() as slack:
        raw = config(tmp_path, "http://unused", wait="30s")
        raw["destinations"] = {"inbox": {"type": "slack", "token": TOKEN, "channel": "#c", "api_url": slack.api_url}}
        raw["default"] = ["inbox"]
        client = await app_client(raw)
        await client.post("/postback", data=mms(f"{media_server.base}/pic.png"))
        (message,) = await slack.wait_for(1)
        (image,) = [b for b in message.body["blocks"] if b["type"] == "image"]
        assert image["image_url"].startswith(f"{PUBLIC}/media/{hashlib.sha256(PNG).hexdigest()}?expires=")


async def test_email_attaches_kept_files_up_to_the_cap(app_client, media_server, tmp_path, mail_servers):  # noqa: F811
    peer, server = await start_mail_server()
    mail_servers.append(server)
    m = media_server.base
    raw = config(tmp_path, "http://unused", wait="30s")
    raw["destinations"] = {
        "mail": {
            "type": "email", "smtp": {"host": "127.0.0.1", "port": peer.port, "security": "none"},
            "from": "bridge@example.com", "to": ["inbox@example.com"], "attach_media": True,
            "attach_max_bytes": len(JPEG) + 10,
        },
    }  # fmt: skip
    raw["default"] = ["mail"]
    client = await app_client(raw)
    await client.post("/postback", data=mms(f"{m}/pic.jpg", f"{m}/pic.png", f"{m}/missing.jpg"))
    (mail,) = await peer.wait_for(1)
    message = mail.message
    assert message.get_content_type() == "multipart/mixed"
    attached = [(p.get_filename(), p.get_content_type(), p.get_content()) for p in message.iter_attachments()]
    digest = hashlib.sha256(JPEG).hexdigest()
    assert attached == [(f"{digest[:16]}.jpg", "image/jpeg", JPEG)]  # the PNG is over the cap: a link
    text = message.get_body(("plain",)).get_content()
    assert f"kept copy: {PUBLIC}/media/{hashlib.sha256(PNG).hexdigest()}" in text
    assert f"{m}/missing.jpg" in text and text.count("kept copy:") == 2


# ---------------------------------------------------------------------------- kill-safety


@pytest.mark.slow
async def test_the_step_is_resumed_after_a_kill(bridge_factory, sink, media_server, tmp_path):
    """The step is a delivery: a bridge killed (-9) while its files cannot be fetched yet picks it
    up when it starts again, and the webhook gets the kept file."""
    media_server.failures["pic.png"] = 10**6  # Skycore's media host is down for now
    raw = config(tmp_path, sink.url, wait="1h")
    raw["media"]["public_url"] = PUBLIC
    bridge = bridge_factory(raw)
    bridge.start()
    status, body = await post(bridge.url + "/postback", mms(f"{media_server.base}/pic.png"))
    assert status == 200
    await eventually(lambda: len(media_server.seen) >= 2, 10, "the step trying")
    bridge.kill()
    media_server.failures["pic.png"] = 0  # back
    bridge.start()
    (request,) = await sink.wait_for(1, timeout=15)
    assert request.json()["id"] == body["id"]
    assert request.json()["media"][0]["sha256"] == hashlib.sha256(PNG).hexdigest()
    assert bridge.stop() == 0


def test_check_config_names_the_media_store_and_no_secret(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "config.yaml"
    path.write_text(
        "media: {store: 's3://mms-media/bridge', secret: a-secret-of-32-characters-or-so!,"
        " s3: {access_key_id: AKIAEXAMPLE, secret_access_key: the-s3-secret-key}}\n"
        "destinations: {log: {type: log}, inbox: {type: slack, token: xoxb-1-2, channel: '#c', upload_media: true}}\n"
        "default: [log]\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "check-config", "-c", str(path)], capture_output=True, text=True, check=True
    )
    assert "media: kept in s3://mms-media/bridge" in done.stdout
    assert "upload_media (inbox): the Slack app needs the bot scope files:write" in done.stdout
    for secret in ("a-secret-of-32", "the-s3-secret-key"):
        assert secret not in done.stdout + done.stderr


# ---------------------------------------------------------------------------- reload, PostgreSQL


async def test_a_reload_keeps_the_step_and_refuses_another_media_store(aiohttp_client, sink, media_server, tmp_path):
    import yaml

    from bridge.app import create_app
    from bridge.config import load

    media_server.failures["pic.png"] = 10**6  # down for now: the step stays pending
    raw = config(tmp_path, sink.url, wait="1h")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    app = create_app(load(path))
    client = await aiohttp_client(app)
    response = await client.post("/postback", data=mms(f"{media_server.base}/pic.png"))
    event_id = (await response.json())["id"]
    await eventually(lambda: media_server.seen, 10, "the step trying")
    runtime = app[RUNTIME]
    assert await runtime.reload() == []
    rows = await runtime.store.event_deliveries(event_id)
    assert {(r.destination, r.status) for r in rows} == {("~media", "pending"), ("crm", "pending")}  # not abandoned
    raw["media"]["store"] = f"file://{tmp_path}/elsewhere"
    path.write_text(yaml.safe_dump(raw))
    assert await runtime.reload() == ["media: the store cannot change or go while running; restart"]
    media_server.failures["pic.png"] = 0
    (request,) = await sink.wait_for(1, timeout=15)
    assert request.json()["media"][0]["content_type"] == "image/png"


@pytest.fixture
def postgres(pg_url: str) -> str:  # noqa: F811 (test_store_contract's fixture, taken before the app's)
    return pg_url


async def test_on_postgresql_the_step_releases_the_deliveries(postgres, app_client, sink, media_server, tmp_path):
    raw = config(tmp_path, sink.url, wait="30s", store=f"file://{tmp_path}/media")
    raw["store"] = postgres
    client = await app_client(raw)
    started = time.monotonic()
    await client.post("/postback", data=mms(f"{media_server.base}/pic.jpg"))
    (request,) = await sink.wait_for(1, timeout=10)
    assert time.monotonic() - started < 10
    assert request.json()["media"][0]["sha256"] == hashlib.sha256(JPEG).hexdigest()
    assert await client.app[RUNTIME].store.keep_meta("media_link_key", "x") == client.app[RUNTIME].media_key.hex()


async def test_a_media_host_that_is_down_does_not_hold_back_other_mms(app_client, sink, media_server, tmp_path):
    """The delivery loop takes a destination that fails again and again to be down and probes it
    one delivery at a time; the media step fetches from whatever host each MMS names, so its
    failures for one MMS must not slow the next one's files."""
    media_server.failures["pic.png"] = 10**6
    client = await app_client(config(tmp_path, sink.url, wait="1h"))
    for n in range(8):
        await client.post("/postback", data=mms(f"{media_server.base}/pic.png", n=n))
    await eventually(lambda: len(media_server.seen) >= 12, 10, "the steps failing again and again")
    await client.post("/postback", data=mms(f"{media_server.base}/pic.jpg", n=99))
    (request,) = await sink.wait_for(1, timeout=3)
    assert request.json()["media"][0]["content_type"] == "image/jpeg"


async def test_a_delivery_report_gets_no_thread_feedback_when_only_media_is_on(app_client, sink, tmp_path):
    """~feedback (what a reply's thread shows) is made for delivery reports only when a Slack
    destination takes replies: a media: section alone makes the bridge's own ~media, not that."""
    client = await app_client(config(tmp_path, sink.url))
    assert client.app[RUNTIME].config.internal == frozenset({"~media"})
    response = await client.post("/postback", data=(POSTBACKS / "sms_mt_n202_delivered.xml").read_bytes())
    assert response.status == 200
    await sink.wait_for(1, timeout=10)
    rows = await client.app[RUNTIME].store.event_deliveries((await response.json())["id"])
    assert [r.destination for r in rows] == ["crm"]
