"""The statements a reply makes on PostgreSQL (issue 19): the real bridge on a fresh schema, the
fakes of tests/ for Slack and Skycore, replies sent one after another (each its own group
commit), and every statement the bridge's asyncpg sends counted by its text, less those of an
idle window as long, and the time from sending each to its answer. Not a timed test: a count,
to see that a change to the store does not add round trips to a reply, and where a reply's
time in the store goes on an otherwise idle bridge.

    .venv/bin/python bench/statements.py [--replies 100] [--store postgresql://postgres@127.0.0.1:5432/test]

The bridge runs with a `sitecustomize` (written to a temporary directory on its PYTHONPATH) that
wraps asyncpg's Connection.execute / _execute / _executemany and writes its counts when sent
SIGUSR2. Prints statements per reply, most first, and their sum; keeps them in
bench/results/latest-statements.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # bench/scaleout.py imports `run`
from bench.replies import texters_threads  # noqa: E402
from bench.run import RESULTS, free_port, wait_listening  # noqa: E402
from bench.scaleout import _schema, with_query  # noqa: E402
from tests.skycore_fake import API_KEY, fake_skycore  # noqa: E402
from tests.slack_fake import SIGNING_SECRET, TOKEN, fake_slack, message_event, signed  # noqa: E402

TEXTERS = 5
COUNTER = """
import collections, json, os, signal, time
import asyncpg.connection as c

counts = collections.Counter()
spent = collections.Counter()  # seconds from sending each statement to its answer


def key(query):
    lines = (line for line in query.splitlines() if not line.strip().startswith("--"))
    return " ".join(" ".join(lines).split())[:100]


def wrap(name, many=False):
    original = getattr(c.Connection, name)

    async def counted(self, query, *args, **kw):
        if name == "execute" and args:  # execute with args goes through _execute
            return await original(self, query, *args, **kw)
        k = ("executemany " if many else "") + key(query)
        counts[k] += 1
        start = time.perf_counter()
        try:
            return await original(self, query, *args, **kw)
        finally:
            spent[k] += time.perf_counter() - start

    setattr(c.Connection, name, counted)


wrap("execute")
wrap("_execute")
wrap("_executemany", many=True)


def dump(*_):
    with open(os.environ["BRIDGE_COUNT_STATEMENTS"], "w") as f:
        json.dump({"counts": counts, "seconds": spent}, f)


signal.signal(signal.SIGUSR2, dump)
"""


async def main(args: argparse.Namespace) -> None:
    schema = f"bench_statements_{uuid.uuid4().hex[:8]}"
    await _schema(args.store, schema)
    try:
        await run(args, schema)
    finally:
        await _schema(args.store, schema, drop=True)


async def run(args: argparse.Namespace, schema: str) -> None:
    async with fake_slack() as slack, fake_skycore() as skycore:
        work = Path(tempfile.mkdtemp(prefix="bench-statements-"))
        (work / "site").mkdir()
        (work / "site" / "sitecustomize.py").write_text(COUNTER)
        port = free_port()
        config = {
            "server": {"listen": f"127.0.0.1:{port}"},
            "store": with_query(args.store, search_path=schema),
            "destinations": {
                "sms": {"type": "skycore", "api_key": API_KEY, "api_url": skycore.api_url},
                "inbox": {"type": "slack", "token": TOKEN, "channel": "#sms-inbox", "api_url": slack.api_url,
                          "replies": {"send_with": "sms", "signing_secret": SIGNING_SECRET}},
            },
            "routes": [{"match": {"shortcode": "60856"}, "to": ["inbox"]}],
            "default": [],
        }  # fmt: skip
        (work / "config.yaml").write_text(yaml.safe_dump(config))
        counts = work / "counts.json"
        env = {**os.environ, "PYTHONPATH": str(work / "site"), "BRIDGE_COUNT_STATEMENTS": str(counts)}
        argv = [sys.executable, "-m", "bridge", "serve", "-c", str(work / "config.yaml")]
        log = (work / "bridge.log").open("wb")
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            await asyncio.to_thread(wait_listening, port, proc)
            async with aiohttp.ClientSession() as http:
                threads = await texters_threads(http, url, slack, TEXTERS)

                async def snapshot() -> dict[str, dict[str, float]]:
                    proc.send_signal(signal.SIGUSR2)
                    await asyncio.sleep(0.5)
                    return dict(json.loads(counts.read_text()))

                async def window(replies: int, seconds: float) -> dict[str, dict[str, float]]:
                    before, start = await snapshot(), time.monotonic()
                    for n in range(replies):
                        ts = f"{1800000000 + n}.000100"
                        slack.person_says("C0FAKE", ts)  # a message the fake knows: reactions land on it
                        payload = json.dumps(message_event(f"r{n}", thread_ts=threads[n % TEXTERS], ts=ts)).encode()
                        async with http.post(url + "/slack/events", data=payload, headers=signed(payload)) as response:
                            assert response.status == 200
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(max(0.0, start + seconds - time.monotonic()))
                    after = await snapshot()
                    return {
                        what: {k: n - before[what].get(k, 0) for k, n in after[what].items()}
                        for what in ("counts", "seconds")
                    }

                seconds = args.replies * 0.06 + 5  # the replies, then their SMS and reactions
                idle = await window(0, seconds)
                busy = await window(args.replies, seconds)
        finally:
            proc.terminate()
            proc.wait(20)
    sent = len(skycore.calls)

    def per_reply(what: str) -> dict[str, float]:
        return {
            k: (busy[what].get(k, 0) - idle[what].get(k, 0)) / args.replies for k in set(busy[what]) | set(idle[what])
        }

    per, ms = per_reply("counts"), {k: v * 1000 for k, v in per_reply("seconds").items()}
    rows = sorted(((v, k) for k, v in per.items() if abs(v) >= 0.005), reverse=True)
    lines = [
        f"# Statements per reply on PostgreSQL ({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})",
        "",
        f"{args.replies} replies one after another ({sent} sent as SMS, {len(slack.reactions)} reactions), each "
        "its own group commit; the bridge's statements less an idle window as long, per reply. Time: from "
        "sending a statement to its answer, as the bridge's asyncpg sees it (the round trip, the server's work "
        "and, for a group commit, its WAL flush), on an otherwise idle bridge.",
        "",
        "| per reply | statement | ms per reply | ms each |",
        "| --- | --- | --- | --- |",
        *(f"| {v:.2f} | `{k}` | {ms.get(k, 0):.2f} | {ms.get(k, 0) / v:.2f} |" for v, k in rows),
        f"| **{sum(per.values()):.2f}** | all | **{sum(ms.values()):.2f}** | |",
    ]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest-statements.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replies", type=int, default=100)
    parser.add_argument("--store", default="postgresql://postgres@127.0.0.1:5432/test", help="postgresql://...")
    asyncio.run(main(parser.parse_args()))
