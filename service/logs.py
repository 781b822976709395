"""Logging of every service process (launcher, engine, HTTP workers): one format, text or JSON lines.

`log_format=text`: `<time> <LEVEL> <process>: <message>`, plus ` [request <id>]` on a line logged while
an HTTP worker handles a request. `log_format=json`: one object a line with `time`, `level`,
`process`, `logger`, `message`, `request_id` (or null) and `exception` when there is one. uvicorn's
own loggers go through the same handler.
"""

from __future__ import annotations

import datetime
import json
import logging
from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)  # set per request by the worker


class _RequestContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.request = f" [request {record.request_id}]" if record.request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.datetime.fromtimestamp(record.created,
                                                         datetime.UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "process": self.process, "logger": record.name,
                 "message": record.getMessage(), "request_id": getattr(record, "request_id", None)}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str, process: str) -> None:
    """The root logger of this process: one stderr handler in the chosen format, at `level`."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestContext())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {process}: %(message)s%(request)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
