"""Logging: text or JSON lines, the request ID on each, and the access line that middleware writes per request."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from contextvars import ContextVar
from typing import Any

import msgspec
from starlette.types import Scope

from settings import Settings

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
_HANDLER_NAME = "service"
_ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "client")
access_logger = logging.getLogger("service.access")


class _RequestIdFilter(logging.Filter):
    """Stamps each record with the ID of the request being handled when it was logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class _Redactor:
    """Replaces secrets in a finished line: a backstop for messages we do not control."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        # Very short values would redact ordinary words; such a secret is refused in production.
        self.secrets = tuple(s for s in secrets if len(s) >= 6)

    def __call__(self, line: str) -> str:
        for secret in self.secrets:
            if secret in line:
                line = line.replace(secret, "***")
        return line


class TextFormatter(logging.Formatter):
    """`LOG_FORMAT` lines, with the request ID appended when the format does not place it."""

    def __init__(self, fmt: str, redact: _Redactor) -> None:
        super().__init__(fmt)
        self.redact = redact
        self.places_request_id = "%(request_id)" in fmt

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Here rather than in format(): the ID belongs on the message line, before any traceback.
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        if request_id and not self.places_request_id:
            line = f"{line} [request_id={request_id}]"
        return line

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access lines carry their fields as keys."""

    def __init__(self, redact: _Redactor) -> None:
        super().__init__()
        self.redact = redact
        # Built once: msgspec reuses the encoder's buffer between lines.
        self.encoder = msgspec.json.Encoder()
        # The date and time to the second, formatted once per second of `record.created`.
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        if seconds != self._second:  # under load, most lines share their second with the previous one
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            self._second = seconds
        entry: dict[str, Any] = {
            "timestamp": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        for field in _ACCESS_FIELDS:
            if (value := record.__dict__.get(field)) is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.redact("".join(traceback.format_exception(*record.exc_info)))
        return self.encoder.encode(entry).decode()


def configure_logging(settings: Settings) -> None:
    """Route every log line, uvicorn's included, through one handler in the chosen format.

    Idempotent: it replaces only the handler it installed before.
    """
    redact = _Redactor(settings.secrets)
    handler = logging.StreamHandler(sys.stderr)
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


def _printable(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def log_access(scope: Scope, status: int, seconds: float, request_id: str) -> None:
    """The request's one access line: method, path, status, duration, client and request ID."""
    if not access_logger.isEnabledFor(logging.INFO):
        return
    duration_ms = round(seconds * 1000, 2)
    client = scope.get("client")
    client_text = f"{client[0]}:{client[1]}" if client else "-"
    method, path = scope["method"], _printable(scope["path"])
    fields = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": duration_ms,
        "client": client_text,
        "request_id": request_id,
    }
    # What `access_logger.info` does, minus its walk up the stack for the caller: always this function.
    here = sys._getframe().f_code
    record = access_logger.makeRecord(
        access_logger.name,
        logging.INFO,
        here.co_filename,
        here.co_firstlineno,
        "%s %s %d %.2fms client=%s",
        (method, path, status, duration_ms, client_text),
        None,
        here.co_name,
        fields,
    )
    access_logger.handle(record)
