"""Log output: plain lines for a terminal, or one JSON object per line for a log pipeline.

``server.log_format = "json"`` makes every record one line such as
``{"ts": "2026-12-04T12:00:00.123Z", "level": "INFO", "logger": "learnloop.release",
"msg": "...", "version": "v3"}``: the fields passed with ``extra=`` (conversation and version
ids, run ids) become keys. learnloop never logs what customers write; the JSON form adds
nothing that the plain form does not hold.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

# attributes every LogRecord has: the rest came from ``extra=`` and are kept as fields
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


def configure(log_format: str, *, verbose: bool = False) -> None:
    """Route every logger to stderr in ``log_format`` (``text`` or ``json``), replacing earlier handlers."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "urllib3", "apscheduler.executors.default"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
