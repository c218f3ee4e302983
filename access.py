"""The access line: one per request, method, path, status, duration, client and request ID.

Written by the request layer for every request the app answers (`log_access`) and by `python -m
app`'s edge for the ones it refuses itself (`log_refusal`). Paths and client addresses are
escaped and cut, so a line can neither forge another nor outgrow `PIPE_BUF`. In production no
`LogRecord` is made: the request's fields go to the log buffer as they are, and the log writer
thread makes the line (`write_access_line`, `access_line`), the shortcut whose gain
bench/README.md measures.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import unquote

from starlette.types import Scope

from logs import REQUEST, JsonFormatter, access_logger
from logstream import BufferedHandler

# Bytes (UTF-8) of a path in a log line, and of a client address: an access line, which holds
# each twice (its message and its fields, where JSON may double a backslash), stays under
# PIPE_BUF (4 KiB), which `python -m app`'s workers need to keep their lines whole on a shared
# pipe, whatever the client sends (a 431's URL can be 70 KB; `X-Forwarded-For` names the client).
PATH_BYTES = 512
CLIENT_BYTES = 128
CUT = "…"  # ends a path or address cut short
# Characters an access line counts for in the log buffer besides its path (twice): the rest of a
# typical line, near enough (the buffer's bound is one of memory, not an exact count of lines).
_LINE_CHARS = 280
_service_logger = logging.getLogger("service")


def write_access_line(
    method: str, path: str, status: int, seconds: float, client: tuple[str, int] | None, request_id: str
) -> None:
    """The access line of one request, as `access_logger.info` would write it, at less cost.

    `path` and `client` as the server has them (`log_access`): the line escapes and cuts them.
    When the service's handler writes JSON lines (production) and nothing else could see the
    record (no other handler, no filter on the access logger: pytest's log capture, for one,
    adds a handler), no `LogRecord` is made: the fields go to the handler's buffer as they are,
    and its writer thread makes the line (`access_line`). Otherwise the record goes through
    `logging` like any other, made here.
    """
    if not access_logger.isEnabledFor(logging.INFO):
        return
    handlers = logging.root.handlers
    handler = handlers[0] if len(handlers) == 1 else None
    formatter = handler.formatter if handler is not None else None
    if (
        isinstance(handler, BufferedHandler)
        and isinstance(formatter, JsonFormatter)
        and handler.level <= logging.INFO
        and not (access_logger.handlers or access_logger.filters or _service_logger.handlers)
    ):
        # A long path or client address is cut now, as the line will cut it (cutting again changes
        # nothing), so that a line waiting in the buffer holds no more of either than it writes.
        if len(path) > PATH_BYTES:
            path = loggable_path(path)
        if client is not None and len(client[0]) > CLIENT_BYTES:
            client = (_cut(printable(client[0]), CLIENT_BYTES), client[1])
        # What the line needs from this moment and this thread: the time, and the request's trace ID.
        now = (formatter, time.time(), method, path, status, seconds, client, request_id, REQUEST.get()[1])
        handler.enqueue_deferred(access_line, now, _LINE_CHARS + 2 * len(path))
        return
    path, client_address, duration_ms = loggable_path(path), client_text(client), round(seconds * 1000, 2)
    fields = {"method": method, "path": path, "status": status, "duration_ms": duration_ms, "client": client_address}
    record = access_logger.makeRecord(
        access_logger.name, logging.INFO, __file__, 0, "%s %s %d %.2fms client=%s",
        (method, path, status, duration_ms, client_address), None, "write_access_line",
        {**fields, "request_id": request_id},
    )  # fmt: skip
    access_logger.handle(record)


def access_line(
    formatter: JsonFormatter,
    created: float,
    method: str,
    path: str,
    status: int,
    seconds: float,
    client: tuple[str, int] | None,
    request_id: str,
    trace_id: str | None,
) -> str:
    """The JSON access line, newline included, as `formatter` writes the record `write_access_line`
    would make: made by the log writer thread, so it reads nothing of the request's context."""
    # The message holds nothing but these fields: masking the two a secret could be in masks all,
    # and the request ID is the caller's when valid.
    path, client_address = formatter.redact(loggable_path(path)), formatter.redact(client_text(client))
    duration_ms = round(seconds * 1000, 2)
    entry = {"timestamp": formatter.timestamp(created), "level": "INFO", "logger": access_logger.name,
             "message": f"{method} {path} {status} {duration_ms:.2f}ms client={client_address}",
             "request_id": formatter.redact(request_id), "method": method, "path": path, "status": status,
             "duration_ms": duration_ms, "client": client_address}  # fmt: skip
    if trace_id:
        entry["trace_id"] = formatter.redact(trace_id)  # the caller's: 32 hex digits may be a password
    return formatter.encode(entry) + "\n"


def log_refusal(
    method: bytes, target: bytes, status: int, seconds: float, client: tuple[str, int] | None, request_id: str
) -> None:
    """The access line of a request the server refused itself (400, 431): the app never saw it.

    `target` is the request target as far as the parser read it, and `method` its method; both
    are "-" when the parser never reached a target (it knows no method either then). The path is
    written as in every access line (no query, percent-decoded, `loggable_path`).
    """
    if target:
        path = unquote(target[: PATH_BYTES * 3].partition(b"?")[0].decode("latin-1"))
        method_text = method.decode("ascii")
    else:
        method_text = path = "-"
    write_access_line(method_text, path, status, seconds, client, request_id)


def printable(text: str) -> str:
    """A path safe for a log line: control characters (CR, LF, ESC) escaped, so no line can forge
    another, and spaces as `%20`, so it cannot forge the fields after it (`/x 200 client=6.6.6.6`)."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text.replace(" ", "%20") if " " in text else text


def loggable_path(path: str) -> str:
    """`path` as log lines write it: `printable`, and cut to `PATH_BYTES` (ending `CUT`)."""
    return _cut(printable(path), PATH_BYTES)


def _cut(text: str, limit: int) -> str:
    """`text` as it is if its UTF-8 takes at most `limit` bytes, else that much of it and `CUT`."""
    if len(text) <= limit and text.isascii():
        return text
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore") + CUT


def log_access(scope: Scope, status: int, seconds: float, request_id: str) -> None:
    """The request's one access line: method, path, status, duration, client and request ID."""
    write_access_line(scope["method"], scope["path"], status, seconds, scope.get("client"), request_id)


def client_text(client: tuple[str, int] | None) -> str:
    """An access line's client address, `host:port`, or `-` when the server knows none.

    The host is whatever the server took it from, `X-Forwarded-For` included (uvicorn trusts it
    from 127.0.0.1): written `printable` and cut to `CLIENT_BYTES`, as a path is.
    """
    return f"{_cut(printable(str(client[0])), CLIENT_BYTES)}:{client[1]}" if client else "-"
