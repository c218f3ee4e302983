"""The edge of `python -m app`: its limits attacked for real over loopback sockets, and its writes counted."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import resource
import selectors
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from service import UvicornProcess, free_port, make_settings, running_uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from test_metrics import value

from api import Endpoints
from app import create_app
from edge import HOST_INVALID, HOST_MISSING, HOST_REPEATED, JOIN_LIMIT
from metrics import UNMATCHED
from server import DrainingServer, EdgeConfig

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
    head, _, body = read_head(sock).partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += receive(sock)
    return head + b"\r\n\r\n" + body


def read_head(sock: socket.socket) -> bytes:
    """Bytes up to a response's blank line, and whatever came with them."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += receive(sock)
    return data


def receive(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the server closed the connection before the response was whole")
    return chunk


BUNDLE_BYTES = (
    (Path(__file__).parent.parent / "static" / "swagger-ui-bundle.js").stat().st_size
)  # the largest static file


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
    assert f"\r\nx-request-id: {envelope['request_id']}\r\n".encode() in head.lower() + b"\r\n"


def padded_head(size: int) -> bytes:
    """A GET /health head of exactly `size` bytes, padded with blanks before a header's value, which
    the parser drops."""
    start, end = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad:", b"v\r\n\r\n"
    return start + b" " * (size - len(start) - len(end)) + end


def exchange_in_pieces(port: int, *pieces: bytes) -> bytes:
    """Send each piece as a read of its own (a pause between them), then read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.2)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("size", [8193, 20000, 120000])
def test_a_head_over_the_limit_in_blanks_before_a_value_gets_the_431(server: UvicornProcess, size: int) -> None:
    """The parser drops the blanks before a field's value, and the head was measured from what it kept:
    a head of whitespace up to a read's size (256 KiB) passed a limit of 8 KiB."""
    assert exchange(server.port, padded_head(size)).startswith(b"HTTP/1.1 431 ")
    assert exchange(server.port, b"\r\n" + padded_head(size)).startswith(b"HTTP/1.1 431 ")  # blank lines first


def test_a_head_of_blanks_at_the_limit_is_served_whichever_reads_bring_it(server: UvicornProcess) -> None:
    """Measured as sent, to the byte, when its reads hold more than the limit (a request behind it):
    in one read, in two (its blank line straddling them), in three, and after blank lines, which
    are not part of it."""
    behind = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"  # never served: the head says Connection: close
    for size, status in ((8192, b"200"), (8193, b"431")):
        head = padded_head(size)
        readings = [
            [head + behind],
            *([head[:-cut], head[-cut:] + behind] for cut in (1, 2, 3, 4, 100)),
            [head[:-2], head[-2:-1], head[-1:] + behind],
            [b"\r\n" + head[:-100], head[-100:] + behind],
        ]
        for pieces in readings:
            answer = exchange_in_pieces(server.port, *pieces)
            assert answer.startswith(b"HTTP/1.1 " + status + b" "), (size, [len(p) for p in pieces], answer[:40])


def logged_with(server: UvicornProcess, request_id: str) -> list[dict[str, Any]]:
    """The JSON lines naming `request_id`, once the log writer's thread has written them."""
    deadline = time.monotonic() + 5
    while request_id not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    return [json.loads(line) for line in server.output().splitlines() if request_id in line]


def test_a_request_the_parser_refuses_gets_the_400_envelope_with_its_request_id_logged(
    server: UvicornProcess,
) -> None:
    """Malformed HTTP is the 400 envelope, not uvicorn's plain text; its one access line names the same request ID."""
    answer = exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nNo colon in this header\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    lines = head.lower().split(b"\r\n")
    assert b"content-type: application/json" in lines
    assert b"x-content-type-options: nosniff" in lines
    assert b"connection: close" in lines
    envelope = json.loads(body)
    assert envelope["error"] == "VALIDATION_ERROR"
    assert set(envelope) == {"error", "message", "timestamp", "request_id"}
    assert f"x-request-id: {envelope['request_id']}".encode() in lines
    logged = logged_with(server, envelope["request_id"])
    assert [(r["logger"], r["level"], r["method"], r["path"], r["status"]) for r in logged] == [
        ("service.access", "INFO", "GET", "/", 400)
    ]
    assert logged[0]["client"].startswith("127.0.0.1:")
    assert logged[0]["duration_ms"] >= 0
    garbage = exchange(server.port, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")  # TLS: no method, no path
    request_id = json.loads(garbage.partition(b"\r\n\r\n")[2])["request_id"]
    assert [(r["method"], r["path"], r["status"]) for r in logged_with(server, request_id)] == [("-", "-", 400)]


def test_a_head_over_the_limit_gets_one_access_line_with_the_start_of_its_path(server: UvicornProcess) -> None:
    """The 431 is logged as any request is, once, with its request ID; a long URL's path is cut, as in
    every access line, to 512 bytes ending `…`."""
    answer = exchange(server.port, b"GET /" + b"a" * 9000 + b"?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    logged = logged_with(server, json.loads(body)["request_id"])
    assert [(r["logger"], r["level"], r["method"], r["status"]) for r in logged] == [
        ("service.access", "INFO", "GET", 431)
    ]
    assert logged[0]["path"] == "/" + "a" * 511 + "…"
    assert logged[0]["client"].startswith("127.0.0.1:")
    assert logged[0]["duration_ms"] >= 0


def test_refused_requests_are_counted_in_the_metrics_as_unmatched(server: UvicornProcess) -> None:
    """What the server refuses before the app sees it is in `http_requests_total`, as each has its access line."""
    exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nNo colon in this header\r\n\r\n")
    exchange(server.port, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")  # TLS: no method
    exchange(server.port, b"POST /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert value(text, "http_requests_total", method="GET", route=UNMATCHED, status="400") == 1
    assert value(text, "http_requests_total", method="OTHER", route=UNMATCHED, status="400") == 1
    assert value(text, "http_requests_total", method="POST", route=UNMATCHED, status="431") == 1
    assert value(text, "http_request_duration_seconds_count", method="POST", route=UNMATCHED) == 1


def test_requests_pipelined_before_a_malformed_one_are_answered_before_its_400(server: UvicornProcess) -> None:
    """uvicorn answers the garbage at once and the request before it is lost; here it gets its 200 first."""
    answer = exchange(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    first, _, second = answer.partition(b"HTTP/1.1 400 ")
    assert b'"status":"healthy"' in first
    assert b'"error":"VALIDATION_ERROR"' in second


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


def test_a_request_body_that_stops_arriving_is_closed_after_the_head_timeout() -> None:
    """A body trickling a byte a second outlives the 2 s timeout; once it stops, the connection is closed 2 s on."""
    with (
        edge_serving(writer_app(threading.Event()), REQUEST_HEAD_TIMEOUT="2") as port,
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
    ):
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        for _ in range(4):  # the app reads each byte and waits for the next
            sock.sendall(b"a")
            time.sleep(1)
        sock.sendall(b"a")
        stopped = time.monotonic()
        assert sock.recv(1) == b""  # no answer: the app never got its whole body
        waited = time.monotonic() - stopped
    assert 2 <= waited < 2 + 1.5  # the timeout, then up to two sweeps (0.5 s each) and slack


# One write per response (edge.ResponseWriter) ------------------------------------------------


def write_calls(pid: int) -> int:
    """The write system calls a process has made so far, all its threads included (`/proc/PID/io`)."""
    return int(re.search(r"syscw: (\d+)", Path(f"/proc/{pid}/io").read_text())[1])  # type: ignore[index]


def test_a_response_with_a_content_length_leaves_in_one_write(server: UvicornProcess) -> None:
    """200 keep-alive GETs and HEADs of /health and a 404 cost the server one write each, not two."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for request in (b"GET /health", b"HEAD /health", b"GET /no-such-route"):
            before = write_calls(server.process.pid)
            for _ in range(200):
                sock.sendall(request + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                response = read_response(sock) if request.startswith(b"GET") else read_head(sock)
                assert response.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 404 "))
                assert request.startswith(b"GET") or response.endswith(b"\r\n\r\n")  # a HEAD's: no body
            # The rest are the log writer's: access lines, many to a write.
            assert write_calls(server.process.pid) - before < 200 * 1.3


@contextlib.contextmanager
def edge_serving(app: Starlette, **env: str) -> Iterator[int]:
    """`app` served by the production server's protocol, in a thread, with these settings; yields the port."""
    port = free_port()
    server = DrainingServer(EdgeConfig(app, make_settings(PORT=str(port), SHUTDOWN_DRAIN_SECONDS="0", **env)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


class FailsAfterStart:
    """A pure ASGI endpoint (Starlette routes a class instance as one) that fails mid-response."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        raise RuntimeError("the handler fails after its response started")


def writer_app(release: threading.Event) -> Starlette:
    async def stream(request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            await asyncio.to_thread(release.wait, 10)
            yield b"late"

        return StreamingResponse(chunks())

    async def echo(request: Request) -> Response:
        return Response(await request.body())

    async def hello(request: Request) -> Response:
        return Response(b"hello")

    async def large(request: Request) -> Response:
        return Response(bytes(range(256)) * 1024)  # 256 KiB: over JOIN_LIMIT, so head and body go as two buffers

    routes = [
        Route("/stream", stream),
        Route("/echo", echo, methods=["POST"]),
        Route("/hello", hello),
        Route("/large", large),
        Route("/fails", FailsAfterStart()),
    ]
    return Starlette(routes=routes)


def test_a_streaming_response_sends_its_head_before_its_first_chunk() -> None:
    """A chunked response's head is not held for its body: the client sees it while the app still waits."""
    release = threading.Event()
    with edge_serving(writer_app(release)) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        data = read_head(sock)
        assert data.startswith(b"HTTP/1.1 200 ")
        assert b"transfer-encoding: chunked" in data
        assert not release.is_set()
        release.set()
        while not data.endswith(b"0\r\n\r\n"):
            data += receive(sock)
        assert data.partition(b"\r\n\r\n")[2] == b"4\r\nlate\r\n0\r\n\r\n"


def test_a_body_over_the_join_limit_arrives_whole_after_its_head() -> None:
    """A large body is handed over with its head in one call, not copied into one buffer, and arrives intact."""
    with (
        edge_serving(writer_app(threading.Event())) as port,
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
    ):
        sock.sendall(b"GET /large HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = read_response(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert len(body) > JOIN_LIMIT
    assert body == bytes(range(256)) * 1024


def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    """`100 Continue` is not held as if it were a response's head: the client gets it, then its answer."""
    with (
        edge_serving(writer_app(threading.Event())) as port,
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
    ):
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        assert read_response(sock).endswith(b"\r\n\r\nhello")


def test_pipelined_heads_and_gets_are_answered_whole_and_in_order() -> None:
    """A HEAD's held head is written when its response completes, before the next response's bytes."""
    post = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"
    head = b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n\r\ntwo"
    with edge_serving(writer_app(threading.Event())) as port:
        answer = exchange(port, post + head + last)
    responses = answer.split(b"HTTP/1.1 ")
    assert responses[0] == b""
    assert [r.partition(b"\r\n")[0] for r in responses[1:]] == [b"200 OK"] * 3
    assert responses[1].endswith(b"\r\n\r\none")
    assert responses[2].endswith(b"content-length: 5\r\n\r\n")  # the HEAD's: no body bytes
    assert responses[3].endswith(b"\r\n\r\ntwo")


def test_a_handler_failing_after_its_response_started_gets_its_head_out_then_the_connection_closed() -> None:
    """As uvicorn does: the head already started is written, then the connection closes mid-body."""
    with edge_serving(writer_app(threading.Event())) as port:
        answer = exchange(port, b"GET /fails HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"content-length: 10\r\n\r\n")


class FailsAfterTheClientLeft:
    """Starts its response, waits for the client to go, then fails: the server must not write to the gone client."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        while (await receive())["type"] != "http.disconnect":
            pass
        raise RuntimeError("the handler fails after its client left")


def test_a_held_head_is_dropped_when_its_client_has_gone(caplog: pytest.LogCaptureFixture) -> None:
    """Only the handler's own error is logged: no failed write to a closed connection, no task left failing."""
    app = Starlette(routes=[Route("/gone", FailsAfterTheClientLeft())])
    with edge_serving(app) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)
        time.sleep(0.5)  # the server sees the disconnect, the handler fails
    gc.collect()  # a task that failed unretrieved is reported when it is collected
    errors = [r.getMessage().strip() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["Exception in ASGI application"]


class Note(msgspec.Struct):
    text: str


posted = Endpoints(tag="test")


@posted.post("/notes", summary="Test only: a handler that reads its body")
async def post_note(body: Note) -> Note:
    return body


@pytest.mark.parametrize(
    "framing",
    [b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n", b"Transfer-Encoding: gzip\r\n\r\n" + b'{"text": "x"}'],
    ids=["bad-chunk-size", "not-chunked"],
)
def test_a_body_the_parser_refuses_while_its_handler_reads_it_is_the_400_envelope_at_once(framing: bytes) -> None:
    """The handler waiting for that body learns it is malformed: its 400 envelope, then the connection closed,
    instead of a wait until the head timeout and no answer at all."""
    app = create_app(make_settings(), endpoints=[posted])
    with edge_serving(app, REQUEST_HEAD_TIMEOUT="30") as port:
        started = time.monotonic()
        answer = exchange(port, b"POST /notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing)
        elapsed = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    envelope = json.loads(body)
    assert head.startswith(b"HTTP/1.1 400 ")
    assert (envelope["error"], envelope["message"]) == (
        "VALIDATION_ERROR",
        "Malformed request body: its framing (Transfer-Encoding, chunk sizes) is invalid",
    )
    assert f"x-request-id: {envelope['request_id']}".encode() in head
    assert b"connection: close" in head
    assert answer.count(b"HTTP/1.1 ") == 1  # the edge's own refusal is not sent as well
    assert elapsed < 5


def test_a_chunked_bodys_trailer_fields_never_become_request_headers(server: UvicornProcess) -> None:
    """A trailer `X-Request-ID` or `Origin` would override the head's (uvicorn appends trailers to the headers)."""
    answer = exchange(
        server.port,
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-ID: from-head\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n2\r\nhi\r\n0\r\nX-Request-ID: from-trailer\r\nOrigin: http://localhost:3000\r\n\r\n",
    )
    head = answer.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200 ")
    assert b"x-request-id: from-head" in head.split(b"\r\n")
    assert b"access-control-allow-origin" not in head


def test_a_refusal_to_a_head_request_has_no_body(server: UvicornProcess) -> None:
    """HEAD gets the 400's headers, its `Content-Length` included, and no body bytes."""
    answer = exchange(server.port, b"HEAD /health HTTP/1.1\r\nHost: x\r\nNo colon in this header\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert int(re.search(rb"content-length: (\d+)", head)[1]) > 0  # type: ignore[index]
    assert body == b""


# Host (RFC 9112 §3.2): exactly one, and valid ----------------------------------------------

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
REFUSED_HOSTS = {  # each is sent, then HEALTH on the same connection, which must never be served
    "HTTP/1.1 without Host": (b"GET /health HTTP/1.1\r\n\r\n", HOST_MISSING),
    "two Host lines": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nHost: x\r\n\r\n", HOST_REPEATED),
    "two Host lines, HTTP/1.0": (b"GET /health HTTP/1.0\r\nHOST: x\r\nhost: y\r\n\r\n", HOST_REPEATED),
    "a space": (b"GET /health HTTP/1.1\r\nHost: a b\r\n\r\n", HOST_INVALID),
    "a space before a port": (b"GET /health HTTP/1.1\r\nHost: exa mple:80\r\n\r\n", HOST_INVALID),
    "a port that is no number": (b"GET /health HTTP/1.1\r\nHost: host:port\r\n\r\n", HOST_INVALID),
    "a slash": (b"GET /health HTTP/1.1\r\nHost: x/y\r\n\r\n", HOST_INVALID),
    # after a request with a valid Host on the connection: the one it accepted is not waved through
    "an invalid Host after a valid one": (HEALTH + b"GET /health HTTP/1.1\r\nHost: x y\r\n\r\n", HOST_INVALID),
    "the valid Host twice after it once": (
        HEALTH + b"GET /health HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n",
        HOST_REPEATED,
    ),
}


def test_a_request_without_exactly_one_valid_host_is_the_400_envelope_and_a_close(server: UvicornProcess) -> None:
    """RFC 9112 §3.2: no Host on HTTP/1.1, several Host lines, or a Host that is not `host[:port]` is a 400,
    with a message saying which; the connection is closed, so a request pipelined after it is never served."""
    for case, (payload, message) in REFUSED_HOSTS.items():
        answer = exchange(server.port, payload + HEALTH)
        served = payload.count(b"\r\n\r\n") - 1  # the valid requests before the refused one
        assert answer.count(b"HTTP/1.1 200 ") == served, case
        head, _, body = answer.rpartition(b"HTTP/1.1 400 ")[2].partition(b"\r\n\r\n")
        assert len(re.findall(rb"HTTP/1\.1 \d{3} ", answer)) == served + 1, case  # nothing after the 400
        assert b"\r\nconnection: close" in head, case
        envelope = json.loads(body)
        assert (envelope["error"], envelope["message"]) == ("VALIDATION_ERROR", message), case


@pytest.mark.parametrize(
    "host",
    [b"Host: example.com", b"Host: [::1]:8000", b"Host: 127.0.0.1:8000", b"Host:", b"host: x.example:80 \t"],
    ids=["name", "ipv6", "ipv4", "empty", "trailing-whitespace"],
)
def test_a_request_with_one_valid_host_is_served(server: UvicornProcess, host: bytes) -> None:
    """A name, an IP literal, an IPv4 address, with or without a port; an empty Host (a target without
    authority) too. Twice on one connection: the second request passes the connection's cached Host."""
    request = b"GET /health HTTP/1.1\r\n" + host + b"\r\n\r\n"
    answer = exchange(server.port, request + request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert answer.count(b"HTTP/1.1 200 ") == 2


def test_an_http_1_0_request_without_host_is_served(server: UvicornProcess) -> None:
    """Only HTTP/1.1 requires a Host."""
    answer = exchange(server.port, b"GET /health HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b'"status":"healthy"' in answer


def test_a_refusal_keeps_the_callers_request_id(server: UvicornProcess) -> None:
    """As every response does: a valid `X-Request-ID` read before the refusal names it, in the header, the body and
    the access line; an invalid one is replaced."""
    kept = exchange(server.port, b"GET /health HTTP/1.1\r\nHost: a b\r\nX-Request-ID: my-trace-124\r\n\r\n")
    replaced = exchange(server.port, b"GET /health HTTP/1.1\r\nHost: a b\r\nX-Request-ID: two words\r\n\r\n")
    head, _, body = kept.partition(b"\r\n\r\n")
    assert (head.split(b"\r\n")[0], json.loads(body)["request_id"]) == (b"HTTP/1.1 400 Bad Request", "my-trace-124")
    assert b"\r\nx-request-id: my-trace-124\r\n" in head + b"\r\n"
    assert [r["status"] for r in logged_with(server, "my-trace-124")] == [400]
    assert b"two words" not in replaced
    assert uuid.UUID(json.loads(replaced.partition(b"\r\n\r\n")[2])["request_id"]).version == 4


def test_a_request_after_a_response_that_closes_the_connection_gets_no_line_of_an_unsent_refusal(
    server: UvicornProcess,
) -> None:
    """A 405 to a chunked body nobody read closes the connection: the bad request pipelined after it is never
    answered, so no access line or count claims it got a 400."""
    answer = exchange(server.port, b"PUT /health HTTP/1.1\r\nHost: a\r\nX-Request-ID: first-one\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                      b"GET /health HTTP/1.1\r\nHost: x y\r\nX-Request-ID: never-answered\r\n\r\n")  # fmt: skip
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"405"]
    assert [r["status"] for r in logged_with(server, "first-one")] == [405]
    time.sleep(0.5)  # a line of the refusal would be written with the 405's, or right after it
    refusals = [line for line in server.output().splitlines() if '"status":400' in line.replace(" ", "")]
    assert refusals == []


def test_a_host_refusal_has_its_access_line_and_is_counted_in_the_metrics(server: UvicornProcess) -> None:
    """Refused by the server before the app, as a malformed request is: one access line, and `<unmatched>`."""
    answer = exchange(server.port, b"POST /items?q=1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    request_id = json.loads(answer.partition(b"\r\n\r\n")[2])["request_id"]
    logged = logged_with(server, request_id)
    assert [(r["logger"], r["method"], r["path"], r["status"]) for r in logged] == [
        ("service.access", "POST", "/items", 400)
    ]
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert value(text, "http_requests_total", method="POST", route=UNMATCHED, status="400") == 1


H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"


@pytest.mark.parametrize("split", [False, True], ids=["one-segment", "body-later"])
def test_a_request_asking_for_h2c_is_served_as_http_1_1_with_its_body(split: bool) -> None:
    """`curl --http2` asks for h2c: httptools took the body for the new protocol's bytes, and the handler got
    none (a 400 "not valid JSON"); the body arriving later was parsed as the next request."""
    body = b'{"text": "hello"}'
    head = b"POST /notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + H2C
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    app = create_app(make_settings(), endpoints=[posted])
    with edge_serving(app) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head if split else head + body)
        if split:
            time.sleep(0.3)
            sock.sendall(body)
        first = read_response(sock)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        second = read_response(sock)
    assert first.startswith(b"HTTP/1.1 200 ")
    assert first.endswith(b"\r\n\r\n" + b'{"text":"hello"}')
    assert second.startswith(b"HTTP/1.1 200 ")


def test_a_body_holding_a_request_is_never_served_as_one_after_an_upgrade_header() -> None:
    """The smuggling shape: a front proxy sees a body, so must the server."""
    inner = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    head = b"POST /notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + H2C
    head += b"Content-Length: %d\r\n\r\n" % len(inner)
    with (
        edge_serving(create_app(make_settings(), endpoints=[posted])) as port,
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
    ):
        sock.sendall(head)
        time.sleep(0.3)  # the body in a segment of its own: uvicorn parsed it as the next request
        sock.sendall(inner)
        answer = read_response(sock)
        sock.settimeout(1)
        with contextlib.suppress(TimeoutError):
            answer += sock.recv(65536)  # a second response, had the body been served as a request
    assert answer.count(b"HTTP/1.1 ") == 1
    assert answer.startswith(b"HTTP/1.1 400 ")  # its body is not JSON
    assert b"not valid JSON" in answer


def test_a_chunked_body_with_an_upgrade_header_is_the_400_envelope_and_a_closed_connection() -> None:
    """Only the parser reads chunked framing, and not after an upgrade head: refused, nothing after it served."""
    head = b"POST /notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + H2C
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with edge_serving(create_app(make_settings(), endpoints=[posted])) as port:
        answer = exchange(port, chunked)
    head_out, _, body = answer.partition(b"\r\n\r\n")
    assert head_out.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in head_out
    assert json.loads(body)["message"] == (
        "Malformed request: a body sent with Transfer-Encoding cannot come with Upgrade; send it without"
    )
    assert answer.count(b"HTTP/1.1 ") == 1


def test_an_h2c_requests_body_trickling_in_is_not_cut_off() -> None:
    """Every byte that arrives restarts the body's wait, for a request asking for h2c as for any other."""
    body = b'{"text": "' + b"x" * 30 + b'"}'
    head = b"POST /notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + H2C
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    app = create_app(make_settings(), endpoints=[posted])
    with (
        edge_serving(app, REQUEST_HEAD_TIMEOUT="1") as port,
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
    ):
        sock.sendall(head)
        for start in range(0, len(body), 4):  # 11 pieces, 0.3 s apart: 3 s in all, three times the timeout
            time.sleep(0.3)
            sock.sendall(body[start : start + 4])
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_thousands_of_pipelined_h2c_requests_are_all_answered() -> None:
    """Each request after a not-upgraded one is parsed in a loop: recursing, the 986th was a 400."""
    requests = b"GET /health HTTP/1.1\r\nHost: x\r\n" + H2C + b"\r\n"
    with edge_serving(create_app(make_settings())) as port:
        answer = exchange(port, requests * 3000 + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200 ") == 3001


def test_an_error_after_the_response_started_is_logged_once_with_the_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The request layer logs it with the request's ID, method and path; uvicorn's own "Exception in ASGI
    application", the same traceback again without them, is left out."""

    class FailsLate:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] == "/fails-late":
                await FailsAfterStart()(scope, receive, send)
            await self.app(scope, receive, send)

    app = create_app(make_settings())
    app.add_middleware(FailsLate)
    with edge_serving(app) as port:
        exchange(port, b"GET /fails-late HTTP/1.1\r\nHost: x\r\nX-Request-ID: late-1\r\n\r\n")
        time.sleep(0.3)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["Unhandled exception in GET /fails-late"]
    assert getattr(errors[0], "request_id", None) == "late-1"
    assert errors[0].exc_info is not None


def test_a_client_that_leaves_mid_download_with_a_request_pipelined_behind_is_no_error(
    server: UvicornProcess,
) -> None:
    """uvicorn told only the newest request its client had left: the one being written went on writing
    to the closed connection, and its handler's "failure" was logged as an ERROR with a traceback."""
    for n in range(3):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.connect(("127.0.0.1", server.port))
            request = b"GET /static/swagger-ui-bundle.js HTTP/1.1\r\nHost: x\r\nX-Request-ID: leaver-%d\r\n\r\n" % n
            sock.sendall(request * 2)
            time.sleep(0.5)  # the server's writes fill the buffers: the response waits for the client
    assert httpx.get(f"{server.url}/health").status_code == 200
    time.sleep(0.5)  # the log writer's thread
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    assert [line for line in lines if line["level"] == "ERROR"] == []
    assert len([line for line in lines if str(line.get("request_id", "")).startswith("leaver-")]) >= 3


def test_a_client_that_never_reads_its_answer_is_cut_off_after_the_head_timeout(server: UvicornProcess) -> None:
    """A connection whose answer waits in full buffers, none of it read, was held until shutdown, with the
    answer's memory: it is aborted once nothing was read for `REQUEST_HEAD_TIMEOUT` (2 s here)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.connect(("127.0.0.1", server.port))
        # More than the kernel's buffers hold (4 MiB at most for the sender): the rest waits in the server.
        sock.sendall(b"GET /static/swagger-ui-bundle.js HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
        time.sleep(2 + 1.5)  # the timeout, a sweep and slack
        sock.settimeout(5)  # a connection still open would send the rest at once, then wait: a timeout
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += len(chunk)
    assert received < 4 * BUNDLE_BYTES  # the rest was dropped


def test_a_client_reading_its_answer_slowly_gets_all_of_it(server: UvicornProcess) -> None:
    """Progress is what counts: a reader slower than the timeout over the whole answer is not cut off."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /static/swagger-ui.css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        started, received = time.monotonic(), b""
        while chunk := sock.recv(8192):
            received += chunk
            time.sleep(0.2)  # about 40 KB a second: 188 KB take longer than the 2 s timeout
        took = time.monotonic() - started
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert len(body) == (Path(__file__).parent.parent / "static" / "swagger-ui.css").stat().st_size
    assert took > 2 + 0.5
