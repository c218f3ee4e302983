"""The service's request layer, pure ASGI, and the CORS it puts in front of requests with an `Origin`.

  RequestContext   every request, in one place: reads the headers once (request ID, trace,
                   origin, body length), refuses bodies over MAX_BODY_BYTES, sends requests
                   with an `Origin` through CORS, answers every exception with the envelope,
                   adds the response's own headers, writes the access line and the metrics
  CORS             Starlette's CORS; a refused preflight is the envelope

Below it: the user's own middleware (`app.add_middleware`), `routing.HotPaths` (probes and
certain 404s without the router), and the router.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, ExceptionHandler, Message, Receive, Scope, Send

from access import log_access, loggable_path
from errors import (
    EXCEPTION_HANDLERS,
    MESSAGES,
    SHUTTING_DOWN,
    UNREADABLE_BODY,
    MalformedRequestError,
    PayloadTooLargeError,
    error_response,
    handler_for,
    server_error,
)
from logs import REQUEST, mark_logged
from routing import route_for

logger = logging.getLogger("service.errors")
REQUEST_ID_HEADER = b"x-request-id"
VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_NOSNIFF = (b"x-content-type-options", b"nosniff")
# What the access line and the metrics say of a request whose client left before its body was
# read (nginx's status for it): not a 500, which would page someone for a client's dropped connection.
CLIENT_CLOSED_REQUEST = 499
# W3C Trace Context, version 00: the trace ID (not all zeros) and the parent ID (not all zeros).
_TRACEPARENT = re.compile(rb"00-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_VARY_ORIGIN = (b"vary", b"Origin")
_READ = frozenset({REQUEST_ID_HEADER, b"traceparent", b"origin", b"content-length", b"transfer-encoding"})
# Masks that turn 128 random bits into a version-4, RFC 9562-variant UUID.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


class RequestContext:
    """The service's one request layer: every response passes through it, 500s and refusals included.

    Per request, in one place: the headers are read once (request ID, trace, origin, body
    length); a body over `max_body_bytes` is refused (413), and one of no readable length
    (chunked) is counted as it arrives; the request goes to CORS only when it has an `Origin`;
    any exception becomes the envelope, by the app's exception handlers (`errors.handler_for`)
    or as a 500; the response gets the request ID, `nosniff` and (when a cache may store it)
    `Vary: Origin`; the access line and the metrics are written (status 499 for a client that
    left before its body was read).

    The request ID is the caller's `X-Request-ID` when it is well formed, else a new UUID; a
    valid W3C `traceparent` puts its trace ID on every log line of the request.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        quiet: Collection[BaseRoute] = (),
        observe: Callable[[Scope, int, float], None] | None = None,
        cors: Callable[[ASGIApp], CORS] | None = None,
        max_body_bytes: int | None = None,
        handlers: Mapping[Any, ExceptionHandler] = EXCEPTION_HANDLERS,
        debug: Callable[[str], str] | None = None,
    ) -> None:
        self.app = app
        # Routes whose successes are not logged: in production, the probes, which succeed thousands
        # of times a day; only their failures are news. By identity (the route routing chose), so
        # `/healthcare` is logged like any route; ids, as a route's `==` is Python code.
        self.quiet = frozenset(map(id, quiet))
        self.observe = observe  # metrics, told (scope, status, seconds) of every request
        self.cors = cors  # makes an app answer with CORS headers (`CORS` with the service's options)
        self.with_origin = cors(app) if cors is not None else app  # where requests with an `Origin` go
        self.max_body_bytes = max_body_bytes
        self.handlers = handlers  # read at each error: a handler added after start-up is used
        self.debug = debug  # with DEBUG: what masks the secrets in a 500's detail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = trace_id = body_length = None
        has_origin = uncounted = False
        for name, value in scope["headers"]:  # the one pass over the headers
            if name not in _READ:
                continue
            # A field value's surrounding whitespace is not part of it (RFC 9110), and httptools keeps it.
            if name == REQUEST_ID_HEADER:
                incoming = valid_request_id(value)
            elif name == b"origin":
                has_origin = True
            elif name == b"traceparent" and (trace := _TRACEPARENT.fullmatch(value.strip(b" \t"))):
                trace_id = trace[1].decode()
            elif name == b"content-length":
                value = value.strip(b" \t")
                body_length = int(value) if value.isdigit() else None
                # A length we cannot read: the body is counted as it arrives, as is any chunked one.
                uncounted = uncounted or body_length is None
            elif name == b"transfer-encoding":
                uncounted = True
        request_id = incoming.decode() if incoming else new_request_id()
        own_headers = [(REQUEST_ID_HEADER, incoming or request_id.encode()), _NOSNIFF]
        token = REQUEST.set((request_id, trace_id))
        status = 0  # until the response starts
        counted: _CountedBody | None = None  # a body of no declared length, counted as the app reads it

        def send_with_context(message: Message) -> Awaitable[None]:
            # A plain function handing back the server's own awaitable: no coroutine of its own.
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])  # in place, as Starlette's own layers do
                if not isinstance(headers, list):
                    headers = message["headers"] = list(headers)
                headers += own_headers
                if not has_origin:  # CORS adds it to the others
                    headers = _vary_on_origin(message, headers)
                if counted is not None and not counted.complete:  # the server would read the rest, unbounded
                    headers.append(_CONNECTION_CLOSE)
            return send(message)

        try:
            if self.max_body_bytes is not None:
                if body_length is not None and body_length > self.max_body_bytes:
                    raise PayloadTooLargeError(_too_large(self.max_body_bytes), headers=_CLOSE)
                if uncounted:
                    receive = counted = _CountedBody(receive, self.max_body_bytes, scope)
            await (self.with_origin if has_origin else self.app)(scope, receive, send_with_context)
        except ClientDisconnect:  # gone while sending its body: nobody to answer, and no fault of ours
            status = status or CLIENT_CLOSED_REQUEST
        except (Exception, asyncio.CancelledError) as exc:  # the boundary: every error is answered with the envelope
            # This request's own task cancelled is the server giving up on it at shutdown; a
            # cancellation from something the handler awaited is the handler's bug, like any other.
            shutdown = isinstance(exc, asyncio.CancelledError) and _being_cancelled()
            if status:
                if not shutdown:
                    logger.exception("Unhandled exception in %s %s", scope["method"], loggable_path(scope["path"]))
                    mark_logged(exc)  # the server reports it too, without the request's ID
                raise  # too late for a response of our own; the server closes the connection
            if shutdown:  # the envelope, not the server's plain-text 500: the client may retry elsewhere
                response: ASGIApp = error_response(503, "SERVICE_UNAVAILABLE", SHUTTING_DOWN, headers=_CLOSE)
            else:
                try:
                    response = await self._error_response(scope, receive, exc)
                except Exception:  # a handler that fails, or an envelope that cannot be encoded: still ours
                    logger.exception(
                        "The error response to %s %s failed", scope["method"], loggable_path(scope["path"])
                    )
                    response = server_error(exc, debug=self.debug)
            if has_origin and self.cors is not None:  # a browser reads an error only with its CORS headers
                response = self.cors(response).with_headers
            await response(scope, receive, send_with_context)
        finally:
            seconds = time.perf_counter() - started
            status = status or 500  # no response at all: the server answers 500
            if self.observe is not None:
                if "route" not in scope:  # answered before routing (a 413, the user's middleware, a preflight)
                    scope["route"] = route_for(scope)  # counted by the route it was for all the same
                self.observe(scope, status, seconds)
            if not (status < 400 and id(scope.get("route")) in self.quiet):
                log_access(scope, status, seconds, request_id)
            REQUEST.reset(token)

    async def _error_response(self, scope: Scope, receive: Receive, exc: BaseException) -> ASGIApp:
        """The envelope for `exc`: its handler's answer; an unhandled one is logged with its traceback
        and answered by the handler registered for 500, as in Starlette, else by our 500."""
        handler = handler_for(self.handlers, exc)
        if handler is None:
            logger.exception("Unhandled exception in %s %s", scope["method"], loggable_path(scope["path"]))
            handler = self.handlers.get(500)
            if handler is None:
                return server_error(exc, debug=self.debug)
        response = handler(Request(scope, receive), exc)  # type: ignore[arg-type]  # http: never a WebSocket one
        answer = await response if inspect.isawaitable(response) else response
        return answer or server_error(exc, debug=self.debug)  # a handler that returned nothing


