"""The one error envelope, and the one mapping from exception to status and code."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ExceptionHandler, Receive, Scope, Send

from logs import REQUEST
from responses import ENCODER, StructResponse, Timestamp, send_bytes, utc_timestamp
from settings import Redactor

CODES = {
    400: "VALIDATION_ERROR",
    401: "AUTHENTICATION_ERROR",
    403: "AUTHORIZATION_ERROR",
    404: "NOT_FOUND_ERROR",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT_ERROR",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "VALIDATION_ERROR",
    431: "REQUEST_HEADER_FIELDS_TOO_LARGE",
    500: "INTERNAL_SERVER_ERROR",
    503: "SERVICE_UNAVAILABLE",
    504: "TIMEOUT_ERROR",
}
MESSAGES = {
    400: "Malformed request",
    401: "Authentication required",
    403: "Not allowed",
    404: "Resource not found",
    405: "Method not allowed",
    409: "Conflict with the current state of the resource",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Request validation failed",
    431: "Request header fields too large",
    500: "Internal server error",
    503: "Service temporarily unavailable",
    504: "The operation timed out",
}
DATABASE_RETRY_AFTER = 5  # seconds: long enough for a pool to reconnect after a restart


SHUTTING_DOWN = "Service is shutting down"  # readiness while draining, and a request cut short by the shutdown


class FieldError(msgspec.Struct):
    field: str
    message: str
    value: Any = None


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """The error envelope: `detail` only with DEBUG, the optional fields only where they apply."""

    error: str
    message: str
    timestamp: Timestamp
    request_id: str
    detail: dict[str, str] | None = None
    validation_errors: list[FieldError] | None = None
    retry_after: int | None = None


# Where the server says why a request's body cannot be read (a chunked body the parser refused
# while the app waits for it): the request layer's next read of the body raises the 400 with it.
UNREADABLE_BODY = "service.unreadable_body"


class ServiceError(Exception):
    """Raise from a handler to answer with the envelope; subclasses fix status and code."""

    status_code = 500
    code = "INTERNAL_SERVER_ERROR"

    def __init__(
        self, message: str | None = None, *, retry_after: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self.message = message or MESSAGES.get(self.status_code, "Error")
        self.retry_after = retry_after
        self.headers = headers
        super().__init__(self.message)


class AuthenticationError(ServiceError):
    status_code, code = 401, "AUTHENTICATION_ERROR"


class AuthorizationError(ServiceError):
    status_code, code = 403, "AUTHORIZATION_ERROR"


class NotFoundError(ServiceError):
    status_code, code = 404, "NOT_FOUND_ERROR"


class MalformedRequestError(ServiceError):
    """The request cannot be read at all (a body that is not JSON); a readable but invalid one is a 422."""

    status_code, code = 400, "VALIDATION_ERROR"


class ConflictError(ServiceError):
    status_code, code = 409, "CONFLICT_ERROR"


class PayloadTooLargeError(ServiceError):
    status_code, code = 413, "PAYLOAD_TOO_LARGE"


class UnsupportedMediaTypeError(ServiceError):
    status_code, code = 415, "UNSUPPORTED_MEDIA_TYPE"


class ServiceUnavailableError(ServiceError):
    status_code, code = 503, "SERVICE_UNAVAILABLE"


class DatabaseConnectionError(ServiceError):
    status_code, code = 503, "DATABASE_CONNECTION_ERROR"


class OperationTimeoutError(ServiceError):
    status_code, code = 504, "TIMEOUT_ERROR"


class QueryTimeoutError(OperationTimeoutError, TimeoutError):
    """A query the database left unanswered for `DATABASE_COMMAND_TIMEOUT` (`db.Database.connection`):
    the 504 saying so, and still the `TimeoutError` asyncpg raised, for a handler that catches one."""


class RequestValidationError(ServiceError):
    status_code, code = 422, "VALIDATION_ERROR"

    def __init__(self, errors: list[FieldError], message: str | None = None) -> None:
        super().__init__(message)
        self.errors = errors


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    debug_detail: dict[str, str] | None = None,
    validation_errors: list[FieldError] | None = None,
    retry_after: int | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = ErrorBody(
        error=code,
        message=message,
        timestamp=utc_timestamp(),
        request_id=REQUEST.get()[0] or "",
        detail=debug_detail,
        validation_errors=validation_errors,
        retry_after=retry_after,
    )
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return StructResponse(body, status, headers)


def _detail(request: Request, exc: BaseException) -> dict[str, str] | None:
    settings = request.app.state.settings
    if not settings.debug:
        return None
    redact: Redactor = request.app.state.redact  # as in the log: DEBUG is allowed outside production
    detail = {"type": type(exc).__name__, "message": redact(str(exc))}
    # What the envelope's message stands for (the database's own error); not asyncio.timeout's CancelledError.
    if isinstance(exc, ServiceError) and exc.__cause__ is not None:
        detail["cause"] = redact(f"{type(exc.__cause__).__name__}: {exc.__cause__}")
    return detail


async def handle_service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    errors = exc.errors if isinstance(exc, RequestValidationError) else None
    return error_response(
        exc.status_code,
        exc.code,
        exc.message,
        debug_detail=_detail(request, exc),
        validation_errors=errors,
        retry_after=exc.retry_after,
        headers=exc.headers,
    )


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    headers = dict(exc.headers or {})
    if status == 405 and "Allow" in headers:
        headers["Allow"] = _allowed_methods(request) or headers["Allow"]
    # Starlette's default detail is the status phrase, which the contract's message replaces; a
    # text of the raiser's own (`HTTPException(404, "No such order")`) is the message, except on a
    # 5xx, whose message never tells internals (`HTTPException(500, str(exc))`).
    detail = exc.detail
    own = isinstance(detail, str) and detail != _phrase(status) and status < 500
    message = detail if own else MESSAGES.get(status) or _phrase(status) or "Error"
    return error_response(
        status,
        CODES.get(status, "HTTP_ERROR"),
        message,
        debug_detail=_detail(request, exc),
        headers=headers,
    )


def _phrase(status: int) -> str | None:
    """The detail Starlette gives an `HTTPException` raised without one."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # a status Python does not name
        return None


