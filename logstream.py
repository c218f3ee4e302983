"""The log stream that never stalls the service: lines wait in a bounded buffer for a writer thread.

Lines are formatted on the caller's thread (the event loop's, mostly) and written by a thread of
their own, so a stream that stops draining (a stuck log shipper on a pipe) never blocks a
request. The access line, the one line of nearly every request, is handed over unformatted and
made by the writer, a batch at a time (`enqueue_deferred`). While the stream keeps up nothing is
dropped; when the buffer is full, new lines are dropped and counted (`log_lines_dropped_total`),
and reported in one line once the stream drains; a stopping process writes every pending line
(`finish_logs`).
"""

from __future__ import annotations

import logging
import os
import select
import stat
import sys
import threading
import time
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Any, TextIO

# Characters of lines that may wait for the stream (a deferred line counts as its caller's estimate);
# past this, new lines are dropped and counted. About 3,500 JSON access lines: a few seconds of a
# stuck log shipper at full load.
LOG_BUFFER_CHARS = 1 << 20
# Seconds a flush (shutdown included) waits for a stream that takes nothing; one that keeps taking
# lines, however slowly (a log shipper catching up), is waited for until it has them all, but at
# most DRAIN_LIMIT seconds in all: exit stays bounded.
FLUSH_TIMEOUT = 5.0
DRAIN_LIMIT = 2 * FLUSH_TIMEOUT
# Seconds the writer lets lines gather after waking, so a burst costs one write and one wake-up.
_LINGER = 0.005
# A line the writer makes itself: `render(*args)`, and the characters it counts for in the buffer.
Deferred = tuple[Callable[..., str], tuple[Any, ...], int]


