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
    """Format a record as one JSON line; ``extra={"fields": {...}}`` adds keys at the top level.

    ``source=True`` adds where the record was logged (``"source": "app.py:123"``), for ``-v``.
    """

    def __init__(self, source: bool = False):
        super().__init__()
        self.source = source

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
        if self.source:
            entry["source"] = f"{record.filename}:{record.lineno}"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_json_logging(level: int = logging.INFO, stream=None, *, source: bool = False) -> None:
    """Send every logger's records (uvicorn's included) at ``level`` and above to ``stream`` as JSON
    lines; ``source`` adds each record's file and line."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(source=source))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
