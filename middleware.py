"""The service's middleware, outermost first, each pure ASGI:

  RequestContext   the per-request work, in one place: reads the headers once (request ID,
                   trace, origin, body length), adds the response's own headers, writes the
                   access line and the metrics of every request
  CORS             Starlette's CORS for requests with an `Origin`; a refused preflight is the envelope
  ServerErrors     an unhandled exception becomes the 500 envelope, inside CORS and the request ID
  BodyLimit        MAX_BODY_BYTES: a larger body is refused, never read past the limit
  routing.HotPaths probes straight to their endpoints, certain 404s without the router

The layers below `RequestContext` find what it read in `EXCHANGE` rather than reading the
headers again or wrapping `send` once more.
"""

from __future__ import annotations

import logging
import os
import re
import time
import traceback
from collections.abc import Callable
from contextvars import ContextVar

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from errors import MESSAGES, PayloadTooLargeError, error_response
from logs import REQUEST_ID, TRACE_ID, log_access

logger = logging.getLogger("service.errors")
REQUEST_ID_HEADER = b"x-request-id"
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_NOSNIFF = (b"x-content-type-options", b"nosniff")
# W3C Trace Context, version 00: the trace ID (not all zeros) and the parent ID (not all zeros).
_TRACEPARENT = re.compile(rb"00-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_VARY_ORIGIN = (b"vary", b"Origin")
_READ = frozenset({REQUEST_ID_HEADER, b"traceparent", b"origin", b"content-length", b"transfer-encoding"})
# Masks that turn 128 random bits into a version-4, RFC 9562-variant UUID.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


class Exchange:
    """One request as the layers see it: what its headers said, and the status once it is sent."""

    __slots__ = ("body_length", "chunked", "has_origin", "status")

    def __init__(self) -> None:
        self.has_origin = False
        self.body_length: int | None = None
        self.chunked = False
        self.status = 0  # 0 until the response has started


EXCHANGE: ContextVar[Exchange] = ContextVar("exchange")


class RequestContext:
    """Outermost, so that every response (CORS preflights, 500s) carries the ID and is logged once.

    The request ID is the caller's `X-Request-ID` when it is well formed, else a new UUID; a
    valid W3C `traceparent` puts its trace ID on every log line of the request. A request
    without `Origin` gets `Vary: Origin` here: `CORS` lets those pass untouched, and a cache
    must not serve their answer to a cross-origin caller.
    """

    def __init__(
        self, app: ASGIApp, *, quiet_health: bool, observe: Callable[[Scope, int, float], None] | None = None
    ) -> None:
        self.app = app
        # In production, probes succeed thousands of times a day; only their failures are news.
        self.quiet_health = quiet_health
        self.observe = observe  # metrics, told (scope, status, seconds) of every request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        exchange = Exchange()
        incoming = trace_id = None
        for name, value in scope["headers"]:  # the one pass over the headers, for every layer
            if name not in _READ:
                continue
            if name == REQUEST_ID_HEADER:
                incoming = value if _VALID_REQUEST_ID.fullmatch(value) else None
            elif name == b"origin":
                exchange.has_origin = True
            elif name == b"traceparent" and (trace := _TRACEPARENT.fullmatch(value)):
                trace_id = trace[1].decode()
            elif name == b"content-length":
                exchange.body_length = int(value) if value.isdigit() else None
            elif name == b"transfer-encoding":
                exchange.chunked = True
        request_id = incoming.decode() if incoming else new_request_id()
        own_headers = [(REQUEST_ID_HEADER, incoming or request_id.encode()), _NOSNIFF]
        tokens = (EXCHANGE.set(exchange), REQUEST_ID.set(request_id), TRACE_ID.set(trace_id))

        async def send_with_context(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                headers = message.setdefault("headers", [])  # in place, as Starlette's own layers do
                if not isinstance(headers, list):
                    headers = message["headers"] = list(headers)
                headers += own_headers
                if not exchange.has_origin:
                    _vary_on_origin(message, headers)
            await send(message)

        try:
            await self.app(scope, receive, send_with_context)
        finally:
            seconds = time.perf_counter() - started
            status = exchange.status or 500  # no response at all: the server answers 500
            if self.observe is not None:
                self.observe(scope, status, seconds)
            if not (self.quiet_health and status < 400 and scope["path"].startswith("/health")):
                log_access(scope, status, seconds, request_id)
            EXCHANGE.reset(tokens[0])
            REQUEST_ID.reset(tokens[1])
            TRACE_ID.reset(tokens[2])


def new_request_id() -> str:
    """A random (version 4) UUID, as `str(uuid.uuid4())` but without building a `uuid.UUID`."""
    bits = int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET
    text = bits.to_bytes(16).hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _vary_on_origin(message: Message, headers: list[tuple[bytes, bytes]]) -> None:
    for name, _ in headers:
        if name == b"vary":  # rare: join it as Starlette does (ASGI header names are lowercase)
            vary = MutableHeaders(scope=message)
            vary["Vary"] = ", ".join([*vary.getlist("Vary"), "Origin"])
            return
    headers.append(_VARY_ORIGIN)


class CORS(CORSMiddleware):
    """Starlette's CORS for requests with an `Origin`, a refused preflight answered by the envelope.

    Requests without one (probes, servers, curl) go straight on: all Starlette would add to
    them is `Vary: Origin`, which `RequestContext` adds without building header objects.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not EXCHANGE.get().has_origin:
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = bytes(response.body).decode()  # e.g. "Disallowed CORS origin, method"
        headers = {k: v for k, v in response.headers.items() if k.startswith("access-control-") or k == "vary"}
        return error_response(400, "VALIDATION_ERROR", reason, headers=headers)


class ServerErrors:
    """Turns an unhandled exception into the 500 envelope *inside* the middleware stack.

    Starlette answers unhandled exceptions outside every user middleware, which would lose
    the request ID and CORS headers; this sits inside them so a 500 keeps both. Whether the
    response had already started, the exchange says (no `send` wrapper of its own).
    """

    def __init__(self, app: ASGIApp, *, debug: bool) -> None:
        self.app = app
        self.debug = debug

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:  # the boundary: anything a handler did not expect becomes a 500
            if scope["type"] != "http":
                raise
            logger.exception("Unhandled exception in %s %s", scope["method"], scope["path"])
            if EXCHANGE.get().status:
                raise  # too late for a response of our own; the server closes the connection
            detail = None
            if self.debug:
                detail = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
            await error_response(500, "INTERNAL_SERVER_ERROR", MESSAGES[500], debug_detail=detail)(scope, receive, send)


class BodyLimit:
    """A body larger than `max_bytes` is refused with the 413 envelope, without reading past the limit.

    At once when `Content-Length` says so (the server never delivers more than it declares);
    a chunked body is counted as it arrives, and the handler reading it gets `PayloadTooLargeError`
    as soon as the limit is crossed. Requests without a body pass untouched.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = EXCHANGE.get()
        if exchange.body_length is not None and exchange.body_length > self.max_bytes:
            refused = error_response(413, "PAYLOAD_TOO_LARGE", _too_large(self.max_bytes), headers=_CLOSE)
            await refused(scope, receive, send)
            return
        await self.app(scope, self._counting(receive) if exchange.chunked else receive, send)

    def _counting(self, receive: Receive) -> Receive:
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise PayloadTooLargeError(_too_large(self.max_bytes), headers=_CLOSE)
            return message

        return receive_within_limit


_CLOSE = {"Connection": "close"}  # the rest of a refused body is never read: the connection cannot be reused


def _too_large(limit: int) -> str:
    return f"{MESSAGES[413]}: the limit is {limit} bytes"