class BufferedHandler(logging.Handler):
    """Formats on the caller's thread (a deferred line aside); a writer thread of its own does the
    writes, which may block.

    `emit` never waits for the stream: it appends the line to a buffer of at most `capacity`
    characters, or, when the buffer is full because the stream stopped draining, drops the
    line and counts it in `dropped`. The writer writes everything buffered in one call; once a
    write goes through after drops, it adds one line saying how many were dropped. `flush`
    (called by `logging.shutdown` at exit) waits until every buffered line is written.
    """

    def __init__(self, stream: TextIO | None, capacity: int = LOG_BUFFER_CHARS) -> None:
        super().__init__()
        self.capacity = capacity
        self.dropped = 0  # lines dropped since the process started (log_lines_dropped_total)
        self.stream = stream  # held: a file object that is collected closes its descriptor; None: stderr closed
        self._write = _writer(stream, self._progressed)
        self._ready = threading.Condition(self.lock)  # Handler.lock: an RLock, so emit may notify inside handle
        self._pending: list[str | Deferred] = []
        self._pending_chars = 0
        self._unreported = 0  # dropped lines no line has reported yet
        self._idle = False  # the writer waits for a notify
        self._closed = False
        self._appended = self._finished = 0  # lines put in the buffer; lines written (or lost) since
        self._progress = 0  # bytes (or writes) the stream has taken: a wait goes on while this grows
        # The progress at which a drain gave up on the stream, and when the exit's one budget of
        # DRAIN_LIMIT ends: None once the stream has caught up.
        self._gave_up_at: int | None = None
        self._budget_ends = 0.0
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
        self._append(line, len(line))  # `handle` holds self.lock here: the writer's bookkeeping shares it

    def handleError(self, record: logging.LogRecord) -> None:
        """A record that cannot be formatted (`log.warning("%d", "abc")`) becomes one line, in the
        stream's format, saying whose it was and why; `logging`'s own would print a traceback as
        plain text on stderr, between the JSON lines."""
        line = self._failure_line(record.name, sys.exc_info()[1], record.msg, record)
        self._append(line, len(line))

    def _failure_line(
        self, source: str, error: BaseException | None, what: object, record: logging.LogRecord | None = None
    ) -> str:
        """The line standing for one of `source`'s that could not be formatted (`what`: its message or arguments)."""
        report = logging.LogRecord(
            "service.logs", logging.ERROR, __file__, 0, "A log line of %s could not be formatted (%s): %.200r",
            (source, f"{type(error).__name__}: {error}", what), None,
        )  # fmt: skip
        report.request_id = getattr(record, "request_id", None)
        report.trace_id = getattr(record, "trace_id", None)
        try:
            return self.format(report) + "\n"
        except Exception:  # the report's own format failed too: its words, as text
            return report.getMessage() + "\n"

    def enqueue(self, line: str) -> None:
        """A finished line (newline included) into the buffer, as `emit` puts a formatted record."""
        with self._ready:
            self._append(line, len(line))

    def enqueue_deferred(self, render: Callable[..., str], args: tuple[Any, ...], size: int) -> None:
        """A line the writer thread makes, `render(*args)` (newline included), counted as `size`
        characters: the caller pays for a tuple, and the writer makes a batch of such lines at a
        time, its code still warm from the line before. `render` must be safe on any thread, and
        `args` must hold all it needs: the caller's context variables are not the writer's.
        A line that cannot be made is replaced by one saying so."""
        with self._ready:
            self._append((render, args, size), size)

    def _append(self, line: str | Deferred, size: int) -> None:
        if self._closed or self._pending_chars + size > self.capacity:
            self.dropped += 1
            self._unreported += 1
            return
        self._pending.append(line)
        self._pending_chars += size
        self._appended += 1
        if self.write_through:
            self._ready.notify_all()
            # A stream that stopped draining gets one wait, not one per line: exit stays bounded.
            self.write_through = self._wait_written(FLUSH_TIMEOUT)
        elif self._idle:  # at most one notify per batch: the writer lingers, then takes all
            self._idle = False
            self._ready.notify()

    def flush(self) -> None:
        self.drain(FLUSH_TIMEOUT)

    def drain(self, timeout: float) -> bool:
        """Wait until every line buffered now is written; False if the stream took nothing for
        `timeout` seconds. A stream that keeps taking lines, however slowly, is waited for until it
        has them all, for at most `DRAIN_LIMIT` seconds.

        Once given up on, the stream shares one budget of `DRAIN_LIMIT` with the drains after it
        (at exit, `finish_logs`, then `logging.shutdown`'s flush and close: 10 s in all, not
        thrice), and one that has taken nothing since is not waited for at all. A stream that
        caught up starts afresh.
        """
        with self._ready:
            self._ready.notify_all()  # cut the writer's linger short
            if self._gave_up_at is None:
                return self._wait_written(timeout)
            return self._wait_written(0 if self._progress == self._gave_up_at else timeout, self._budget_ends)

    def _wait_written(self, patience: float, limit: float | None = None) -> bool:
        """With the lock held: wait until the lines buffered now are written (not those logged
        meanwhile, which could keep coming), while the stream takes something every `patience`
        seconds, until `limit` (a `time.monotonic()`; by default `DRAIN_LIMIT` from now)."""
        target = self._appended
        limit = time.monotonic() + DRAIN_LIMIT if limit is None else limit
        while True:
            progress = self._progress
            wait = min(patience, max(limit - time.monotonic(), 0))
            if self._ready.wait_for(lambda: self._finished >= target, wait):
                return True
            if self._progress == progress or time.monotonic() >= limit:
                if self._gave_up_at is None:
                    self._budget_ends = limit
                self._gave_up_at = self._progress
                return False

    def _progressed(self, amount: int) -> None:
        """Told by the writer of every write the stream took: only its thread changes the count."""
        self._progress += amount

    def take_over(self, old: BufferedHandler) -> None:
        """`old`'s buffered lines and counts, and `old` closed, without waiting for its stream: a
        handler replaced on a stream that does not drain (logging configured again, at start-up)
        holds nothing up. A batch `old`'s writer already holds is still its own to write."""
        with old._ready:
            lines, old._pending, old._pending_chars = old._pending, [], 0
            old._finished += len(lines)  # `self` writes them now
            unreported, old._unreported = old._unreported, 0
            old._closed = True
            old._ready.notify_all()
        with self._ready:
            self.dropped += old.dropped  # the count is the process's, not the handler's
            self._unreported += unreported
            for line in lines:
                self._append(line, len(line) if isinstance(line, str) else line[2])

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
                taken = len(batch)
                unreported, self._unreported = self._unreported, 0
                if unreported:  # the stream took the write before this one: it drains again
                    batch.append(self._report(unreported))
                closed = self._closed
            try:
                lost = self._write([self._made(line) for line in batch]) if batch else 0
            except Exception:  # the writer must outlive any stream: a dead one would lose every later line
                lost = len(batch)
            with self._ready:
                self._finished += taken
                if self._finished >= self._appended:  # caught up: waited for afresh
                    self._gave_up_at = None
                if lost:  # a closed, broken or full stream: the lines not written whole are lost too
                    report_lost = bool(unreported)  # the report is the batch's last line: lost first
                    self.dropped += lost - report_lost
                    self._unreported += lost - report_lost + (unreported if report_lost else 0)
                self._ready.notify_all()
                if closed and not self._pending:
                    return

    def _made(self, line: str | Deferred) -> str:
        """`line`, made now if it was deferred; one that cannot be made becomes a line saying why."""
        if isinstance(line, str):
            return line
        render, args, _ = line
        try:
            return render(*args)
        except Exception as error:  # the writer must not die of one line: every later line would be lost
            return self._failure_line(render.__qualname__, error, args)

    def _report(self, count: int) -> str:
        record = logging.LogRecord(
            "service.logs", logging.WARNING, __file__, 0,
            "%d log lines were dropped: the log stream was not draining", (count,), None,
        )  # fmt: skip
        record.request_id = record.trace_id = None  # what the service's filter gives every record
        record.log_lines_dropped = count
        try:
            return self.format(record) + "\n"
        except Exception:  # the writer thread must not die of a format: every later line would be lost
            return f"{record.getMessage()}\n"


