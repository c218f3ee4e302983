"""A log stream that stops draining never stalls the service, and a graceful stop loses no line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import pytest
from service import _SERVICE_VARIABLES, ROOT, free_port, stop
from test_metrics import value

import logstream
from logstream import DRAIN_LIMIT, FLUSH_TIMEOUT, BufferedHandler

pytestmark = pytest.mark.slow
PIPE_BUFFER = 65536  # Linux's default pipe capacity, in bytes
FLOOD = 12000  # 404 access lines of about 330 bytes: far more than the pipe and the handler's buffer hold
DROPPED_LINE = "log lines were dropped"


@contextmanager
def uvicorn(env: dict[str, str], stderr: int | IO[bytes]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`uvicorn app:app` with its stderr where the test says; SIGTERM afterwards, killed if it hangs."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARIABLES}
    command = [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port), "--loop", "uvloop"]
    process = subprocess.Popen(
        command, cwd=ROOT, env={**clean, "LOG_JSON": "true", **env}, stdout=subprocess.DEVNULL, stderr=stderr
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield process, url
    finally:
        stop(process)


def wait_ready(url: str) -> int:
    """Polls /health until it answers 200; returns how many responses that took (each is a line)."""
    answered = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            answered += 1
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return answered
        except httpx.ConnectError:  # not listening yet: no request reached the app, no line
            answered -= 1
            time.sleep(0.05)
    raise AssertionError("uvicorn did not answer /health within 30 s")


def flood(url: str, count: int, batch: int = 200) -> None:
    """`count` 404s pipelined on one keep-alive connection, read back in batches: many lines, fast."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sent = 0
        while sent < count:
            n = min(batch, count - sent)
            sock.sendall(b"".join(b"GET /flood/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (sent + i) for i in range(n)))
            received = b""
            while received.count(b"HTTP/1.1 404 ") < n:
                chunk = sock.recv(1 << 16)
                assert chunk, "the server closed the connection mid-flood"
                received += chunk
            sent += n


def access_lines(text: str) -> list[dict[str, object]]:
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [e for e in entries if e["logger"] == "service.access"]


def test_requests_and_probes_are_answered_while_nobody_reads_the_log_pipe(database_url: str) -> None:
    """Past a full pipe, lines are dropped and counted; once read again one line gives the count."""
    read_end, write_end = os.pipe()
    try:
        with uvicorn({"DATABASE_URL": database_url}, write_end) as (process, url):
            os.close(write_end)
            write_end = -1
            responses = wait_ready(url)
            flood(url, FLOOD)  # with a synchronous handler this stalled after about 220 lines
            responses += FLOOD
            for _ in range(3):
                assert httpx.get(f"{url}/health", timeout=2).status_code == 200
                assert httpx.get(f"{url}/health/db", timeout=5).status_code == 200  # degraded: migrations pending
                responses += 2

            output: list[bytes] = []
            reader = threading.Thread(target=lambda: output.extend(iter(lambda: os.read(read_end, 1 << 16), b"")))
            reader.start()
            deadline = time.monotonic() + 20
            while DROPPED_LINE.encode() not in b"".join(output):
                assert time.monotonic() < deadline, "no line reported the dropped lines once the pipe drained"
                time.sleep(0.05)
            text = httpx.get(f"{url}/metrics", timeout=5).text
            dropped = value(text, "log_lines_dropped_total")
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its shutdown
            reader.join(10)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    log = b"".join(output).decode()
    reports = [json.loads(line) for line in log.splitlines() if DROPPED_LINE in line]
    assert dropped is not None
    assert dropped * 330 > PIPE_BUFFER  # far more was dropped than fits in a pipe: the test bit
    assert sum(int(r["log_lines_dropped"]) for r in reports) == dropped
    # Every access line written or counted (+1: /metrics). The count is of every dropped line, so
    # it may also hold the one line a readiness change writes while the pipe is full.
    missing = responses + 1 - len(access_lines(log))
    assert missing <= dropped <= missing + 1


def test_every_access_line_is_written_before_a_graceful_stop(tmp_path: Path) -> None:
    """A flood then SIGTERM at once: one line per request in the file, and none dropped."""
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as log, uvicorn({}, log) as (process, url):
        responses = wait_ready(url)
        flood(url, 3000)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its shutdown
    text = log_path.read_text()
    flooded = [line for line in access_lines(text) if str(line["path"]).startswith("/flood/")]
    assert sorted(int(str(line["path"]).rsplit("/", 1)[1]) for line in flooded) == list(range(3000))
    assert len(access_lines(text)) == responses + 3000
    assert DROPPED_LINE not in text
    assert "Finished server process" in text.splitlines()[-1]  # uvicorn's own last line, after the lifespan's


def test_a_graceful_stop_with_a_stuck_log_stream_still_ends(database_url: str) -> None:
    """SIGTERM while nobody reads the pipe: the wait for the stream is bounded and the exit graceful."""
    read_end, write_end = os.pipe()
    try:
        with uvicorn({"DATABASE_URL": database_url}, write_end) as (process, url):
            os.close(write_end)
            write_end = -1
            wait_ready(url)
            flood(url, 6000)
            process.send_signal(signal.SIGTERM)
            assert process.wait(40) in (0, -signal.SIGTERM)  # the flush waits at most FLUSH_TIMEOUT, once
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


WRITER = """
import logging, sys
from logstream import BufferedHandler, finish_logs
handler = BufferedHandler(sys.stderr)
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.INFO)
for i in range(1500):
    logging.info("%s %d %s", sys.argv[1], i, "x" * (100 + i % 7 * 150))
finish_logs()
"""


def test_lines_of_several_processes_on_one_slowly_read_pipe_stay_whole() -> None:
    """The workers of `python -m app` share stderr: a write longer than PIPE_BUF into a full pipe was split,
    and another process's lines landed inside one's (a stuck shipper catching up made corrupt JSON)."""
    read_end, write_end = os.pipe()
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, f"writer-{n}"], cwd=ROOT, stderr=write_end) for n in range(4)
    ]
    os.close(write_end)
    data = bytearray()
    while chunk := os.read(read_end, 16384):  # slower than four writers: the pipe stays full
        data += chunk
        time.sleep(0.002)
    os.close(read_end)
    assert [writer.wait(30) for writer in writers] == [0] * 4
    lines = bytes(data).decode().splitlines()
    assert len(lines) == 4 * 1500
    whole = [
        (m := re.fullmatch(r"writer-\d (\d+) (x+)", line)) and len(m[2]) == 100 + int(m[1]) % 7 * 150 for line in lines
    ]
    assert all(whole), lines[whole.index(False)]


