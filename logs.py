"""Logging: text or JSON lines, the request ID on each, and the access line written per request.

Every line goes through one handler, `logstream.BufferedHandler`: formatted on the caller's
thread, written by a thread of its own, so a log stream that stops draining never stalls the
event loop.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from contextvars import ContextVar
from typing import Any
from urllib.parse import unquote

import msgspec
from starlette.types import Scope

from logstream import BufferedHandler
from responses import utc_second
from settings import Redactor, Settings

# The request being handled: its ID, and the W3C trace ID of the caller's `traceparent` when it
# sent a valid one (logs join its traces). One variable: set and reset once per request.
REQUEST: ContextVar[tuple[str | None, str | None]] = ContextVar("request", default=(None, None))
_HANDLER_NAME = "service"
REFUSED_PATH_CHARACTERS = 1024  # of a refused request's path in its access line: a 431's URL can be 70 KB
_ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "client", "log_lines_dropped")
access_logger = logging.getLogger("service.access")
_service_logger = logging.getLogger("service")


class _RequestIdFilter(logging.Filter):
    """Stamps each record with the request ID (and trace ID) of the request being handled when it was logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id, trace_id = REQUEST.get()
        if not hasattr(record, "request_id"):
            record.request_id = request_id
        if not hasattr(record, "trace_id"):
            record.trace_id = trace_id
        return True


class TextFormatter(logging.Formatter):
    """`LOG_FORMAT` lines, with the request ID appended when the format does not place it."""

    def __init__(self, fmt: str, redact: Redactor) -> None:
        super().__init__(fmt)
        self.redact = redact
        self.places_request_id = "%(request_id)" in fmt

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Here rather than in format(): the IDs belong on the message line, before any traceback.
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        if request_id and not self.places_request_id:
            trace_id = getattr(record, "trace_id", None)
            trace = f" trace_id={trace_id}" if trace_id else ""
            line = f"{line} [request_id={request_id}{trace}]"
        return line

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access lines carry their fields as keys."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact
        # Built once: msgspec reuses the encoder's buffer between lines.
        self.encoder = msgspec.json.Encoder()

    def timestamp(self, created: float) -> str:
        """RFC 3339 UTC to the millisecond, as `logging` counts them (`LogRecord.msecs`)."""
        seconds = int(created)
        return f"{utc_second(seconds)}.{int((created - seconds) * 1000):03d}Z"

    def access_line(self, created: float, message: str, request_id: str, fields: dict[str, Any]) -> str:
        """The line `format` gives an access record with these fields, without the record."""
        entry = {"timestamp": self.timestamp(created), "level": "INFO", "logger": access_logger.name,
                 "message": self.redact(message), "request_id": request_id, **fields}  # fmt: skip
        if trace_id := REQUEST.get()[1]:
            entry["trace_id"] = trace_id
        return self.encoder.encode(entry).decode()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": self.timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            entry["trace_id"] = trace_id
        for field in _ACCESS_FIELDS:
            if (value := record.__dict__.get(field)) is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.redact("".join(traceback.format_exception(*record.exc_info)))
        return self.encoder.encode(entry).decode()


def write_access_line(method: str, path: str, status: int, duration_ms: float, client: str, request_id: str) -> None:
    """The access line of one request, as `access_logger.info` would write it, at less cost.

    When the service's handler writes JSON lines (production) and nothing else could see the
    record (no other handler, no filter on the access logger: pytest's log capture, for one,
    adds a handler), the line is encoded straight into the handler's buffer: no `LogRecord`,
    no handler lookup, no filter. Otherwise the record goes through `logging` like any other.
    `path` must already be printable (the middleware escapes it).
    """
    if not access_logger.isEnabledFor(logging.INFO):
        return
    handlers = logging.root.handlers
    handler = handlers[0] if len(handlers) == 1 else None
    fields = {"method": method, "path": path, "status": status, "duration_ms": duration_ms, "client": client}
    if (
        isinstance(handler, BufferedHandler)
        and isinstance(handler.formatter, JsonFormatter)
        and handler.level <= logging.INFO
        and not (access_logger.handlers or access_logger.filters or _service_logger.handlers)
    ):
        message = f"{method} {path} {status} {duration_ms:.2f}ms client={client}"
        handler.enqueue(handler.formatter.access_line(time.time(), message, request_id, fields) + "\n")
        return
    record = access_logger.makeRecord(
        access_logger.name, logging.INFO, __file__, 0, "%s %s %d %.2fms client=%s",
        (method, path, status, duration_ms, client), None, "write_access_line", {**fields, "request_id": request_id},
    )  # fmt: skip
    access_logger.handle(record)


def configure_logging(settings: Settings) -> None:
    """Route every log line, uvicorn's included, through one handler in the chosen format.

    Idempotent: it replaces only the handler it installed before, after writing out its lines.
    """
    redact = Redactor(settings.secrets)
    handler = BufferedHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(_RequestIdFilter())
    formatter = JsonFormatter(redact) if settings.log_json else TextFormatter(settings.log_format, redact)
    handler.setFormatter(formatter)
    # Every LogRecord looks up its thread, process and process name unless told not to; the
    # logging HOWTO's advice for speed is to skip what no formatter prints (JSON prints none).
    printed = "" if settings.log_json else settings.log_format
    logging.logThreads = "%(thread" in printed
    logging.logProcesses = "%(process)" in printed
    logging.logMultiprocessing = "%(processName)" in printed
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
        handler.dropped += getattr(old, "dropped", 0)  # the count is the process's, not the handler's
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # Our access line carries the request ID and duration; uvicorn's would be a second line.
    # Without handlers anywhere up its chain, uvicorn does not even build that line's arguments.
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers.clear()
    uvicorn_access.propagate = False
    uvicorn_access.disabled = True


def log_refusal(
    method: bytes, target: bytes, status: int, seconds: float, client: tuple[str, int] | None, request_id: str
) -> None:
    """The access line of a request the server refused itself (400, 431): the app never saw it.

    `target` is the request target as far as the parser read it, and `method` its method; both
    are "-" when the parser never reached a target (it knows no method either then). The path is
    written as in every access line (no query, percent-decoded, escaped when not printable) and
    cut to `REFUSED_PATH_CHARACTERS`.
    """
    if target:
        path = unquote(target[:REFUSED_PATH_CHARACTERS].partition(b"?")[0].decode("latin-1"))
        method_text, path = method.decode("ascii"), printable(path)[:REFUSED_PATH_CHARACTERS]
    else:
        method_text = path = "-"
    write_access_line(method_text, path, status, round(seconds * 1000, 2), client_text(client), request_id)


def printable(text: str) -> str:
    """A path safe for a log line: control characters (CR, LF, ESC) escaped, so no line can forge
    another, and spaces as `%20`, so it cannot forge the fields after it (`/x 200 client=6.6.6.6`)."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text.replace(" ", "%20") if " " in text else text


def log_access(scope: Scope, status: int, seconds: float, request_id: str) -> None:
    """The request's one access line: method, path, status, duration, client and request ID."""
    client = client_text(scope.get("client"))
    write_access_line(scope["method"], printable(scope["path"]), status, round(seconds * 1000, 2), client, request_id)


def client_text(client: tuple[str, int] | None) -> str:
    """An access line's client address, `host:port`, or `-` when the server knows none."""
    return f"{client[0]}:{client[1]}" if client else "-"
