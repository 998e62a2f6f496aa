"""Replies from Slack under load (issue 19, "Speed"; not a timed test): a Slack event to the
sendSMS request on a fake Skycore, at 50 replies/s, with postbacks flowing beside them (wrk,
about 1,000/s offered), against the real bridge process on SQLite.

    .venv/bin/python bench/replies.py [--seconds 20] [--rate 50] [--postbacks-pause-ms 10]

The fakes (tests/slack_fake.py, tests/skycore_fake.py) run in this process; the latency is
from just before the signed event is POSTed to /slack/events to the moment the fake Skycore
takes the sendSMS request for it (both on this machine's clock).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import free_port, wait_listening, wrk  # noqa: E402
from tests.skycore_fake import API_KEY, fake_skycore  # noqa: E402
from tests.slack_fake import SIGNING_SECRET, TOKEN, fake_slack, message_event, signed  # noqa: E402

TEXTERS = 20


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def main(args: argparse.Namespace) -> None:
    async with fake_slack() as slack, fake_skycore() as skycore:
        work = Path(tempfile.mkdtemp(prefix="bench-replies-"))
        port = free_port()
        config = {
            "server": {"listen": f"127.0.0.1:{port}"},
            "store": f"sqlite:///{work / 'bridge.db'}",
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
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", "-c", str(work / "config.yaml")], cwd=ROOT, stdout=log, stderr=log
        )
        url = f"http://127.0.0.1:{port}"
        try:
            await asyncio.to_thread(wait_listening, port, proc)
            async with aiohttp.ClientSession() as http:
                for n in range(TEXTERS):  # one thread per texter
                    body = (
                        f"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><CODE>N211</CODE><FROM>1555100{n:04d}</FROM><TO>60856</TO>"
                        f"<TEXT>hi</TEXT><TRANSACTIONID>bench-thread-{n}</TRANSACTIONID></POSTBACK>"
                    )
                    async with http.post(url + "/postback", data=body) as response:
                        assert response.status == 200
                threads: list[str] = []
                deadline = time.monotonic() + 30
                while len(threads) < TEXTERS and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                    async with http.get(url + "/admin/deliveries?destination=inbox&status=delivered") as response:
                        if len((await response.json())["deliveries"]) >= TEXTERS:
                            threads = [c.ts for c in slack.posted() if c.ts and "thread_ts" not in c.body]
                assert len(threads) == TEXTERS, "the texters' threads were not made"

                load = asyncio.create_task(
                    asyncio.to_thread(wrk, port, connections=10, seconds=args.seconds, pause_ms=args.postbacks_pause_ms)
                )
                sent_at: dict[str, float] = {}
                statuses: list[int] = []
                posting: list[asyncio.Task[None]] = []

                async def send(payload: bytes) -> None:
                    async with http.post(url + "/slack/events", data=payload, headers=signed(payload)) as response:
                        statuses.append(response.status)

                interval = 1.0 / args.rate
                start = time.monotonic()
                n = 0
                while time.monotonic() - start < args.seconds:
                    text = f"bench reply {n}"
                    ts = f"{1800000000 + n}.000100"
                    payload = json.dumps(message_event(text, thread_ts=threads[n % TEXTERS], ts=ts)).encode()
                    sent_at[text] = time.time()
                    posting.append(asyncio.create_task(send(payload)))  # at the rate, whatever the answers take
                    n += 1
                    await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
                postbacks = await load
                await asyncio.gather(*posting)
                await asyncio.sleep(3)  # the last replies' SMS
        finally:
            proc.terminate()
            proc.wait(20)
        latencies = [
            (call.at - sent_at[call.request["TEXT"]]) * 1000
            for call in skycore.calls
            if call.request.get("TEXT") in sent_at
        ]
        result = {
            "replies": n,
            "replies_per_s": round(n / args.seconds, 1),
            "events_not_200": sum(1 for s in statuses if s != 200),
            "sms_requests": len(latencies),
            "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "p99_ms": round(pct(latencies, 0.99), 1),
            "max_ms": round(max(latencies), 1) if latencies else None,
            "postbacks_per_s": postbacks["per_s"],
            "postbacks_p99_ms": postbacks["p99_ms"],
            "postbacks_not_2xx": postbacks["non2xx"] + postbacks["socket_errors"],
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=float, default=50, help="replies per second")
    parser.add_argument(
        "--postbacks-pause-ms", type=float, default=10, help="each of wrk's 10 connections waits this long"
    )
    asyncio.run(main(parser.parse_args()))