SLOW_EXIT = """
import logging, sys, time
import logstream
from logstream import BufferedHandler, finish_logs
logstream.FLUSH_TIMEOUT = 0.3  # logging.shutdown's flush and close at exit wait this long too
handler = BufferedHandler(sys.stderr)
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.INFO)
for i in range(400):
    logging.info("%d %s", i, "x" * 600)
started = time.monotonic()
drained = finish_logs(0.3)
print(f"{drained} {time.monotonic() - started:.2f}", file=sys.__stdout__, flush=True)
"""


def test_a_stream_read_slowly_at_exit_gets_every_line() -> None:
    """A log shipper catching up at exit, slower than the whole buffer in FLUSH_TIMEOUT: a stream that keeps
    taking lines is waited for until it has them all; the wait used to end after FLUSH_TIMEOUT in all,
    and the lines still buffered were lost with the process, uncounted."""
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_EXIT], cwd=ROOT, stderr=write_end, stdout=subprocess.PIPE, text=True
    )
    os.close(write_end)
    data = bytearray()
    try:
        while chunk := os.read(read_end, 4096):  # about 200 KB a second: the 240 KB take over a second
            data += chunk
            time.sleep(0.02)
    finally:
        os.close(read_end)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    drained, seconds = out.split()
    assert drained == "True"
    assert float(seconds) > 0.3  # longer than the wait for a stream that takes nothing
    lines = bytes(data).decode().splitlines()
    assert [int(line.split()[0]) for line in lines] == list(range(400))


