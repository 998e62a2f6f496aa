"""Running it in production: metrics, the admin API, CLI replay, hot reload, retention.

The admin API with replay, a reload that removes a destination, and retention run on both
stores (PostgreSQL when BRIDGE_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bridge import cli as cli_module
from bridge import runtime as runtime_module
from bridge import serving
from bridge.app import create_app
from bridge.config import load
from bridge.errors import StoreError
from bridge.runtime import RUNTIME, purge_once, settle_heap
from bridge.store import DeliveryFilter
from bridge.store.sqlite import SQLiteStore
from tests.conftest import POSTBACKS, connect_to, eventually, free_port, post, sms
from tests.test_store_contract import (
    pg_url,  # noqa: F401  (a fixture: a fresh PostgreSQL schema)
    put,
    stalling_postgresql,
    via,
)

ADMIN = "admin-secret-token"
FAST = {"initial": "50ms", "max_interval": "200ms", "max_age": "1h"}


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The `store:` URL. Ask for it before bridge_factory, so bridges stop before the schema goes."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bridge.db'}"
    return request.getfixturevalue("pg_url")


def one_log_destination(tmp_path: Path, name: str, listen: str | None = None) -> str:
    """A config file's text: SQLite in tmp_path, and everything to one log destination `name`."""
    server = f"server: {{listen: {listen}}}\n" if listen else ""
    return (
        f"{server}store: sqlite:///{tmp_path / 'b.db'}\n"
        f"destinations:\n  {name}: {{type: log, path: {tmp_path / name}.jsonl}}\n"
        f"default: [{name}]\n"
    )


def config_for(url: str, **server: object) -> dict:
    return {
        "server": {"admin_token": ADMIN, **server},
        "retry": FAST,
        "destinations": {
            "crm": {"type": "webhook", "url": url + "/crm"},
            "audit": {"type": "webhook", "url": url + "/audit"},
        },
        "routes": [{"name": "stop", "match": {"keyword": "STOP"}, "to": ["crm"]}],
        "default": ["audit"],
    }


async def admin(bridge, method: str, path: str, token: str | None = ADMIN, **kwargs) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.request(method, bridge.url + path, headers=headers, **kwargs) as r:
        return r.status, await r.json(content_type=None)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def scrape(bridge) -> dict[tuple[str, tuple], float]:
    async with aiohttp.ClientSession() as s, s.get(bridge.url + "/metrics") as r:
        assert r.status == 200
        return samples(await r.text())


def rewrite(bridge, change) -> None:
    """Edit the running bridge's config file as an operator would."""
    config = yaml.safe_load(bridge.config_path.read_text())
    change(config)
    bridge.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


# ---------------------------------------------------------------------------- admin auth


async def test_admin_needs_the_bearer_token(sink, bridge_factory):
    bridge = bridge_factory(config_for(sink.url))
    bridge.start()
    assert (await admin(bridge, "GET", "/admin/deliveries", token=None))[0] == 401
    assert (await admin(bridge, "GET", "/admin/deliveries", token="wrong"))[0] == 401
    status, body = await admin(bridge, "GET", "/admin/deliveries")
    assert status == 200 and body == {"deliveries": [], "next": None}
    status, spec = await admin(bridge, "GET", "/admin/openapi.json")
    assert status == 200 and "/admin/replay" in spec["paths"] and "/admin/dead-letters" in spec["paths"]
    assert (await admin(bridge, "GET", "/admin/dead-letters", token=None))[0] == 401


# ---------------------------------------------------------------------------- metrics


async def test_every_metric_moves_in_an_end_to_end_run(sink, bridge_factory):
    sink.responses = [400]  # the first crm delivery dies
    bridge = bridge_factory(config_for(sink.url))
    bridge.start()
    before = await scrape(bridge)
    assert before[("bridge_build_info", (("version", "0.1.0"),))] == 1

    await post(bridge.url + "/postback", sms(1, text="STOP"))  # -> crm, dies on 400
    await post(bridge.url + "/postback", sms(1, text="STOP"))  # duplicate
    await post(bridge.url + "/postback", sms(2, text="hello"))  # -> default (audit)
    await post(bridge.url + "/postback", b"not xml")  # rejected
    await sink.wait_for(2)

    async def settled() -> bool:
        m = await scrape(bridge)
        return (
            m.get(("bridge_deliveries_dead", (("destination", "crm"),))) == 1
            and m.get(("bridge_delivery_attempts_total", (("destination", "audit"), ("outcome", "delivered")))) == 1
        )

    await eventually(settled)
    m = await scrape(bridge)
    assert m[("bridge_postbacks_received_total", (("origin", "SMS_MO"), ("outcome", "accepted"), ("reason", "")))] == 2
    assert m[("bridge_postbacks_received_total", (("origin", "SMS_MO"), ("outcome", "duplicate"), ("reason", "")))] == 1
    assert m[("bridge_postbacks_received_total", (("origin", ""), ("outcome", "rejected"), ("reason", "invalid")))] == 1
    assert m[("bridge_events_routed_total", (("route", "stop"),))] == 1  # events: the duplicate is none
    assert m[("bridge_events_routed_total", (("route", "default"),))] == 1
    (again,) = [line for line in bridge.log_lines() if line["msg"] == "postback duplicate"]
    assert again["destinations"] == [] and again["routes"] == ["stop"]  # sent nowhere: the first one went
    assert m[("bridge_delivery_attempts_total", (("destination", "crm"), ("outcome", "dead")))] == 1
    assert m[("bridge_delivery_latency_seconds_count", (("destination", "audit"),))] == 1
    assert m[("bridge_deliveries_pending", (("destination", "audit"),))] == 0
    assert m[("bridge_store_up", ())] == 1


