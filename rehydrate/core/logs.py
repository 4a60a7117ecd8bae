"""Logging: plain text, or one JSON object a line (`--log-json`, REHYDRATE_LOG_FORMAT=json) carrying the
projection, generation, lane and chunk of the activity that logged, where known."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

_fields: ContextVar[dict[str, Any] | None] = ContextVar("rehydrate_log_fields", default=None)
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Add fields (projection=…, lane=…) to every record logged inside, in this task only."""
    token = _fields.set({**(_fields.get() or {}), **fields})
    try:
        yield
    finally:
        _fields.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_fields.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the context fields and any `extra=` fields."""

    _standard = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._standard and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class _PoolFloorFilter(logging.Filter):
    """Drops asyncpg's warning, with its stack trace, for each failed attempt to reopen a pool's idle connection
    while the database is down: one after 1 s, then after 2, 4, … up to 60 s, for as long as the outage lasts. The
    pool connects again when next used anyway, and whoever uses it says once what is down (a tail's outage warning,
    a failed activity)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to restore the pool connection floor")


_POOL_FLOOR = _PoolFloorFilter()


def configure(json: bool = False, level: int = logging.INFO) -> None:
    """Log rehydrate's records at `level` (others at WARNING) to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(_TEXT_FORMAT))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("rehydrate").setLevel(level)
    logging.getLogger("asyncpg.pool").addFilter(_POOL_FLOOR)
