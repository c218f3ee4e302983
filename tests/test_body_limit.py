"""MAX_BODY_BYTES: a larger body is the 413 envelope, refused without reading past the limit."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
from service import SERVER_COMMANDS, make_settings, running_uvicorn, serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from test_metrics import value

from api import Endpoints, WithHeaders
from app import create_app
from metrics import UNMATCHED

LIMIT = 1000


class Size(msgspec.Struct):
    size: int


class Blob(msgspec.Struct):
    data: str


sized = Endpoints(tag="test")


@sized.post("/blobs", summary="Test only: how large the body was")
async def measure(body: Blob) -> Size:
    return Size(len(body.data))


@sized.get("/varied", summary="Test only: a Vary of its own, and the body never read")
async def varied() -> WithHeaders[Size]:
    return WithHeaders(Size(0), {"Vary": "Accept-Encoding"})


def limited_app() -> Starlette:
    return create_app(make_settings(MAX_BODY_BYTES=str(LIMIT)), endpoints=[sized])


def assert_413(response: httpx.Response) -> None:
    body = response.json()
    assert response.status_code == 413
    assert body["error"] == "PAYLOAD_TOO_LARGE"
    assert body["message"] == f"Request body too large: the limit is {LIMIT} bytes"
    assert body["request_id"] == response.headers["x-request-id"]
    assert response.headers["connection"] == "close"


@pytest.mark.anyio
async def test_a_body_within_the_limit_is_served() -> None:
    data = "x" * (LIMIT - len('{"data":""}'))
    async with serve(limited_app()) as client:
        response = await client.post("/blobs", json={"data": data})
    assert (response.status_code, response.json()) == (200, {"size": len(data)})


@pytest.mark.anyio
async def test_content_length_over_the_limit_is_refused_before_the_handler() -> None:
    """Refused before routing, and counted in the metrics by the route it was for all the same."""
    async with serve(limited_app()) as client:
        response = await client.post("/blobs", content=b"{" + b" " * LIMIT + b"}")
        assert_413(response)
        assert_413(await client.put("/blobs", content=b" " * (LIMIT + 1)))  # the route's 405, had it been read
        assert_413(await client.post("/nothing-here", content=b" " * (LIMIT + 1)))
        text = (await client.get("/metrics")).text
    assert value(text, "http_requests_total", method="POST", route="/blobs", status="413") == 1
    assert value(text, "http_requests_total", method="PUT", route="/blobs", status="413") == 1
    assert value(text, "http_requests_total", method="POST", route=UNMATCHED, status="413") == 1


@pytest.mark.anyio
async def test_a_preflight_with_a_body_over_the_limit_is_the_413_with_its_cors_headers() -> None:
    """A body over the limit on a CORS preflight is refused like any other, not answered as the preflight
    (a 200 after which the server would read the whole body to reach the next request)."""
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    async with serve(limited_app()) as client:
        response = await client.request("OPTIONS", "/blobs", headers=preflight, content=b" " * (LIMIT + 1))
        served = await client.options("/blobs", headers=preflight)
    assert_413(response)
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert (served.status_code, served.headers["access-control-allow-methods"].count("POST")) == (200, 1)


@pytest.mark.anyio
async def test_a_413_under_a_mount_is_counted_under_the_route_inside_it() -> None:
    """As the router labels what it serves under a Mount: the inner route's template, one series for both."""

    async def thing(request: Request) -> Response:
        return Response(status_code=204)

    app = limited_app()
    app.router.routes.append(Mount("/v2", routes=[Route("/things/{id}", thing, methods=["POST"])]))
    async with serve(app) as client:
        served = await client.post("/v2/things/1", content=b"{}")
        refused = await client.post("/v2/things/1", content=b" " * (LIMIT + 1))
        text = (await client.get("/metrics")).text
    assert (served.status_code, refused.status_code) == (204, 413)
    assert value(text, "http_requests_total", method="POST", route="/things/{id}", status="204") == 1
    assert value(text, "http_requests_total", method="POST", route="/things/{id}", status="413") == 1


