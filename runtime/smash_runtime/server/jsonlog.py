"""Structured logs: one JSON object per line on stderr.

Request lines carry ``event="request"``, the request id and timings; other records (uvicorn's,
the loader's) become ``{"ts", "level", "logger", "message"}``. Nothing here reads headers, so
the API key cannot reach a log line.

    >>> configure_json_logging()
    >>> logging.getLogger(LOGGER).info("request", extra={"fields": {"status": 200}})
"""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = "smash_runtime.server"


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line; ``extra={"fields": {...}}`` adds keys at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry["event"] = record.getMessage()
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_json_logging(level: int = logging.INFO, stream=None) -> None:
    """Send every logger's records (uvicorn's included) to ``stream`` as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
