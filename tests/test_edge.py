"""The edge limits of `python -m app`, attacked for real over loopback sockets."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service import UvicornProcess, running_uvicorn

pytestmark = pytest.mark.slow
MIB = 1024 * 1024


@pytest.fixture
def server() -> Iterator[UvicornProcess]:
    # 1,500 slow clients need 3,000 descriptors on this side and the server's (which inherits the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard or hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    env = {"MAX_REQUEST_HEAD_BYTES": "8192", "REQUEST_HEAD_TIMEOUT": "2", "LOG_JSON": "true"}
    with running_uvicorn(env, command="python -m app") as process:
        yield process


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
        pending += [int(child) for child in children]
    return total


def exchange(port: int, payload: bytes) -> bytes:
    """Send `payload`, then read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head, then `Content-Length` bytes of body), however the server split it."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def head_of_size(size: int) -> bytes:
    """A GET /health head of exactly `size` bytes, padded with one header."""
    start, end = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def test_a_100_mib_header_block_is_refused_without_growing_memory(server: UvicornProcess) -> None:
    """A header streamed in 1 MiB chunks is cut off near the limit; the server's RSS grows < 16 MiB."""
    for _ in range(50):  # warm up: the first requests allocate what every request needs
        httpx.get(f"{server.url}/health")
    before = rss_bytes(server.process.pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes(server.process.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    sent, answer = 0, b""
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Huge: ")
            try:
                for _ in range(100):
                    sock.sendall(b"a" * MIB)
                    sent += MIB
                answer = sock.recv(65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
    finally:
        done.set()
        sampler.join()
    assert sent < 100 * MIB, "the whole block was accepted"
    assert answer in (b"",) or answer.startswith(b"HTTP/1.1 431 ")
    print(f"RSS {before / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB during the attack; {sent / MIB:.0f} MiB sent")
    assert peak - before < 16 * MIB, f"RSS grew by {(peak - before) / MIB:.1f} MiB"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_head_at_the_limit_is_served_and_one_byte_more_gets_the_431_envelope(server: UvicornProcess) -> None:
    """MAX_REQUEST_HEAD_BYTES is the largest head served; one byte more is the 431 envelope, then a close."""
    served = exchange(server.port, head_of_size(8192))
    assert served.startswith(b"HTTP/1.1 200 ")
    refused = exchange(server.port, head_of_size(8193))
    head, _, body = refused.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    assert b"content-type: application/json" in head.lower()
    assert b"connection: close" in head.lower()
    envelope = json.loads(body)
    assert envelope["error"] == "REQUEST_HEADER_FIELDS_TOO_LARGE"
    assert set(envelope) == {"error", "message", "timestamp", "request_id"}
    assert envelope["request_id"]


def test_responses_carry_a_date_but_do_not_name_the_server(server: UvicornProcess) -> None:
    """No `server: uvicorn` for scanners to match against, served or refused; `Date` stays (RFC 9110)."""
    for payload in (head_of_size(512), head_of_size(8193)):
        head = exchange(server.port, payload).partition(b"\r\n\r\n")[0].lower()
        assert b"\r\ndate: " in head
        assert b"\r\nserver:" not in head


def test_a_head_over_the_limit_after_a_keep_alive_request_is_refused(server: UvicornProcess) -> None:
    """The limit applies to each request on a connection, not only to the first."""
    small = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = exchange(server.port, small + head_of_size(20000))
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 431 " in answer


def test_a_silent_connection_is_closed_after_the_head_timeout(server: UvicornProcess) -> None:
    """A client that connects and sends nothing is closed REQUEST_HEAD_TIMEOUT (2 s) later, not before."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        opened = time.monotonic()
        assert sock.recv(1) == b""
        waited = time.monotonic() - opened
    assert 1.9 <= waited < 4


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout_and_not_before() -> None:
    """uvicorn's 5 s keep-alive holds without its timer per response: idle past it is closed, a busy one is not."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with (
        running_uvicorn({"REQUEST_HEAD_TIMEOUT": "30"}, command="python -m app") as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as busy,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as idle,
    ):
        idle.sendall(request)
        assert read_response(idle).startswith(b"HTTP/1.1 200 ")
        answered = next_request = time.monotonic()
        idle.settimeout(0.05)
        idle_for = None
        while time.monotonic() - answered < 9:
            if time.monotonic() >= next_request:  # a request every 2 s keeps `busy` open throughout
                busy.sendall(request)
                assert read_response(busy).startswith(b"HTTP/1.1 200 ")
                next_request += 2
            if idle_for is None:
                with contextlib.suppress(TimeoutError):
                    if idle.recv(1) == b"":
                        idle_for = time.monotonic() - answered
    assert idle_for is not None
    assert 5 <= idle_for < 6.5  # the timeout, then at most one sweep (0.5 s) and slack


def test_a_keep_alive_connection_trickling_its_next_head_is_closed(server: UvicornProcess) -> None:
    """The head timeout restarts after each response: a slow second head is cut off too."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        answered = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        closed = False
        while not closed and time.monotonic() - answered < 6:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                sock.settimeout(0.5)
                closed = sock.recv(1) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        waited = time.monotonic() - answered
    assert closed
    assert 1.9 <= waited < 4


def test_slow_clients_are_closed_on_time_and_never_block_health(server: UvicornProcess) -> None:
    """1,500 clients trickling header lines are all closed after the timeout; /health stays prompt meanwhile."""
    clients: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    for _ in range(1500):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        selector.register(sock, selectors.EVENT_READ, data=time.monotonic())  # when it opened
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        sock.setblocking(False)
        clients[sock.fileno()] = sock
    opened = time.monotonic()
    closed_after: list[float] = []
    health_seconds: list[float] = []
    next_trickle = opened
    try:
        while len(closed_after) < len(clients) and time.monotonic() - opened < 10:
            now = time.monotonic()
            if now >= next_trickle:  # every open client sends another header line
                next_trickle = now + 0.5
                for key in selector.get_map().values():
                    with contextlib.suppress(OSError):
                        clients[key.fd].send(b"X-Slow: 1\r\n")
                started = time.monotonic()
                with httpx.Client(timeout=5) as fresh:  # a new connection, as a probe makes
                    assert fresh.get(f"{server.url}/health").status_code == 200
                health_seconds.append(time.monotonic() - started)
            for key, _ in selector.select(timeout=0.05):
                sock = clients[key.fd]
                try:
                    data = sock.recv(65536)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                assert data == b"", "a slow client was answered instead of closed"
                selector.unregister(sock)
                closed_after.append(time.monotonic() - key.data)
    finally:
        selector.close()
        for sock in clients.values():
            sock.close()
    assert len(closed_after) == 1500
    assert min(closed_after) >= 1.9  # the timeout (2 s) counts from each client's connection
    assert max(closed_after) < 2 + 1.5  # within the timeout, one sweep (0.5 s) and slack
    assert max(health_seconds) < 1
    low, high, probe = min(closed_after), max(closed_after), max(health_seconds)
    print(f"slow clients closed after {low:.2f}..{high:.2f} s; /health took at most {probe * 1000:.0f} ms")
