"""Structured logs: one JSON object per line on stderr, written off the event loop.

Context goes in `extra=` (event_id, route, destination, attempt, outcome...). Secrets never
reach here: config values that are secret are `Secret`s, which print as asterisks.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
from typing import Any

logger = logging.getLogger("bridge")

FLUSH_EVERY = 0.1  # seconds an info line may wait before it is written
FLUSH_LINES = 512
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime a second, not one a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return _encode(line)


_encode = json.JSONEncoder(ensure_ascii=False, default=str).encode


class _BatchingHandler(logging.Handler):
    """Formats on the caller's thread (a few microseconds) and leaves the writing to a thread
    that writes whatever has piled up in one call. Formatting in a background thread instead
    would hold the GIL away from the event loop for milliseconds at a time under load."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream
        self.setFormatter(JSONFormatter())
        self._lines: list[str] = []
        self._wake = threading.Event()
        self._closed = False
        self._writer = threading.Thread(target=self._write_forever, name="log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record) + "\n")
        except Exception:  # never let a log line break the request that logs it
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or len(self._lines) >= FLUSH_LINES:
            self._wake.set()  # else the writer comes by within FLUSH_EVERY: waking it per line costs more

    def _write_forever(self) -> None:
        while True:
            self._wake.wait(FLUSH_EVERY)
            self._wake.clear()
            self._drain()
            if self._closed:
                return

    def _drain(self) -> None:
        lines, self._lines = self._lines, []
        if lines:
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):  # stderr closed: nowhere left to say it
                pass

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._writer.join(timeout=5)
        self._drain()
        super().close()


_handler: _BatchingHandler | None = None


def setup(level: str = "info", stream: Any = None) -> None:
    """Log JSON lines to `stream` (stderr), written by a background thread."""
    global _handler
    flush()
    # The logging HOWTO's "Optimization" switches: we never print caller, thread or process.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    _handler = _BatchingHandler(stream or sys.stderr)
    logger.handlers[:] = [_handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    atexit.register(flush)


def flush() -> None:
    """Write out what is buffered and stop the writer (at exit)."""
    global _handler
    if _handler is not None:
        logger.removeHandler(_handler)
        _handler.close()
        _handler = None