def _being_cancelled() -> bool:
    """Whether the running task itself has been asked to stop (not merely handed a CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def valid_request_id(value: bytes) -> bytes | None:
    """An `X-Request-ID` value, if well formed: what the service reuses rather than making its own."""
    value = value.strip(b" \t")  # a field value's surrounding whitespace is not part of it (RFC 9110)
    return value if VALID_REQUEST_ID.fullmatch(value) else None


def incoming_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The caller's `X-Request-ID` among `headers` as the request layer reads it (the last such line,
    if well formed): what a refusal before the app reuses."""
    incoming = None
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            incoming = valid_request_id(value)
    return incoming.decode() if incoming else None


def new_request_id() -> str:
    """A random (version 4) UUID, as `str(uuid.uuid4())` but without building a `uuid.UUID`.

    From `random`, not `os.urandom`: a request ID names a request, it guards nothing, and
    `os.urandom` lets go of the interpreter lock for its system call, where the log writer
    thread takes it: measured, a request with an access line paid for that (bench/README.md).
    `random` reseeds itself in every forked worker, so workers never share a sequence.
    """
    raw = (random.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET).to_bytes(16)
    return f"{raw[:4].hex()}-{raw[4:10].hex('-', 2)}-{raw[10:].hex()}"  # 8-4-4-4-12 digits: 4, 2+2+2, 6 bytes


