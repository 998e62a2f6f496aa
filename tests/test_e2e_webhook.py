"""End to end: the real `postback-bridge serve` process, a real sink, real XML."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from cloudevents.v1.http import from_http
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.conftest import POSTBACKS, eventually, post, raw_receiver, sms

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
FAST_RETRY = {"initial": "50ms", "max_interval": "200ms", "max_age": "1h"}


def webhook_config(url: str, client: str, **extra: object) -> dict:
    return {
        "retry": FAST_RETRY,
        "destinations": {"crm": {"type": "webhook", "url": url + "/hook", "client": client, **extra}},
        "default": ["crm"],
    }


async def test_signed_event_verifies_with_standardwebhooks(sink, bridge_factory, webhook_client):
    bridge = bridge_factory(webhook_config(sink.url, webhook_client, secret=SECRET))
    bridge.start()
    status, body = await post(bridge.url + "/postback", (POSTBACKS / "sms_mo_transactionid.xml").read_bytes())
    assert status == 200 and body["status"] == "accepted"
    (request,) = await sink.wait_for(1)
    payload = Webhook(SECRET).verify(request.body, request.headers)
    assert payload["id"] == body["id"] == request.headers["webhook-id"]
    assert payload["type"] == "sms.received"
    assert payload["from"] == "+15552312102"
    assert request.headers["User-Agent"].startswith("postback-bridge/")
    assert bridge.stop() == 0


@pytest.mark.slow
async def test_rotating_secrets_each_sign_and_either_verifies(sink, bridge_factory, webhook_client):
    """`secret: [new, old]`: one signature per secret in `webhook-signature`, so receivers still
    on the old secret and those already on the new one both verify (Standard Webhooks rotation)."""
    new = "whsec_" + base64.b64encode(b"the-new-signing-key-of-32-bytes!").decode()
    bridge = bridge_factory(webhook_config(sink.url, webhook_client, secret=[new, SECRET]))
    assert "signed with 2 secrets" in bridge.cli("check-config", "-c", str(bridge.config_path)).stdout
    bridge.start()
    status, body = await post(bridge.url + "/postback", sms(1))
    assert status == 200
    (request,) = await sink.wait_for(1)
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    for secret in (new, SECRET):
        assert Webhook(secret).verify(request.body, request.headers)["id"] == body["id"]
    other = "whsec_" + base64.b64encode(b"a-key-this-endpoint-never-had!!!").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(request.body, request.headers)
    assert bridge.stop() == 0


async def test_cloudevents_structured(sink, bridge_factory, webhook_client):
    bridge = bridge_factory(webhook_config(sink.url, webhook_client, format="cloudevents"))
    bridge.start()
    status, body = await post(bridge.url + "/postback", (POSTBACKS / "mms_mo_v1.3.xml").read_bytes())
    assert status == 200
    (request,) = await sink.wait_for(1)
    assert request.headers["Content-Type"].startswith("application/cloudevents+json")
    event = from_http(request.headers, request.body)
    assert event["id"] == body["id"]
    assert event["type"] == "com.skycore.mms.received"
    assert event.data["media"][0]["url"].endswith("1.jpg")


async def test_an_unsigned_webhook_carries_the_event_id_as_webhook_id_too(sink, bridge_factory, webhook_client):
    """Receivers deduplicate on `webhook-id`: it is sent with no `secret` as well, unsigned."""
    bridge = bridge_factory(webhook_config(sink.url, webhook_client))
    bridge.start()
    status, body = await post(bridge.url + "/postback", sms(1))
    assert status == 200
    (request,) = await sink.wait_for(1)
    assert request.headers["webhook-id"] == body["id"] == request.json()["id"]
    assert "webhook-signature" not in request.headers and "webhook-timestamp" not in request.headers


@pytest.mark.slow
async def test_500_500_200_is_one_delivery(sink, bridge_factory, webhook_client):
    sink.responses = [500, 500, 200]
    bridge = bridge_factory(webhook_config(sink.url, webhook_client))
    bridge.start()
    status, _ = await post(bridge.url + "/postback", sms(1))
    assert status == 200
    await sink.wait_for(3)
    await asyncio.sleep(0.5)
    assert len(sink.received) == 3
    listing = json.loads(bridge.cli("deliveries", "-c", str(bridge.config_path), "--json").stdout)
    assert [d["status"] for d in listing] == ["delivered"]
    assert listing[0]["attempts"] == 3


@pytest.mark.slow
async def test_400_is_dead_with_reason_and_not_retried(sink, bridge_factory, webhook_client):
    sink.responses = [400]
    bridge = bridge_factory(webhook_config(sink.url, webhook_client))
    bridge.start()
    await post(bridge.url + "/postback", sms(1))
    await sink.wait_for(1)
    await asyncio.sleep(0.6)
    assert len(sink.received) == 1
    listing = json.loads(bridge.cli("deliveries", "-c", str(bridge.config_path), "--json").stdout)
    assert listing[0]["status"] == "dead"
    assert "HTTP 400" in listing[0]["last_error"]


@pytest.mark.slow
async def test_retry_after_is_honoured(sink, bridge_factory, webhook_client):
    sink.responses = [(429, {"Retry-After": "1"}), 200]
    config = webhook_config(sink.url, webhook_client)
    config["retry"] = {"initial": "10ms", "max_interval": "5s", "max_age": "1h"}
    bridge = bridge_factory(config)
    bridge.start()
    await post(bridge.url + "/postback", sms(1))
    first, second = await sink.wait_for(2, timeout=10)
    assert second.at - first.at >= 0.95


async def test_same_postback_twice_is_one_delivery(sink, bridge_factory, webhook_client):
    bridge = bridge_factory(webhook_config(sink.url, webhook_client))
    bridge.start()
    body = (POSTBACKS / "sms_mo_transactionid.xml").read_bytes()
    (s1, b1), (s2, b2) = [await post(bridge.url + "/postback", body) for _ in range(2)]
    assert (s1, s2) == (200, 200)
    assert (b1["status"], b2["status"]) == ("accepted", "duplicate")
    assert b1["id"] == b2["id"]
    await sink.wait_for(1)
    await asyncio.sleep(0.5)
    assert len(sink.received) == 1


@pytest.mark.slow
async def test_kill_9_with_sink_down_then_everything_delivered(sink, bridge_factory, webhook_client):
    sink.default = 503
    bridge = bridge_factory(webhook_config(sink.url, webhook_client))
    bridge.start()
    ids = set()
    for n in range(20):
        status, body = await post(bridge.url + "/postback", sms(n))
        assert status == 200
        ids.add(body["id"])
    bridge.kill()
    sink.default = 200
    bridge.start()
    await eventually(
        lambda: ids <= {r.json()["id"] for r in sink.received}, waits=100, interval=0.2, what="every event at the sink"
    )
    assert bridge.stop() == 0


async def test_https_receiver_with_its_certificate_checked(bridge_factory, tmp_path, webhook_client):
    """The real process posts over TLS, trusting the CA that SSL_CERT_FILE names (as on a host
    with a private CA), and refuses a receiver whose certificate it cannot verify."""
    import ssl

    import trustme
    from aiohttp import web

    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_tls)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        config = {
            "retry": FAST_RETRY,
            "destinations": {
                "trusted": {"type": "webhook", "url": f"https://localhost:{port}/hook", "client": webhook_client},
                "wrong_name": {"type": "webhook", "url": f"https://127.0.0.1:{port}/hook", "client": webhook_client},
            },
            "default": ["trusted", "wrong_name"],
        }
        bridge = bridge_factory(config, env={"SSL_CERT_FILE": str(tmp_path / "ca.pem")})
        await asyncio.to_thread(bridge.start)
        status, body = await post(bridge.url + "/postback", sms(1))
        assert status == 200
        await eventually(lambda: received, waits=100, what="a delivery to the trusted name")
        assert [e["id"] for e in received] == [body["id"]]  # once: the other name is not trusted
        await asyncio.sleep(0.5)
        attempts = [
            line
            for line in bridge.log_lines()
            if line.get("msg") == "delivery attempt" and line.get("destination") == "wrong_name"
        ]
        assert attempts and attempts[0]["outcome"] == "retry"
        assert "certificate" in attempts[0]["error"].lower()
        assert len(received) == 1
        assert await asyncio.to_thread(bridge.stop) == 0
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------- client: builtin | aiohttp


async def test_both_clients_send_the_same_request(bridge_factory):
    """`client: aiohttp` is a way back, not another request: the request line, every header (the
    Basic credentials of a non-ASCII password in UTF-8, as http1 makes them) and the body are the
    same, in the same order; aiohttp adds no Accept or Accept-Encoding of its own."""
    requests: list[tuple[bytes, list[tuple[str, str]], bytes]] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            start, *lines = head[:-4].split(b"\r\n")
            fields = [(name, value.strip()) for name, _, value in (line.decode().partition(":") for line in lines)]
            body = await reader.readexactly(int(dict(fields)["Content-Length"]))
            requests.append((start, fields, body))
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    async with raw_receiver(record) as url:
        hook = url.replace("http://", "http://bridge:p%C3%A4ss-W0rd@") + "/hook?team=7"
        options = {"type": "webhook", "url": hook, "headers": {"X-Api-Key": "k3y_Vq8RtZ2m"}}
        bridge = bridge_factory(
            {
                "destinations": {"ours": {**options, "client": "builtin"}, "theirs": {**options, "client": "aiohttp"}},
                "default": ["ours", "theirs"],
            }
        )
        bridge.start()
        status, body = await post(bridge.url + "/postback", sms(1))
        assert status == 200
        for _ in range(100):
            if len(requests) == 2:
                break
            await asyncio.sleep(0.05)
        assert bridge.stop() == 0
    assert len(requests) == 2
    ours, theirs = requests
    assert ours == theirs
    start, fields, sent = ours
    assert start == b"POST /hook?team=7 HTTP/1.1"
    basic = "Basic " + base64.b64encode("bridge:päss-W0rd".encode()).decode()
    assert ("Authorization", basic) in fields and ("X-Api-Key", "k3y_Vq8RtZ2m") in fields
    assert json.loads(sent)["id"] == body["id"]


async def test_a_2xx_counts_once_its_status_line_is_in_with_the_builtin_client_only(bridge_factory, webhook_client):
    """The one rule aiohttp cannot follow (docs/destinations/webhook.md): a receiver that sends
    `200 OK` and then never ends its head has the event, and http1 counts it delivered; aiohttp
    gives a response only once the head is whole, so with it the attempt times out and is
    retried (the receiver may get the event twice). This is also how a test tells which client
    sent: one that ignored `client: aiohttp` would deliver here."""

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n")
        await writer.drain()
        await asyncio.sleep(30)

    async with raw_receiver(stalls) as url:
        config = webhook_config(url, webhook_client, timeout="1s")
        config["retry"] = {"initial": "30s", "max_interval": "30s", "max_age": "1h"}
        bridge = bridge_factory(config)
        bridge.start()
        status, _ = await post(bridge.url + "/postback", sms(1))
        assert status == 200
        attempts: list[dict] = []
        for _ in range(100):
            attempts = [line for line in bridge.log_lines() if line.get("msg") == "delivery attempt"]
            if attempts:
                break
            await asyncio.sleep(0.05)
        assert bridge.stop() == 0
    assert len(attempts) == 1
    if webhook_client == "builtin":
        assert attempts[0]["outcome"] == "delivered"
    else:
        assert (attempts[0]["outcome"], attempts[0].get("error")) == ("retry", "timeout after 1s")