def _read_slowly(fd: int, pause: float, into: bytearray) -> threading.Thread:
    def read() -> None:
        with contextlib.suppress(OSError):  # a terminal's end answers EIO once the other is closed
            while chunk := os.read(fd, 4096):
                into.extend(chunk)
                time.sleep(pause)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


def _lines_into(handler: BufferedHandler, count: int, size: int) -> None:
    for i in range(count):
        handler.enqueue(f"{i} {'x' * size}\n")


def test_a_drain_waits_for_the_lines_it_found_not_for_those_logged_meanwhile() -> None:
    """Another thread logging without pause while the stream keeps up: the drain ends once the lines it found
    are written. Waiting for an empty buffer, with the wait renewed at each write, it never ended."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")  # closed here: collected later, it would close a number reused since
    handler = BufferedHandler(stream)
    reader = _read_slowly(read_end, 0.001, bytearray())
    stop = threading.Event()

    def chatty() -> None:
        while not stop.is_set():
            handler.enqueue("tick " + "y" * 80 + "\n")

    logger = threading.Thread(target=chatty)
    logger.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        assert handler.drain(1.0) is True
        assert time.monotonic() - started < DRAIN_LIMIT
    finally:
        stop.set()
        logger.join()
        handler.close()
        handler._thread.join(10)  # its writer done with the descriptor before it is closed, and its number reused
        stream.close()  # the reader's end of file
        reader.join(10)
        os.close(read_end)


def test_a_stream_too_slow_for_the_drain_limit_is_given_up_on_at_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream taking a little every second keeps a drain going, but not past DRAIN_LIMIT, and logging's own
    flushes at exit do not wait for it again: exit stays bounded."""
    monkeypatch.setattr(logstream, "DRAIN_LIMIT", 1.0)
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    handler = BufferedHandler(stream)
    reader = _read_slowly(read_end, 0.2, bytearray())  # 20 KB a second: the 300 KB buffered take 15 s
    try:
        _lines_into(handler, 3000, 100)
        started = time.monotonic()
        assert handler.drain(0.5) is False
        assert 1.0 <= time.monotonic() - started < 2.0
        time.sleep(0.5)  # the stream takes another write meanwhile
        flushed = time.monotonic()
        handler.flush()  # still taking lines, but given up on until it has caught up
        assert time.monotonic() - flushed < 0.2
    finally:
        os.close(read_end)  # the writer's next write fails: the rest is lost, and close() waits for nothing
        reader.join(10)
        handler.close()
        handler._thread.join(10)
        stream.close()


