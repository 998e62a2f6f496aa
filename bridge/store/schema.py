"""Versioned schema migrations, the same way for both stores.

Each backend has numbered SQL files, `migrations/<backend>/0001_baseline.sql`, `0002_...`, from 1
without gaps; a store keeps the number of the last one applied as the `schema_version` row of its
`meta` table. Opening a store applies the ones it lacks, in order, in one transaction with the
new version (under a lock, as several processes may open one store at once), and refuses a store
whose version is newer than this code knows: it was made by a later release, and an older one
writing to it could lose what the newer columns hold.

A store made before versions were kept (0.1.0 and earlier) has no row: it is at version 0, and
0001 brings it to the baseline, as it makes the tables of a new store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from bridge.errors import ConfigError

VERSION_KEY = "schema_version"
_FILE = re.compile(r"(\d{4})_(\w+)\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


class SchemaTooNewError(ConfigError):
    """The store was made or upgraded by a later release than this one."""

    def __init__(self, where: str, version: int, latest: int) -> None:
        super().__init__(
            [
                f"store: {where} is at schema version {version}, newer than this postback-bridge knows "
                f"(up to {latest}): a later release made it. Run that release (or newer) on it; an "
                "older one could lose what the newer schema holds"
            ]
        )


@cache
def migrations(backend: str) -> tuple[Migration, ...]:
    """Every migration of `backend` (`sqlite`, `postgres`), in order."""
    found = []
    for item in files("bridge.store").joinpath("migrations", backend).iterdir():
        matched = _FILE.fullmatch(item.name)
        if matched:
            found.append(Migration(int(matched[1]), matched[2], item.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    numbers = [m.version for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise RuntimeError(f"the {backend} migrations are not numbered 1, 2, 3, ... without gaps: {numbers}")
    return tuple(found)


def latest(backend: str) -> int:
    return migrations(backend)[-1].version


def pending(backend: str, version: int, where: str) -> tuple[Migration, ...]:
    """The migrations a store at `version` lacks; SchemaTooNewError for one newer than the code."""
    if version > latest(backend):
        raise SchemaTooNewError(where, version, latest(backend))
    return migrations(backend)[version:]


def version_of(value: str | None) -> int:
    """The stored `schema_version` row's value as a number; no row is version 0."""
    return 0 if value is None else int(value)
