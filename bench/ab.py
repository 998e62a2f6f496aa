"""Before and after on PostgreSQL: the bridge of a git revision against the working tree's, side by side.

    .venv/bin/python bench/ab.py --store postgresql://postgres@127.0.0.1:5432/test --before HEAD~3

Both bridges run at once (CPU 0), each on a fresh schema of that database, and are measured one
after the other, flat out end to end for `--seconds` as bench/scaleout.py does (wrk and the sink
on CPU 1), for `--rounds` rounds; the order alternates each round (before first, then after
first), so a machine that drifts between two measurements favours neither. The figure to read is
the median of each round's after/before ratio. Results: bench/results/*-ab.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import run as bench
import scaleout


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="postgresql://... (fresh schemas are made and dropped)")
    parser.add_argument("--before", required=True, help="a git revision: its bridge/ is the 'before'")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    revision = subprocess.run(
        ["git", "rev-parse", "--short", args.before], cwd=bench.ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    work = Path(bench.tempfile.mkdtemp(prefix="bridge-ab-"))
    old = work / "before"
    old.mkdir()
    archive = subprocess.run(["git", "archive", revision, "bridge"], cwd=bench.ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    tag = uuid.uuid4().hex[:8]
    schemas = {"before": f"bench_{tag}_before", "after": f"bench_{tag}_after"}
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "kind": "a/b",
        "before": revision,
        "after": "working tree",
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "load_before": os.getloadavg()},
        "settings": {"connections": args.connections, "seconds": args.seconds, "rounds": args.rounds},
    }
    for name in schemas.values():
        asyncio.run(scaleout._schema(args.store, name))
    try:
        sink_port = bench.free_port()
        sink_url = f"http://127.0.0.1:{sink_port}/in"
        subjects: dict[str, tuple[int, list[int], scaleout.PgCpu]] = {}
        with contextlib.ExitStack() as stack:
            peers = [sys.executable, str(bench.HERE / "peers.py"), "sink", str(sink_port)]
            stack.enter_context(bench.process(peers, 1, sink_port, work / "sink.log"))
            for name, schema in schemas.items():
                port, app = bench.free_port(), f"bench-{tag}-{name}"
                url = scaleout.with_query(args.store, search_path=schema, application_name=app)
                config = scaleout.write_config(work, port, url, sink_url, name)
                # the 'before' imports its bridge from the extracted revision, ahead of the installed one
                os.environ["PYTHONPATH"] = str(old) if name == "before" else ""
                proc = stack.enter_context(bench.process(bench.bridge_argv(config), 0, port, work / f"{name}.log"))
                subjects[name] = (port, [proc.pid], scaleout.PgCpu(args.store, app))
            os.environ.pop("PYTHONPATH", None)
            for port, _, _ in subjects.values():
                bench.wrk(port, connections=args.connections, seconds=1)  # warm up
                scaleout.drain(port)
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in subjects}
            for n in range(args.rounds):
                order = list(subjects) if n % 2 == 0 else list(reversed(subjects))
                print(f"round {n + 1} of {args.rounds}: {', '.join(order)} ...", flush=True)
                for name in order:
                    port, pids, pg = subjects[name]
                    rounds[name].append(scaleout.flat_out(port, sink_port, args, pids, pg))
                    scaleout.drain(port)
            results["rounds"] = rounds
    finally:
        for name in schemas.values():
            with contextlib.suppress(Exception):
                asyncio.run(scaleout._schema(args.store, name, drop=True))
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_after"] = os.getloadavg()
    pairs = list(zip(results["rounds"]["before"], results["rounds"]["after"], strict=True))
    delivered = sorted(a["delivered_per_s"] / b["delivered_per_s"] for b, a in pairs)
    p99 = sorted(a["p99_ms"] / b["p99_ms"] for b, a in pairs)
    results["ratios"] = {"delivered_per_s": delivered, "p99_ms": p99}
    load = ", ".join(f"{v:.1f}" for v in results["machine"]["load_before"])

    def each(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    lines = [
        f"A/B run {results['when']}: {revision} (before) against the working tree (after), one bridge each on"
        f" PostgreSQL, {args.connections} connections flat out end to end, {args.rounds} rounds of"
        f" {args.seconds:g} s, order alternating; load average before: {load}.",
        f"after/before delivered/s: median {median(delivered):.2f}x (rounds: {each(delivered)})",
        f"after/before p99: median {median(p99):.2f}x (rounds: {each(p99)})",
    ]
    for name in ("before", "after"):
        runs = results["rounds"][name]
        best = min(runs, key=lambda r: r["p99_ms"])
        lines.append(
            f"{name}: delivered/s median {median([r['delivered_per_s'] for r in runs]):,.0f}, p99 median"
            f" {median([r['p99_ms'] for r in runs]):.1f} ms, best round p99 {best['p99_ms']:.1f} ms at"
            f" {best['delivered_per_s']:,.0f}/s"
        )
    text = "\n".join(lines)
    print(text)
    bench.RESULTS.mkdir(exist_ok=True)
    stamp = results["when"].replace(":", "").replace("-", "")
    (bench.RESULTS / f"{stamp}-ab.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
