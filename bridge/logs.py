"""Structured logs: one JSON object per line on stderr, written off the event loop.

Context goes in `extra=` (event_id, route, destination, attempt, outcome...). Secrets never
reach here: config values that are secret are `Secret`s, which print as asterisks.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

logger = logging.getLogger("bridge")

_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class _Handoff(logging.handlers.QueueHandler):
    """Hands records to the writer thread as they are, tracebacks rendered here."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info:
            record.traceback = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        record.msg, record.args = record.getMessage(), None
        return record


_listener: logging.handlers.QueueListener | None = None


def setup(level: str = "info", stream: Any = None) -> None:
    """Log JSON lines to `stream` (stderr) through a background thread."""
    global _listener
    if _listener is not None:
        _listener.stop()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    log_queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(log_queue, handler)
    _listener.start()
    logger.handlers[:] = [_Handoff(log_queue)]
    logger.setLevel(level.upper())
    logger.propagate = False
    atexit.register(flush)


def flush() -> None:
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
