"""The OpenAPI document, built once from the wire Structs (`docs.py` serves it, and the pages).

Response schemas come from the msgspec Structs the handlers encode, so the description cannot
drift from the wire. What a Struct cannot say (which statuses a route answers, the contract's
examples) is an `Operation` per route name (`OPERATIONS` here, the root's in app.py); a route
without one stops `create_app`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import msgspec
from starlette.routing import BaseRoute, Route

from errors import ErrorBody
from health import Liveness, Readiness
from settings import Settings

SCHEMA_REF = "#/components/schemas/{name}"
_NO_CONTENT = frozenset({204, 304})  # statuses whose responses never have a body
_CONVERTOR = re.compile(r"{(\w+):\w+}")
_T = "2025-09-23T10:30:00Z"  # the contract's example timestamp
_REQUEST_ID = "550e8400-e29b-41d4-a716-446655440000"


class Reply(msgspec.Struct, frozen=True):
    """One documented response: a Struct body (JSON) or a media type, with named examples."""

    description: str
    body: type[msgspec.Struct] | None = None
    examples: dict[str, Any] = {}
    headers: tuple[str, ...] = ()  # of `components.headers`
    own_headers: tuple[str, ...] = ()  # a handler's own (`ETag`), described where they are used
    media_type: str = "application/json"


class Param(msgspec.Struct, frozen=True):
    """A path, query or header parameter, with the JSON schema of its type."""

    name: str
    location: str  # "path", "query" or "header"
    schema: dict[str, Any]
    required: bool
    components: dict[str, Any] = {}  # the schemas `schema` refers to (an Enum's, a Struct's)


class Operation(msgspec.Struct, frozen=True):
    """A route's documentation: `replies` are its own; `errors` the shared error statuses it answers."""

    summary: str
    description: str
    tag: str
    replies: dict[int, Reply]
    parameters: tuple[Param, ...] = ()
    request_body: type[msgspec.Struct] | None = None
    errors: frozenset[int] = frozenset()
    security: dict[str, dict[str, Any]] = {}  # the security schemes a caller must satisfy, by name


