"""The machine under the benchmarks: how steady its CPUs' speed is, and how fast it flushes.

    .venv/bin/python bench/machine.py [--seconds 10]

On a virtual machine a CPU's speed is not the guest's own to keep. On one of this workplace's
2-core machines the unit of work below took about 10 ms at one moment and about 19 ms at the
next, switching between the two within seconds (likely the host: its other tenants on the same
cores, or its power states), and ran slow more often when the CPU was only partly busy, as the
bridge's is under the benchmarks' load. bench/replies.py compares latencies to 5% across phases
of 15 s. A machine whose speed changes by 1.9x underneath them takes many rounds to average out;
this says how much there is.

Each CPU is probed in turn, with nothing else of the bench running: a fixed unit of pure-Python
work run back to back ("busy"), then with a pause of 0.2 s after each ("paused": a CPU that is
partly idle, as the bridge's). A unit that takes more than 1.25 times the fastest twentieth of
them ran slow. Then the flush: a 4 KiB write and fdatasync, over and over, in a temporary
directory (where the benchmarks keep their SQLite files).
Figures are printed and kept in bench/results/ (a JSON file per run, and latest-machine.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import RESULTS, pct  # noqa: E402

UNIT = 200_000  # iterations of the unit of work: about 10-20 ms of CPU here
SLOW = 1.25  # a unit slower than this many times the fastest twentieth ran slow
PAUSE = 0.2  # seconds after each unit when "paused"


def unit() -> int:
    total = 0
    for i in range(UNIT):
        total += i * i
    return total


def cpu_speed(cpu: int, seconds: float, pause: float = 0.0) -> list[float]:
    """The unit's wall time in ms, over and over for `seconds`, on `cpu` alone, with `pause`
    seconds after each. This process is on `cpu` meanwhile, and back where it was after."""
    where = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        samples: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end or not samples:
            start = time.perf_counter()
            unit()
            samples.append((time.perf_counter() - start) * 1000)
            if pause:
                time.sleep(pause)
        return samples
    finally:
        os.sched_setaffinity(0, where)


def speed_summary(samples: list[float]) -> dict[str, Any]:
    """How fast the unit ran (ms: fastest twentieth, median, 90th percentile) and the share of
    units that ran slow (over SLOW times the fastest twentieth)."""
    fast = pct(samples, 0.05)
    return {
        "units": len(samples),
        "fast_ms": round(fast, 2),
        "p50_ms": round(pct(samples, 0.5), 2),
        "p90_ms": round(pct(samples, 0.9), 2),
        "slow_share": round(sum(1 for s in samples if s > SLOW * fast) / len(samples), 3),
    }


def flush_ms(directory: str, seconds: float) -> dict[str, Any]:
    """p50 and p99 of a 4 KiB write's fdatasync in `directory`, over `seconds`."""
    samples: list[float] = []
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        end = time.monotonic() + seconds
        while time.monotonic() < end or not samples:
            os.pwrite(f.fileno(), b"x" * 4096, 0)
            start = time.perf_counter()
            os.fdatasync(f.fileno())
            samples.append((time.perf_counter() - start) * 1000)
    return {"flushes": len(samples), "p50_ms": round(pct(samples, 0.5), 3), "p99_ms": round(pct(samples, 0.99), 3)}


def probe(seconds: float) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    return {
        "cpus": {
            str(cpu): {
                "busy": speed_summary(cpu_speed(cpu, seconds)),
                "paused": speed_summary(cpu_speed(cpu, seconds, PAUSE)),
            }
            for cpu in cpus
        },
        "flush": flush_ms(tempfile.gettempdir(), seconds),
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"# The machine ({result['at']})",
        "",
        f"A unit of pure-Python work ({UNIT:,} iterations) on each CPU alone, {result['seconds']:g} s each way:"
        f" back to back (busy) and with {PAUSE:g} s after each (paused). Slow: over {SLOW:g}x the fastest"
        " twentieth.",
        "",
        "| CPU | way | units | fastest twentieth ms | p50 ms | p90 ms | slow |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cpu, ways in result["cpus"].items():
        for way, s in ways.items():
            lines.append(
                f"| {cpu} | {way} | {s['units']} | {s['fast_ms']} | {s['p50_ms']} | {s['p90_ms']} |"
                f" {s['slow_share']:.0%} |"
            )
    flush = result["flush"]
    lines += [
        "",
        f"fdatasync of a 4 KiB write in {tempfile.gettempdir()}: p50 {flush['p50_ms']} ms, p99 {flush['p99_ms']} ms"
        f" ({flush['flushes']:,} flushes).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per CPU and way, and for the flushes")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to keep the figures")
    args = parser.parse_args(argv)
    now = datetime.now(UTC)
    result = {"at": now.isoformat(timespec="seconds"), "seconds": args.seconds, **probe(args.seconds)}
    text = report(result)
    print(text, end="")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{now.strftime('%Y%m%dT%H%M%S%z')}-machine.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "latest-machine.md").write_text(text)


if __name__ == "__main__":
    main()