async def test_oldest_pending_age_grows_while_a_destination_is_down(sink, bridge_factory):
    sink.default = 503
    bridge = bridge_factory(config_for(sink.url))
    bridge.start()
    await post(bridge.url + "/postback", sms(1))
    await asyncio.sleep(1.2)
    m = await scrape(bridge)
    assert m[("bridge_deliveries_pending", (("destination", "audit"),))] == 1
    assert m[("bridge_oldest_pending_delivery_age_seconds", (("destination", "audit"),))] >= 1.0


# ---------------------------------------------------------------------------- listing and replay


@pytest.mark.slow
async def test_filters_attempts_and_replay_end_to_end(sink, store, bridge_factory):
    sink.responses = [400, 400]  # the first attempts of both events die
    bridge = bridge_factory({**config_for(sink.url), "store": store})
    bridge.start()
    _, stop = await post(bridge.url + "/postback", sms(1, text="STOP"))
    _, hello = await post(bridge.url + "/postback", sms(2, text="hello"))
    await sink.wait_for(2)

    async def both_dead() -> bool:
        _, body = await admin(bridge, "GET", "/admin/deliveries?status=dead")
        return len(body["deliveries"]) == 2

    await eventually(both_dead)
    status, body = await admin(bridge, "GET", "/admin/dead-letters")
    assert status == 200 and {d["event_id"] for d in body["deliveries"]} == {stop["id"], hello["id"]}
    status, body = await admin(bridge, "GET", "/admin/dead-letters?destination=crm&status=pending")  # dead only
    assert [(d["event_id"], d["status"]) for d in body["deliveries"]] == [(stop["id"], "dead")]
    status, body = await admin(bridge, "GET", "/admin/events?keyword=stop")
    assert [e["id"] for e in body["events"]] == [stop["id"]]
    status, body = await admin(bridge, "GET", "/admin/events?type=sms.received&from=%2B15552312102")
    assert {e["id"] for e in body["events"]} == {stop["id"], hello["id"]}
    status, body = await admin(bridge, "GET", "/admin/deliveries?destination=crm")
    (crm,) = body["deliveries"]
    assert crm["event_id"] == stop["id"] and crm["status"] == "dead" and "HTTP 400" in crm["last_error"]
    status, body = await admin(bridge, "GET", "/admin/deliveries?since=not-a-time")
    assert status == 400 and "since" in body["error"]
    # a duration ago, as the CLI's --since/--until take it
    status, body = await admin(bridge, "GET", "/admin/deliveries?destination=crm&since=1h")
    assert status == 200 and [d["id"] for d in body["deliveries"]] == [crm["id"]]
    status, body = await admin(bridge, "GET", "/admin/deliveries?destination=crm&until=1h")
    assert status == 200 and body["deliveries"] == []
    status, body = await admin(bridge, "GET", "/admin/events?keyword=stop&since=10m")
    assert [e["id"] for e in body["events"]] == [stop["id"]]

    status, detail = await admin(bridge, "GET", f"/admin/events/{stop['id']}")
    (delivery,) = detail["deliveries"]
    assert delivery["attempt_log"][0]["status"] == 400 and delivery["attempt_log"][0]["outcome"] == "dead"

    # one delivery by id, through the API: same event id, a new attempt
    status, body = await admin(bridge, "POST", f"/admin/deliveries/{crm['id']}/replay")
    assert status == 200 and body == {"replayed": [crm["id"]]}
    await sink.wait_for(3)
    assert sink.received[2].path == "/crm" and sink.received[2].json()["id"] == stop["id"]

    async def crm_delivered() -> bool:
        _, d = await admin(bridge, "GET", f"/admin/deliveries/{crm['id']}")
        return d["status"] == "delivered"

    await eventually(crm_delivered)
    _, d = await admin(bridge, "GET", f"/admin/deliveries/{crm['id']}")
    assert [a["outcome"] for a in d["attempt_log"]] == ["dead", "delivered"]
    # replaying a delivered one needs force
    status, body = await admin(bridge, "POST", f"/admin/deliveries/{crm['id']}/replay")
    assert status == 409
    status, body = await admin(bridge, "POST", f"/admin/deliveries/{crm['id']}/replay?force=true")
    assert status == 200 and body["replayed"] == [crm["id"]]
    await sink.wait_for(4)

    # all dead ones of a destination, through the CLI on the store directly
    done = bridge.cli("replay", "-c", str(bridge.config_path), "--destination", "audit")
    assert "replayed 1" in done.stdout
    await sink.wait_for(5, timeout=15)
    assert sink.received[4].path == "/audit" and sink.received[4].json()["id"] == hello["id"]
    table = bridge.cli("deliveries", "-c", str(bridge.config_path)).stdout
    assert "DESTINATION" in table and "audit" in table