@pytest.mark.anyio
async def test_a_chunked_body_is_refused_as_soon_as_it_crosses_the_limit() -> None:
    """The handler's read stops at the chunk that crosses the limit: the rest is never pulled."""
    pulled = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield b" " * 400

    async with serve(limited_app()) as client:
        response = await client.post("/blobs", content=chunks())
    assert_413(response)
    assert pulled <= 4  # 3 chunks cross 1,000 bytes; httpx may read one ahead


@pytest.mark.anyio
@pytest.mark.parametrize("order", ["chunked first", "length first"])
async def test_a_chunked_body_with_a_length_too_is_counted_whichever_line_comes_first(order: str) -> None:
    """`Transfer-Encoding: chunked` overrides `Content-Length` (RFC 9112 6.3): a small length after it
    left the chunked body uncounted, and the handler read it whole (h11 accepts both lines)."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 400

    lines = [("Transfer-Encoding", "chunked"), ("Content-Length", "10")]
    headers = lines if order == "chunked first" else lines[::-1]
    async with serve(limited_app()) as client:
        response = await client.post("/blobs", content=chunks(), headers=headers)
    assert_413(response)


@pytest.mark.anyio
async def test_a_chunked_body_left_unread_closes_the_connection_when_the_answer_has_a_vary_of_its_own() -> None:
    """Joining `Vary: Origin` into the answer's own `Vary` put its headers in a new list, and the
    `Connection: close` went to the old one, unsent."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b" " * 400

    async with serve(limited_app()) as client:
        response = await client.request("GET", "/varied", content=chunks())
    assert response.status_code == 200
    assert response.headers["vary"] == "Accept-Encoding, Origin"
    assert response.headers["connection"] == "close"


@pytest.mark.slow
def test_uvicorn_refuses_a_declared_oversized_body_without_waiting_for_it() -> None:
    """Under `uvicorn app:app`, a Content-Length over the limit is answered before any body byte is sent."""
    with (
        running_uvicorn({"MAX_BODY_BYTES": str(LIMIT)}) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock,
    ):
        head = f"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {100 * 2**20}\r\n\r\n"
        started = time.monotonic()
        sock.sendall(head.encode())
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        elapsed = time.monotonic() - started
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"
    assert b'"error":"PAYLOAD_TOO_LARGE"' in rest
    assert elapsed < 5


@pytest.mark.parametrize("command", SERVER_COMMANDS)
def test_blanks_after_a_declared_length_do_not_hide_it(command: str) -> None:
    """httptools keeps `Content-Length: 200017 `'s trailing blank; read as no length, the body went uncounted."""
    with running_uvicorn({"MAX_BODY_BYTES": str(LIMIT)}, command=command) as server:
        for blanks in (b" ", b"\t", b" \t "):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 200017" + blanks + b"\r\n\r\n")
                received = b""
                while not received.rstrip().endswith(b"}") and (chunk := sock.recv(65536)):
                    received += chunk
            assert received.startswith(b"HTTP/1.1 413 "), (blanks, received[:80])
            assert b'"error":"PAYLOAD_TOO_LARGE"' in received


@pytest.mark.parametrize("command", SERVER_COMMANDS)
def test_a_chunked_body_its_route_never_reads_closes_the_connection_after_the_answer(command: str) -> None:
    """The server would read and drop the rest to reach the next request, without any bound: the answer
    says `Connection: close` instead, and nothing sent after it is served."""
    with (
        running_uvicorn({"MAX_BODY_BYTES": str(LIMIT)}, command=command) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock,
    ):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"400\r\n" + b"a" * 1024 + b"\r\n")
        received = b""
        with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread: a reset, after the answer
            while chunk := sock.recv(65536):
                received += chunk
                if received.endswith(b"}"):  # the rest of the body, and a request after it
                    sock.sendall(b"400\r\n" + b"a" * 1024 + b"\r\n0\r\n\r\nGET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    head = received.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200 ")
    assert b"connection: close" in head.split(b"\r\n")
    assert received.count(b"HTTP/1.1 ") == 1
