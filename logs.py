"""Logging: text or JSON lines with the request ID on each (the access line itself: access.py).

Every line goes through one handler, `logstream.BufferedHandler`: formatted on the caller's
thread (the access line aside, made by the writer), written by a thread of its own, so a log
stream that stops draining never stalls the event loop.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import threading
import traceback
from contextvars import ContextVar
from typing import Any

import msgspec

from logstream import BufferedHandler
from responses import utc_second
from settings import Redactor, Settings

# The request being handled: its ID, and the W3C trace ID of the caller's `traceparent` when it
# sent a valid one (logs join its traces). One variable: set and reset once per request.
REQUEST: ContextVar[tuple[str | None, str | None]] = ContextVar("request", default=(None, None))
_HANDLER_NAME = "service"
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
        self.placed_ids = [name for name in ("request_id", "trace_id") if f"%({name})" in fmt]

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Here rather than in format(): the IDs belong on the message line, before any traceback.
        request_id = getattr(record, "request_id", None)
        trace_id = getattr(record, "trace_id", None)
        if any(getattr(record, name, None) is None for name in self.placed_ids):
            placed = copy.copy(record)  # an ID the format places but the line has none of: `-`, not `None`
            for name in self.placed_ids:
                if getattr(placed, name, None) is None:
                    setattr(placed, name, "-")
            line = super().formatMessage(placed)
        else:
            line = super().formatMessage(record)
        line = line.rstrip("\n")  # a warning's message ends in one: the IDs go on its line
        if request_id and "request_id" not in self.placed_ids:
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

    def encode(self, entry: dict[str, Any]) -> str:
        """`entry` as one line of JSON. Text JSON cannot carry (a lone surrogate, from a file name
        decoded with `os.fsdecode`) is written as its escape (`\\udcff`) rather than losing the line."""
        try:
            return self.encoder.encode(entry).decode()
        except UnicodeEncodeError:
            clean = {k: v.encode("utf-8", "backslashreplace").decode() if isinstance(v, str) else v
                     for k, v in entry.items()}  # fmt: skip
            return self.encoder.encode(clean).decode()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": self.timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:  # the caller's own, when valid: it may be a secret, sent to see it logged
            entry["request_id"] = self.redact(request_id)
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            entry["trace_id"] = self.redact(trace_id)
        for field in _ACCESS_FIELDS:
            if (value := record.__dict__.get(field)) is not None:
                entry[field] = self.redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = self.redact("".join(traceback.format_exception(*record.exc_info)))
        return self.encode(entry)


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
    for old in [h for h in root.handlers if isinstance(h, BufferedHandler) and h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        handler.take_over(old)  # its lines, without waiting for a stream that may not drain
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    logging.getLogger("uvicorn.error").addFilter(_LOGGED_ONCE)  # once: addFilter keeps one of each
    # Our access line carries the request ID and duration; uvicorn's would be a second line.
    # Without handlers anywhere up its chain, uvicorn does not even build that line's arguments.
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers.clear()
    uvicorn_access.propagate = False
    uvicorn_access.disabled = True
    # What Python itself would print on stderr goes through the same handler, in the same format:
    # warnings (`py.warnings`), an exception that ends a thread, one raised where nothing can catch
    # it (a `__del__`, a coroutine's finaliser). A hook someone else installed (an error tracker,
    # pytest) is left in place.
    logging.captureWarnings(True)
    if threading.excepthook is threading.__excepthook__:
        threading.excepthook = _log_thread_exception
    if sys.unraisablehook is sys.__unraisablehook__:
        sys.unraisablehook = _log_unraisable


def mark_logged(exc: BaseException) -> None:
    """`exc` has had its line, with the request's ID, method and path: the server's own report of
    it ("Exception in ASGI application", after a response that had started) is left out."""
    with contextlib.suppress(AttributeError):  # an exception with __slots__ takes no mark: logged twice
        setattr(exc, _LOGGED, True)


class _LoggedOnce(logging.Filter):
    """Drops a record of an exception `mark_logged` marked: the same traceback again, without the ID."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and getattr(record.exc_info[1], _LOGGED, False))


_LOGGED = "_service_logged"
_LOGGED_ONCE = _LoggedOnce()


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:  # how a thread may end quietly, as Python's own hook has it
        return
    name = args.thread.name if args.thread is not None else "unknown"
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback) if args.exc_value is not None else None
    _service_logger.error("Exception in thread %s", name, exc_info=exc_info)


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    message = unraisable.err_msg or "Exception ignored in"
    error = unraisable.exc_value
    exc_info = (type(error), error, unraisable.exc_traceback) if error is not None else None
    _service_logger.error("%s: %r", message, unraisable.object, exc_info=exc_info)
