"""bench/console.py on a tiny store (the bench itself is not part of the suite): it fills a
store with the mix it says, finds what its pages name, and every page answers 200 from the real
app on that store."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from bench import console

TOKEN = "a-token-for-the-console-bench-test"


async def test_the_bench_fills_a_store_and_every_page_it_times_answers(app_client: Any, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'bench.db'}"
    timings = await console.fill_store(url, console.Fill(events=600, deliveries=1000, span_days=0.1))
    assert timings["size_mb"] >= 0
    conn = sqlite3.connect(tmp_path / "bench.db")
    try:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (600,)
        assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (1000,)
        statuses = dict(conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status").fetchall())
        assert set(statuses) == {"delivered", "dead", "pending"} and statuses["delivered"] > 800
        kinds = {row[0] for row in conn.execute("SELECT DISTINCT type FROM events")}
        assert {"sms.received", "sms.reply", "sms.status", "subscriber.opted_out"} <= kinds
        assert conn.execute("SELECT count(*) FROM attempts").fetchone()[0] > 900
        assert conn.execute("SELECT count(*) FROM events_text").fetchone()[0] > 300  # its index made again
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"events_from", "events_to", "deliveries_status_id"} <= names
    finally:
        conn.close()
    context = await console.context_of(url)
    raw = {
        "server": {"admin_token": TOKEN},
        "store": url,
        "destinations": {d: {"type": "log", "path": str(tmp_path / f"{d}.jsonl")} for d in console.DESTINATIONS},
        "default": ["crm"],
    }
    client = await app_client(raw)
    pages = await console.time_pages(str(client.make_url("")), console.PAGES, context, runs=1, token=TOKEN)
    assert [p["name"] for p in pages] == [p.name for p in console.PAGES]
    assert [(p["name"], p.get("status")) for p in pages if p.get("status") != 200] == []
    results = {
        "when": "now",
        "backend": "sqlite",
        "pages": pages,
        "fill": timings,
        "machine": {"cpus": 2, "python": "3", "load_before": [1.0], "load_after": [1.0]},
        "settings": {"events": 600, "deliveries": 1000, "runs": 1},
        "ingest": {n: {"median": 100.0, "rounds": [100], "cpu_us_median": 50.0} for n in ("full", "empty", "bare")},
    }
    assert "| events: newest |" in console.report(results)