def _vary_on_origin(message: Message, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`Vary: Origin` on a response to a request without one, unless no cache may store it; returns
    the message's headers, a new list when an existing `Vary` was joined.

    `Vary` tells caches which request headers select a stored response: a cache that stored
    this answer must not hand it to a request with an `Origin`, which gets CORS headers. A
    `no-store` response (the probes, `/metrics`) is never stored, so it goes without.
    """
    vary = False
    for name, value in headers:  # ASGI header names are lowercase
        # `find`, not `in`: bytes' `in` first tries its operand as an integer, at twice the cost.
        if name == b"cache-control" and value.lower().find(b"no-store") >= 0:
            return headers
        vary = vary or name == b"vary"
    if not vary:
        headers.append(_VARY_ORIGIN)
        return headers
    joined = MutableHeaders(scope=message)  # rare: join it as Starlette does (into a copy of the list)
    joined["Vary"] = ", ".join([*joined.getlist("Vary"), "Origin"])
    return joined.raw  # the list now in the message


class CORS(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered by the envelope.

    `RequestContext` sends it only the requests with an `Origin`: all Starlette would add to
    the others (probes, servers, curl) is `Vary: Origin`, which the request layer adds itself.
    """

    async def with_headers(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The wrapped app's answer with the CORS headers of a simple request, even to a preflight.

        For an error answered on a request's behalf: refused on a preflight's way (a body over the
        limit), the refusal is the answer, never swapped for the preflight's 200, after which the
        server would read the whole body to reach the next request.
        """
        await self.simple_response(scope, receive, send, request_headers=Headers(scope=scope))

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = bytes(response.body).decode()  # e.g. "Disallowed CORS origin, method"
        headers = {k: v for k, v in response.headers.items() if k.startswith("access-control-") or k == "vary"}
        return error_response(400, "VALIDATION_ERROR", reason, headers=headers)


class _CountedBody:
    """`receive` for a body of no declared length (chunked): `PayloadTooLargeError` as soon as more
    than `limit` bytes arrived, `MalformedRequestError` once the server found it cannot be read
    (`errors.UNREADABLE_BODY`), and `complete` once the last of it has arrived.

    A response that starts before the body was read to its end closes the connection: the
    server would otherwise read and drop the rest to reach the next request, however long it is.
    """

    __slots__ = ("complete", "limit", "receive", "received", "scope")

    def __init__(self, receive: Receive, limit: int, scope: Scope) -> None:
        self.receive = receive
        self.limit = limit
        self.scope = scope
        self.received = 0
        self.complete = False

    async def __call__(self) -> Message:
        message = await self.receive()
        if (unreadable := self.scope.get(UNREADABLE_BODY)) is not None:
            raise MalformedRequestError(unreadable)
        self.received += len(message.get("body", b""))
        if self.received > self.limit:  # its response closes the connection: the body is not complete
            raise PayloadTooLargeError(_too_large(self.limit))
        self.complete = not message.get("more_body", False)  # a disconnect ends it too
        return message


_CLOSE = {"Connection": "close"}  # the rest of a refused body is never read: the connection cannot be reused
_CONNECTION_CLOSE = (b"connection", b"close")


def _too_large(limit: int) -> str:
    return f"{MESSAGES[413]}: the limit is {limit} bytes"