@pytest.mark.slow
async def test_failed_deliveries_are_listed_and_replay_sends_them_now(sink, bridge_factory):
    """CONTRACT §2: `replay` requeues dead or failed ones; a failed one waits for an hour's backoff
    here, and the replay sends it at once."""
    sink.responses = [503]
    config = config_for(sink.url)
    config["retry"] = {"initial": "1h", "max_interval": "2h", "max_age": "24h"}
    bridge = bridge_factory(config)
    bridge.start()
    _, stop = await post(bridge.url + "/postback", sms(1, text="STOP"))
    await sink.wait_for(1)

    async def failed() -> list:
        _, body = await admin(bridge, "GET", "/admin/deliveries?status=failed")
        return body["deliveries"]

    await eventually(failed)
    (delivery,) = await failed()
    assert (delivery["event_id"], delivery["status"]) == (stop["id"], "pending") and "503" in delivery["last_error"]
    listed = json.loads(bridge.cli("deliveries", "-c", str(bridge.config_path), "--status", "failed", "--json").stdout)
    assert [d["id"] for d in listed] == [delivery["id"]]
    (row,) = [line for line in bridge.cli("deliveries", "-c", str(bridge.config_path)).stdout.splitlines()[1:]]
    assert row.endswith(delivery["last_error"])  # the last column whole, never cut in an address
    next_try = datetime.fromisoformat(row.split()[6]).timestamp()  # an hour's backoff: a time ahead
    assert time.time() + 1800 < next_try < time.time() + 7300

    done = bridge.cli("replay", "-c", str(bridge.config_path), "--destination", "crm")
    assert f"replayed 1 delivery: {delivery['id']}" in done.stdout
    (_, again) = await sink.wait_for(2, timeout=15)  # now, not in an hour
    assert again.json()["id"] == stop["id"]
    assert await failed() == []


def test_the_next_column_says_due_for_a_time_gone_by_and_nothing_once_settled():
    """A pending delivery whose time is past waits its turn (or behind the one delivery that
    probes a destination that is down): `due`, not a time gone by."""
    now = time.time()
    row = SimpleNamespace(status="pending", next_at=now - 600)
    assert cli_module._next(row) == "due"
    assert cli_module._next(SimpleNamespace(status="pending", next_at=now + 600)).startswith(
        datetime.fromtimestamp(now + 600, UTC).strftime("%Y-%m-%dT%H:")
    )
    assert cli_module._next(SimpleNamespace(status="dead", next_at=now - 600)) == "-"
    assert cli_module._next(SimpleNamespace(status="delivered", next_at=None)) == "-"


async def test_replay_cli_refuses_without_a_selector(bridge_factory, sink):
    bridge = bridge_factory(config_for(sink.url))
    done = bridge.cli("replay", "-c", str(bridge.config_path), check=False)
    assert done.returncode == 2 and "say which" in done.stderr


@pytest.mark.slow
async def test_replay_cli_names_delivery_ids_that_do_not_exist(sink, bridge_factory):
    sink.default = 400  # dead at once
    bridge = bridge_factory(config_for(sink.url))
    bridge.start()
    await post(bridge.url + "/postback", sms(1, text="STOP"))

    async def dead() -> list:
        return (await admin(bridge, "GET", "/admin/dead-letters"))[1]["deliveries"]

    await eventually(dead)
    (delivery,) = await dead()
    done = bridge.cli("replay", "-c", str(bridge.config_path), str(delivery["id"]), "9999", check=False)
    assert done.returncode == 1 and "no delivery 9999" in done.stderr
    assert f"replayed 1 delivery: {delivery['id']}" in done.stdout  # the one that exists still goes
    done = bridge.cli("replay", "-c", str(bridge.config_path), "9999", "--json", check=False)
    assert done.returncode == 1 and json.loads(done.stdout) == {"replayed": [], "unknown": [9999]}
    assert "--force" not in done.stdout  # not "only dead ones are replayed": there is no such delivery


def test_a_store_that_does_not_exist_is_said_and_never_made(bridge_factory, tmp_path: Path):
    """Before the first `serve`, or with a typo in `store:`: listing shows nothing and says why
    (it must not read as a plain "nothing is dead"), replaying is an error, and neither leaves an
    empty store behind."""
    missing = tmp_path / "typo" / "bridge.db"
    bridge = bridge_factory({"store": f"sqlite:///{missing}"})
    done = bridge.cli("deliveries", "-c", str(bridge.config_path), "--status", "dead", "--json")
    assert json.loads(done.stdout) == [] and f"no store at {missing}" in done.stderr
    done = bridge.cli("deliveries", "-c", str(bridge.config_path))
    assert "no deliveries match" in done.stdout and f"no store at {missing}" in done.stderr
    done = bridge.cli("replay", "-c", str(bridge.config_path), "--all", check=False)
    assert done.returncode == 1 and f"no store at {missing}" in done.stderr, done.stderr
    assert not (tmp_path / "typo").exists()


