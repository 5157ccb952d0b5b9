"""The server's log format: uvicorn's text lines (the default) or one JSON object per line (`--log-format json`, for
log collectors such as Loki or Cloud Logging), every record carrying the id of the request it was written for.

The request id is the one the client sent in `x-request-id` (when well formed) or a fresh one, as the response's
`x-request-id` header says (app.py sets `REQUEST_ID` per request; the access line and any error of that request
carry it). JSON lines: {"time", "level", "logger", "message", "request_id"} plus "exc_info" for a traceback.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

FORMATS = ("text", "json")
REQUEST_ID: ContextVar[str | None] = ContextVar("dsv3_request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id`: the id of the request being answered in this context (None outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure_logging(level: str, fmt: str) -> dict:
    """Set up the root logger for `fmt` and return the uvicorn.Config arguments that go with it: with JSON,
    uvicorn's own handlers are left out (log_config=None) so its access and error lines reach the root's."""
    if fmt not in FORMATS:
        raise SystemExit(f"--log-format {fmt}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        from pythonjsonlogger.core import RESERVED_ATTRS
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(  # uvicorn's color_message (the message with terminal colours) left out
            "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s", reserved_attrs=[*RESERVED_ATTRS,
            "color_message"], rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    return {"log_config": None} if fmt == "json" else {}
