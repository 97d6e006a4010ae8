"""Structured logs: one JSON object per line (`--log-format json`) or text, each line of a request carrying its
trace id, span id and request id; and the access log (`--access-log`, off by default).

The ids come from the context the line is logged in (`RpcScope`, `RequestTrace`), read by a filter on the
handler, so any logger in any module gets them without passing anything around.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import IO, Any

from tensorgate.server.telemetry.context import _request, _scope

__all__ = ["ACCESS_LOGGER", "FORMATS", "ContextFilter", "JsonFormatter", "TextFormatter", "build_handler", "configure"]

#: The access log's logger: one INFO line per call, when `access_log` is on.
ACCESS_LOGGER = "tensorgate.access"
FORMATS = ("text", "json")

#: Attributes every LogRecord has; anything else on a record came from `extra=` and goes into the JSON line.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "trace_id", "span_id", "request_id"}


def _ids(span: Any) -> tuple[str, str]:
    context = span.get_span_context()
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class ContextFilter(logging.Filter):
    """Adds `trace_id`, `span_id` and `request_id` to each record ("" when the line is not part of a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is not None:  # set explicitly, e.g. by the access log
            return True
        trace_id = span_id = request_id = ""
        request = _request.get()
        scope = _scope.get()
        if request is not None:
            request_id = request.request_id
            trace_id, span_id = _ids(request.span)
        elif scope is not None:
            request_id = scope.request_id
            if scope.span is not None:
                trace_id, span_id = _ids(scope.span)
        record.trace_id, record.span_id, record.request_id = trace_id, span_id, request_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request's ids, `extra=` fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("trace_id", "span_id", "request_id"):
            value = getattr(record, key, "")
            if value:
                line[key] = value
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, then ` [request_id=... trace_id=... span_id=...]` inside a request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [f"{key}={value}" for key in ("request_id", "trace_id", "span_id") if (value := getattr(record, key, ""))]
        if not ids:
            return text
        head, newline, rest = text.partition("\n")  # keep a traceback below the line
        return f"{head} [{' '.join(ids)}]{newline}{rest}"


def build_handler(log_format: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with the request ids and the chosen format."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return handler


def configure(level: str = "INFO", log_format: str = "text", stream: IO[str] | None = None) -> None:
    """Route every log line of the process through one handler of `log_format` at `level` (the CLI's setup)."""
    handler = build_handler(log_format, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