async def test_deliveries_and_replay_with_no_config_use_the_store_serve_uses_with_none(tmp_path: Path):
    """`serve` with no config file keeps its store at ./bridge.db; `deliveries` and `replay` with
    none read that one (CONTRACT §2 shows them without -c)."""
    env = {k: v for k, v in os.environ.items() if k != "BRIDGE_CONFIG"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bridge", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )

    done = cli("deliveries")
    assert done.returncode == 0 and "no store at bridge.db" in done.stderr and "-c FILE" in done.stderr
    assert not (tmp_path / "bridge.db").exists()

    store = SQLiteStore(str(tmp_path / "bridge.db"))  # where `serve` on its defaults keeps it
    await store.open()
    try:
        stored = await put(store, 1, destinations=("log",))
        await asyncio.sleep(0.01)
        assert await store.expire("log", max_age=0) == 1  # dead, as a down destination's would be
    finally:
        await store.close()
    done = cli("deliveries", "--json")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert (row["event_id"], row["destination"], row["status"]) == (stored, "log", "dead")
    done = cli("replay", "--destination", "log")
    assert done.returncode == 0 and "replayed 1 delivery" in done.stdout, done.stdout + done.stderr


# ---------------------------------------------------------------------------- reload


async def test_reload_good_file_takes_effect_for_the_next_postback(sink, bridge_factory):
    bridge = bridge_factory(config_for(sink.url))
    bridge.start()
    rewrite(bridge, lambda c: c["routes"].insert(0, {"name": "hello", "match": {"keyword": "HELLO"}, "to": ["crm"]}))
    status, body = await admin(bridge, "POST", "/admin/reload")
    assert status == 200 and body["status"] == "reloaded"
    await post(bridge.url + "/postback", sms(1, text="hello"))
    (request,) = await sink.wait_for(1)
    assert request.path == "/crm"


async def test_reload_bad_file_keeps_the_old_routes_and_says_why(sink, bridge_factory):
    bridge = bridge_factory(config_for(sink.url))
    bridge.start()
    rewrite(bridge, lambda c: c["routes"][0].update(to=["nowhere"]))
    status, body = await admin(bridge, "POST", "/admin/reload")
    assert status == 422 and any("routes[0].to" in e and "nowhere" in e for e in body["errors"])
    bridge.proc.send_signal(signal.SIGHUP)  # the same through SIGHUP: logged, old config kept
    await post(bridge.url + "/postback", sms(1, text="STOP"))
    (request,) = await sink.wait_for(1)
    assert request.path == "/crm"
    await asyncio.sleep(0.3)
    assert any(line["msg"].startswith("config reload rejected") for line in bridge.log_lines())
    m = await scrape(bridge)
    assert m[("bridge_config_reloads_total", (("result", "failure"),))] == 2


async def test_reload_during_a_burst_refuses_and_loses_nothing(sink, bridge_factory):
    bridge = bridge_factory(config_for(sink.url))
    bridge.start()

    async def burst() -> list[int]:
        async with aiohttp.ClientSession() as s:

            async def one(n: int) -> int:
                async with s.post(bridge.url + "/postback", data=sms(n)) as r:
                    return r.status

            return await asyncio.gather(*(one(n) for n in range(200)))

    async def reloads() -> None:
        for n in range(3):
            rewrite(bridge, lambda c, n=n: c["routes"].append({"name": f"r{n}", "match": {"keyword": "X"}, "to": []}))
            assert (await admin(bridge, "POST", "/admin/reload"))[0] == 200
            await asyncio.sleep(0.05)

    statuses, _ = await asyncio.gather(burst(), reloads())
    assert statuses == [200] * 200
    await sink.wait_for(200, timeout=30)

    async def all_delivered() -> bool:
        _, body = await admin(bridge, "GET", "/admin/deliveries?status=pending&limit=1000")
        return not body["deliveries"]

    await eventually(all_delivered, timeout=30)
    delivered = {r.json()["id"] for r in sink.received}
    _, events = await admin(bridge, "GET", "/admin/events?limit=1000")
    assert {e["id"] for e in events["events"]} <= delivered


async def test_removed_destination_keeps_its_pending_deliveries_as_dead(sink, store, bridge_factory):
    sink.default = 503
    bridge = bridge_factory({**config_for(sink.url), "store": store})
    bridge.start()
    await post(bridge.url + "/postback", sms(1, text="STOP"))  # crm, which keeps failing

    def remove_crm(config: dict) -> None:
        config["routes"] = []
        del config["destinations"]["crm"]

    rewrite(bridge, remove_crm)
    assert (await admin(bridge, "POST", "/admin/reload"))[0] == 200
    _, body = await admin(bridge, "GET", "/admin/deliveries?destination=crm")
    assert [(d["status"], d["last_error"]) for d in body["deliveries"]] == [("dead", "destination removed")]


# ---------------------------------------------------------------------------- retention


async def test_retention_purges_only_what_is_old_enough(store, app_client, sink):
    raw = config_for(sink.url)
    raw["store"] = store
    raw["retention"] = {"delivered": "1s", "dead": "1h"}
    sink.responses = [400]  # the first one dies: kept for an hour
    client = await app_client(raw)
    runtime = client.app[RUNTIME]
    await client.post("/postback", data=sms(1, text="STOP"))  # crm -> dead
    await sink.wait_for(1)  # before the next one, which goes to another destination's loop
    await client.post("/postback", data=sms(2, text="hello"))  # audit -> delivered
    await sink.wait_for(2)
    await asyncio.sleep(1.3)
    await client.post("/postback", data=sms(3, text="later"))  # delivered, but fresh
    await sink.wait_for(3)
    await asyncio.sleep(0.3)
    assert await purge_once(runtime) == 1
    events = {e["fields"]["TRANSACTIONID"] for e in await runtime.store.list_events(_all())}
    assert events == {"tx-1", "tx-3"}
    assert await purge_once(runtime) == 0


def _all():
    from bridge.store import EventFilter

    return EventFilter(limit=1000)


async def test_route_dry_run_shows_the_admin_free_event(bridge_factory, sink):
    bridge = bridge_factory(config_for(sink.url))
    done = bridge.cli("route", "-c", str(bridge.config_path), "--json", str(POSTBACKS / "sms_mo_v1.3.xml"))
    (report,) = json.loads(done.stdout)
    assert report["routes"] == ["stop"] and list(report["destinations"]) == ["crm"]


# ---------------------------------------------------------------------------- removed destinations


async def test_a_postback_in_flight_during_a_reload_is_routed_by_the_new_config(tmp_path: Path, aiohttp_server):
    """Half a postback arrives, a reload swaps destination `a` for `b`, then the rest arrives:
    the event goes to `b`, and nothing is left pending for `a`, which nobody sends to any more."""
    path = tmp_path / "c.yaml"

    def write(name: str) -> None:
        path.write_text(one_log_destination(tmp_path, name))

    write("a")
    app = create_app(load(path))  # not app_client: from a file, which the reload reads again
    server = await aiohttp_server(app)
    runtime = app[RUNTIME]
    body = sms(1)
    async with connect_to("127.0.0.1", server.port) as (reader, writer):
        head = f"POST /postback HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        writer.write(head + body[:20])
        await writer.drain()
        await asyncio.sleep(0.3)  # the handler is waiting for the rest of the body
        write("b")
        assert await runtime.reload() == []
        writer.write(body[20:])
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")

    async def delivered() -> bool:
        rows = await runtime.store.list_deliveries(DeliveryFilter())
        return [(r.destination, r.status) for r in rows] == [("b", "delivered")]

    await eventually(delivered)


@pytest.mark.slow
async def test_a_destination_gone_after_a_restart_leaves_its_deliveries_dead(sink, bridge_factory):
    sink.default = 503
    bridge = bridge_factory(config_for(sink.url))
    bridge.start()
    await post(bridge.url + "/postback", sms(1, text="STOP"))  # crm, which keeps failing
    assert bridge.stop() == 0

    def remove_crm(config: dict) -> None:
        config["routes"] = []
        del config["destinations"]["crm"]

    rewrite(bridge, remove_crm)
    bridge.start()
    _, body = await admin(bridge, "GET", "/admin/deliveries?destination=crm")
    assert [(d["status"], d["last_error"]) for d in body["deliveries"]] == [("dead", "destination removed")]
    dead_id = body["deliveries"][0]["id"]
    # replaying it while crm is still missing would leave it pending forever: refused, with why
    status, body = await admin(bridge, "POST", f"/admin/deliveries/{dead_id}/replay")
    assert status == 409 and "crm" in body["error"]
    done = bridge.cli("replay", "-c", str(bridge.config_path), "--destination", "crm", check=False)
    assert done.returncode == 2 and "not in" in done.stderr
    done = bridge.cli("replay", "-c", str(bridge.config_path), str(dead_id), check=False)
    assert done.returncode == 1 and f"is to 'crm', not in {bridge.config_path}" in done.stderr
    assert "--force" not in done.stdout  # not the hint: that is not why it was not replayed


@pytest.mark.parametrize("store", ["sqlite", "postgres"], indirect=True)
async def test_dropped_events_are_counted_and_stored_without_deliveries(store, tmp_path: Path, app_client):
    """Unmatched with no default, or `to: []`: counted, stored with no delivery (a 200 means
    stored), and Skycore's retry of one is a duplicate with the same id; retention purges them."""
    raw = {
        "store": store,
        "retention": {"delivered": "1s", "dead": "1h"},
        "destinations": {"audit": {"type": "log", "path": str(tmp_path / "audit.jsonl")}},
        "routes": [{"name": "quiet", "match": {"keyword": "QUIET"}, "to": []}],
    }
    client = await app_client(raw)
    runtime = client.app[RUNTIME]
    first = {}
    for n, text in enumerate(["hello", "quiet please"]):
        response = await client.post("/postback", data=sms(n, text=text))
        body = await response.json()
        assert response.status == 200 and body["status"] == "accepted"
        first[n] = body["id"]
    for n, text in enumerate(["hello", "quiet please"]):  # Skycore's retries
        response = await client.post("/postback", data=sms(n, text=text))
        assert await response.json() == {"status": "duplicate", "id": first[n]}
    m = samples(await (await client.get("/metrics")).text())
    assert m[("bridge_events_unmatched_total", ())] == 1  # "hello": no route, no default (its retry: no new event)
    assert m[("bridge_events_routed_total", (("route", "quiet"),))] == 1  # dropped on purpose
    assert m[("bridge_postbacks_received_total", (("origin", "SMS_MO"), ("outcome", "dropped"), ("reason", "")))] == 2
    assert m[("bridge_postbacks_received_total", (("origin", "SMS_MO"), ("outcome", "duplicate"), ("reason", "")))] == 2
    assert {e["id"] for e in await runtime.store.list_events(_all())} == set(first.values())
    for event_id in first.values():
        assert await runtime.store.event_deliveries(event_id) == []
    assert not (tmp_path / "audit.jsonl").exists() or (tmp_path / "audit.jsonl").read_text() == ""

    await asyncio.sleep(1.2)
    later = await (await client.post("/postback", data=sms(9, text="hello"))).json()
    assert await purge_once(runtime) == 2  # the two dropped ones, not the fresh one
    assert [e["id"] for e in await runtime.store.list_events(_all())] == [later["id"]]


async def test_made_up_origins_share_one_other_series(tmp_path: Path, app_client):
    """A new <ORIGIN> per postback must not make a new Prometheus series each: outside Skycore's
    ORIGINs (whatever their case) the label is `other`."""
    raw = {
        "store": f"sqlite:///{tmp_path / 'bridge.db'}",
        "destinations": {"audit": {"type": "log", "path": str(tmp_path / "audit.jsonl")}},
        "default": ["audit"],
    }
    client = await app_client(raw)
    origins = [f"X_{n}" for n in range(1000)] + ["SMS_MO", "mms_mo", "EMAIL_SUB"]

    async def send(n: int, origin: str) -> None:
        body = f"<POSTBACK><ORIGIN>{origin}</ORIGIN><TRANSACTIONID>o-{n}</TRANSACTIONID></POSTBACK>"
        response = await client.post("/postback", data=body.encode())
        assert response.status == 200 and (await response.json())["status"] == "accepted"

    for start in range(0, len(origins), 50):  # 50 at a time: the store commits them together
        await asyncio.gather(*(send(n, o) for n, o in enumerate(origins[start : start + 50], start)))
    text = await (await client.get("/metrics")).text()
    series = {
        labels: value for (name, labels), value in samples(text).items() if name == "bridge_postbacks_received_total"
    }
    assert series == {
        (("origin", "other"), ("outcome", "accepted"), ("reason", "")): 1000,
        (("origin", "SMS_MO"), ("outcome", "accepted"), ("reason", "")): 1,
        (("origin", "MMS_MO"), ("outcome", "accepted"), ("reason", "")): 1,
        (("origin", "EMAIL_SUB"), ("outcome", "accepted"), ("reason", "")): 1,
    }
    assert "X_1" not in text and len(text) < 16_000


@contextlib.asynccontextmanager
async def tcp_proxy(port: int, host: str, target: int) -> AsyncIterator[None]:
    """Listens on 127.0.0.1:`port` and passes each connection on to host:target: a database
    "coming up" on a port the bridge was already told about."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()


async def readyz(bridge) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(bridge.url + "/readyz") as r:
        return r.status, await r.json()


@pytest.mark.slow
async def test_serve_waits_for_a_postgresql_that_is_not_up_yet(pg_url, sink, bridge_factory):  # noqa: F811
    """PostgreSQL is not up when the bridge starts (a compose file, a reboot): serve does not
    exit. It answers postbacks 503 (Skycore retries) and /readyz 503 with why, keeps trying,
    and once the database answers it takes postbacks and delivers them."""
    parts = urlsplit(pg_url)
    port = free_port()  # nothing listens here yet
    user = parts.netloc.rpartition("@")[0]
    url = urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{port}"))
    bridge = bridge_factory({**config_for(sink.url), "store": url})
    bridge.start()

    status, body = await readyz(bridge)
    # why, without the hosts and names in the log's message: anyone may ask /readyz
    assert status == 503 and body["store"].startswith("not open yet (") and str(port) not in body["store"], body
    async with aiohttp.ClientSession() as s, s.get(bridge.url + "/healthz") as r:
        assert r.status == 200  # alive: a supervisor must not restart it for this
    async with aiohttp.ClientSession() as s, s.post(bridge.url + "/postback", data=sms(1, text="STOP")) as r:
        assert r.status == 503 and r.headers["Retry-After"] == "30"
    assert (await admin(bridge, "GET", "/admin/deliveries"))[0] == 503
    assert (await scrape(bridge))[("bridge_store_up", ())] == 0

    async with tcp_proxy(port, parts.hostname or "127.0.0.1", parts.port or 5432):

        async def ready() -> bool:
            return (await readyz(bridge))[0] == 200

        await eventually(ready, timeout=20)  # tries again after 1 s, 2 s, 4 s, ...
        status, body = await post(bridge.url + "/postback", sms(1, text="STOP"))
        assert status == 200 and body["status"] == "accepted"
        (received,) = await sink.wait_for(1)
        assert received.path == "/crm" and received.json()["id"] == body["id"]
        assert await asyncio.to_thread(bridge.stop) == 0  # its last words to the database go through this loop
    messages = [line["msg"] for line in bridge.log_lines()]
    assert "store unreachable; answering 503 until it opens" in messages and "store open" in messages
    assert "unexpected error" not in messages  # the admin API's 503 is expected, not a bug's traceback
    assert "retention purge failed; trying again later" not in messages  # it waits for the store too
    assert all(line.startswith("{") for line in bridge.stderr().splitlines())  # asyncpg's too, as JSON


@pytest.mark.slow
async def test_a_database_host_that_hangs_does_not_keep_serve_from_listening(bridge_factory):
    """A host that takes the connection and never answers: /healthz must answer long before
    asyncpg's own timeouts (10 s to connect, 15 s a command) end, or a liveness probe restarts
    us for what is the database's trouble."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()  # the kernel completes the handshake; nobody ever answers
        bridge = bridge_factory({"store": f"postgresql://postgres@127.0.0.1:{hung.getsockname()[1]}/test"})
        started = time.monotonic()
        bridge.start(timeout=15)
        assert time.monotonic() - started < 9
        async with aiohttp.ClientSession() as s, s.get(bridge.url + "/healthz") as r:
            assert r.status == 200
        assert (await readyz(bridge))[0] == 503
        assert bridge.stop() == 0


@pytest.mark.slow
async def test_a_database_that_hangs_after_login_does_not_keep_serve_from_listening(pg_url, bridge_factory):  # noqa: F811
    """Logged in, then its first query never answered: asyncpg gives up on that only after its
    own timeouts, and does not stop sooner for being cancelled. serve listens after OPEN_PATIENCE
    anyway, and lets that attempt go on in the background."""
    with stalling_postgresql() as port:
        bridge = bridge_factory({"store": via(pg_url, port)})
        started = time.monotonic()
        bridge.start(timeout=15)
        assert time.monotonic() - started < 9
        assert (await readyz(bridge))[0] == 503
        stopping = time.monotonic()
        assert bridge.stop() == 0
        assert time.monotonic() - stopping < 10  # the stuck attempt is cut off, not waited for
    assert all(line.startswith("{") for line in bridge.stderr().splitlines()), bridge.stderr()


@pytest.mark.parametrize(
    ("wrong", "named"),
    [
        ("/no_such_database_here", "no_such_database_here"),
        ("?connect_timeout=10", "connect_timeout"),
        ("?sslmode=verify-full&sslrootcert=/no/such/root.crt", "no such file: sslrootcert=/no/such/root.crt"),
    ],
)
def test_a_postgresql_that_refuses_for_good_is_an_error_at_startup(pg_url, bridge_factory, wrong, named):  # noqa: F811
    """No such database, a role refused, a setting PostgreSQL does not know: a person must fix
    it, and waiting would only hide it behind a 503."""
    parts = urlsplit(pg_url)
    if wrong.startswith("/"):
        url = urlunsplit(parts._replace(path=wrong))
    else:
        url = urlunsplit(parts._replace(query=wrong.removeprefix("?")))
    bridge = bridge_factory({"store": url})
    with pytest.raises(AssertionError, match="exited with 1") as failed:
        bridge.start()
    assert "store: " in str(failed.value) and named in str(failed.value)


async def test_a_unix_socket_not_there_yet_is_waited_for(bridge_factory, tmp_path: Path):
    """Before PostgreSQL has started, its socket file is missing: that is "not up yet" (a
    FileNotFoundError, as a missing certificate file would be), not a mistake in the URL."""
    sockets = tmp_path / "run"
    sockets.mkdir()
    bridge = bridge_factory({"store": f"postgresql://postgres@/test?host={sockets}"})
    bridge.start()
    assert (await readyz(bridge))[0] == 503
    assert bridge.stop() == 0


class _SlowToComeUp(SQLiteStore):
    """A real SQLite store behind a "server" that is down at first: its first open fails as an
    unreachable database does, its second with a bug, and the third works."""

    retry_open = True

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.tries = 0

    async def open(self) -> None:
        self.tries += 1
        if self.tries == 1:
            raise StoreError("connection refused")
        if self.tries == 2:
            raise RuntimeError("a bug in opening")
        await super().open()


async def test_the_connect_loop_outlives_a_bug_and_opens_the_store(tmp_path: Path, app_client, monkeypatch):
    """Whatever an attempt to open raises, the loop tries again: a loop that died would leave
    the bridge answering 503 for ever, with nothing in the log after the traceback."""
    monkeypatch.setattr(runtime_module, "CONNECT_FIRST", 0.05)
    store = _SlowToComeUp(str(tmp_path / "bridge.db"))
    client = await app_client(
        {"destinations": {"log": {"type": "log", "path": str(tmp_path / "out")}}, "default": ["log"]}, store=store
    )
    assert (await client.post("/postback", data=sms(1))).status == 503

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await eventually(ready, timeout=5)
    assert store.tries == 3
    response = await client.post("/postback", data=sms(1))
    assert response.status == 200 and (await response.json())["status"] == "accepted"


async def test_serve_stops_cleanly_while_waiting_for_its_postgresql(bridge_factory):
    bridge = bridge_factory({"store": f"postgresql://postgres@127.0.0.1:{free_port()}/test"})
    bridge.start()
    assert (await readyz(bridge))[0] == 503
    started = time.monotonic()
    assert bridge.stop() == 0
    assert time.monotonic() - started < 5


async def test_a_malformed_postgresql_url_is_an_error_at_startup(bridge_factory):
    """Unlike an unreachable database, a URL that can never work is not waited for."""
    bridge = bridge_factory({"store": "postgresql://postgres@127.0.0.1:99999/test"})
    with pytest.raises(AssertionError, match="exited with 1") as failed:
        bridge.start()
    assert "store:" in str(failed.value)


async def test_a_good_reload_is_counted_with_its_time(sink, bridge_factory):
    bridge = bridge_factory(config_for(sink.url))
    bridge.start()
    before = time.time()
    assert (await admin(bridge, "POST", "/admin/reload"))[0] == 200
    m = await scrape(bridge)
    assert m[("bridge_config_reloads_total", (("result", "success"),))] == 1
    assert m[("bridge_config_last_reload_success_timestamp_seconds", ())] >= before - 1


def _slack(thread_by_sender: bool) -> dict:
    """A Slack destination whose API is nowhere (127.0.0.1:9): its deliveries stay pending."""
    return {"type": "slack", "token": "xoxb-1", "channel": "C1", "thread_by_sender": thread_by_sender,
            "api_url": "http://127.0.0.1:9/api/"}  # fmt: skip


def _rows(db: Path, query: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(query).fetchall()


async def test_only_deliveries_to_ordered_destinations_are_stored_as_ordered(tmp_path: Path, app_client):
    """A webhook or log sends in any order; email and threaded Slack keep a conversation in
    order, and only their deliveries are stored (and indexed) as ordered."""
    raw = {
        "store": f"sqlite:///{tmp_path / 'b.db'}",
        "destinations": {
            "crm": {"type": "webhook", "url": "http://127.0.0.1:9/nobody"},
            "audit": {"type": "log", "path": str(tmp_path / "audit.jsonl")},
            "mail": {"type": "email", "smtp": {"host": "127.0.0.1", "port": 9, "security": "none"},
                     "from": "bridge@example.com", "to": "team@example.com"},
            "threads": _slack(True),
            "flat": _slack(False),
        },
        "default": ["crm", "audit", "mail", "threads", "flat"],
    }  # fmt: skip
    client = await app_client(raw)
    response = await client.post("/postback", data=sms(1))
    assert response.status == 200, await response.text()
    stored = dict(_rows(tmp_path / "b.db", "SELECT destination, ordered FROM deliveries"))
    assert stored == {"crm": 0, "audit": 0, "mail": 1, "threads": 1, "flat": 0}


async def test_a_destination_made_ordered_orders_what_was_queued_for_it(tmp_path: Path, app_client):
    """Slack `thread_by_sender` turned on between two runs (or by a reload): the deliveries
    queued while it was off go in conversation order too, so one texter gets one thread."""

    def config(threads: bool) -> dict:
        return {
            "store": f"sqlite:///{tmp_path / 'b.db'}",
            "destinations": {"chat": _slack(threads)},
            "default": ["chat"],
        }

    def stored() -> list[int]:
        return [row[0] for row in _rows(tmp_path / "b.db", "SELECT ordered FROM deliveries WHERE status = 'pending'")]

    first = await app_client(config(False))
    for n in range(2):
        assert (await first.post("/postback", data=sms(n))).status == 200
    await first.close()
    assert stored() == [0, 0]
    again = await app_client(config(True))
    assert stored() == [1, 1]
    await again.close()


# ---------------------------------------------------------------------------- the heap


@pytest.fixture
def thawed_after() -> Iterator[None]:
    """A test that freezes the heap, as serving does, thaws it again: the suite's objects made
    meanwhile are collected as before once it ends."""
    try:
        yield
    finally:
        gc.unfreeze()


def test_settling_puts_what_exists_out_of_the_collectors_sight(thawed_after):
    made_at_start = [[n] for n in range(100)]  # lists: objects the collector tracks
    settle_heap()
    walked = {id(o) for o in gc.get_objects()}  # what a full collection walks
    assert not any(id(o) in walked for o in made_at_start)
    made_later = [[n] for n in range(100)]
    walked = {id(o) for o in gc.get_objects()}
    assert all(id(o) in walked for o in made_later)


def test_serve_settles_the_heap_once_the_app_has_started_before_it_listens(tmp_path, monkeypatch):
    """The wiring: `serve` hands settle_heap to run_app, which calls it after the app's startup
    (store open, destinations open) and before the port listens."""
    seen: list[tuple[str, bool]] = []

    def run_app(app, *, host, port, lane, shutdown_timeout, started, before_listening):
        async def go() -> None:
            runner = web.AppRunner(app)
            await runner.setup()  # the app's startup hooks, as the real run_app
            before_listening()
            seen.append(("settled", app[RUNTIME].store is not None and gc.get_freeze_count() > 0))
            with socket.socket() as s:  # nothing listens on the port yet
                seen.append(("listening", s.connect_ex((host, port)) == 0))
            await runner.cleanup()

        asyncio.run(go())

    monkeypatch.setattr("bridge.serving.run_app", run_app)
    monkeypatch.setattr("bridge.logs.setup", lambda *args, **kwargs: None)  # the suite's logging stays
    config = tmp_path / "c.yaml"
    config.write_text(one_log_destination(tmp_path, "a", listen=f"127.0.0.1:{free_port()}"))
    try:
        assert cli_module.main(["serve", "-c", str(config)]) == 0
    finally:
        gc.unfreeze()
    assert seen == [("settled", True), ("listening", False)]


async def test_a_reload_of_a_frozen_heap_lets_the_old_configs_cycles_go(tmp_path, aiohttp_server, thawed_after):
    """Frozen objects that end in a reference cycle are never collected: whatever of the old
    config sits in one (planted here: the destination refers to itself) would be kept for good.
    A reload thaws the heap, collects, and freezes what lives now."""
    path = tmp_path / "c.yaml"

    def write(name: str) -> None:
        path.write_text(one_log_destination(tmp_path, name))

    write("a")
    app = create_app(load(path))
    await aiohttp_server(app)
    runtime = app[RUNTIME]
    old = runtime.destinations["a"]
    old.cycle = old  # type: ignore[attr-defined]  # the planted cycle
    gone = weakref.ref(old)
    del old
    settle_heap()  # as serving does once started
    made_since = [[1]]
    write("b")
    assert await runtime.reload() == []
    assert gone() is None, "the replaced destination is still in memory"
    assert not any(o is made_since for o in gc.get_objects()), "what lives after the reload is frozen again"


@pytest.mark.parametrize("lane", [True, False])
def test_run_app_calls_before_listening_after_the_startup_and_before_the_port_listens(tmp_path, lane):
    port = free_port()
    config = tmp_path / "c.yaml"
    config.write_text(one_log_destination(tmp_path, "a", listen=f"127.0.0.1:{port}"))
    app = create_app(load(config))
    seen: list[tuple[str, bool, bool]] = []

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def before_listening() -> None:
        seen.append(("before_listening", app[RUNTIME].store is not None, listening()))

    def started(_: str) -> None:
        seen.append(("started", app[RUNTIME].store is not None, listening()))
        os.kill(os.getpid(), signal.SIGTERM)  # run_app's own handler: a graceful stop

    serving.run_app(
        app,
        host="127.0.0.1",
        port=port,
        lane=lane,
        shutdown_timeout=1.0,
        started=started,
        before_listening=before_listening,
    )
    assert seen == [("before_listening", True, False), ("started", True, True)]
