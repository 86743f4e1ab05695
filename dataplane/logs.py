"""Process logging: plain text (default) or one JSON object per line, with the request id.

``--log-format json`` (or ``MODELFLEET_LOG_FORMAT=json``) on every role writes
lines like::

    {"ts":"2026-11-22T10:00:00.123Z","level":"WARNING","role":"gateway","logger":"...","message":"...","request_id":"abc"}

The request id is a context variable set per HTTP request from its
``x-request-id`` header (``httpserver.error_middleware``, the outermost
middleware of the gateway, the sidecar and the engine); the gateway generates
one when a client sends none and forwards it, so one id follows a request
through every hop. Log messages never carry prompts or keys: only what the
code passes to the logger, which never includes request bodies or headers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextvars import ContextVar
from typing import Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
ENV_LOG_FORMAT = "MODELFLEET_LOG_FORMAT"
MAX_REQUEST_ID = 128  # a client's header is logged, so it is bounded

REQUEST_ID: ContextVar[str | None] = ContextVar("modelfleet_request_id", default=None)


def bounded_request_id(value: str | None) -> str | None:
    return value[:MAX_REQUEST_ID] if value else None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ms), level, role, logger, message, request_id when known."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "role": self.role,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            out["request_id"] = request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def log_format(flag: str | None) -> LogFormat:
    """The flag, else MODELFLEET_LOG_FORMAT, else text."""
    value = (flag or os.environ.get(ENV_LOG_FORMAT) or "text").strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value


def configure(role: str, level: str, fmt: LogFormat = "text") -> None:
    """Root logging of one process role, on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