def _allowed_methods(request: Request) -> str:
    """Every method a route serves at the request's path, for `Allow`.

    Starlette's router answers a wrong method with the first route whose path matched, so its
    `Allow` names that route's methods only; `GET /items` and `POST /items` are two routes.
    """
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods, key=lambda m: (_METHOD_ORDER.get(m, len(_METHOD_ORDER)), m)))


_METHOD_ORDER = {m: i for i, m in enumerate(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))}


async def handle_timeout(request: Request, exc: Exception) -> Response:
    return error_response(504, "TIMEOUT_ERROR", MESSAGES[504], debug_detail=_detail(request, exc))


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """The router's answer when no route matches: what raising `HTTPException(404)` would give.

    Unknown paths are the commonest error (scanners, typos); this encodes the very envelope
    `handle_http_exception` gives, without raising, catching, or a Request and Response each.
    """
    detail = _NOT_FOUND_DETAIL if scope["app"].state.settings.debug else None
    body = ErrorBody(CODES[404], MESSAGES[404], utc_timestamp(), REQUEST.get()[0] or "", detail)
    await send_bytes(scope, send, 404, ENCODER.encode(body))


_NOT_FOUND = HTTPException(404)  # never raised: it is what the router would have raised
_NOT_FOUND_DETAIL = {"type": type(_NOT_FOUND).__name__, "message": str(_NOT_FOUND)}


def server_error(exc: BaseException, *, debug: Callable[[str], str] | None) -> Response:
    """The 500 envelope for an exception nothing handles; with DEBUG (`debug`: what masks the
    secrets in its detail, as in the log), its type, message and traceback."""
    detail = None
    if debug is not None:
        detail = {
            "type": type(exc).__name__,
            "message": debug(str(exc)),
            "traceback": debug("".join(traceback.format_exception(exc))),
        }
    return error_response(500, "INTERNAL_SERVER_ERROR", MESSAGES[500], debug_detail=detail)


def handler_for(handlers: Mapping[Any, ExceptionHandler], exc: BaseException) -> ExceptionHandler | None:
    """The handler registered for `exc`, as Starlette looks it up: an `HTTPException` by its status
    first, else the nearest class in its MRO; None when nothing handles it (a 500)."""
    if isinstance(exc, HTTPException) and exc.status_code in handlers:
        return handlers[exc.status_code]
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None


EXCEPTION_HANDLERS: dict[Any, ExceptionHandler] = {
    HTTPException: handle_http_exception,
    ServiceError: handle_service_error,
    TimeoutError: handle_timeout,
}
