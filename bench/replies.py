"""Replies from Slack under load (issue 19, "Speed"; not a timed test): a Slack event to the
sendSMS request on a fake Skycore, at 50 replies/s, with postbacks flowing beside them (wrk,
about 1,000/s offered), against the real bridge process on SQLite (or PostgreSQL: `--store
postgresql://...`, on a fresh schema of that database, dropped afterwards).

    .venv/bin/python bench/replies.py [--seconds 15] [--rounds 5] [--rate 50]
        [--postbacks-connections 20] [--postbacks-pause-ms 15] [--store URL]
        [--fakes-idle] [--bridge-on 0|any|CPUS] [--control]
        [--rate 0 [--burn MS [--burn-on CPUS]]]

One bridge runs wrk's postbacks once uncounted (a warm-up), then the postbacks alone (A) and
with the replies beside them (B) in turn, A B A B ... A, `--rounds` B phases in all, then the
replies alone. Each B is compared with the geometric mean of the A just before it and the A
just after it: the bridge answers a little slower as its store grows (over its first 100,000
events or so), and a B compared with the A before it alone would count that growth against
the replies. `--rate 0` sends no replies at all: a calibration, whose figures say what the
comparison reads when nothing differs. `--rate 0 --burn MS` puts, in place of the replies, a
process that only spins the CPU for MS milliseconds of each second (in 50 slices, anywhere on
the machine, as PostgreSQL's processes run): what the same CPU as the replies' costs the
postbacks when it does nothing else.

`--control` makes that comparison within one run, round by round: after each B and the A after
it, a C phase runs the postbacks beside spinning processes that burn, on the same CPUs, the CPU
the replies added in that B (the bridge's extra on the bridge's CPUs, PostgreSQL's on any, the
fakes' on theirs at their priority), in 500 slices a second: A B A C A B A C ... A. Each C is
compared with the A's beside it as B is, and each round's B with its C: whether the replies
cost the postbacks more, or less, than their CPU does when it does nothing else. (The extra is
all the CPU B took beyond the A phases' rate, so CPU the postbacks spent more because of the
replies is burnt in C too: C copies what of the replies' harm shows as CPU.)

The replies-alone phase gives the bridge's CPU per reply directly (its CPU over the phase, less
what it spends idle, per reply); beside the postbacks it is estimated as the phase's CPU less
the postbacks' share at the A phases' CPU per postback.

The fakes (tests/slack_fake.py, tests/skycore_fake.py) run in this process, on CPU 1 beside wrk
(they stand for Slack and Skycore, which are not on the bridge's machine); with `--fakes-idle`
this process runs at idle priority (SCHED_IDLE), so the fakes get little CPU while the bridge,
PostgreSQL and wrk want it. The bridge runs on CPU 0 (`--bridge-on any`: anywhere, as in a
deployment). The latency is from just before the signed event is POSTed to /slack/events to
the moment the fake Skycore takes the sendSMS request for it (both on this machine's clock).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import machine  # noqa: E402
from bench.run import RESULTS, at_normal_priority, free_port, pct, proc_stat, wait_listening, wrk  # noqa: E402
from bench.scaleout import _schema, with_query  # noqa: E402
from tests.skycore_fake import API_KEY, fake_skycore  # noqa: E402
from tests.slack_fake import SIGNING_SECRET, TOKEN, fake_slack, message_event, signed  # noqa: E402

TEXTERS = 20
SPEED_PROBE = 8.0  # seconds of bench/machine.py's probe of CPU 0, before the bridge starts and after it stops


async def main(args: argparse.Namespace) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})  # off the bridge's CPU 0, as wrk
    if args.fakes_idle:
        # Slack's and Skycore's side (and the replies' sender) get little CPU while the others
        # want it, nearer to running elsewhere; the bridge, wrk and the spinner are started at the
        # normal priority (at_normal_priority), and PostgreSQL's processes are not ours
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    schema = None
    if args.store != "sqlite":
        schema = f"bench_replies_{uuid.uuid4().hex[:8]}"
        await _schema(args.store, schema)
    try:
        await run(args, schema)
    finally:
        if schema is not None:
            await _schema(args.store, schema, drop=True)


async def run(args: argparse.Namespace, schema: str | None) -> None:
    async with fake_slack() as slack, fake_skycore() as skycore:
        work = Path(tempfile.mkdtemp(prefix="bench-replies-"))
        port = free_port()
        store = f"sqlite:///{work / 'bridge.db'}" if schema is None else with_query(args.store, search_path=schema)
        config = {
            "server": {"listen": f"127.0.0.1:{port}"},
            "store": store,
            "destinations": {
                "sms": {"type": "skycore", "api_key": API_KEY, "api_url": skycore.api_url},
                "inbox": {"type": "slack", "token": TOKEN, "channel": "#sms-inbox", "api_url": slack.api_url,
                          "replies": {"send_with": "sms", "signing_secret": SIGNING_SECRET}},
                "archive": {"type": "log", "path": str(work / "archive.jsonl")},
            },
            "routes": [{"match": {"shortcode": "60856"}, "to": ["inbox"]}],
            "default": ["archive"],
        }  # fmt: skip
        (work / "config.yaml").write_text(yaml.safe_dump(config))
        log = (work / "bridge.log").open("wb")
        # how steady CPU 0 (the bridge's, unless --bridge-on says otherwise) ran with nothing of
        # the bench on it (bench/machine.py)
        speed_before = cpu0_speed()
        argv = [sys.executable, "-m", "bridge", "serve", "-c", str(work / "config.yaml")]
        if shutil.which("taskset") and args.bridge_on != "any":
            argv = ["taskset", "-c", args.bridge_on, *argv]  # as bench/run.py: the bridge on CPU 0, wrk on CPU 1
        load_before = os.getloadavg()
        proc = subprocess.Popen(at_normal_priority(argv), cwd=ROOT, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            await asyncio.to_thread(wait_listening, port, proc)
            async with aiohttp.ClientSession() as http:
                threads = await texters_threads(http, url, slack, TEXTERS)

                await asyncio.sleep(2)
                idle0, server_idle0, idle_t0 = cpu_seconds(proc.pid), server_cpu_seconds(), time.monotonic()
                await asyncio.sleep(5)
                idle = (cpu_seconds(proc.pid) - idle0) / (time.monotonic() - idle_t0)  # CPU s per s, idle
                server_idle = (server_cpu_seconds() - server_idle0) / (time.monotonic() - idle_t0)
                n = 0
                # Postbacks alone (A) and with replies beside them (B), in turn on one bridge:
                # A B A B ... A, after a first phase of postbacks that is not counted (the
                # bridge's first seconds under load are its slowest). Each B is compared with the
                # geometric mean of the A just before it and the A just after it: the bridge
                # answers a little slower as its store grows (its first 100,000 events or so), and
                # a B compared only with the A before it would count that growth against the
                # replies; an arithmetic mean of two A's would sit above a typical one and flatter
                # B.
                warm_up = await alone_phase(proc.pid, port, args)
                alone = [await alone_phase(proc.pid, port, args)]
                rounds: list[dict[str, Any]] = []
                for round_no in range(args.rounds):
                    cpu, server = cpu_seconds(proc.pid), server_cpu_seconds()
                    beside, n = await with_replies(http, url, threads, args, n, slack)
                    cpu_beside = cpu_seconds(proc.pid) - cpu
                    server_beside = server_cpu_seconds() - server
                    alone.append(await alone_phase(proc.pid, port, args))
                    before, after = alone[-2], alone[-1]
                    per_postback = (before["bridge_cpu_s"] + after["bridge_cpu_s"]) / max(1, before["ok"] + after["ok"])
                    postbacks_cpu = per_postback * beside["postbacks_beside_replies"]["ok"]
                    server_per_postback = (before["server_cpu_s"] + after["server_cpu_s"]) / max(
                        1, before["ok"] + after["ok"]
                    )
                    server_postbacks = server_per_postback * beside["postbacks_beside_replies"]["ok"]
                    rounds.append(
                        {
                            "round": round_no + 1,
                            "postbacks_alone": baseline(before, after),
                            "postbacks_alone_before": before,
                            "postbacks_alone_after": after,
                            **beside,
                            # the bridge's CPU time (user + system) over the phase and its wind-down
                            "bridge_cpu_s_beside": round(cpu_beside, 2),
                            "bridge_idle_cpu_s_per_s": round(idle, 4),
                            "bridge_cpu_ms_per_postback": round(per_postback * 1000, 3),
                            # the phase's CPU less its postbacks' at the A phases' rate (an
                            # estimate: 0.01 ms more or less per postback is 0.2 ms per reply)
                            "bridge_cpu_ms_per_reply_beside": round(
                                (cpu_beside - postbacks_cpu) / max(1, beside["replies"]) * 1000, 2
                            )
                            if beside["replies"]
                            else None,
                            # PostgreSQL's processes on this machine, the same way (None on SQLite)
                            "server_cpu_ms_per_postback": round(server_per_postback * 1000, 3)
                            if schema is not None
                            else None,
                            "server_cpu_ms_per_reply_beside": round(
                                (server_beside - server_postbacks) / max(1, beside["replies"]) * 1000, 2
                            )
                            if beside["replies"] and schema is not None
                            else None,
                        }
                    )
                    if args.control:  # C: the CPU the replies added in this B, spinning, then an A
                        extra = {
                            "bridge": max(0.0, cpu_beside - postbacks_cpu),
                            "server": max(0.0, server_beside - server_postbacks) if schema is not None else 0.0,
                            "fakes": beside["fakes_cpu_s"],
                        }
                        spun = await control_phase(proc.pid, port, args, extra)
                        alone.append(await alone_phase(proc.pid, port, args))
                        rounds[-1]["control"] = {
                            **spun,
                            "postbacks_alone": baseline(alone[-2], alone[-1]),
                            "postbacks_alone_after": alone[-1],
                        }
                only: dict[str, Any] | None = None
                if args.rate > 0:  # the replies alone, last: their latency and CPU with nothing beside
                    cpu, server, t0 = cpu_seconds(proc.pid), server_cpu_seconds(), time.monotonic()
                    only, n = await with_replies(http, url, threads, args, n, slack, postbacks=False)
                    cpu_only, wall_only = cpu_seconds(proc.pid) - cpu, time.monotonic() - t0
                    server_only = server_cpu_seconds() - server
                    only.pop("postbacks_beside_replies")
                    only["bridge_cpu_s"] = round(cpu_only, 2)
                    # the phase's CPU less the idle bridge's, per reply
                    only["bridge_cpu_ms_per_reply"] = round(
                        (cpu_only - idle * wall_only) / max(1, only["replies"]) * 1000, 2
                    )
                    only["server_cpu_ms_per_reply"] = (
                        round((server_only - server_idle * wall_only) / max(1, only["replies"]) * 1000, 2)
                        if schema is not None
                        else None
                    )
                rss = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(20)
        speed_after = cpu0_speed()
        for entry in [*rounds, *([only] if only is not None else [])]:
            sent = entry.pop("_sent_at")
            first: dict[str, float] = {}  # each reply's first sendSMS request
            for call in skycore.calls:
                text = call.request.get("TEXT")
                if text in sent:
                    first.setdefault(text, call.at)
            latencies = [(at - sent[text]) * 1000 for text, at in first.items()]
            entry["replies_sent_as_sms"] = len(latencies)
            entry["sms_sent_twice"] = sum(1 for call in skycore.calls if call.request.get("TEXT") in sent) - len(first)
            entry["reply_p50_ms"] = round(statistics.median(latencies), 1) if latencies else None
            entry["reply_p99_ms"] = round(pct(latencies, 0.99), 1) if latencies else None
            entry["reply_max_ms"] = round(max(latencies), 1) if latencies else None
        reactions = len(slack.reactions)
        result = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {
                "cpus": os.cpu_count(),
                "note": "shared with other sessions' builds and tests: figures vary between runs",
                "load_before": load_before,
                "load_after": os.getloadavg(),
                # where this process (the fakes, the replies' sender) ran: CPU 1 since e6e352e
                "fakes_cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                # their scheduling priority: "idle" with --fakes-idle (since 2026-12-06, 06:00)
                "fakes_priority": "idle" if args.fakes_idle else "normal",
                # CPU 0's speed before and after the run (bench/machine.py, "paused"; since 2026-12-06, 09:00)
                "cpu0_speed_before": speed_before,
                "cpu0_speed_after": speed_after,
            },
            "settings": vars(args),
            "store": "sqlite" if schema is None else "postgresql",
            "warm_up": warm_up,
            "replies_alone": only,
            "rounds": rounds,
            "reactions_in_threads": reactions,
            "bridge_rss_mb": rss,
        }
        print(json.dumps(result, indent=2))
        RESULTS.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S+0000", time.gmtime())
        kind = (
            ("replies" if schema is None else "replies-pg")
            + (
                ""
                if args.rate > 0
                else f"-burn{args.burn:g}" + ("" if args.burn_on == "any" else f"-on{args.burn_on.replace(',', '+')}")
                if args.burn
                else "-calibration"
            )
            + ("-control" if args.control else "")
            + ("" if args.bridge_on == "0" else f"-bridge-on-{args.bridge_on.replace(',', '+')}")
            + ("-fakes-idle" if args.fakes_idle else "")
        )
        (RESULTS / f"{stamp}-{kind}.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / f"latest-{kind}.md").write_text(summary(result) + "\n")
        print(summary(result))


async def with_replies(
    http: aiohttp.ClientSession,
    url: str,
    threads: list[str],
    args: argparse.Namespace,
    n: int,
    slack: Any,
    *,
    postbacks: bool = True,
) -> tuple[dict[str, Any], int]:
    """wrk's postbacks (unless `postbacks` is False) with `args.rate` replies/s beside them; the
    postbacks' figures, and the replies' send times (matched to the fake Skycore's requests
    afterwards)."""
    port = int(url.rsplit(":", 1)[1])
    fakes_cpu = time.process_time()  # this process: the fakes, the replies' sender (and wrk's waiting thread)
    burner = spin(args.burn, args.seconds, args.burn_on) if postbacks and args.burn else None
    load = asyncio.create_task(asyncio.to_thread(wrk_postbacks, port, args)) if postbacks else None
    sent_at: dict[str, float] = {}
    statuses: list[int] = []
    posting: list[asyncio.Task[None]] = []

    async def send(payload: bytes) -> None:
        async with http.post(url + "/slack/events", data=payload, headers=signed(payload)) as response:
            statuses.append(response.status)

    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    start = time.monotonic()
    first = n
    while args.rate > 0 and time.monotonic() - start < args.seconds:
        text = f"bench reply {n}"
        ts = f"{1800000000 + n}.000100"
        slack.person_says("C0FAKE", ts)  # a message the fake knows: the thread's reactions land on it
        payload = json.dumps(message_event(text, thread_ts=threads[n % TEXTERS], ts=ts)).encode()
        sent_at[text] = time.time()
        posting.append(asyncio.create_task(send(payload)))  # at the rate, whatever the answers take
        n += 1
        await asyncio.sleep(max(0.0, min(start + (n - first) * interval, start + args.seconds) - time.monotonic()))
    offered = await load if load is not None else None
    burnt = await asyncio.to_thread(reaped, burner) if burner is not None else None
    await asyncio.gather(*posting)
    await asyncio.sleep(3)  # the last replies' SMS (and, as after every phase, the archive's backlog)
    entry = {
        "postbacks_beside_replies": offered,
        "replies": n - first,
        "replies_per_s": round((n - first) / args.seconds, 1),
        "events_not_200": sum(1 for s in statuses if s != 200),
        # what Slack's and Skycore's side of the replies cost here, on CPU 1 (not on the bridge's
        # machine in a deployment, but beside wrk and, on PostgreSQL, the server's processes here)
        "fakes_cpu_s": round(time.process_time() - fakes_cpu, 2),
        # the spinning process's CPU per second of the phase, as measured (--burn)
        "burn_cpu_ms_per_s": round(burnt / args.seconds * 1000, 1) if burnt is not None else None,
        "_sent_at": sent_at,
    }
    return entry, n


# Spins `ms_per_s` of CPU time each second for `seconds`, in `slices` slices a second on a fixed
# schedule (a slice that starts late, behind a busier task, starts the moment it can). The slices
# are counted in the process's own CPU time, not the clock's, and against a running total: one
# preempted midway still burns all of it, and the loop's own sleeping and waking count in it, so
# the process burns what it is asked to whenever the machine lets it (and its start, before).
SPIN = """
import os, sys, time
ms_per_s, seconds, where, slices = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
cpus = set(range(os.cpu_count())) if where == "any" else set()
for part in where.split(",") if where != "any" else []:  # taskset's lists: 0,1 or 0-1
    low, _, high = part.partition("-")
    cpus.update(range(int(low), int(high or low) + 1))
