"""Endpoints: how a module adds routes to the service, with typed input and their OpenAPI operation.

A module declares a group, decorates its handlers, and hands the group to `create_app`:

    items = Endpoints(tag="items")

    @items.get("/items/{item_id}", summary="One item", errors=(404,))
    async def get_item(ctx: Context, item_id: uuid.UUID) -> Item: ...

    app = create_app(endpoints=[items])

A handler's parameters say what it takes; each is decoded before it runs by a decoder built once,
at start-up:
  - annotated `Context`: the request, the settings, the database and the caller (`ctx.user`);
  - named like a `{segment}` of the path: that segment, converted to its annotation (UUID, int, str);
  - `query: SomeStruct`: the query string, one parameter per field (bounds from `msgspec.Meta`);
  - `headers: SomeStruct`: request headers, one per field (`If-Match`), matched without regard to case;
  - `body: SomeStruct`: the JSON body (not JSON: 400; wrong shape, unknown field: 422);
  - `user`, in a group with a `Guard`: the caller its check returned, typed by the annotation.
Its return annotation says what it answers: a Struct (200), `WithHeaders[Struct]` (200 with headers
of its own: `ETag`, `Cache-Control`; a GET whose `If-None-Match` names its `ETag` gets 304 and no
body), `Created[Struct]` (201 and `Location`), or `None` (204). The
route's OpenAPI operation is derived from the same declarations, so no endpoint can go undocumented.
A group made with `guard=Guard(...)` (guard.py) lets in only the callers its check accepts (`ctx.user`).
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Generic, TypedDict, TypeVar
from urllib.parse import quote

import msgspec
from starlette.convertors import PathConvertor, StringConvertor
from starlette.requests import Request
from starlette.routing import Route, compile_path
from starlette.types import Receive, Scope, Send

from db import NOT_CONFIGURED, Connection, Database
from errors import DatabaseConnectionError
from guard import Guard
from inputs import Binder, body_binder, headers_binder, path_binder, query_binder, struct_params
from metrics import Metrics
from openapi import Operation, Param, Reply, type_schema
from responses import ENCODER, JSON_HEADERS, send_bytes
from settings import Settings

T = TypeVar("T")
Handler = Callable[..., Awaitable[Any]]
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_ERROR_STATUSES = frozenset(status.value for status in HTTPStatus if 400 <= status.value <= 599)


class State(TypedDict):
    """What the lifespan hands to every request as `scope["state"]`."""

    database: Database | None
    started_at: float
    shutting_down: bool  # set by the production server (server.py) when SIGTERM starts its drain
    metrics: Metrics | None  # where the production server counts the requests it refuses itself (edge.py)


@dataclass(frozen=True, slots=True)
class Created(Generic[T]):
    """A handler's answer for a new resource: `201`, the body, and its `Location`.

    `location` is the new resource's path in the app (`/items/<id>`): served under a prefix
    (`root_path`), the response gives the client the prefixed path. A full URL is sent as it is.
    `headers` are the handler's own (the new version's `ETag`), under `WithHeaders`' rules.
    """

    body: T
    location: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WithHeaders(Generic[T]):
    """A handler's `200` with response headers of its own: `ETag`, `Cache-Control`, `Last-Modified`...

    The headers the service or the server writes (`Content-Type`, `Content-Length`,
    `Content-Encoding`, `X-Request-ID`, `X-Content-Type-Options`, `Date`, `Server`, CORS's
    `Access-Control-*`), the connection's (`Connection`, `Transfer-Encoding`, `Keep-Alive`...),
    one name given twice in two cases, and a name or value holding a line break cannot be
    given: each is the handler's bug, a 500. Cross-origin scripts may read `ETag` (exposed by
    the service's CORS) and the headers CORS always lets through (`Cache-Control`, `Last-Modified`).

    An `ETag` must be an entity-tag (`"v2"`, or weak `W/"v2"`), else a 500 too. A GET (or HEAD)
    whose `If-None-Match` names it (weak comparison, RFC 9110 13.1.2) or is `*` is answered `304
    Not Modified` with the same own headers and no body: the client's copy is current.
    """

    body: T
    headers: Mapping[str, str]


class Context:
    """What a handler may need besides its input: the request, the settings, the database."""

    __slots__ = ("request", "settings")

    def __init__(self, request: Request, settings: Settings) -> None:
        self.request = request
        self.settings = settings

    @property
    def database(self) -> Database:
        """The pool; a service without `DATABASE_URL` answers 503 to an endpoint that needs one."""
        return database_of(self.request)

    @property
    def user(self) -> Any:
        """The caller the group's `Guard` let in (a user, a tenant), else what a middleware put in
        `scope["user"]` (Starlette's `AuthenticationMiddleware`), else None."""
        return self.request.scope.get("user")

    def connection(self, *, stateless: bool = False) -> AbstractAsyncContextManager[Connection]:
        """A pooled connection for an `async with` block: `db.Database.connection` itself, not a wrapper."""
        return self.database.connection(stateless=stateless)


def database_of(request: Request) -> Database:
    """The pool, for code that has the request but no `Context` (a middleware: `async with
    database_of(request).connection() as conn`); without `DATABASE_URL`, the 503 envelope."""
    database: Database | None = request.scope.get("state", {}).get("database")
    if database is None:
        raise DatabaseConnectionError(NOT_CONFIGURED)
    return database


@dataclass(frozen=True, slots=True)
class _Declaration:
    method: str
    path: str
    handler: Handler
    summary: str
    description: str
    errors: tuple[int, ...]
    response_headers: tuple[str, ...]


_UNTYPED = (StringConvertor, PathConvertor)  # `{name}` and `{name:path}`: text, typed by the annotation


class Endpoints:
    """A group of routes with one OpenAPI tag; `create_app(endpoints=[...])` serves it."""

    def __init__(self, tag: str, *, guard: Guard | None = None) -> None:
        self.tag = tag
        self.guard = guard  # what every caller of the group's routes must show
        self.declarations: list[_Declaration] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        description: str = "",
        errors: Iterable[int] = (),
        response_headers: Iterable[str] = (),
    ) -> Callable[[Handler], Handler]:
        """Declare `handler` as the answer to `method path`; `errors` are the statuses it raises itself,
        `response_headers` the headers its `WithHeaders` answer may carry (`ETag`), documented with it."""
        if method not in _METHODS:
            raise ValueError(f"{method} {path}: the method must be one of {', '.join(_METHODS)}")
        errors = tuple(errors)
        _, _, convertors = compile_path(path)
        if typed := [name for name, convertor in convertors.items() if not isinstance(convertor, _UNTYPED)]:
            # Starlette's would answer a value they cannot take with a 404, or a 500 (4,301 digits for
            # `int`), where an annotated parameter gets the 422 naming it.
            raise ValueError(
                f"{method} {path}: type the path parameter {typed[0]!r} by the handler's annotation "
                f"(`{{{typed[0]}}}` and `{typed[0]}: int`), not by a converter in the path"
            )
        if unknown := [status for status in errors if status not in _ERROR_STATUSES]:
            raise ValueError(f"{method} {path}: errors must be HTTP error statuses (400..599), not {unknown}")
        if isinstance(response_headers, str):  # ("ETag") for ("ETag",): it would document E, T, a and g
            raise TypeError(f"{method} {path}: response_headers must be a sequence of names, not one string")
        response_headers = tuple(response_headers)
        # A name a handler could not send is refused now, not at a request (`""`: a value any name may have).
        _own(dict.fromkeys(response_headers, '""'))

        def declare(handler: Handler) -> Handler:
            doc = description or inspect.getdoc(handler) or ""
            declared = _Declaration(method, path, handler, summary, doc, tuple(errors), response_headers)
            self.declarations.append(declared)
            return handler

        return declare

    def get(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, **options)

    def post(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, **options)

    def put(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("PUT", path, **options)

    def patch(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("PATCH", path, **options)

    def delete(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, **options)

    def bind(self, settings: Settings) -> list[tuple[Route, Operation]]:
        """The routes for `settings`, each with its operation; a handler that cannot be served raises."""
        bound = []
        for d in self.declarations:
            endpoint = Endpoint(d, settings, self.guard)
            route = Route(d.path, endpoint, methods=[d.method], name=d.handler.__name__)
            bound.append((route, endpoint.operation(self.tag)))
        return bound


class Endpoint:
    """One handler as an ASGI app: decode its input, call it, encode its answer."""

    def __init__(self, declaration: _Declaration, settings: Settings, guard: Guard | None = None) -> None:
        self.declaration = declaration
        self.handler = declaration.handler
        self.guard = guard
        where = f"{declaration.method} {declaration.path} ({declaration.handler.__name__})"
        # Awaited at every request: a plain function's result would be a 500 each time. Behind a
        # decorator (`functools.wraps`), the function it wraps says.
        if not inspect.iscoroutinefunction(inspect.unwrap(self.handler)):
            raise TypeError(f"{where}: a handler is an `async def` function")
        hints = typing.get_type_hints(self.handler)
        _, _, convertors = compile_path(declaration.path)
        parameters = inspect.signature(self.handler).parameters
        self.binders: list[tuple[str, Binder]] = []
        self.params: list[Param] = []
        self.body_type: type[msgspec.Struct] | None = None
        for name in parameters:
            kind = hints.get(name)
            if kind is None:
                raise TypeError(f"{where}: parameter {name!r} needs a type annotation")
            self.binders.append((name, self._binder(name, kind, convertors, settings, where)))
        if unbound := [name for name in convertors if name not in parameters]:  # the OpenAPI path would not resolve
            raise TypeError(
                f"{where}: the path segment {{{unbound[0]}}} needs a parameter {unbound[0]!r} of the handler"
            )
        self.status, self.reply_type = _answer(hints.get("return"), where)
        answer = typing.get_origin(hints.get("return"))
        # A GET answering with its version's ETag: a client that holds that version gets 304.
        self.conditional = declaration.method == "GET" and answer is WithHeaders
        if declaration.response_headers and answer not in (WithHeaders, Created):
            raise TypeError(f"{where}: response_headers are for a handler that returns WithHeaders or Created")
        if answer is Created and "location" in {name.lower() for name in declaration.response_headers}:
            raise TypeError(f"{where}: Created sends Location itself, from its location")

    def _binder(self, name: str, kind: Any, path_names: Iterable[str], settings: Settings, where: str) -> Binder:
        if kind is Context:

            async def context(request: Request) -> Context:
                return Context(request, settings)

            return context
        if name in path_names:
            schema, components = type_schema(kind)
            self.params.append(Param(name, "path", schema, required=True, components=components))
            return path_binder(name, kind)
        if name == "user" and self.guard is not None:  # the caller the guard let in, typed by the annotation
            checked = kind if isinstance(kind, type) else object  # a class is checked; `Caller | None` is not

            async def user(request: Request) -> Any:
                caller = request.scope["user"]
                if not isinstance(caller, checked):  # the guard and the handler disagree: a bug, a 500
                    raise TypeError(f"{where}: the guard's check returned {type(caller).__name__}, not {kind!r}")
                return caller

            return user
        if name == "query" and _is_struct(kind):
            self.params += struct_params(kind, "query")
            return query_binder(kind)
        if name == "headers" and _is_struct(kind):
            self.params += struct_params(kind, "header")
            return headers_binder(kind)
        if name == "body" and _is_struct(kind):
            self.body_type = kind
            return body_binder(kind)
        raise TypeError(
            f"{where}: cannot bind parameter {name!r}: expected a Context, a path segment, "
            "`query: Struct`, `headers: Struct`, `body: Struct` or, in a guarded group, `user`"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        if self.guard is not None:
            scope["user"] = await self.guard.caller(request)
        kwargs = {name: await bind(request) for name, bind in self.binders}
        result = await self.handler(**kwargs)
        if result is None:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        elif isinstance(result, Created):
            path = result.location
            if path.startswith("/"):  # a path in the app: behind a proxy's prefix, the client needs the prefix too
                path = scope.get("root_path", "") + path
            # Escaped: a location made of a decoded path segment may hold CR, LF, blanks or non-ASCII.
            location = (b"location", quote(path, safe=_URL_CHARACTERS).encode())
            own = _own(result.headers, also=_CREATED) if result.headers else ()
            await send_bytes(scope, send, 201, ENCODER.encode(result.body), (*JSON_HEADERS, location, *own))
        elif isinstance(result, WithHeaders):
            own = _own(result.headers)
            if self.conditional and _unchanged(request, own):  # no Content-Length: it would be the 200's body's
                await send({"type": "http.response.start", "status": 304, "headers": own})
                await send({"type": "http.response.body", "body": b""})
            else:
                await send_bytes(scope, send, 200, ENCODER.encode(result.body), (*JSON_HEADERS, *own))
        else:
            await send_bytes(scope, send, self.status, ENCODER.encode(result))

    def operation(self, tag: str) -> Operation:
        """The OpenAPI operation these declarations imply."""
        d = self.declaration
        headers = ("Location",) if self.status == 201 else ()
        reply = Reply(_STATUS_TEXT[self.status], self.reply_type, headers=headers, own_headers=d.response_headers)
        replies = {self.status: reply}
        params = tuple(self.params)
        if self.conditional and "etag" in {name.lower() for name in d.response_headers}:
            replies[304] = Reply(_NOT_MODIFIED, own_headers=d.response_headers)
            if not any(p.location == "header" and p.name.lower() == "if-none-match" for p in params):
                params += (Param("If-None-Match", "header", {"type": "string"}, required=False),)
        errors = set(d.errors) | {503, 504}  # any endpoint may find its database unavailable, or slow
        if self.params or self.body_type is not None:  # a value of the client's the database refuses is a 400 too
            errors |= {400, 422}
        if self.body_type is not None:
            errors |= {400, 413, 415}
        security = {}
        if self.guard is not None:
            errors |= {401, 403}
            security[self.guard.name] = dict(self.guard.scheme)
        return Operation(d.summary, d.description, tag, replies, params, self.body_type, frozenset(errors), security)


_STATUS_TEXT = {200: "OK", 201: "Created", 204: "No content"}
_NOT_MODIFIED = "Not modified: `If-None-Match` names the current `ETag`; the client's copy is current"
_URL_CHARACTERS = "/:?#[]@!$&'()*+,;=%~"  # left as they are in a Location: reserved ones, and escapes


def _own(headers: Mapping[str, str], also: frozenset[str] = frozenset()) -> list[tuple[bytes, bytes]]:
    """A handler's headers as the server takes them; ValueError for one it may not set (or `also`
    reserves: `Created`'s Location) or that cannot be sent."""
    own: dict[bytes, bytes] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in _RESERVED or lower in also or lower.startswith("access-control-") or not _TOKEN.fullmatch(name):
            raise ValueError(f"a handler cannot send the header {name!r}")
        if not value.isprintable() or lower.encode() in own:  # a line break; the same name twice, in two cases
            raise ValueError(f"a handler cannot send the header {name!r} with the value {value!r}")
        if lower == "etag" and not _ENTITY_TAG.fullmatch(value):  # a client could never name it back
            raise ValueError(f'an ETag is a quoted entity-tag, "v2" or W/"v2", not {value!r}')
        own[lower.encode()] = value.encode("latin-1")
    return list(own.items())


# What the service and the server write (the body's type, length and coding, the request ID, the
# date, the server), the connection's own (RFC 9110 7.6.1), and CORS (`access-control-*`, from
# CORS_ORIGINS alone): a handler's value would contradict theirs.
_RESERVED = frozenset({"content-type", "content-length", "content-encoding", "x-request-id", "x-content-type-options",
                       "date", "server", "connection", "keep-alive", "proxy-connection", "te", "trailer",
                       "transfer-encoding", "upgrade"})  # fmt: skip
_CREATED = frozenset({"location"})  # what `Created` writes from its `location`
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110)
_ENTITY_TAG = re.compile(r'(?:W/)?"([\x21\x23-\x7e\x80-\xff]*)"')  # RFC 9110 8.8.3; group 1: the opaque tag


def _unchanged(request: Request, own: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request's `If-None-Match` is `*` or names the answer's `ETag`, weak or strong alike."""
    listed = ",".join(request.headers.getlist("if-none-match"))
    etag = next((value for name, value in own if name == b"etag"), None)
    if not listed or etag is None:
        return False
    if listed.strip() == "*":
        return True
    current = _ENTITY_TAG.fullmatch(etag.decode("latin-1"))
    return current is not None and current[1] in {tag[1] for tag in _ENTITY_TAG.finditer(listed)}


def _is_struct(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, msgspec.Struct)


def _answer(kind: Any, where: str) -> tuple[int, type[msgspec.Struct] | None]:
    """(status, body type) from a handler's return annotation."""
    if kind is type(None):
        return 204, None
    if typing.get_origin(kind) is Created and _is_struct(typing.get_args(kind)[0]):
        body: type[msgspec.Struct] = typing.get_args(kind)[0]
        return 201, body
    if typing.get_origin(kind) is WithHeaders and _is_struct(typing.get_args(kind)[0]):
        return 200, typing.get_args(kind)[0]
    if _is_struct(kind):
        return 200, kind
    raise TypeError(
        f"{where}: the return annotation must be a msgspec Struct, Created[Struct], WithHeaders[Struct] or None"
    )
