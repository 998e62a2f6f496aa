"""The scale-out path, side by side with SQLite in one run (`bench/run.py --store postgresql://...`).

Subjects, measured in rotation round after round (this machine's speed drifts over minutes),
each flat out end to end: wrk at N connections as fast as answered, while the bridge delivers
every postback to one sink, for `--seconds`:

  sqlite      one bridge on SQLite (fsync on every commit)
  pg          one bridge on the PostgreSQL store
  pg_x2       two bridges on that store behind one port (nginx's stream module, round robin
              per connection: wrk's connections are shared 50/50)

The bridges run on CPU 0 (both of pg_x2's too: the same CPU budget as one instance), wrk, the
sink and nginx on CPU 1, PostgreSQL wherever the kernel puts it: it is a server shared with
the machine, and its CPU (the bench's backends and the server's own WAL writer, checkpointer and
background writer) is read from /proc and shown beside each figure.

Then, with PostgreSQL:
  pickup      a postback stored by one instance (the store's own ingest, in this process),
              delivered by another (a `serve` process): from the stored answer to the sink
  backlog     peak RSS of one instance while 100,000+ deliveries wait for a destination that
              is down
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import run as bench

TICK = os.sysconf("SC_CLK_TCK")
AUX = ("walwriter", "checkpointer", "background writer", "wal writer", "autovacuum")


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


def cpu_seconds(pid: int) -> float:
    try:
        fields = bench.proc_stat(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def postgres_aux() -> list[int]:
    """The server's own processes that every commit makes work (WAL writer, checkpointer,
    background writer, autovacuum); the bench's backends are found by PgCpu.backends."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("postgres:") and any(a in cmdline for a in AUX):
            pids.append(int(entry.name))
    return pids


class PgCpu:
    """CPU time of the server processes that work for the bench over one measurement."""

    def __init__(self, url: str, app: str) -> None:
        self.url, self.app = url, app

    def backends(self) -> list[int]:
        out = subprocess.run(
            [sys.executable, "-c", _BACKENDS, self.url, self.app], capture_output=True, text=True, check=True
        ).stdout
        return [int(x) for x in out.split()]

    def __enter__(self) -> PgCpu:
        self.pids = {pid: cpu_seconds(pid) for pid in [*self.backends(), *postgres_aux()]}
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        pids = set(self.pids) | set(self.backends()) | set(postgres_aux())
        used = sum(cpu_seconds(pid) - self.pids.get(pid, 0.0) for pid in pids)
        self.cores = round(used / (time.monotonic() - self.t0), 2)


_BACKENDS = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name LIKE $1", sys.argv[2] + "%")
    print(" ".join(str(r[0]) for r in rows))
    await conn.close()
