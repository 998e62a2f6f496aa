"""The benchmark: the real bridge against two baselines measured in the same run.

    .venv/bin/python bench/run.py            (needs wrk: apt-get install wrk)

The bridge (SQLite, fsync on every commit) runs on CPU 0; wrk and the sink share CPU 1.
Baselines, each on CPU 0 the same way: a bare aiohttp handler that only parses the XML, and a
non-durable one that parses and awaits a POST to the sink before answering.
Figures are printed and kept in bench/results/ (one JSON file per run, and latest.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early: {proc.args}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def pct(values: list[float], q: float) -> float:
    """The value at quantile `q` of `values` (nearest rank below; NaN when there are none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the process's name, from its state on: [1] the parent's
    pid, [11] and [12] its user and system CPU in clock ticks, [13] and [14] those of its children
    that ended and were waited for. OSError when the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def at_normal_priority(argv: list[str]) -> list[str]:
    """`argv` to run at the normal scheduling priority even when the calling thread runs at idle
    priority (bench/replies.py --fakes-idle), which a child would otherwise inherit."""
    idle = getattr(os, "SCHED_IDLE", None)
    if idle is not None and os.sched_getscheduler(0) == idle:
        return ["chrt", "--other", "0", *argv]
    return argv


@contextlib.contextmanager
def process(argv: list[str], cpu: int, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    pinned = ["taskset", "-c", str(cpu), *argv] if shutil.which("taskset") else argv
    with log.open("wb") as out:
        proc = subprocess.Popen(pinned, cwd=log.parent, stdout=subprocess.DEVNULL, stderr=out)
        try:
            wait_listening(port, proc)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wrk(
    port: int, *, connections: int, seconds: float, path: str = "/postback", pause_ms: float = 0
) -> dict[str, float]:
    argv = [
        "wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(HERE / "postback.lua"),
        f"http://127.0.0.1:{port}", "--", path, f"{pause_ms:g}",
    ]  # fmt: skip
    if shutil.which("taskset"):
        argv = ["taskset", "-c", "1", *argv]
    out = subprocess.run(at_normal_priority(argv), capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("BENCH_JSON "))
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    seconds_run = raw["duration_us"] / 1e6
    ok = raw["requests"] - raw["non2xx"]
    return {
        "requests": raw["requests"],
        "ok": ok,
        "non2xx": raw["non2xx"],
        "socket_errors": raw["socket_errors"],
        "per_s": round(ok / seconds_run, 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "seconds": seconds_run,
    }


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def metric(port: int, name: str, destination: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f'{name}{{destination="{destination}"}}'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def rss_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mb": round(fields["VmRSS"], 1), "peak_rss_mb": round(fields["VmHWM"], 1)}


def bridge_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "bridge", "serve", "-c", str(config)]


def write_config(work: Path, port: int, url: str) -> Path:
    config = work / "config.yaml"
    config.write_text(
        f"server: {{listen: 127.0.0.1:{port}}}\n"
        f"store: sqlite:///{work / 'bridge.db'}\n"
        f"destinations:\n  crm: {{type: webhook, url: '{url}', timeout: 5s}}\n"
        "default: [crm]\n"
    )
    return config


def run(args: argparse.Namespace) -> dict:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    results: dict = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {
            "connections": args.connections,
            "seconds": args.seconds,
            "backlog": args.backlog,
            "rounds": args.rounds,
        },
    }
    work = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
    peers = [sys.executable, str(HERE / "peers.py")]
    c, d = args.connections, args.seconds
    down = work / "down"
    down.mkdir()
    sink_port, fwd_port, po_port, px_port, down_port = (free_port() for _ in range(5))
    config = write_config(down, down_port, f"http://127.0.0.1:{free_port()}/nobody-listens")
    with contextlib.ExitStack() as stack:
        # Everything the throughput rounds use runs at once (idle when not measured), and the
        # measurements take turns, round after round: this machine's speed drifts by 10-30%
        # over minutes, and a ratio of two figures taken minutes apart would measure the drift.
        stack.enter_context(process([*peers, "sink", str(sink_port)], 1, sink_port, work / "sink.log"))
        subjects = {
            "parse_only": stack.enter_context(
                process([*peers, "parse-only", str(po_port)], 0, po_port, work / "po.log")
            ),
            "parse_only_xmltodict": stack.enter_context(
                process([*peers, "parse-only-xmltodict", str(px_port)], 0, px_port, work / "px.log")
            ),
            "forward": stack.enter_context(
                process(
                    [*peers, "forward", str(fwd_port), f"http://127.0.0.1:{sink_port}/in"],
                    0,
                    fwd_port,
                    work / "fwd.log",
                )
            ),
            "bridge_down": stack.enter_context(process(bridge_argv(config), 0, down_port, down / "bridge.log")),
        }
        ports = {"parse_only": po_port, "parse_only_xmltodict": px_port, "forward": fwd_port, "bridge_down": down_port}
        for port in ports.values():
            wrk(port, connections=c, seconds=1)  # warm up
        rounds: dict[str, list[dict]] = {name: [] for name in ports}
        for n in range(args.rounds):
            print(
                f"round {n + 1} of {args.rounds}: parse-only, parse-only (xmltodict), parse-and-forward, "
                "bridge (destination down) ...",
                flush=True,
            )
            for name, port in ports.items():
                rounds[name].append(wrk(port, connections=c, seconds=d))
        for name, runs in rounds.items():
            results[name] = {**median_run(runs), "rounds": runs}
        results["bridge_down"].update(rss_mb(subjects["bridge_down"].pid))

        print("bridge, end to end to a fast sink ...", flush=True)
        results["bridge_e2e"] = end_to_end(work, peers, args, forward_port=fwd_port, rounds=rounds["forward"])
        results["forward"] = {**median_run(rounds["forward"]), "rounds": rounds["forward"]}

        print(f"bridge, filling the backlog to {args.backlog:,} pending deliveries (destination down) ...", flush=True)
        deadline = time.monotonic() + 300
        while metric(down_port, "bridge_deliveries_pending", "crm") < args.backlog and time.monotonic() < deadline:
            wrk(down_port, connections=c, seconds=5)
        pending = metric(down_port, "bridge_deliveries_pending", "crm")
        time.sleep(2)  # let the probing settle
        results["backlog"] = {"pending": int(pending), **rss_mb(subjects["bridge_down"].pid)}
    shutil.rmtree(work, ignore_errors=True)
    return results


def count(sink_port: int) -> int:
    return get_json(f"http://127.0.0.1:{sink_port}/count")["count"]


def offered(
    port: int, sink_port: int, *, rate: float, connections: int, seconds: float, latency_ms: float = 5.0
) -> dict:
    """Offer about `rate` postbacks/s (each wrk connection pausing between requests); how much got
    delivered meanwhile, the backlog left when the load stops, and how long it takes to drain."""
    pause = max(0.0, connections / rate * 1000 - latency_ms)  # a connection's cycle: pause + answer
    start = count(sink_port)
    load = wrk(port, connections=connections, seconds=seconds, pause_ms=pause)
    during = count(sink_port) - start
    stopped = time.monotonic()
    # the backlog is what the bridge itself counts as pending, not wrk's answers minus the sink's
    # count: a request wrk cuts off when its time is up is still stored and delivered
    backlog = pending = int(metric(port, "bridge_deliveries_pending", "crm"))
    while pending and time.monotonic() - stopped < 60:
        time.sleep(0.02)
        pending = int(metric(port, "bridge_deliveries_pending", "crm"))
    return {
        **load,
        "offered_per_s": round(rate),
        "delivered_during_load_per_s": round(during / load["seconds"], 1),
        "backlog_at_end": backlog,
        "drain_s": round(time.monotonic() - stopped, 2),
        "delivered": count(sink_port) - start,
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median rate (its latencies go with it)."""
    return dict(sorted(runs, key=lambda r: r["per_s"])[len(runs) // 2])


def sustained(result: dict) -> bool:
    """Keeping up: what is left when the load stops is under half a second of traffic."""
    return result["backlog_at_end"] <= 0.5 * result["per_s"] and result["non2xx"] == 0


def end_to_end(
    work: Path, peers: list[str], args: argparse.Namespace, *, forward_port: int, rounds: list[dict]
) -> dict:
    """The highest offered rate the bridge delivers as fast as it takes in (a few steps up or down
    from the target), and a flat-out run for the ingest rate while delivering. The parse-and-
    forward baseline is measured again between steps (into `rounds`), for the same reason as the
    throughput rounds."""
    e2e = work / "e2e"
    e2e.mkdir()
    sink_port, port = free_port(), free_port()
    config = write_config(e2e, port, f"http://127.0.0.1:{sink_port}/in")
    with (
        process([*peers, "sink", str(sink_port)], 1, sink_port, work / "sink2.log"),
        process(bridge_argv(config), 0, port, e2e / "bridge.log") as bridge,
    ):
        flat_out = offered(port, sink_port, rate=1e9, connections=args.connections, seconds=args.seconds)
        target = 0.6 * median_run(rounds)["per_s"]
        # start from what it delivered flat out (with ingest taking its share) and the target,
        # whichever is lower, and move by 12% a step
        steps, best, latency = [], None, 5.0
        rate = min(target, 1.2 * flat_out["delivered_during_load_per_s"])
        for _ in range(args.steps):
            run = offered(
                port, sink_port, rate=rate, connections=args.connections, seconds=args.seconds, latency_ms=latency
            )
            latency = run["p50_ms"]
            steps.append(run)
            rounds.append(wrk(forward_port, connections=args.connections, seconds=args.seconds))
            print(
                f"  offered {run['offered_per_s']:,}/s: took {run['per_s']:,.0f}/s, delivered "
                f"{run['delivered_during_load_per_s']:,.0f}/s, backlog {run['backlog_at_end']:,}",
                flush=True,
            )
            if sustained(run):
                best = run if best is None or run["per_s"] > best["per_s"] else best
                rate *= 1.12
            else:
                rate *= 0.88
        # wrk as fast as the bridge answers is the highest offered rate of all: if deliveries
        # kept up with that too, it is the sustained figure
        if sustained(flat_out) and (best is None or flat_out["per_s"] > best["per_s"]):
            best = {**flat_out, "offered_per_s": round(flat_out["per_s"]), "flat_out": True}
        return {"sustained": best, "steps": steps, "flat_out": flat_out, **rss_mb(bridge.pid)}


def report(r: dict) -> str:
    po, fw, down, backlog = r["parse_only"], r["forward"], r["bridge_down"], r["backlog"]
    px = r["parse_only_xmltodict"]
    e2e = r["bridge_e2e"]["sustained"] or r["bridge_e2e"]["steps"][-1]
    flat = r["bridge_e2e"]["flat_out"]
    c = r["settings"]["connections"]

    def row(what: str, value: str, target: str, ok: bool) -> str:
        return f"| {what} | {value} | {target} | {'yes' if ok else 'NO'} |"

    peak = max(r["bridge_e2e"]["peak_rss_mb"], down["peak_rss_mb"], backlog["peak_rss_mb"])
    lines = [
        f"Run {r['when']} on {r['machine']['cpus']} CPUs, Python {r['machine']['python']}, "
        f"{c} concurrent senders, {r['settings']['seconds']}s per measurement; throughputs are the median of "
        f"{r['settings']['rounds']} turns taken in rotation (parse-and-forward: also between end-to-end steps).",
        "",
        "| measurement | postbacks/s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- |",
        f"| baseline: parse-only aiohttp handler | {po['per_s']:,.0f} | {po['p50_ms']:.1f} | {po['p99_ms']:.1f} |",
        f"| baseline: parse-only with xmltodict (as the issue measured) | {px['per_s']:,.0f} | "
        f"{px['p50_ms']:.1f} | {px['p99_ms']:.1f} |",
        f"| baseline: parse and forward (not durable) | {fw['per_s']:,.0f} | {fw['p50_ms']:.1f} | {fw['p99_ms']:.1f} |",
        f"| bridge: durable ingest, destination down | {down['per_s']:,.0f} | {down['p50_ms']:.1f} | "
        f"{down['p99_ms']:.1f} |",
        f"| bridge: flat out while delivering to a fast sink | {flat['per_s']:,.0f} | {flat['p50_ms']:.1f} | "
        f"{flat['p99_ms']:.1f} |",
        f"| bridge: sustained end to end ({'flat out' if e2e.get('flat_out') else 'offered'} "
        f"{e2e['offered_per_s']:,}/s) | {e2e['per_s']:,.0f} | "
        f"{e2e['p50_ms']:.1f} | {e2e['p99_ms']:.1f} |",
        "",
        f"End to end, sustained: {e2e['delivered_during_load_per_s']:,.0f} delivered/s during the load "
        f"{'(kept up)' if r['bridge_e2e']['sustained'] else '(did NOT keep up at any rate tried)'}, "
        f"backlog at the end {e2e['backlog_at_end']:,}, drained {e2e['drain_s']} s after the load stopped. "
        f"Flat out (wrk as fast as answered) it takes {flat['per_s']:,.0f}/s and delivers "
        f"{flat['delivered_during_load_per_s']:,.0f}/s meanwhile; that backlog ({flat['backlog_at_end']:,}) "
        f"drained in {flat['drain_s']} s.",
        f"Against the parse-only handler with xmltodict, durable ingest is {down['per_s'] / px['per_s']:.0%} "
        "(the targets below are against the handler with the bridge's own parser).",
        f"Memory: peak RSS {peak:.0f} MB; with {backlog['pending']:,} deliveries pending for a down "
        f"destination RSS {backlog['rss_mb']:.0f} MB (peak {backlog['peak_rss_mb']:.0f} MB).",
        "",
        "| target | measured | goal | met |",
        "| --- | --- | --- | --- |",
        row("durable ingest, destination down, vs parse-only", f"{down['per_s'] / po['per_s']:.0%}", ">= 50%",
            down["per_s"] >= 0.5 * po["per_s"]),
        row("delivered/s end to end vs parse-and-forward", f"{e2e['delivered_during_load_per_s'] / fw['per_s']:.0%}",
            ">= 60%", e2e["delivered_during_load_per_s"] >= 0.6 * fw["per_s"]),
        row("drain after load stops", f"{e2e['drain_s']} s", "< 2 s", e2e["drain_s"] < 2),
        row(f"p99 at {c} senders (destination down / flat out delivering)",
            f"{down['p99_ms']:.1f} / {flat['p99_ms']:.1f} ms", "<= 25 ms", max(down["p99_ms"], flat["p99_ms"]) <= 25),
        row("peak RSS (also with the backlog)", f"{peak:.0f} MB", "<= 120 MB", peak <= 120),
        row("errors (non-2xx, socket)", f"{sum(x['non2xx'] + x['socket_errors'] for x in (down, e2e, flat))}",
            "0", all(x["non2xx"] + x["socket_errors"] == 0 for x in (down, e2e, flat))),
    ]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--backlog", type=int, default=100_000, help="pending deliveries for the memory check")
    parser.add_argument("--steps", type=int, default=5, help="offered rates tried for the sustained end to end")
    parser.add_argument("--rounds", type=int, default=3, help="turns each throughput measurement takes (median)")
    parser.add_argument(
        "--store",
        help="postgresql://...: measure the scale-out path instead (bench/scaleout.py): SQLite, PostgreSQL and two"
        " instances on PostgreSQL behind one port, side by side, with the server's CPU",
    )
    parser.add_argument("--pickups", type=int, default=200, help="with --store: postbacks for the pickup measurement")
    args = parser.parse_args()
    if args.store:
        import scaleout  # beside this file

        results = scaleout.run(args)
        text = scaleout.report(results)
        print()
        print(text)
        RESULTS.mkdir(exist_ok=True)
        stamp = results["when"].replace(":", "").replace("-", "")
        (RESULTS / f"{stamp}-scaleout.json").write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / "latest-scaleout.md").write_text(text + "\n")
        return
    results = run(args)
    text = report(results)
    print()
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = results["when"].replace(":", "").replace("-", "")
    (RESULTS / f"{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
