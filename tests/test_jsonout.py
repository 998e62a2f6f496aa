"""bridge.jsonout writes what json.dumps(ensure_ascii=False, compact) writes, orjson or not."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bridge.jsonout import dumps

GOLDEN = Path(__file__).parent / "golden"


@dataclass
class _Point:
    x: int


def _json(obj: object) -> str:
    return json.dumps(obj, default=str, ensure_ascii=False, separators=(",", ":"))


@pytest.mark.parametrize(
    "obj",
    [
        {"text": 'héllo \u2028 </script> "q" \\ \n\t\x00', "emoji": "😀"},
        {"lone": "\ud800"},  # orjson refuses it: json writes it
        {"big": 2**70},  # past 64 bits: orjson refuses it
        {1: "key not a string"},
        {"when": datetime(2024, 5, 1, 16, 0, tzinfo=UTC)},  # default=str, as json does
        {"point": _Point(1)},  # default=str, not orjson's dataclass support
        {"nested": [1, None, True, False, (2, 3), {"a": []}]},
    ],
    ids=["escapes", "surrogate", "bigint", "int-key", "datetime", "dataclass", "nested"],
)
def test_same_text_as_json(obj: object) -> None:
    assert dumps(obj, default=str) == _json(obj)


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.json")), ids=lambda p: p.stem)
def test_golden_events_round_trip_byte_for_byte(path: Path) -> None:
    event = json.loads(path.read_text())
    assert dumps(event) == _json(event)


def test_without_default_unknown_types_still_fail() -> None:
    with pytest.raises(TypeError):
        dumps({"x": object()})
