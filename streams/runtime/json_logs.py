"""Log records as JSON lines (``BLACKROAD_LOG_FORMAT=json``), for log shippers.

One object per line: ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``,
``process``, ``message`` and, for a record with one, ``exception`` (the traceback as text).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(document).decode()


def logging_config(level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` document: every record to stderr as JSON at ``level``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json", "level": level.upper()}},
        "root": {"level": level.upper(), "handlers": ["default"]},
    }
