"""Logging: text or JSON lines, the request ID on each, and the access line middleware writes per request.

Lines are formatted on the caller's thread and written by a thread of their own
(`BufferedHandler`), so a log stream that stops draining never stalls the event loop.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TextIO

import msgspec
from starlette.types import Scope

from responses import utc_second
from settings import Redactor, Settings

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
# The W3C trace ID of the caller's `traceparent`, when it sent a valid one: logs join its traces.
TRACE_ID: ContextVar[str | None] = ContextVar("trace_id", default=None)
_HANDLER_NAME = "service"
_ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "client", "log_lines_dropped")
# Characters of formatted lines that may wait for the stream; past this, new lines are dropped and
# counted. About 4,000 JSON access lines: a few seconds of a stuck log shipper at full load.
LOG_BUFFER_CHARS = 1 << 20
FLUSH_TIMEOUT = 5.0  # seconds a flush (shutdown included) waits for a stream that does not drain
# Seconds the writer lets lines gather after waking, so a burst costs one write and one wake-up.
_LINGER = 0.005
access_logger = logging.getLogger("service.access")
_service_logger = logging.getLogger("service")


class _RequestIdFilter(logging.Filter):
    """Stamps each record with the request ID (and trace ID) of the request being handled when it was logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        if not hasattr(record, "trace_id"):
            record.trace_id = TRACE_ID.get()
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
        if trace_id := TRACE_ID.get():
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


class BufferedHandler(logging.Handler):
    """Formats on the caller's thread; a writer thread of its own does the writes, which may block.

    `emit` never waits for the stream: it appends the line to a buffer of at most `capacity`
    characters, or, when the buffer is full because the stream stopped draining, drops the
    line and counts it in `dropped`. The writer writes everything buffered in one call; once a
    write goes through after drops, it adds one line saying how many were dropped. `flush`
    (called by `logging.shutdown` at exit) waits until every buffered line is written.
    """

    def __init__(self, stream: TextIO, capacity: int = LOG_BUFFER_CHARS) -> None:
        super().__init__()
        self.capacity = capacity
        self.dropped = 0  # lines dropped since the process started (log_lines_dropped_total)
        self.stream = stream  # held: a file object that is collected closes its descriptor
        self._write = _writer(stream)
        self._ready = threading.Condition(self.lock)  # Handler.lock: an RLock, so emit may notify inside handle
        self._pending: list[str] = []
        self._pending_chars = 0
        self._unreported = 0  # dropped lines no line has reported yet
        self._writing = False  # the writer holds a batch that is not written yet
        self._idle = False  # the writer waits for a notify
        self._closed = False
        self.write_through = False  # each line written before emit returns: set when the process stops
        self._start_writer()
        # A forked child has no writer thread: it starts its own, leaving the parent's lines to the parent.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _restart_after_fork(ref()))

    def _start_writer(self) -> None:
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # logging's own rule: a line that cannot be formatted never raises
            self.handleError(record)
            return
        self._append(line)  # `handle` holds self.lock here: the writer's bookkeeping shares it

    def enqueue(self, line: str) -> None:
        """A finished line (newline included) into the buffer, as `emit` puts a formatted record."""
        with self._ready:
            self._append(line)

    def _append(self, line: str) -> None:
        if self._closed or self._pending_chars + len(line) > self.capacity:
            self.dropped += 1
            self._unreported += 1
            return
        self._pending.append(line)
        self._pending_chars += len(line)
        if self.write_through:
            self._ready.notify_all()
            # A stream that stopped draining gets one wait, not one per line: exit stays bounded.
            self.write_through = self._ready.wait_for(lambda: not (self._pending or self._writing), FLUSH_TIMEOUT)
        elif self._idle:  # at most one notify per batch: the writer lingers, then takes all
            self._idle = False
            self._ready.notify()

    def flush(self) -> None:
        self.drain(FLUSH_TIMEOUT)

    def drain(self, timeout: float) -> bool:
        """Wait until every buffered line is written; False if the stream did not take them in time."""
        with self._ready:
            self._ready.notify_all()  # cut the writer's linger short
            return self._ready.wait_for(lambda: not (self._pending or self._writing), timeout)

    def close(self) -> None:
        self.flush()
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        super().close()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not (self._pending or self._closed):
                    self._idle = True
                    self._ready.wait()
                self._idle = False
                if not self._closed:
                    self._ready.wait(_LINGER)
                batch, self._pending, self._pending_chars = self._pending, [], 0
                lines = len(batch)
                unreported, self._unreported = self._unreported, 0
                if unreported:  # the stream took the write before this one: it drains again
                    batch.append(self._report(unreported))
                closed, self._writing = self._closed, True
            written = self._write("".join(batch)) if batch else True
            with self._ready:
                self._writing = False
                if not written:  # a closed or broken stream: these lines are lost too
                    self.dropped += lines
                    self._unreported += lines + unreported
                self._ready.notify_all()
                if closed and not self._pending:
                    return

    def _report(self, count: int) -> str:
        record = logging.LogRecord(
            "service.logs", logging.WARNING, __file__, 0,
            "%d log lines were dropped: the log stream was not draining", (count,), None,
        )  # fmt: skip
        record.request_id = None
        record.log_lines_dropped = count
        return self.format(record) + "\n"


def _restart_after_fork(handler: BufferedHandler | None) -> None:
    if handler is not None and not handler._closed:
        handler._pending, handler._pending_chars, handler._writing, handler._idle = [], 0, False, False
        handler._start_writer()


def _writer(stream: TextIO) -> Callable[[str], bool]:
    """A function that writes text to `stream` whatever it takes, True if it all went out.

    A real descriptor is written with `os.write`: a thread blocked in it holds no lock of the
    interpreter's, so the process can still exit while the stream is stuck (a thread blocked
    inside `sys.stderr.write` would make the interpreter abort at exit). A stream with no
    descriptor (pytest's capture) is written through its own methods.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the latter

        def write_text(text: str) -> bool:
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError):
                return False
            return True

        return write_text
    stream.flush()

    def write_fd(text: str) -> bool:
        data = memoryview(text.encode("utf-8", "backslashreplace"))
        try:
            while data:
                try:
                    data = data[os.write(fd, data) :]
                except BlockingIOError:  # a descriptor someone made non-blocking: wait until it takes more
                    select.select([], [fd], [], 1.0)
        except OSError:
            return False
        return True

    return write_fd


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


def dropped_log_lines() -> int:
    """Lines the installed handler dropped because the log stream was not draining."""
    return sum(h.dropped for h in logging.getLogger().handlers if isinstance(h, BufferedHandler))


def finish_logs(timeout: float = FLUSH_TIMEOUT) -> bool:
    """For a stopping process: write every buffered line now, and each later line before its call returns.

    `logging.shutdown` flushes at exit, but a process can end without it: uvicorn re-raises
    SIGTERM after its graceful shutdown, which skips `atexit`, and its last lines come after the
    lifespan's. Returns False if the stream did not take the buffered lines within `timeout`.
    """
    drained = True
    for handler in [h for h in logging.getLogger().handlers if isinstance(h, BufferedHandler)]:
        handler.write_through = handler.drain(timeout)  # a stuck stream is not waited for line by line
        drained = drained and handler.write_through
    return drained


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


def _printable(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def log_access(scope: Scope, status: int, seconds: float, request_id: str) -> None:
    """The request's one access line: method, path, status, duration, client and request ID."""
    client = scope.get("client")
    client_text = f"{client[0]}:{client[1]}" if client else "-"
    write_access_line(
        scope["method"], _printable(scope["path"]), status, round(seconds * 1000, 2), client_text, request_id
    )
