"""JSON out: compact UTF-8 text, as `json.dumps(obj, ensure_ascii=False, separators=(",", ":"))`
writes it, made by orjson (about ten times faster; each postback is encoded twice, once to be
stored and once for its log line).

orjson refuses a few things json takes (a lone surrogate, an integer past 64 bits, a key that is
not a string); those fall back to json, so every caller gets the same text either way. Floats
aside: orjson writes NaN as null (json writes NaN, which is not JSON) and 1e-7 as 1e-7, not 1e-07.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

# datetimes and dataclasses go to `default` as json would send them, not orjson's own forms
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def dumps(obj: Any, default: Callable[[Any], Any] | None = None) -> str:
    try:
        return orjson.dumps(obj, default=default, option=_OPTIONS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(obj, default=default, ensure_ascii=False, separators=(",", ":"))