def test_a_stream_that_resumes_after_a_drain_gave_up_is_waited_for_within_the_same_budget() -> None:
    """Given up on, then read again: the next drain (logging's own flush at exit) waited for nothing until the
    stream had caught up, and the process ended with a megabyte of lines it would have taken in a second."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    handler = BufferedHandler(stream)
    try:
        _lines_into(handler, 9000, 100)  # about 900 KB on a pipe nobody reads yet
        assert handler.drain(0.5) is False
        reader = _read_slowly(read_end, 0.002, bytearray())  # 2 MB a second: half a second to catch up
        deadline = time.monotonic() + 5
        while handler._progress == handler._gave_up_at and time.monotonic() < deadline:
            time.sleep(0.01)  # it has taken a write since: it drains again
        assert handler.drain(FLUSH_TIMEOUT) is True
        assert handler.drain(0) is True  # and caught up: nothing left to wait for
    finally:
        handler.close()
        handler._thread.join(10)
        stream.close()
        reader.join(10)
        os.close(read_end)


def test_a_terminal_read_slowly_is_waited_for_while_it_takes_lines() -> None:
    """`docker run -t`: a terminal took a whole batch in one write, so a steady reader's progress showed only at
    its end, and the drain gave up on it after FLUSH_TIMEOUT (here 0.5 s) though it kept reading."""
    primary, secondary = os.openpty()
    tty.setraw(secondary)
    stream = os.fdopen(secondary, "w")
    handler = BufferedHandler(stream)
    received = bytearray()
    reader = _read_slowly(primary, 0.2, received)  # about 20 KB a second: 60 KB take 3 s
    try:
        _lines_into(handler, 100, 600)
        assert handler.drain(0.5) is True
        handler.close()
        handler._thread.join(10)
        deadline = time.monotonic() + 10
        while len(received) < sum(len(f"{i} ") + 601 for i in range(100)) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stream.close()
        reader.join(10)
        os.close(primary)
    assert [int(line.split()[0]) for line in bytes(received).decode().splitlines()] == list(range(100))


def test_a_stream_that_did_not_drain_is_waited_for_once() -> None:
    """At exit `finish_logs`, then logging.shutdown's flush and close each waited FLUSH_TIMEOUT for a stuck stream."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    handler = BufferedHandler(stream)
    try:
        for _ in range(2000):  # more than the pipe holds: the writer blocks
            handler.enqueue("x" * 100 + "\n")
        assert handler.drain(0.5) is False
        started = time.monotonic()
        handler.flush()
        handler.drain(FLUSH_TIMEOUT)
        assert time.monotonic() - started < 1
        reader = threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(read_end, 65536), b"")])
        reader.start()  # the stream drains again: once it has caught up, a drain waits for it again
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while handler._gave_up_at is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        handler.enqueue("after\n")
        assert handler.drain(FLUSH_TIMEOUT) is True
        handler.close()
        stream.close()  # the reader's end of file
        reader.join(10)
    finally:
        os.close(read_end)


def test_lines_of_several_processes_on_one_slowly_read_socket_stay_whole() -> None:
    """systemd's journal gives stderr as a Unix stream socket: its writes are cut into whole lines as a pipe's are."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, f"writer-{n}"], cwd=ROOT, stderr=writer.fileno())
        for n in range(4)
    ]
    writer.close()
    data = bytearray()
    while chunk := reader.recv(4096):  # slower than four writers: the socket's buffer stays full
        data += chunk
        time.sleep(0.002)
    reader.close()
    assert [process.wait(30) for process in writers] == [0] * 4
    lines = bytes(data).decode().splitlines()
    assert len(lines) == 4 * 1500
    assert all(re.fullmatch(r"writer-\d \d+ x+", line) for line in lines)


FULL_DISK = """
import logging, resource, sys
from logstream import BufferedHandler
handler = BufferedHandler(open(sys.argv[1], "a"))
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("flood")
log.addHandler(handler)
log.propagate = False
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, hard))  # the file may not grow past 4000 bytes: EFBIG
for i in range(100):
    log.warning("line %03d %s", i, "z" * 91)