os.sched_setaffinity(0, cpus)
period, slice_ = 1 / slices, ms_per_s / slices / 1000
start, spent = time.monotonic(), time.process_time()
for k in range(round(seconds * slices)):
    time.sleep(max(0.0, start + k * period - time.monotonic()))
    while time.process_time() < spent + (k + 1) * slice_:
        pass
"""
BURN_SLICES = 50  # --burn's slices a second (about 3.5 ms each at 175 ms a second)
# the control's (--control): a reply's CPU comes in pieces of a few tenths of a millisecond (its
# three HTTP exchanges, its statements, its log lines), about ten a reply at 50 replies a second
CONTROL_SLICES = 500


async def control_phase(pid: int, port: int, args: argparse.Namespace, extra: dict[str, float]) -> dict[str, Any]:
    """wrk's postbacks beside spinners that burn the CPU seconds in `extra`, which the replies
    added in the B phase before (see --control), over a phase as long: the bridge's on the
    bridge's CPUs and PostgreSQL's on any, both at the normal priority; the fakes' on this
    process's CPUs at its priority (idle with --fakes-idle)."""
    ours = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    pinned = shutil.which("taskset") and args.bridge_on != "any"  # as the bridge was started
    where = {"bridge": args.bridge_on if pinned else "any", "server": "any", "fakes": ours}
    asked = {name: seconds / args.seconds * 1000 for name, seconds in extra.items()}
    spinners = {
        name: spin(ms, args.seconds, where[name], slices=CONTROL_SLICES, normal=name != "fakes")
        for name, ms in asked.items()
        if ms >= 1  # less than a millisecond a second is nothing to spin
    }
    cpu, server = cpu_seconds(pid), server_cpu_seconds()
    figures: dict[str, Any] = await asyncio.to_thread(wrk_postbacks, port, args)
    # what each had burnt when wrk stopped: one that fell behind (the fakes' at idle priority,
    # starved) would burn the rest afterwards, beside no postbacks
    during = {name: cpu_seconds(proc.pid) for name, proc in spinners.items()}
    burnt = {name: await asyncio.to_thread(reaped, proc) for name, proc in spinners.items()}
    await asyncio.sleep(3)  # as after every phase
    return {
        "postbacks_beside_spinners": figures,
        "bridge_cpu_s": round(cpu_seconds(pid) - cpu, 2),
        "server_cpu_s": round(server_cpu_seconds() - server, 2),
        "spinners": {
            name: {
                "on": where[name],
                "asked_ms_per_s": round(asked[name], 1),
                # over the phase (the ticks of /proc, 10 ms), and in all
                "burnt_ms_per_s": round(during[name] / args.seconds * 1000, 1) if name in during else None,
                "burnt_in_all_ms_per_s": round(burnt[name] / args.seconds * 1000, 1) if name in burnt else None,
            }
            for name in asked
        },
    }


