"""Hostile input over raw sockets to a real uvicorn: a clean 4xx or a fresh ID, never a crash or an echo."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from service import SERVER_COMMANDS, UvicornProcess

pytestmark = pytest.mark.slow
MARKER = "Hostile-Marker-7f3a"


@pytest.fixture(scope="module", params=SERVER_COMMANDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornProcess]:
    log_path = tmp_path_factory.mktemp("hostile") / "out.log"
    process = UvicornProcess({"LOG_JSON": "true"}, log_path=log_path, command=request.param)
    process.wait_ready()
    yield process
    process.terminate()


def send_raw(server: UvicornProcess, payload: bytes) -> bytes:
    """Send bytes as they are and read until the server closes or a response is complete."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def header(response: bytes, name: bytes) -> bytes | None:
    head = response.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def assert_still_serving(server: UvicornProcess) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.process.poll() is None


@pytest.mark.parametrize(
    "request_line",
    [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /\x00nul HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello to a plain-HTTP port
    ],
)
def test_malformed_request_lines_get_a_clean_4xx(server: UvicornProcess, request_line: bytes) -> None:
    """What the parser refuses is a 400 before the app: the envelope with its request ID from `python -m app`,
    uvicorn's own plain text from `uvicorn app:app`; both keep serving."""
    response = send_raw(server, request_line)
    assert status_of(response) == 400
    if server.command == "python -m app":
        envelope = json.loads(response.partition(b"\r\n\r\n")[2])
        assert envelope["error"] == "VALIDATION_ERROR"
        assert header(response, b"x-request-id") == envelope["request_id"].encode()
    else:
        assert header(response, b"content-type") == b"text/plain; charset=utf-8"
    assert_still_serving(server)


@pytest.mark.parametrize("path", [b"/%ff%fe%00", b"/%zz", b"/%", b"/caf%C3%A9", b"/a/../../etc/passwd", b"//x"])
def test_odd_percent_encoding_in_paths_gets_the_404_envelope(server: UvicornProcess, path: bytes) -> None:
    """Invalid UTF-8 and broken percent-escapes reach the app as a path and get the 404 envelope."""
    response = send_raw(server, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 404
    assert b'"error":"NOT_FOUND_ERROR"' in response
    assert header(response, b"content-type") == b"application/json"
    assert_still_serving(server)


def test_raw_invalid_utf8_bytes_in_the_path_are_refused_or_enveloped(server: UvicornProcess) -> None:
    """Non-ASCII bytes on the wire are refused by the HTTP parser with a 400, never a 500."""
    response = send_raw(server, b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 400
    assert_still_serving(server)


def test_oversized_headers_do_not_crash_the_server(server: UvicornProcess) -> None:
    """A megabyte of headers: uvicorn app:app answers it, python -m app refuses it; both keep serving."""
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 8000) for i in range(128))
    try:
        response = send_raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n")
    except OSError:  # refused while still arriving: the unread rest resets the connection (reset, EPIPE, ENOTCONN)
        response = b""
    if server.command == "python -m app":
        assert response == b"" or status_of(response) == 431
    else:
        assert status_of(response) == 200
    assert_still_serving(server)


@pytest.mark.parametrize(
    "value",
    [
        b"x" * 10_000,
        b'"quoted"' + MARKER.encode(),
        b"<script>" + MARKER.encode(),
        MARKER.encode() + b" with spaces",
        MARKER.encode() + b"\xc3\xa9",
        MARKER.encode() + b"%0d%0aSet-Cookie:%20a=b",
    ],
)
def test_hostile_request_ids_get_a_fresh_id_and_are_never_echoed_or_logged(
    server: UvicornProcess, value: bytes
) -> None:
    """A request ID outside the contract's pattern is replaced, and the raw value goes nowhere."""
    response = send_raw(
        server, b"GET /nowhere HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + value + b"\r\nConnection: close\r\n\r\n"
    )
    assert status_of(response) == 404
    returned = header(response, b"x-request-id")
    assert returned is not None
    assert uuid.UUID(returned.decode()).version == 4
    assert value not in response
    assert value.decode(errors="replace") not in server.output()
    assert MARKER.encode() not in response


def test_whitespace_around_the_request_id_and_traceparent_is_not_part_of_them(server: UvicornProcess) -> None:
    """RFC 9110 trims a field value; httptools keeps trailing blanks, so the service trims them itself."""
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = send_raw(
        server,
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nX-Request-ID: \t spaced-id \t\r\n"
        b"traceparent:  00-" + trace.encode() + b"-00f067aa0ba902b7-01  \r\nConnection: close\r\n\r\n",
    )
    assert header(response, b"x-request-id") == b"spaced-id"
    deadline = time.monotonic() + 5
    while '"request_id":"spaced-id"' not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)  # the log writer's thread writes it
    [line] = [json.loads(x) for x in server.output().splitlines() if '"request_id":"spaced-id"' in x]
    assert (line["status"], line["trace_id"]) == (404, trace)


def test_header_injection_through_crlf_cannot_add_response_headers(server: UvicornProcess) -> None:
    """CR/LF splits a request header into two on the wire; neither ends up in our response."""
    payload = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-ID: ok-id\r\nSet-Cookie: injected=1\r\nConnection: close\r\n\r\n"
    )
    response = send_raw(server, payload)
    assert status_of(response) == 200
    assert header(response, b"set-cookie") is None
    assert header(response, b"x-request-id") == b"ok-id"
    bare_cr = send_raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\rInjected: 1\r\n\r\n")
    assert status_of(bare_cr) == 400
    assert b"Injected" not in bare_cr
    assert_still_serving(server)


def test_a_client_that_disconnects_mid_request_does_not_hurt_the_server(server: UvicornProcess) -> None:
    """Half a request, then gone: the next client is served normally."""
    for partial in (b"GET /health HTTP/1.1\r\nHo", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(partial)
    assert_still_serving(server)


def test_no_response_was_a_500(server: UvicornProcess) -> None:
    """After everything above, the access log holds no 5xx."""
    statuses = [line for line in server.output().splitlines() if '"service.access"' in line and '"status":5' in line]
    assert statuses == []