def type_schema(kind: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """`kind`'s JSON schema, and the schemas it refers to, named as in `components.schemas`."""
    (schema,), components = msgspec.json.schema_components([kind], ref_template=SCHEMA_REF)
    return schema, components


def _error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": code, "message": message, "timestamp": _T, "request_id": _REQUEST_ID, **extra}


_POOL = {"active_connections": 2, "pool_size": 10}
_HEALTHY_DB = {"status": "healthy", "timestamp": _T, "database_connected": True, "response_time_ms": 15,
               "connection_pool": _POOL, "migration_status": "up_to_date"}  # fmt: skip
_DEGRADED_DB = {**_HEALTHY_DB, "status": "degraded", "migration_status": "pending",
                "errors": ["1 pending migration(s): 0002.orders"]}  # fmt: skip
_UNHEALTHY_DB = {"status": "unhealthy", "timestamp": _T, "database_connected": False, "response_time_ms": None,
                 "connection_pool": {"active_connections": 0, "pool_size": 10}, "migration_status": "unknown",
                 "errors": ["Database health check timed out after 10 seconds"]}  # fmt: skip
_LIVE = {"status": "healthy", "timestamp": _T, "version": "0.1.0", "uptime_seconds": 3600}
_HTML = Reply("An HTML page", headers=("Content-Security-Policy",), media_type="text/html")

# Errors any route can answer: shared in `components.responses`, each one the error envelope.
ERROR_REPLIES = {
    400: Reply("The request cannot be read: a body that is not JSON, or a value the database cannot store", ErrorBody,
               {"malformed": _error("VALIDATION_ERROR", "Malformed request body: not valid JSON")}),
    401: Reply("No credentials, or ones the route's guard refused", ErrorBody,
               {"unauthenticated": _error("AUTHENTICATION_ERROR", "Authentication required")}, ("WWW-Authenticate",)),
    403: Reply("The caller may not do this", ErrorBody, {"forbidden": _error("AUTHORIZATION_ERROR", "Not allowed")}),
    404: Reply("Not found: no route matches the path, or the resource does not exist", ErrorBody,
               {"not_found": _error("NOT_FOUND_ERROR", "Resource not found")}),
    405: Reply("The path exists, the method does not", ErrorBody,
               {"method_not_allowed": _error("METHOD_NOT_ALLOWED", "Method not allowed")}, ("Allow",)),
    409: Reply("Conflicts with other rows: a unique key taken, a foreign key or exclusion constraint", ErrorBody,
               {"conflict": _error("CONFLICT_ERROR", "Already exists (unique constraint orders_reference_key)")}),
    413: Reply("The request body is larger than MAX_BODY_BYTES", ErrorBody,
               {"too_large": _error("PAYLOAD_TOO_LARGE", "Request body too large: the limit is 1048576 bytes")}),
    415: Reply("The body is not declared as UTF-8 JSON (`Content-Type`), or is compressed", ErrorBody,
               {"unsupported": _error("UNSUPPORTED_MEDIA_TYPE",
                                      "Unsupported media type: send the body as application/json")}),
    422: Reply("The request is well formed but invalid", ErrorBody, {"invalid": _error(
        "VALIDATION_ERROR", "Request validation failed",
        validation_errors=[{"field": "name", "message": "Expected `str`, got `int`", "value": 1}])}),
    500: Reply("An unexpected failure; `detail` only with DEBUG=true", ErrorBody,
               {"internal": _error("INTERNAL_SERVER_ERROR", "Internal server error")}),
    503: Reply("A dependency is temporarily unavailable", ErrorBody, {"database": _error(
        "DATABASE_CONNECTION_ERROR", "Database temporarily unavailable", retry_after=5)}, ("Retry-After",)),
    504: Reply("Took too long: a query past `statement_timeout` or DATABASE_COMMAND_TIMEOUT", ErrorBody,
               {"timeout": _error("TIMEOUT_ERROR", "The operation timed out (database: query canceled)")}),
}  # fmt: skip
_NAMES = {400: "MalformedRequest", 401: "Unauthenticated", 403: "Forbidden", 404: "NotFound",
          405: "MethodNotAllowed", 409: "Conflict", 413: "PayloadTooLarge", 415: "UnsupportedMediaType",
          422: "ValidationError", 500: "InternalServerError", 503: "ServiceUnavailable", 504: "Timeout"}  # fmt: skip

OPERATIONS = {
    "health": Operation("Liveness", "Whether this process can serve. No I/O: it never touches the database.",
                        "health", {
        200: Reply("Alive", Liveness, {"healthy": _LIVE}, ("Cache-Control",)),
        503: Reply("A check of the process itself failed", Liveness, {"unhealthy": {
            **_LIVE, "status": "unhealthy", "uptime_seconds": 0,
            "errors": ["Application start-up has not completed"]}}, ("Cache-Control",)),
    }),
    "health_db": Operation("Readiness", "One probe through the pool, bounded by DATABASE_HEALTH_CHECK_TIMEOUT.",
                           "health", {
        200: Reply("Reachable: healthy, or degraded while migrations are pending", Readiness,
                   {"healthy": _HEALTHY_DB, "degraded": _DEGRADED_DB}, ("Cache-Control",)),
        503: Reply("Unreachable, timed out, refused credentials, or not configured", Readiness,
                   {"unhealthy": _UNHEALTHY_DB}, ("Cache-Control",)),
    }),
    "metrics": Operation("Prometheus metrics", "Request counts and durations by route, pool and process gauges.",
                         "operations", {200: Reply("Prometheus text format", headers=("Cache-Control",),
                                                   media_type="text/plain")}),
    "openapi": Operation("This document", "The OpenAPI description of the service.", "documentation",
                         {200: Reply("OpenAPI 3.1", media_type="application/json")}),
    "docs": Operation("Swagger UI", "Interactive documentation, served without a CDN.", "documentation",
                      {200: _HTML}),
    "redoc": Operation("ReDoc", "Reference documentation, served without a CDN.", "documentation", {200: _HTML}),
}  # fmt: skip
_HEADERS = {
    "X-Request-ID": {"description": "The request's ID, also in logs and error bodies", "schema": {"type": "string"}},
    "Cache-Control": {"description": "`no-store`: probes and metrics are never cached", "schema": {"type": "string"}},
    "Content-Security-Policy": {
        "description": "The page may load nothing but this service's own assets (no CDN)",
        "schema": {"type": "string"},
    },
    "Retry-After": {"description": "Seconds before a retry may succeed", "schema": {"type": "integer"}},
    "Allow": {"description": "The methods the path answers", "schema": {"type": "string"}},
    "Location": {"description": "The path of the resource just created", "schema": {"type": "string"}},
    "WWW-Authenticate": {
        "description": "How to authenticate (RFC 9110): `Bearer`, `Basic`, or `ApiKey in=..., name=...`",
        "schema": {"type": "string"},
    },
}
_DESCRIPTION = (
    "Every route answers HEAD where it answers GET. Every error, for any path and method, is the "
    "`ErrorBody` envelope: 404 for an unknown path, 405 for a method a path does not answer, 422 for "
    "an invalid request, 500 for an unexpected failure, 503 when a dependency is unavailable."
)


def build_openapi(settings: Settings, routes: list[BaseRoute], operations: Mapping[str, Operation]) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `routes`, each described by the operation of its name."""
    bodies = {reply.body for op in operations.values() for reply in op.replies.values() if reply.body}
    bodies |= {op.request_body for op in operations.values() if op.request_body}
    _, schemas = msgspec.json.schema_components(
        sorted([*bodies, ErrorBody], key=lambda t: t.__name__), ref_template=SCHEMA_REF
    )
    for op in operations.values():
        for param in op.parameters:
            for name, schema in param.components.items():
                if schemas.setdefault(name, schema) != schema:  # two types, one name: one would replace the other
                    raise ValueError(f"two types are named {name!r} in the OpenAPI document: rename one of them")
    security: dict[str, dict[str, Any]] = {}
    for op in operations.values():
        for name, scheme in op.security.items():
            if security.setdefault(name, scheme) != scheme:
                raise ValueError(f"two security schemes are named {name!r}: give each guard a name of its own")
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if isinstance(route, Route):
            for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
                path = _CONVERTOR.sub(r"{\1}", route.path)  # OpenAPI names `{rest:path}` `{rest}`
                paths.setdefault(path, {})[method.lower()] = _operation(route.name, operations[route.name])
    return {
        "openapi": "3.1.0",
        "info": {"title": settings.app_name, "version": settings.app_version, "description": _DESCRIPTION},
        # Relative to the document's own URL: behind a proxy's path prefix (`/api/openapi.json`),
        # Swagger UI's "Try it out" calls `/api/items`, where with no server it would call `/items`.
        "servers": [{"url": ".", "description": "This service, where this document is served"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {_NAMES[status]: _response(status, reply) for status, reply in ERROR_REPLIES.items()},
            "headers": _HEADERS,
            **({"securitySchemes": security} if security else {}),
        },
    }


def _operation(name: str, op: Operation) -> dict[str, Any]:
    responses: dict[str, Any] = {str(status): _response(status, reply) for status, reply in op.replies.items()}
    envelope = {"application/json": {"schema": {"$ref": SCHEMA_REF.format(name="ErrorBody")}}}
    for status in sorted(op.errors | {500}):
        if status in _NAMES:  # one of the contract's: the shared response, with its example
            responses[str(status)] = {"$ref": f"#/components/responses/{_NAMES[status]}"}
        else:  # a status of the app's own (its exception handler answers it): the envelope
            responses[str(status)] = {"description": HTTPStatus(status).phrase, "content": envelope}
    responses["default"] = {
        "description": "Any other error: see the shared error responses",
        "content": envelope,
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
    }
    operation: dict[str, Any] = {
        "operationId": name,
        "summary": op.summary,
        "description": op.description,
        "tags": [op.tag],
    }
    if op.parameters:
        operation["parameters"] = [
            {"name": p.name, "in": p.location, "required": p.required, "schema": p.schema} for p in op.parameters
        ]
    if op.request_body is not None:
        schema = {"$ref": SCHEMA_REF.format(name=op.request_body.__name__)}
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    if op.security:
        operation["security"] = [{name: [] for name in op.security}]
    return {**operation, "responses": responses}


def _response(status: int, reply: Reply) -> dict[str, Any]:
    media: dict[str, Any] = {}
    if reply.body is not None:
        media["schema"] = {"$ref": SCHEMA_REF.format(name=reply.body.__name__)}
    if reply.examples:
        media["examples"] = {name: {"value": value} for name, value in reply.examples.items()}
    headers: dict[str, Any] = {
        name: {"$ref": f"#/components/headers/{name}"} for name in ("X-Request-ID", *reply.headers)
    }
    headers |= {name: {"description": "Set by the handler", "schema": {"type": "string"}} for name in reply.own_headers}
    if status in _NO_CONTENT:
        return {"description": reply.description, "headers": headers}
    return {"description": reply.description, "headers": headers, "content": {reply.media_type: media}}