def cpu0_speed() -> dict[str, Any] | None:
    """bench/machine.py's probe of CPU 0 ("paused"), in a process of its own at the normal
    priority: this one may be at idle priority (--fakes-idle), where any other task on CPU 0,
    however small, would come first."""
    code = (
        "import json; from bench import machine; "
        f"print(json.dumps(machine.speed_summary(machine.cpu_speed(0, {SPEED_PROBE}, machine.PAUSE))))"
    )
    argv = at_normal_priority([sys.executable, "-c", code])
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if done.returncode == 0:
        with contextlib.suppress(ValueError):
            return dict(json.loads(done.stdout))
    # a probe that fails costs the run its line in the summary, not its rounds
    print(f"CPU 0's probe failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}", file=sys.stderr)
    return None


def can_leave_idle_priority() -> bool:
    """Whether a child of an idle-priority thread can be started at the normal priority here
    (`chrt --other 0`): Linux lets only root, or a process with CAP_SYS_NICE, leave SCHED_IDLE."""
    if not hasattr(os, "SCHED_IDLE") or shutil.which("chrt") is None:
        return False
    probe = "import os, subprocess, sys; from run import at_normal_priority; "
    probe += "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)); "
    probe += "sys.exit(subprocess.run(at_normal_priority(['true'])).returncode)"
    return subprocess.run([sys.executable, "-c", probe], cwd=ROOT / "bench", capture_output=True).returncode == 0


