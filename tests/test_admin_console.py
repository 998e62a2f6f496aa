"""The admin API's filters and pages for the console (CONTRACT §8): events by texter, short code
and text with a cursor, deliveries and dead letters by `before_id`, each page saying `next`; bad
cursors and ids are a 400, never a 500. Real postbacks to the real app on a SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import sms

ADMIN = "an-admin-token-for-the-console-tests"
BEARER = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
async def client(app_client: Any, tmp_path: Path) -> Any:
    raw = {
        "server": {"admin_token": ADMIN},
        "store": f"sqlite:///{tmp_path / 'bridge.db'}",
        "destinations": {"audit": {"type": "log", "path": str(tmp_path / "events.jsonl")}},
        "default": ["audit"],
    }
    return await app_client(raw)


async def get(client: Any, path: str, params: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with client.get(path, params=params, headers=BEARER) as response:
        return response.status, await response.json()


async def test_events_by_texter_short_code_and_text_in_pages(client):
    for n in range(5):
        sender = "15552312102" if n % 2 == 0 else "15557770001"
        async with client.post("/postback", data=sms(n, text=f"hello number {n}", sender=sender)) as response:
            assert response.status == 200
    status, body = await get(client, "/admin/events", {"texter": "+1 555-231-2102", "limit": "2"})
    assert status == 200 and [e["text"] for e in body["events"]] == ["hello number 4", "hello number 2"]
    status, rest = await get(client, "/admin/events", {"texter": "15552312102", "limit": "2", "cursor": body["next"]})
    assert status == 200 and [e["text"] for e in rest["events"]] == ["hello number 0"] and rest["next"] is None
    _, coded = await get(client, "/admin/events", {"short_code": "86717", "text": "NUMBER 3"})
    assert [e["text"] for e in coded["events"]] == ["hello number 3"] and coded["next"] is None
    _, everything = await get(client, "/admin/events", {"limit": "5"})
    assert len(everything["events"]) == 5 and everything["next"] is None  # no empty page after the last


@pytest.mark.parametrize(
    ("path", "params", "says"),
    [
        ("/admin/events", {"cursor": "not-a-cursor"}, "cursor"),
        ("/admin/events", {"cursor": "x" * 5000}, "cursor"),
        ("/admin/events", {"cursor": "fG5vdGhpbmc"}, "cursor"),
        ("/admin/events", {"text": "ab"}, "text"),
        ("/admin/events", {"text": " a  "}, "text"),
        ("/admin/deliveries", {"before_id": "abc"}, "before_id"),
        ("/admin/deliveries", {"before_id": "-3"}, "before_id"),
        ("/admin/dead-letters", {"before_id": "99999999999999999999"}, "before_id"),
    ],
)
async def test_a_bad_cursor_or_before_id_is_a_400_that_says_which(client, path, params, says):
    status, body = await get(client, path, params)
    assert status == 400 and body["error"].startswith(says), body


async def test_deliveries_and_dead_letters_page_by_before_id(client):
    for n in range(3):
        async with client.post("/postback", data=sms(n)) as response:
            assert response.status == 200
    _, first = await get(client, "/admin/deliveries", {"limit": "2"})
    assert len(first["deliveries"]) == 2 and first["next"] == first["deliveries"][-1]["id"]
    _, second = await get(client, "/admin/deliveries", {"limit": "2", "before_id": str(first["next"])})
    assert [d["id"] for d in second["deliveries"]] == [first["next"] - 1] and second["next"] is None
    _, dead = await get(client, "/admin/dead-letters", {"before_id": str(first["next"])})
    assert dead == {"deliveries": [], "next": None}
