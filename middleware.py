"""The service's middleware, outermost first, each pure ASGI:

RequestContext       the per-request work, in one place: request ID, security and `Vary`
                     headers, one access line and the metrics of every request
CORS                 Starlette's CORS, a refused preflight answered by the error envelope
errors.ServerErrorMiddleware   an unhandled exception becomes the 500 envelope
BodyLimit            MAX_BODY_BYTES: a larger body is refused, never read past the limit
HotPaths             probes straight to their endpoints, certain 404s without the router
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from errors import MESSAGES, PayloadTooLargeError, error_response, not_found
from logs import REQUEST_ID, TRACE_ID, log_access

REQUEST_ID_HEADER = b"x-request-id"
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_NOSNIFF = (b"x-content-type-options", b"nosniff")
# W3C Trace Context, version 00: the trace ID (not all zeros) and the parent ID (not all zeros).
_TRACEPARENT = re.compile(rb"00-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_VARY_ORIGIN = (b"vary", b"Origin")
# Masks that turn 128 random bits into a version-4, RFC 9562-variant UUID.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


class RequestContext:
    """Outermost, so that every response (CORS preflights, 500s) carries the ID and is logged once.

    The request ID is the caller's `X-Request-ID` when it is well formed, else a new UUID; a
    valid W3C `traceparent` puts its trace ID on every log line of the request. A
    request without `Origin` gets `Vary: Origin` here: Starlette's CORS layer sends nothing to
    those, and a cache must not serve their answer to a cross-origin caller.
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
        incoming = None
        has_origin = False
        trace_id = None
        for name, value in scope["headers"]:  # one pass over the headers for every question
            if name == REQUEST_ID_HEADER:
                incoming = value if _VALID_REQUEST_ID.fullmatch(value) else None
            elif name == b"origin":
                has_origin = True
            elif name == b"traceparent" and (trace := _TRACEPARENT.fullmatch(value)):
                trace_id = trace[1].decode()
        request_id = incoming.decode() if incoming else new_request_id()
        own_headers = [(REQUEST_ID_HEADER, incoming or request_id.encode()), _NOSNIFF]
        token = REQUEST_ID.set(request_id)
        trace_token = TRACE_ID.set(trace_id)
        status = 500

        async def send_with_context(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), *own_headers]
                message = {**message, "headers": headers}
                if not has_origin:
                    _vary_on_origin(message, headers)
            await send(message)

        try:
            await self.app(scope, receive, send_with_context)
        finally:
            seconds = time.perf_counter() - started
            if self.observe is not None:
                self.observe(scope, status, seconds)
            if not (self.quiet_health and status < 400 and scope["path"].startswith("/health")):
                log_access(scope, status, seconds, request_id)
            REQUEST_ID.reset(token)
            TRACE_ID.reset(trace_token)


def new_request_id() -> str:
    """A random (version 4) UUID, as `str(uuid.uuid4())` but without building a `uuid.UUID`.

    From `random`, not `os.urandom`: a request ID names a request, it guards nothing, and a
    system call per request cost more than the rest of this function (the generator is
    reseeded in every forked worker).
    """
    bits = random.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET
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
        if scope["type"] == "http" and not any(name == b"origin" for name, _ in scope["headers"]):
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
        length = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = int(value) if value.isdigit() else None
            elif name == b"transfer-encoding":
                chunked = True
        if length is not None and length > self.max_bytes:
            refused = error_response(413, "PAYLOAD_TOO_LARGE", _too_large(self.max_bytes), headers=_CLOSE)
            await refused(scope, receive, send)
            return
        await self.app(scope, self._counting(receive) if chunked else receive, send)

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


class HotPaths:
    """The two commonest requests skip Starlette's router: probes, and paths nothing serves.

    - `GET`/`HEAD` of the exact probe paths go straight to their endpoints. Orchestrators call
      them more than anything else; the router would try every route before theirs.
    - A path that no route's pattern matches, with or without a trailing slash, is certain to be a
      404: it gets `errors.not_found`, the router's own answer, from one match against all the
      route patterns at once instead of the router's two passes over every route (the second for
      the slash redirect). Scanners and typos make this the commonest error.

    Everything else (other methods, near-misses, a `root_path`) goes on to the router, which
    answers 405s, redirects and the rest as before. Like the router, it leaves the route it
    chose in `scope["route"]` (metrics label by it).
    """

    def __init__(self, app: ASGIApp, *, probes: list[Route]) -> None:
        self.app = app
        self.probes = {route.path: route for route in probes}
        self._routes_seen = -1
        self._any_route: re.Pattern[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            path: str = scope["path"]
            route = self.probes.get(path)
            if route is not None and scope["method"] in ("GET", "HEAD"):
                scope["route"] = route
                await route.app(scope, receive, send)
                return
            if self._unrouted(scope["app"].routes, path):
                await not_found(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _unrouted(self, routes: list[BaseRoute], path: str) -> bool:
        """True only when the router would certainly answer 404 (no redirect either)."""
        if len(routes) != self._routes_seen:  # read from the live router: a route added late is seen
            self._routes_seen = len(routes)
            self._any_route = _any_of(routes)
        if self._any_route is None:
            return False
        other = path[:-1] if path.endswith("/") else path + "/"
        return self._any_route.match(path) is None and self._any_route.match(other) is None


def _any_of(routes: list[BaseRoute]) -> re.Pattern[str] | None:
    """One pattern matching every path some route matches; None when a route is of another kind."""
    if not all(isinstance(route, Route | Mount) for route in routes):
        return None
    patterns = [route.path_regex.pattern for route in routes]  # type: ignore[attr-defined]
    anonymous = [re.sub(r"\(\?P<\w+>", "(?:", p) for p in patterns]  # a group name may repeat across routes
    return re.compile("|".join(f"(?:{p})" for p in anonymous))