def spin(
    ms_per_s: float, seconds: float, cpus: str = "any", *, slices: int = BURN_SLICES, normal: bool = True
) -> subprocess.Popen[bytes]:
    """A process that spins the CPU `ms_per_s` of each second for `seconds` on `cpus` ("0,1",
    or "any"), in `slices` slices a second (see SPIN); at the normal priority, or (`normal`
    False) at this process's own."""
    argv = [sys.executable, "-c", SPIN, str(ms_per_s), str(seconds), cpus, str(slices)]
    return subprocess.Popen(at_normal_priority(argv) if normal else argv)


def reaped(proc: subprocess.Popen[bytes]) -> float:
    """Wait for `proc` (a spinner) to end; its CPU time in seconds, user + system. One that
    failed stops the run: a phase beside it would be read as a phase beside its CPU."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, for its CPU time
    if proc.returncode != 0:
        raise RuntimeError(f"a spinning process failed (exit status {proc.returncode}): {proc.args}")
    return usage.ru_utime + usage.ru_stime


async def texters_threads(http: aiohttp.ClientSession, url: str, slack: Any, texters: int) -> list[str]:
    """A texter's text to short code 60856 (routed to the Slack destination `inbox`) for each of
    `texters`: the ts of each thread the bridge starts, once all of them are delivered."""
    for n in range(texters):
        body = (
            f"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><CODE>N211</CODE><FROM>1555100{n:04d}</FROM><TO>60856</TO>"
            f"<TEXT>hi</TEXT><TRANSACTIONID>bench-thread-{n}</TRANSACTIONID></POSTBACK>"
        )
        async with http.post(url + "/postback", data=body) as response:
            assert response.status == 200
    threads: list[str] = []
    deadline = time.monotonic() + 30
    while len(threads) < texters and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        async with http.get(url + "/admin/deliveries?destination=inbox&status=delivered") as response:
            if len((await response.json())["deliveries"]) >= texters:
                threads = [c.ts for c in slack.posted() if c.ts and "thread_ts" not in c.body]
    assert len(threads) == texters, "the texters' threads were not made"
    return threads


def baseline(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """What a B phase is compared with: the geometric mean of the A phases on either side of it,
    figure by figure (an arithmetic mean sits above a typical phase, and would flatter B)."""
    return {key: math.sqrt(before[key] * after[key]) for key in ("per_s", "p50_ms", "p99_ms")}


async def alone_phase(pid: int, port: int, args: argparse.Namespace) -> dict[str, Any]:
    """wrk's postbacks with nothing beside them, the bridge's CPU over the phase and its
    wind-down, and the same pause after it as a phase with replies has."""
    cpu, server = cpu_seconds(pid), server_cpu_seconds()
    figures: dict[str, Any] = await asyncio.to_thread(wrk_postbacks, port, args)
    await asyncio.sleep(3)
    return {
        **figures,
        "bridge_cpu_s": round(cpu_seconds(pid) - cpu, 2),
        "server_cpu_s": round(server_cpu_seconds() - server, 2),
    }


def wrk_postbacks(port: int, args: argparse.Namespace) -> dict[str, float]:
    connections, pause = args.postbacks_connections, args.postbacks_pause_ms
    return wrk(port, connections=connections, seconds=args.seconds, pause_ms=pause)


def cpu_seconds(pid: int) -> float:
    """The process's CPU time so far, all threads, user + system (/proc/PID/stat)."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds() -> float:
    """The CPU time so far of this machine's PostgreSQL processes (those named `postgres`: the
    server and its backends, the bridge's connections among them), user + system, and of those
    that ended meanwhile (the postmaster's reaped children: a pool closes idle connections, and
    a sum over the live ones alone would drop their time and could go down); 0 when there are
    none (a server elsewhere). Other work on the same server counts too: run nothing beside."""
    stats: dict[int, list[str]] = {}
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):  # gone meanwhile
            if comm.read_text().strip() == "postgres":
                stats[int(comm.parent.name)] = proc_stat(int(comm.parent.name))
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for fields in stats.values():
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if int(fields[1]) not in stats:  # the postmaster (its parent is not one of them)
            total += int(fields[13]) + int(fields[14])  # cutime, cstime: its children that ended
    return total / tick


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def summary(result: dict[str, Any]) -> str:
    settings = result["settings"]
    cpus = result["machine"].get("fakes_cpus")  # not kept by runs before it was
    fakes = "the fakes unpinned" if not cpus or len(cpus) > 1 else f"the fakes on CPU {cpus[0]}"
    if result["machine"].get("fakes_priority") == "idle":  # not kept by runs before it was: normal
        fakes += " at idle priority (SCHED_IDLE: little CPU while the others want it)"
    burn_on = settings.get("burn_on", "any")  # not kept by runs before it was
    where = "any CPU" if burn_on == "any" else f"CPU {burn_on}"
    bridge_on = settings.get("bridge_on", "0")  # not kept by runs before it was: CPU 0
    bridge_where = "any CPU" if bridge_on == "any" else f"CPU {bridge_on}"
    controlled = [r for r in result["rounds"] if r.get("control")]
    order = (
        "After a warm-up, phases A (postbacks alone) and B (with the replies beside them) alternate, A B A ... B A; "
        "each B is compared with the geometric mean of the A before and the A after it."
        if not controlled
        else "After a warm-up, phases A (postbacks alone), B (with the replies beside them) and C (with processes "
        "beside them that spin the CPU the replies added in the B before, on the same CPUs, in "
        f"{CONTROL_SLICES} slices a second) go A B A C A B A C ... A; each B and each C is compared with the "
        "geometric mean of the A before and the A after it."
    )
    lines = [
        f"# Replies beside postbacks ({result['when']}, {result['store']})",
        "",
        f"{result['machine']['cpus']} CPUs, shared with other work (load average "
        f"{result['machine']['load_before'][0]:.1f} before, {result['machine']['load_after'][0]:.1f} after); "
        f"the bridge on {bridge_where}, wrk on CPU 1, {fakes}. {settings['rate']:g} replies/s"
        + (
            f" (none: each B phase has a process beside the postbacks that spins the CPU {settings['burn']:g} ms "
            f"of each second instead, on {where})"
            if settings["rate"] <= 0 and settings.get("burn")
            else " (none: a calibration, each B phase is postbacks alone too)"
            if settings["rate"] <= 0
            else ""
        )
        + f", wrk {settings['postbacks_connections']} connections each pausing {settings['postbacks_pause_ms']:g} ms, "
        f"{settings['seconds']:g} s per phase. {order}",
        "",
    ]
    before, after = result["machine"].get("cpu0_speed_before"), result["machine"].get("cpu0_speed_after")
    if before is not None and after is not None:  # not kept by runs before it was
        lines += [
            "CPU 0's speed with nothing else on it (bench/machine.py, a fixed unit of work with pauses), "
            f"before / after the run: p50 {before['p50_ms']} / {after['p50_ms']} ms, fastest twentieth "
            f"{before['fast_ms']} / {after['fast_ms']} ms, units that ran slow (over {machine.SLOW:g}x the "
            f"fastest twentieth) {before['slow_share']:.0%} / {after['slow_share']:.0%}.",
            "",
        ]
    only = result["replies_alone"]
    if only is not None:
        lines += [
            f"Replies alone ({only['replies_per_s']:g}/s, {only['replies_sent_as_sms']} of {only['replies']} "
            f"sent as SMS): p50 / p99 / max {only['reply_p50_ms']} / {only['reply_p99_ms']} / "
            f"{only['reply_max_ms']} ms; "
            f"the bridge's CPU {only['bridge_cpu_ms_per_reply']} ms per reply"
            + (
                f", PostgreSQL's {only['server_cpu_ms_per_reply']} ms."
                if only.get("server_cpu_ms_per_reply") is not None
                else "."
            ),
            "",
        ]
    lines += [
        "| round | postbacks/s A before / B / A after | p50 ms A / B / A | p99 ms A / B / A "
        "| replies/s | reply p50 / p99 / max ms | events not 200 | SMS sent | bridge CPU ms per reply beside "
        "| per postback |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rounds"]:
        phases = columns(r["postbacks_alone_before"], r["postbacks_beside_replies"], r["postbacks_alone_after"])
        lines.append(
            f"| {r['round']} | {phases} | "
            f"{r['replies_per_s']:g} | {r['reply_p50_ms']} / {r['reply_p99_ms']} / {r['reply_max_ms']} | "
            f"{r['events_not_200']} | {r['replies_sent_as_sms']} of {r['replies']}"
            + (f", {r['sms_sent_twice']} twice" if r["sms_sent_twice"] else "")
            + " | "
            f"{r['bridge_cpu_ms_per_reply_beside']} | {r['bridge_cpu_ms_per_postback']} |"
        )
    if controlled:
        lines += [
            "",
            "| round | postbacks/s A / C / A | p50 ms A / C / A | p99 ms A / C / A | spinners' CPU ms/s, "
            "asked / burnt: the bridge's, PostgreSQL's, the fakes' |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in controlled:
            control = r["control"]
            phases = columns(
                r["postbacks_alone_after"], control["postbacks_beside_spinners"], control["postbacks_alone_after"]
            )
            spinners = control["spinners"]
            burnt = ", ".join(
                f"{spun['asked_ms_per_s']:g} / {spun['burnt_ms_per_s']:g}"
                if (spun := spinners.get(name)) and spun["burnt_ms_per_s"]
                else "-"
                for name in ("bridge", "server", "fakes")
            )
            lines.append(f"| {r['round']} | {phases} | {burnt} |")
    reactions, rss = result["reactions_in_threads"], result["bridge_rss_mb"]
    calibration = result["settings"]["rate"] <= 0
    lines += ["", f"Reactions in the threads: {reactions}; bridge RSS {rss} MB.", ""]
    burnt = [r["burn_cpu_ms_per_s"] for r in result["rounds"] if r.get("burn_cpu_ms_per_s") is not None]
    if burnt:
        lines += [f"The spinning process's CPU, ms per second of each B phase: {', '.join(map(str, burnt))}.", ""]
    faked = [r for r in result["rounds"] if r.get("fakes_cpu_s") is not None and r["replies"]]
    if faked:  # runs since it was kept
        each = ", ".join(f"{r['fakes_cpu_s'] / r['replies'] * 1000:.2f}" for r in faked)
        lines += [f"The fakes' CPU (Slack's and Skycore's side, on CPU 1), ms per reply, each round's: {each}.", ""]
    server = [r for r in result["rounds"] if r.get("server_cpu_ms_per_postback") is not None]
    if server:  # runs on PostgreSQL since it was kept
        each = ", ".join(f"{r['server_cpu_ms_per_postback']} / {r['server_cpu_ms_per_reply_beside']}" for r in server)
        lines += [
            "PostgreSQL's CPU (this machine's `postgres` processes), ms per postback (A) / per reply "
            f"beside (B), each round's: {each}.",
            "",
        ]
    lines += verdict(result["rounds"], calibration=calibration)
    return "\n".join(lines)


def columns(*phases: dict[str, Any]) -> str:
    """A summary row's rate, p50 and p99 columns: each of `phases`' figure, in order."""
    figures = (("per_s", ",.0f"), ("p50_ms", ".1f"), ("p99_ms", ".1f"))
    return " | ".join(" / ".join(format(phase[key], fmt) for phase in phases) for key, fmt in figures)


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf  # an A phase with no answers at all: no verdict passes


def verdict(rounds: list[dict[str, Any]], *, calibration: bool = False) -> list[str]:
    """Issue 19's targets: each figure of the postbacks beside the replies (B) against the
    geometric mean of the postbacks alone just before and just after it (A), as the median of
    the rounds' ratios, and the replies' p99 in every round. A calibration (no replies) says
    what the comparison reads when nothing differs; its "met" is not a verdict. Below them, for
    comparison with runs before 2026-12-06, the p50 against the A before only (those runs'
    order: A, the replies alone, then B), how far each round's two A's differ, and the p50's
    difference in milliseconds: 5% of a 2-3 ms p50 (both stores' on the machine of 2026-12-06
    05:52) is 0.1-0.15 ms, of a 5 ms one (SQLite's on an earlier machine) 0.25 ms."""

    def ratios(key: str, against: str = "postbacks_alone") -> list[float]:
        return sorted(ratio(r["postbacks_beside_replies"][key], r[against][key]) for r in rounds)

    def row(what: str, values: list[float], goal: str, met: bool | None) -> str:
        each = ", ".join(f"{v:.2f}" for v in values)
        median = statistics.median(values)
        said = "-" if met is None or calibration else "yes" if met else "NO"
        shown = f"{median:.2f}"
        if shown in goal and float(shown) != median:  # 0.946 is not 0.95: three decimals on the bound
            shown = f"{median:.3f}"
        return f"| {what} (each round's: {each}) | {shown}x | {goal} | {said} |"

    rate, p50, p99 = ratios("per_s"), ratios("p50_ms"), ratios("p99_ms")
    added = sorted(r["postbacks_beside_replies"]["p50_ms"] - r["postbacks_alone"]["p50_ms"] for r in rounds)
    alone_p50 = statistics.median(r["postbacks_alone"]["p50_ms"] for r in rounds)
    drift = sorted(ratio(r["postbacks_alone_after"]["p50_ms"], r["postbacks_alone_before"]["p50_ms"]) for r in rounds)
    replies = [r["reply_p99_ms"] for r in rounds if r["reply_p99_ms"] is not None]
    worst = max(replies) if replies else None
    controls = []
    controlled = [r for r in rounds if r.get("control")]
    if controlled:  # --control: the C phases, and each round's B against its C
        (spun_rate, _), (spun_p50, over_p50) = (controlled_ratios(controlled, k) for k in ("per_s", "p50_ms"))
        of = f"{len(controlled)} of the {len(rounds)} rounds"
        controls = [
            row(f"(postbacks/s beside the spinners vs alone: the replies' CPU, burnt; {of})", spun_rate, "-", None),
            row(f"(postback p50 beside the spinners vs alone; {of})", spun_p50, "-", None),
            row(f"(postback p50: the replies' ratio over the spinners'; {of})", over_p50, "-", None),
        ]
    reply_row = (
        "| reply p99, Slack event to sendSMS | no replies (a calibration run) | < 100 ms | - |"
        if worst is None
        else f"| reply p99, Slack event to sendSMS (each round's: {', '.join(f'{v:g}' for v in replies)}) "
        f"| {worst:g} ms at most | < 100 ms | {'yes' if worst < 100 else 'NO'} |"
    )
    return [
        "| target | measured | goal | met |",
        "| --- | --- | --- | --- |",
        reply_row,
        row("postbacks/s beside replies vs alone", rate, ">= 0.95x", statistics.median(rate) >= 0.95),
        row("postback p50 beside replies vs alone", p50, "<= 1.05x", statistics.median(p50) <= 1.05),
        row("postback p99 beside replies vs alone", p99, "<= 1.05x", statistics.median(p99) <= 1.05),
        row("(p50 vs the A before only, as before 2026-12-06)", ratios("p50_ms", "postbacks_alone_before"), "-", None),
        row("(p50 of the A after vs the A before: the drift)", drift, "-", None),
        f"| (p50 beside minus alone, in ms; alone it is {alone_p50:.2f} ms, so 5% is {alone_p50 * 0.05:.2f} ms) "
        f"(each round's: {', '.join(f'{v:+.2f}' for v in added)}) | {statistics.median(added):+.2f} ms | - | - |",
        *controls,
    ]


def controlled_ratios(rounds: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """For the rounds with a C phase (--control), sorted: each C's figure against the A's beside
    it, and each round's B ratio over its C ratio (above 1: the replies cost the postbacks more
    than their CPU spinning does)."""
    spun, over = [], []
    for r in rounds:
        c = ratio(r["control"]["postbacks_beside_spinners"][key], r["control"]["postbacks_alone"][key])
        b = ratio(r["postbacks_beside_replies"][key], r["postbacks_alone"][key])
        spun.append(c)
        over.append(ratio(b, c) if math.isfinite(c) else math.inf)
    return sorted(spun), sorted(over)


def pooled(paths: list[str], *, draws: int = 10_000) -> list[str]:
    """The verdict over the rounds of several runs together: more rounds than one run has, so a
    median that moves less with the machine. Beside each median, a 95% bootstrap interval
    (the rounds resampled with replacement, `draws` times; seeded, so the same files print the
    same figures)."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    rounds = [r for result in results for r in result["rounds"]]
    calibration = all(result["settings"]["rate"] <= 0 for result in results)
    if not calibration and any(result["settings"]["rate"] <= 0 for result in results):
        raise SystemExit("calibrations and runs with replies are not pooled together")
    if len({result.get("store", "sqlite") for result in results}) > 1:
        raise SystemExit("runs on SQLite and on PostgreSQL are not pooled together")
    if len({result["settings"].get("burn", 0) for result in results}) > 1:
        raise SystemExit("runs with different --burn are not pooled together")
    if len({result["settings"].get("bridge_on", "0") for result in results}) > 1:
        raise SystemExit("runs with the bridge on different CPUs are not pooled together")
    if len({result.get("machine", {}).get("fakes_priority", "normal") for result in results}) > 1:
        raise SystemExit("runs with the fakes at idle priority and at the normal one are not pooled together")
    rng = random.Random(19)

    def interval(values: list[float]) -> str:
        medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
        return f"{medians[int(0.025 * draws)]:.2f}-{medians[int(0.975 * draws)]:.2f}"

    lines = [
        f"{len(rounds)} rounds of {len(results)} runs ({', '.join(Path(p).name for p in paths)})",
        "",
        *verdict(rounds, calibration=calibration),
        "",
        "95% bootstrap intervals of the medians:",
    ]
    for key in ("per_s", "p50_ms", "p99_ms"):
        values = [r["postbacks_beside_replies"][key] / r["postbacks_alone"][key] for r in rounds]
        lines.append(f"- {key}: {interval(values)}")
    controlled = [r for r in rounds if r.get("control")]
    if controlled:
        spun, over = controlled_ratios(controlled, "p50_ms")
        lines.append(f"- p50_ms beside the spinners ({len(controlled)} rounds): {interval(spun)}")
        lines.append(f"- p50_ms, the replies' ratio over the spinners': {interval(over)}")
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15, help="per phase")
    parser.add_argument("--rounds", type=int, default=5, help="phases with replies, each between two without")
    parser.add_argument(
        "--rate", type=float, default=50, help="replies per second (0: none, a calibration of the comparison)"
    )
    parser.add_argument(
        "--burn",
        type=float,
        default=0,
        metavar="MS",
        help="with --rate 0: in each B phase, a process that spins the CPU this many ms of each second, in 50 "
        "slices, on any CPU (what as much CPU as the replies take costs the postbacks, with nothing else)",
    )
    parser.add_argument(
        "--burn-on",
        default="any",
        metavar="CPUS",
        help="the spinning process's CPUs: any (the default), or a list such as 0 or 0,1",
    )
    parser.add_argument(
        "--bridge-on",
        default="0",
        metavar="CPUS",
        help="the bridge's CPUs: 0 (the default, off wrk's CPU 1), a list such as 0,1 or 0-1, or any (not pinned, "
        "as in a deployment; the server's processes are not pinned either)",
    )
    parser.add_argument(
        "--fakes-idle",
        action="store_true",
        help="run this process (the fakes for Slack and Skycore, and the replies' sender) at idle priority "
        "(SCHED_IDLE), so their CPU, which a deployment does not have on its machine, goes mostly where the "
        "bridge, PostgreSQL and wrk leave a core idle; the bridge, wrk and --burn's spinner stay at the normal one "
        "(which takes root or CAP_SYS_NICE)",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="with replies: after each B and the A after it, a C phase of postbacks beside processes that spin the "
        "CPU the replies added in that B, on the same CPUs (the bridge's, PostgreSQL's, the fakes' at their "
        f"priority), in {CONTROL_SLICES} slices a second, then an A: whether the replies cost the postbacks more "
        "than their CPU does when it does nothing else",
    )
    parser.add_argument("--store", default="sqlite", help="sqlite (a new file), or postgresql://... (a fresh schema)")
    parser.add_argument(
        "--postbacks-pause-ms", type=float, default=15, help="each of wrk's connections waits this long, each time"
    )
    parser.add_argument(
        "--postbacks-connections",
        type=int,
        default=20,
        help="wrk's connections, each waiting for its answer and then pausing: a closed loop whose rate is "
        "connections / (pause + latency), about 1,000-1,100/s by default, so a slower answer is also a lower rate",
    )
    parser.add_argument(
        "--verdict-of",
        nargs="+",
        metavar="RESULT_JSON",
        help="run nothing: the verdict over the rounds of these result files together (same settings), "
        "with a bootstrap interval for each median",
    )
    parsed = parser.parse_args()
    if parsed.verdict_of:
        print("\n".join(pooled(parsed.verdict_of)))
        raise SystemExit(0)
    if parsed.rounds < 1 or parsed.seconds <= 0 or parsed.rate < 0:
        parser.error("--rounds must be at least 1, --seconds more than 0, --rate 0 or more")
    if parsed.burn and (parsed.rate > 0 or not 0 < parsed.burn < 1000):
        parser.error("--burn takes --rate 0 and 0 < MS < 1000")
    if parsed.control and parsed.rate <= 0:
        parser.error("--control takes replies (--rate more than 0): it burns the CPU they added")
    if parsed.fakes_idle and not can_leave_idle_priority():
        parser.error(
            "--fakes-idle needs chrt (util-linux) and the right to start the bridge and wrk back at the normal "
            "priority from an idle one: root, or CAP_SYS_NICE"
        )
    asyncio.run(main(parsed))
