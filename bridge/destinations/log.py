"""`type: log`: each event as one JSON line, on stdout or appended to a file."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

from bridge.destinations.base import Attempt, Destination, Services
from bridge.event import Event
from bridge.jsonout import dumps
from bridge.retry import Delivered, Failed, Outcome
from bridge.validate import Reader


def render(event: Event) -> str:
    return dumps(event) + "\n"


@dataclass(frozen=True)
class LogOptions:
    """`type: log`, validated."""

    path: str | None = None


class LogDestination(Destination):
    type_name = "log"
    config_keys = frozenset({"path"})
    attempt_timeout = 10.0

    def __init__(self, name: str, path: str | None = None, **common: Any) -> None:
        super().__init__(name, **common)
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()  # whole lines, never interleaved

    @classmethod
    def parse(cls, options: dict[str, Any], path: str, r: Reader) -> LogOptions | None:
        file = r.string(options["path"], f"{path}.path") if "path" in options else None
        return LogOptions(file)

    def describe(self) -> str:
        return f"JSON lines to {self.path or 'stdout'}"

    def preview(self, event: Event) -> Any:
        return {"path": self.path or "stdout", "line": render(event).rstrip("\n")}

    async def open(self, services: Services) -> None:
        if self.path:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._fd is not None:
                os.write(self._fd, data)
            else:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()

    async def send(self, event: Event, attempt: Attempt) -> Outcome:
        try:
            await asyncio.to_thread(self._write, render(event).encode("utf-8"))
        except OSError as exc:
            return Failed(reason=f"cannot write: {exc.strerror or exc}", retryable=True)
        return Delivered()