assert handler.drain(5)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # room again
log.warning("after")
assert handler.drain(5)
print(handler.dropped)
"""


def test_a_write_cut_short_by_a_full_disk_counts_exactly_the_lines_lost(tmp_path: Path) -> None:
    """A write that took part of a line (a full disk, a size limit) counts as dropped only the lines not
    written whole, and the cut line ends there, so the next line starts on a line of its own."""
    log = tmp_path / "service.log"
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(log)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    dropped = int(done.stdout)
    lines = log.read_text().splitlines()
    whole = [line for line in lines if re.fullmatch(r"line \d{3} z{91}", line)]
    assert len(whole) == 39  # what 4000 bytes hold of 101-byte lines, and part of the 40th
    assert dropped == 100 - len(whole)
    cut = [line for line in lines if line.startswith("line ") and line not in whole]
    assert len(cut) == 1  # the line the limit cut, alone on its line
    assert len(cut[0]) < len("line 000 ") + 91
    assert lines[-2:] == ["after", f"{dropped} log lines were dropped: the log stream was not draining"]


def test_no_stream_at_all_counts_every_line_and_holds_nothing_up() -> None:
    """With stderr closed when the process started (`sys.stderr` is None), lines are dropped and counted."""
    handler = BufferedHandler(None)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for n in range(5):
        handler.handle(logging.LogRecord("t", logging.WARNING, __file__, 0, "line %d", (n,), None))
    started = time.monotonic()
    assert handler.drain(FLUSH_TIMEOUT)
    assert time.monotonic() - started < 1
    assert handler.dropped == 5
    handler.close()


def test_python_m_app_with_stderr_closed_serves_and_stops_cleanly(tmp_path: Path) -> None:
    """`python -m app 2>&-`: the event loop must not take descriptor 2, which libuv aborts on closing at exit."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARIABLES}
    env = {**clean, "PORT": str(port), "HOST": "127.0.0.1", "SHUTDOWN_DRAIN_SECONDS": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, preexec_fn=lambda: os.close(2)
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(30) == 0
        assert time.monotonic() - started < FLUSH_TIMEOUT  # no wait for a stream that is not there
    finally:
        stop(process)


FORKED = """
import logging, os, sys, time
from logstream import BufferedHandler
path = sys.argv[1]
handler = BufferedHandler(open(path, "w"))
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("forked")
log.addHandler(handler)
log.propagate = False
log.setLevel(logging.INFO)
log.info("parent")
time.sleep(0.3)  # the parent's writer is idle, waiting
if os.fork() == 0:
    log.info("child")
    deadline = time.monotonic() + 3
    while "child" not in open(path).read() and time.monotonic() < deadline:
        time.sleep(0.02)
    print("written" if "child" in open(path).read() else "still buffered")
    sys.stdout.flush()
    os._exit(0)
os.wait()
"""


def test_a_forked_child_writes_its_lines_without_being_flushed(tmp_path: Path) -> None:
    """The child kept the parent's condition, whose list of waiters named the parent's writer: the
    child's writer was never woken, and its lines waited for a flush."""
    done = subprocess.run(
        [sys.executable, "-c", FORKED, str(tmp_path / "log")], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "written"


def test_deferred_lines_are_made_by_the_writer_in_order_and_one_that_fails_is_reported(tmp_path: Path) -> None:
    """`enqueue_deferred`: the writer thread makes the line, in its place among the others; a line
    that cannot be made becomes a line saying so, and the writer goes on with the rest."""
    made_on: list[str] = []

    def render(text: str) -> str:
        made_on.append(threading.current_thread().name)
        return text + "\n"

    def broken(text: str) -> str:
        raise ValueError(f"cannot make {text}")

    with (tmp_path / "log").open("w") as stream:
        handler = BufferedHandler(stream)
        handler.enqueue_deferred(render, ("first",), 6)
        handler.enqueue("second\n")
        handler.enqueue_deferred(broken, ("third",), 6)
        handler.enqueue_deferred(render, ("fourth",), 7)
        assert handler.drain(5)
        handler.close()
    first, second, failed, fourth = (tmp_path / "log").read_text().splitlines()
    assert (first, second, fourth) == ("first", "second", "fourth")
    assert "could not be formatted (ValueError: cannot make third)" in failed
    assert made_on == ["log-writer", "log-writer"]
    assert handler.dropped == 0


def test_deferred_lines_count_against_the_buffer_as_their_caller_said() -> None:
    """A stuck stream: deferred lines fill the buffer by the size given, then are dropped and counted."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        while True:  # a pipe nobody reads, already full
            os.write(write_end, b"x" * 4096)
    os.set_blocking(write_end, True)
    stream = os.fdopen(write_end, "w")
    handler = BufferedHandler(stream, capacity=1000)
    try:
        handler.enqueue("blocked\n")  # the writer takes it, and blocks in its write
        deadline = time.monotonic() + 5
        while handler._pending and time.monotonic() < deadline:  # the writer took it
            time.sleep(0.01)
        for _ in range(12):
            handler.enqueue_deferred(str, ("y" * 10 + "\n",), 100)
        assert handler.dropped == 2  # ten of 100 fill 1000 characters
    finally:
        os.close(read_end)  # the writer's write fails: what it held is lost, and counted
        handler.close()
        stream.close()
