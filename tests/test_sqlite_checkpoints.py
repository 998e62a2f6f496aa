"""The SQLite store checkpoints beside its writer (bridge/store/sqlite.py `_Checkpointer`): the
WAL still starts over under a steady stream of commits, and without the checkpointer thread
SQLite's own checkpoints come back."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

from bridge.event import dedup_key
from bridge.store import NewDelivery
from bridge.store import sqlite as sqlite_store
from bridge.store.sqlite import SQLiteStore
from tests.test_store_contract import make_event


async def _write_for(store: SQLiteStore, seconds: float, senders: int = 16) -> int:
    """Postbacks from `senders` at once, back to back, for `seconds`: commits never stop."""
    deadline, count = time.monotonic() + seconds, 0

    async def sender(k: int) -> None:
        nonlocal count
        n = k * 1_000_000
        while time.monotonic() < deadline:
            n += 1
            event = make_event(n, text="x" * 300)
            await store.ingest(event, dedup_key(event), [NewDelivery("crm", "r", f"c{n}", ordered=False)])
            count += 1

    await asyncio.gather(*(sender(k) for k in range(senders)))
    return count


async def test_the_wal_starts_over_while_commits_keep_coming(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 0.05)
    path = tmp_path / "bridge.db"
    store = SQLiteStore(str(path))
    await store.open()
    try:
        count = await _write_for(store, 2.0)
        wal = os.path.getsize(f"{path}-wal")
    finally:
        await store.close()
    written = os.path.getsize(path)  # at least every page once; the WAL had to carry all of it
    print(f"\n{count} postbacks, database {written / 1e6:.1f} MB, WAL file {wal / 1e6:.1f} MB")
    assert count > 1000
    # a WAL that never started over would be larger than the database it filled
    assert wal < written / 2, (wal, written)


async def test_without_the_checkpointer_sqlite_checkpoints_itself(tmp_path: Path, monkeypatch):
    def cannot_start(self: sqlite_store._Checkpointer) -> None:
        raise RuntimeError("no thread for you")

    monkeypatch.setattr(sqlite_store._Checkpointer, "run", cannot_start)
    monkeypatch.setattr("threading.excepthook", lambda args: None)
    store = SQLiteStore(str(tmp_path / "bridge.db"))
    await store.open()
    try:
        await _write_for(store, 0.2, senders=2)
        every = await store._run(lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
    finally:
        await store.close()
    assert every == 1000


async def test_closing_stops_the_checkpointer(tmp_path: Path, monkeypatch):
    every = 0.05
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", every)
    store = SQLiteStore(str(tmp_path / "bridge.db"))
    await store.open()
    await _write_for(store, 0.2, senders=2)
    await store.close()
    await asyncio.sleep(2 * every)
    assert not [t for t in threading.enumerate() if t.name == "sqlite-checkpointer"]
