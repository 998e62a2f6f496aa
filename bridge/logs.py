"""Structured logs: one JSON object per line on stderr, written off the event loop.

Context goes in `extra=` (event_id, route, destination, attempt, outcome...). Secrets never
reach here: config values that are secret are `Secret`s, which print as asterisks.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import sys
import threading
import time
from typing import Any

from bridge.jsonout import dumps

logger = logging.getLogger("bridge")

FLUSH_EVERY = 0.1  # seconds an info line may wait before it is written
FLUSH_LINES = 512
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # one strftime a second, not one a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self.timestamp(record.created),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        if record.name and not record.name.startswith("bridge"):  # a library's warning (asyncpg's pool, aiohttp)
            line["logger"] = record.name
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return dumps(line, default=str)


class _BatchingHandler(logging.Handler):
    """Formats on the caller's thread (a few microseconds) and leaves the writing to a thread
    that writes whatever has piled up in one call. Formatting in a background thread instead
    would hold the GIL away from the event loop for milliseconds at a time under load."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream
        self.setFormatter(JSONFormatter())
        self._lines: collections.deque[str] = collections.deque()  # append/popleft: atomic, no lock
        self._wake = threading.Event()
        self._closed = False
        self._writer = threading.Thread(target=self._write_forever, name="log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._add(self.format(record) + "\n", record.levelno)
        except Exception:  # never let a log line break the request that logs it
            self.handleError(record)

    def line(self, level: int, msg: str, fields: dict[str, Any]) -> None:
        """The same JSON line as `emit` would write, without a LogRecord on the way."""
        formatter = self.formatter
        assert isinstance(formatter, JSONFormatter)
        head = {"ts": formatter.timestamp(time.time()), "level": logging.getLevelName(level).lower(), "msg": msg}
        self._add(dumps({**head, **fields}, default=str) + "\n", level)

    def _add(self, text: str, level: int) -> None:
        self._lines.append(text)
        if level >= logging.WARNING or len(self._lines) >= FLUSH_LINES:
            self._wake.set()  # else the writer comes by within FLUSH_EVERY: waking it per line costs more

    def _write_forever(self) -> None:
        while True:
            self._wake.wait(FLUSH_EVERY)
            self._wake.clear()
            self._drain()
            if self._closed:
                return

    def _drain(self) -> None:
        lines = []
        with contextlib.suppress(IndexError):
            while True:
                lines.append(self._lines.popleft())
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


def hot(logger: logging.Logger, level: int, msg: str, fields: dict[str, Any]) -> None:
    """For the lines written per postback and per attempt: with `setup`'s handler, the line goes
    straight to it (a LogRecord and its handling cost as much as the rest of a postback's work);
    without it (a library user, a test), through `logger` as usual."""
    if not logger.isEnabledFor(level):
        return
    if _handler is not None:
        _handler.line(level, msg, fields)
    else:
        logger.log(level, msg, extra=fields)


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
    # the libraries' warnings and errors as JSON lines too, not as bare tracebacks between them
    root = logging.getLogger()
    root.handlers[:] = [_handler]
    root.setLevel(logging.WARNING)
    atexit.register(flush)


def flush() -> None:
    """Write out what is buffered and stop the writer (at exit)."""
    global _handler
    if _handler is not None:
        logger.removeHandler(_handler)
        logging.getLogger().removeHandler(_handler)
        _handler.close()
        _handler = None