def _restart_after_fork(handler: BufferedHandler | None) -> None:
    if handler is not None and not handler._closed:
        # A condition of its own: the old one still lists the parent's writer as waiting, and
        # a notify would go to that thread, which the child does not have.
        handler._ready = threading.Condition(handler.lock)
        handler._pending, handler._pending_chars, handler._idle = [], 0, False
        handler._finished = handler._appended  # the parent's lines are the parent's to write
        handler._start_writer()


def _writer(stream: TextIO | None, progressed: Callable[[int], None]) -> Callable[[list[str]], int]:
    """A function that writes lines to `stream` whatever it takes, and returns how many it could
    not write whole (0: all went out). It tells `progressed` of each write the stream takes.

    A real descriptor is written with `os.write`: a thread blocked in it holds no lock of the
    interpreter's, so the process can still exit while the stream is stuck (a thread blocked
    inside `sys.stderr.write` would make the interpreter abort at exit). A stream with no
    descriptor (pytest's capture) is written through its own methods; no stream at all (stderr
    closed when the process started) takes nothing, and every line is counted as dropped.
    """
    if stream is None:
        return len
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the latter

        def write_text(lines: list[str]) -> int:
            try:
                stream.write("".join(lines))
                stream.flush()
            except (OSError, ValueError):
                return len(lines)
            progressed(len(lines))
            return 0

        return write_text
    stream.flush()
    mode = os.fstat(fd).st_mode
    # Shared by every worker: a pipe, or a stream socket (systemd's journal gives one). Written in
    # pieces of PIPE_BUF, as a terminal is too, so that a slow reader's progress shows piece by
    # piece; a file takes a batch in one write.
    shared = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
    most = select.PIPE_BUF if shared or stat.S_ISCHR(mode) else 0  # 0: the batch whole
    cut = False  # a failed write ended inside a line: the next write starts on a line of its own

    def write_fd(lines: list[str]) -> int:
        nonlocal cut
        prefix = b"\n" if cut else b""
        data = prefix + "".join(lines).encode("utf-8", "backslashreplace")
        sent = 0
        try:
            for piece in _whole_lines(data, most) if 0 < most < len(data) else (memoryview(data),):
                while piece:
                    try:
                        written = os.write(fd, piece)
                    except BlockingIOError:  # a descriptor someone made non-blocking: wait until it takes more
                        select.select([], [fd], [], 1.0)
                        continue
                    piece, sent = piece[written:], sent + written
                    progressed(written)
        except OSError:  # a full disk may have taken part of a line: it is lost, and ends on the next write
            ends = list(accumulate(len(line.encode("utf-8", "backslashreplace")) for line in lines))
            whole = bisect_right(ends, sent - len(prefix))
            cut = (sent > 0 and data[sent - 1] != ord("\n")) or (cut and sent == 0)
            return len(lines) - whole
        cut = False
        return 0

    return write_fd


def _whole_lines(data: bytes, most: int) -> Iterator[memoryview]:
    """`data` in pieces of whole lines, each at most `most` bytes where its lines allow
    (`PIPE_BUF` on a shared descriptor).

    A pipe takes a write of up to `PIPE_BUF` bytes whole, never mixed with another process's
    (POSIX); a longer one may be split where the pipe is full, and the workers of `python -m
    app` share their stderr: one's lines would land inside another's. A Unix stream socket
    (systemd's `StandardOutput=journal`) promises nothing of the kind, but Linux takes such
    small writes whole (measured: spliced lines with 1 MiB writes, none in these pieces). A line
    longer than that (a long traceback) is a piece of its own, and is still not safe from it.
    """
    view, start, size = memoryview(data), 0, len(data)
    while start < size:
        end = start + most
        if end < size:
            cut = data.rfind(b"\n", start, end)
            end = cut + 1 if cut >= start else (data.find(b"\n", end) + 1 or size)  # a longer line: alone
        yield view[start:end]
        start = end


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
