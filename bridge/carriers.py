"""SPID -> carrier name, from Skycore's table (Appendix E) shipped in the package."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from functools import cache
from importlib.resources import files

from bridge.digits import is_digits


@cache
def builtin() -> Mapping[str, str]:
    table: dict[str, str] = {}
    text = files("bridge").joinpath("data/skycore-spid.csv").read_text(encoding="utf-8")
    for row in csv.DictReader(io.StringIO(text)):
        # as the table names it ("All Carriers" too: a route matches `carrier:` on the table's
        # words); it lists a few SPIDs twice: the first row wins
        table.setdefault(row["spid"].strip(), row["carrier"].strip())
    return table


def spid_key(spid: str) -> str:
    """SPIDs are 7 digits; some senders drop the leading zeros."""
    spid = spid.strip()
    return spid.zfill(7) if is_digits(spid) else spid


class Carriers:
    def __init__(self, extra: Mapping[str, str] | None = None) -> None:
        self._table = {**builtin(), **{spid_key(k): v for k, v in (extra or {}).items()}}

    def lookup(self, spid: str | None) -> str | None:
        if not spid:
            return None
        return self._table.get(spid_key(spid))