asyncio.run(main())
"""


def proc_cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def write_config(work: Path, port: int, store: str, url: str, name: str) -> Path:
    config = work / f"{name}.yaml"
    config.write_text(
        f"server: {{listen: 127.0.0.1:{port}}}\n"
        f"store: '{store}'\n"
        f"destinations:\n  crm: {{type: webhook, url: '{url}', timeout: 5s}}\n"
        "default: [crm]\n"
    )
    return config


@contextlib.contextmanager
def nginx(work: Path, port: int, upstreams: list[int]) -> Iterator[None]:
    """nginx's stream module on CPU 1: one port, round robin per connection."""
    conf = work / "nginx.conf"
    servers = "".join(f"    server 127.0.0.1:{p};\n" for p in upstreams)
    conf.write_text(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
        f"pid {work}/nginx.pid;\nerror_log {work}/nginx.err;\nworker_processes 1;\n"
        "events { worker_connections 1024; }\n"
        f"stream {{\n  upstream bridges {{\n{servers}  }}\n"
        f"  server {{ listen 127.0.0.1:{port}; proxy_pass bridges; }}\n}}\n"
    )
    argv = ["taskset", "-c", "1", "nginx", "-p", str(work), "-c", str(conf), "-g", "daemon off;"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bench.wait_listening(port, proc)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


async def _schema(url: str, name: str, drop: bool = False) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE" if drop else f"CREATE SCHEMA {name}")
    finally:
        await conn.close()


def flat_out(port: int, sink_port: int, args: argparse.Namespace, pids: list[int], pg: PgCpu | None) -> dict[str, Any]:
    start, t0, cpu0 = bench.count(sink_port), time.monotonic(), proc_cpu(pids)
    if pg is not None:
        with pg:
            load = bench.wrk(port, connections=args.connections, seconds=args.seconds)
    else:
        load = bench.wrk(port, connections=args.connections, seconds=args.seconds)
    delivered = bench.count(sink_port) - start
    elapsed = time.monotonic() - t0
    return {
        **load,
        "delivered_per_s": round(delivered / load["seconds"], 1),
        "bridge_cores": round((proc_cpu(pids) - cpu0) / elapsed, 2),
        "postgres_cores": pg.cores if pg is not None else None,
    }


def drain(port: int, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while bench.metric(port, "bridge_deliveries_pending", "crm") and time.monotonic() < deadline:
        time.sleep(0.05)


async def _pickup(url: str, count: int, serve_argv: list[str], port: int, work: Path, sink_port: int) -> dict[str, Any]:
    """Postbacks stored here (the store's ingest, as a `serve` would) and delivered by a `serve`
    process on the same store: how long from the answer to the sink."""
    from aiohttp import web

    from bridge.carriers import Carriers
    from bridge.destinations.base import conversation_key
    from bridge.event import dedup_key, normalize
    from bridge.ids import event_id
    from bridge.postback import parse
    from bridge.store import NewDelivery
    from bridge.store.postgres import PostgresStore

    arrived: dict[str, float] = {}
    waiting: dict[str, asyncio.Event] = {}

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        arrived.setdefault(body["id"], time.monotonic())
        if body["id"] in waiting:
            waiting[body["id"]].set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/in", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", sink_port).start()
    store = PostgresStore(url)
    await store.open()
    took: list[float] = []
    try:
        with bench.process(serve_argv, 0, port, work / "pickup.log"):
            await asyncio.sleep(1.0)  # its LISTEN in place
            for n in range(count):
                await asyncio.sleep(random.uniform(0.02, 0.1))
                xml = (
                    f"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><CODE>N211</CODE><FROM>1555{n:07d}</FROM><TO>86717</TO>"
                    f"<TEXT>pickup {n}</TEXT><TRANSACTIONID>pickup-{uuid.uuid4().hex}</TRANSACTIONID></POSTBACK>"
                ).encode()
                event = normalize(parse(xml), event_id=event_id(), received_at=datetime.now(UTC), carriers=Carriers({}))
                waiting[event["id"]] = asyncio.Event()
                await store.ingest(event, dedup_key(event), [NewDelivery("crm", "default", conversation_key(event))])
                stored = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiting[event["id"]].wait(), 5)
                took.append(arrived.get(event["id"], float("inf")) - stored)
    finally:
        await store.close()
        await runner.cleanup()
    took.sort()
    return {
        "count": len(took),
        "p50_ms": round(took[len(took) // 2] * 1000, 1),
        "p99_ms": round(took[min(len(took) - 1, int(len(took) * 0.99))] * 1000, 1),
        "max_ms": round(took[-1] * 1000, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    if not shutil.which("nginx") or not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        raise SystemExit("nginx with its stream module is needed: apt-get install nginx libnginx-mod-stream")
    tag = uuid.uuid4().hex[:8]
    app = f"bench-{tag}"
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "kind": "scale-out",
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "load_before": os.getloadavg()},
        "settings": {"connections": args.connections, "seconds": args.seconds, "rounds": args.rounds},
    }
    work = Path(bench.tempfile.mkdtemp(prefix="bridge-scaleout-"))
    schemas = [f"bench_{tag}_one", f"bench_{tag}_two", f"bench_{tag}_pickup", f"bench_{tag}_backlog"]
    for name in schemas:
        asyncio.run(_schema(args.store, name))
    peers = [sys.executable, str(bench.HERE / "peers.py")]
    try:
        sink_port = bench.free_port()
        ports = {name: bench.free_port() for name in ("sqlite", "pg", "pg_a", "pg_b", "pg_x2")}
        sink_url = f"http://127.0.0.1:{sink_port}/in"

        def pg(schema: str, who: str) -> str:
            return with_query(args.store, search_path=schema, application_name=f"{app}-{who}")

        configs = {
            "sqlite": write_config(work, ports["sqlite"], f"sqlite:///{work / 'bridge.db'}", sink_url, "sqlite"),
            "pg": write_config(work, ports["pg"], pg(schemas[0], "one"), sink_url, "pg"),
            "pg_a": write_config(work, ports["pg_a"], pg(schemas[1], "a"), sink_url, "pg_a"),
            "pg_b": write_config(work, ports["pg_b"], pg(schemas[1], "b"), sink_url, "pg_b"),
        }
        with contextlib.ExitStack() as stack:
            stack.enter_context(bench.process([*peers, "sink", str(sink_port)], 1, sink_port, work / "sink.log"))
            procs = {
                name: stack.enter_context(
                    bench.process(bench.bridge_argv(configs[name]), 0, ports[name], work / f"{name}.log")
                )
                for name in configs
            }
            stack.enter_context(nginx(work, ports["pg_x2"], [ports["pg_a"], ports["pg_b"]]))
            subjects = {
                "sqlite": (ports["sqlite"], [procs["sqlite"].pid], None),
                "pg": (ports["pg"], [procs["pg"].pid], PgCpu(args.store, f"{app}-one")),
                "pg_x2": (ports["pg_x2"], [procs["pg_a"].pid, procs["pg_b"].pid], PgCpu(args.store, f"{app}-")),
            }
            drained = {"sqlite": ["sqlite"], "pg": ["pg"], "pg_x2": ["pg_a"]}  # pg_b sees the same store
            for name, (port, _, _) in subjects.items():
                bench.wrk(port, connections=args.connections, seconds=1)  # warm up
                for d in drained[name]:
                    drain(ports[d])
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in subjects}
            for n in range(args.rounds):
                print(f"round {n + 1} of {args.rounds}: sqlite, postgresql, postgresql x2 ...", flush=True)
                for name, (port, pids, pgcpu) in subjects.items():
                    rounds[name].append(flat_out(port, sink_port, args, pids, pgcpu))
                    for d in drained[name]:
                        drain(ports[d])
            for name, runs in rounds.items():
                median = dict(sorted(runs, key=lambda r: r["delivered_per_s"])[len(runs) // 2])
                results[name] = {**median, "rounds": runs, **bench.rss_mb(subjects[name][1][0])}
            results["pg_x2"]["rss_b"] = bench.rss_mb(procs["pg_b"].pid)

        print("pickup: stored by one instance, delivered by another ...", flush=True)
        pickup_port, pickup_sink = bench.free_port(), bench.free_port()
        config = write_config(
            work, pickup_port, pg(schemas[2], "pickup"), f"http://127.0.0.1:{pickup_sink}/in", "pickup"
        )
        results["pickup"] = asyncio.run(
            _pickup(
                pg(schemas[2], "pickup-here"), args.pickups, bench.bridge_argv(config), pickup_port, work, pickup_sink
            )
        )

        print(f"backlog: {args.backlog:,} deliveries pending on PostgreSQL (destination down) ...", flush=True)
        down_port = bench.free_port()
        config = write_config(
            work, down_port, pg(schemas[3], "down"), f"http://127.0.0.1:{bench.free_port()}/nobody", "down"
        )
        with bench.process(bench.bridge_argv(config), 0, down_port, work / "down.log") as proc:
            deadline = time.monotonic() + 300
            down = bench.wrk(down_port, connections=args.connections, seconds=args.seconds)
            while bench.metric(down_port, "bridge_deliveries_pending", "crm") < args.backlog:
                if time.monotonic() > deadline:
                    break
                bench.wrk(down_port, connections=args.connections, seconds=5)
            pending = bench.metric(down_port, "bridge_deliveries_pending", "crm")
            time.sleep(2)
            results["backlog"] = {"pending": int(pending), "ingest_down": down, **bench.rss_mb(proc.pid)}
    finally:
        for name in schemas:
            with contextlib.suppress(Exception):
                asyncio.run(_schema(args.store, name, drop=True))
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_after"] = os.getloadavg()
    return results


def report(r: dict[str, Any]) -> str:
    s, p, x, pick, backlog = r["sqlite"], r["pg"], r["pg_x2"], r["pickup"], r["backlog"]
    c = r["settings"]["connections"]

    def line(what: str, m: dict[str, Any]) -> str:
        pgc = "" if m["postgres_cores"] is None else f"{m['postgres_cores']:.2f}"
        return (
            f"| {what} | {m['per_s']:,.0f} | {m['delivered_per_s']:,.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
            f"{m['bridge_cores']:.2f} | {pgc} |"
        )

    def row(what: str, value: str, target: str, ok: bool | None) -> str:
        return f"| {what} | {value} | {target} | {'reported' if ok is None else 'yes' if ok else 'NO'} |"

    peak = max(p["peak_rss_mb"], backlog["peak_rss_mb"])
    # the ratios of figures taken one after the other in each round: the machine's speed drifts
    # between rounds more than between two neighbouring measurements
    ratios = sorted(b["delivered_per_s"] / a["delivered_per_s"] for a, b in zip(s["rounds"], p["rounds"], strict=True))
    twos = sorted(b["delivered_per_s"] / a["delivered_per_s"] for a, b in zip(p["rounds"], x["rounds"], strict=True))
    ratio, two = ratios[len(ratios) // 2], twos[len(twos) // 2]
    load = ", ".join(f"{v:.1f}" for v in r["machine"]["load_before"])
    lines = [
        f"Scale-out run {r['when']} on {r['machine']['cpus']} CPUs, Python {r['machine']['python']}, {c} "
        f"connections flat out, {r['settings']['seconds']}s per measurement, median of {r['settings']['rounds']} "
        f"rounds in rotation; load average before: {load}.",
        "",
        "Each subject's median round (by delivered/s):",
        "",
        "| subject | answered/s | delivered/s | p50 ms | p99 ms | bridge CPU (cores) | PostgreSQL CPU (cores) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        line("SQLite, one instance", s),
        line("PostgreSQL, one instance", p),
        line("PostgreSQL, two instances behind one port", x),
        "",
        f"Pickup across instances ({pick['count']} postbacks stored by one, delivered by the other): "
        f"p50 {pick['p50_ms']} ms, p99 {pick['p99_ms']} ms, max {pick['max_ms']} ms.",
        f"Backlog: {backlog['pending']:,} deliveries pending on PostgreSQL for a down destination: RSS "
        f"{backlog['rss_mb']:.0f} MB (peak {backlog['peak_rss_mb']:.0f} MB); durable ingest meanwhile "
        f"{backlog['ingest_down']['per_s']:,.0f}/s, p99 {backlog['ingest_down']['p99_ms']:.1f} ms.",
        "",
        "| target | measured | goal | met |",
        "| --- | --- | --- | --- |",
        row("PostgreSQL e2e delivered/s vs SQLite e2e (median of the rounds' ratios; each round's: "
            + ", ".join(f"{r:.2f}" for r in ratios) + ")", f"{ratio:.2f}x", ">= 0.8x", ratio >= 0.8),
        row(f"PostgreSQL p99 at {c} senders (SQLite's in this run: {s['p99_ms']:.1f} ms)", f"{p['p99_ms']:.1f} ms",
            "<= 25 ms", p["p99_ms"] <= 25),
        row("cross-instance pickup p99", f"{pick['p99_ms']} ms", "<= 50 ms", pick["p99_ms"] <= 50),
        row("two instances vs one, delivered/s (each round's: " + ", ".join(f"{r:.2f}" for r in twos) + ")",
            f"{two:.2f}x", "reported", None),
        row("peak RSS per instance with 100,000 pending", f"{peak:.0f} MB", "<= 120 MB",
            peak <= 120 and backlog["pending"] >= 100_000),
        row("errors (non-2xx, socket)", str(sum(m["non2xx"] + m["socket_errors"] for m in (s, p, x))), "0",
            all(m["non2xx"] + m["socket_errors"] == 0 for m in (s, p, x))),
    ]  # fmt: skip
    return "\n".join(lines)
