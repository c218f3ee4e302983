"""The error envelope for every error, with routes added only here to raise each kind."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest
from service import make_settings, serve
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import Context, Endpoints
from app import create_app
from errors import (
    AuthenticationError,
    AuthorizationError,
    DatabaseConnectionError,
    FieldError,
    MalformedRequestError,
    NotFoundError,
    OperationTimeoutError,
    RequestValidationError,
    ServiceUnavailableError,
    error_response,
)
from logs import REQUEST

pytestmark = pytest.mark.anyio
ENVELOPE_KEYS = {"error", "message", "timestamp", "request_id"}
ORIGIN = "http://localhost:3000"


class Order(msgspec.Struct):
    quantity: int


class Done(msgspec.Struct):
    ok: bool = True


raising_routes = Endpoints(tag="test")


@raising_routes.get("/explode", summary="A bug")
async def explode() -> Done:
    raise RuntimeError("secret internals: table users has 42 rows")


@raising_routes.post("/strict", summary="A typed body")
async def strict_body(body: Order) -> None:
    return None


@raising_routes.get("/invalid", summary="A handler's own validation error")
async def invalid_fields() -> Done:
    raise RequestValidationError([FieldError("email", "must contain @", "nope")])


@raising_routes.get("/db-down", summary="An unavailable database")
async def database_down() -> Done:
    raise DatabaseConnectionError(retry_after=7)


@raising_routes.get("/slow", summary="A timeout")
async def too_slow() -> Done:
    raise TimeoutError


@raising_routes.get("/leaky", summary="A bug whose message names the secrets")
async def leaky(ctx: Context) -> Done:
    settings = ctx.settings
    raise RuntimeError(f"could not use {settings.database_url} (key {settings.secret_key})")


@raising_routes.get("/leaky-refusal", summary="A refusal caused by an error that names a secret")
async def leaky_refusal(ctx: Context) -> Done:
    cause = ValueError(f"key {ctx.settings.secret_key} rejected")
    raise MalformedRequestError("Refused") from cause


@raising_routes.get("/timed-out", summary="A timeout as asyncio.timeout raises it")
async def timed_out() -> Done:
    async with asyncio.timeout(0):
        await asyncio.sleep(1)
    return Done()


@raising_routes.get("/decode-bug", summary="A handler decoding its own data wrongly")
async def decode_bug() -> Done:
    msgspec.json.decode(b'{"quantity": "three"}', type=Order)  # e.g. a jsonb column of the wrong shape
    return Done()


@raising_routes.get("/awaits-cancelled", summary="A handler awaiting a task cancelled elsewhere")
async def await_a_cancelled_task() -> Done:
    helper = asyncio.get_running_loop().create_task(asyncio.sleep(10))
    helper.cancel()
    await helper  # raises CancelledError here, though nobody cancelled this request
    return Done()


@raising_routes.get("/waits", summary="A handler that waits until its request is cancelled")
async def wait_for_ever() -> Done:
    await asyncio.sleep(3600)
    return Done()


@asynccontextmanager
async def client_for(**env: str) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(create_app(make_settings(**env), endpoints=[raising_routes])) as client:
        yield client


async def answer_to(raised: Exception) -> httpx.Response:
    """The service's answer to a request whose handler raises `raised`."""
    group = Endpoints(tag="test")

    @group.get("/raise", summary="Raises the exception under test")
    async def raising() -> Done:
        raise raised

    async with serve(create_app(make_settings(), endpoints=[group])) as client:
        return await client.get("/raise")


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    body: dict[str, object] = response.json()
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert set(body) >= ENVELOPE_KEYS
    assert body["error"] == code
    assert body["request_id"] == response.headers["x-request-id"]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", str(body["timestamp"]))
    return body


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
async def test_unknown_path_is_404_envelope_for_every_method(method: str) -> None:
    """Any method on an unknown path gets the NOT_FOUND_ERROR envelope (HEAD: headers only)."""
    async with client_for() as client:
        response = await client.request(method, "/no/such/thing")
    assert response.status_code == 404
    if method != "HEAD":
        body = assert_envelope(response, 404, "NOT_FOUND_ERROR")
        assert body["message"] == "Resource not found"
        assert "detail" not in body


async def test_wrong_method_is_405_envelope_with_allow_header() -> None:
    """A known path with the wrong method lists the allowed ones."""
    async with client_for() as client:
        response = await client.delete("/health")
    assert_envelope(response, 405, "METHOD_NOT_ALLOWED")
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}


async def test_unhandled_exception_is_500_envelope_without_internals() -> None:
    """A 500 says nothing of the exception unless DEBUG is on."""
    async with client_for() as client:
        response = await client.get("/explode")
    body = assert_envelope(response, 500, "INTERNAL_SERVER_ERROR")
    assert body["message"] == "Internal server error"
    assert "detail" not in body
    assert "secret internals" not in response.text


async def test_unhandled_exception_with_debug_adds_type_message_and_traceback() -> None:
    """With DEBUG=true, `detail` carries the exception type, message and traceback."""
    async with client_for(DEBUG="true") as client:
        response = await client.get("/explode")
    detail = assert_envelope(response, 500, "INTERNAL_SERVER_ERROR")["detail"]
    assert isinstance(detail, dict)
    assert detail["type"] == "RuntimeError"
    assert detail["message"] == "secret internals: table users has 42 rows"
    assert "Traceback" in detail["traceback"]
    assert "explode" in detail["traceback"]


async def test_with_debug_the_detail_masks_the_secrets_as_the_log_does() -> None:
    """DEBUG is allowed in staging: a 500's message and traceback, and a refusal's cause, sent the database
    password and SECRET_KEY to any caller, where the log line of the same request masked them."""
    key, password = "k" * 20 + "Zq81-x_m3LpRt0wYv", "Sup3r-S3cret-Pw"
    url = f"postgresql://app:{password}@127.0.0.1:1/app"
    async with client_for(DEBUG="true", SECRET_KEY=key, DATABASE_URL=url) as client:
        crashed = await client.get("/leaky")
        refused = await client.get("/leaky-refusal")
    assert_envelope(crashed, 500, "INTERNAL_SERVER_ERROR")
    assert_envelope(refused, 400, "VALIDATION_ERROR")
    assert crashed.json()["detail"]["message"] == "could not use postgresql://app:***@127.0.0.1:1/app (key ***)"
    assert refused.json()["detail"]["cause"] == "ValueError: key *** rejected"
    for response in (crashed, refused):
        assert key not in response.text
        assert password not in response.text


async def test_with_debug_a_timeouts_detail_names_no_cancellation_as_its_cause() -> None:
    """`asyncio.timeout` raises its TimeoutError from the CancelledError it used: not a cause worth showing."""
    async with client_for(DEBUG="true") as client:
        response = await client.get("/timed-out")
    assert assert_envelope(response, 504, "TIMEOUT_ERROR")["detail"] == {"type": "TimeoutError", "message": ""}


async def test_500_keeps_request_id_and_cors_headers() -> None:
    """An unhandled exception must not lose the headers every other response has."""
    async with client_for() as client:
        response = await client.get("/explode", headers={"Origin": ORIGIN, "X-Request-ID": "trace-500"})
    assert_envelope(response, 500, "INTERNAL_SERVER_ERROR")
    assert response.headers["x-request-id"] == "trace-500"
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_a_handler_awaiting_a_task_cancelled_elsewhere_is_a_500_not_a_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The CancelledError is the handler's bug: the 500 envelope and its traceback, not 'shutting down'."""
    async with client_for() as client:
        response = await client.get("/awaits-cancelled")
    assert_envelope(response, 500, "INTERNAL_SERVER_ERROR")
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [asyncio.CancelledError]


async def test_a_request_the_server_cancels_is_the_503_envelope_with_its_cors_headers() -> None:
    """What uvicorn does at the end of a graceful shutdown's wait: cancel the request's task."""
    app = create_app(make_settings(), endpoints=[raising_routes])
    sent: list[Message] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    headers = [(b"host", b"test"), (b"origin", ORIGIN.encode())]
    scope = {"type": "http", "method": "GET", "path": "/waits", "raw_path": b"/waits", "root_path": "",
             "query_string": b"", "headers": headers, "state": {"started_at": 0.0}, "scheme": "http",
             "http_version": "1.1", "server": ("test", 80), "client": ("127.0.0.1", 1),
             "asgi": {"version": "3.0"}}  # fmt: skip
    request = asyncio.get_running_loop().create_task(app(scope, receive, send))
    await asyncio.sleep(0.1)
    request.cancel()
    await request  # answered, not cancelled: the server's task ends as it would with any answer
    start, body = sent
    response_headers = {name.decode(): value.decode() for name, value in start["headers"]}
    assert start["status"] == 503
    assert msgspec.json.decode(body["body"])["message"] == "Service is shutting down"
    assert response_headers["access-control-allow-origin"] == ORIGIN
    assert response_headers["connection"] == "close"


async def test_malformed_json_body_is_400_validation_error() -> None:
    """A body that is not JSON at all is a malformed request."""
    async with client_for() as client:
        response = await client.post("/strict", content=b"{not json")
    assert assert_envelope(response, 400, "VALIDATION_ERROR")["message"] == "Malformed request body: not valid JSON"


async def test_invalid_json_body_is_422_with_validation_errors() -> None:
    """A well-formed body of the wrong shape lists the offending field."""
    async with client_for() as client:
        response = await client.post("/strict", content=b'{"quantity": "three"}')
    body = assert_envelope(response, 422, "VALIDATION_ERROR")
    assert body["validation_errors"] == [
        {"field": "quantity", "message": "Expected `int`, got `str`", "value": "three"}
    ]


async def test_a_handler_decoding_its_own_data_wrongly_is_a_500_not_the_clients_fault() -> None:
    """Only request input maps to 400/422: msgspec failing on a handler's own data is a bug."""
    async with client_for() as client:
        response = await client.get("/decode-bug")
    body = assert_envelope(response, 500, "INTERNAL_SERVER_ERROR")
    assert "validation_errors" not in body


async def test_request_validation_error_carries_field_message_and_value() -> None:
    """A handler's own validation failure is the same 422 shape."""
    async with client_for() as client:
        response = await client.get("/invalid")
    body = assert_envelope(response, 422, "VALIDATION_ERROR")
    assert body["validation_errors"] == [{"field": "email", "message": "must contain @", "value": "nope"}]


async def test_database_unavailable_is_503_with_matching_retry_after() -> None:
    """A temporarily unavailable dependency says when to retry, in the body and the header."""
    async with client_for() as client:
        response = await client.get("/db-down")
    body = assert_envelope(response, 503, "DATABASE_CONNECTION_ERROR")
    assert body["retry_after"] == 7
    assert response.headers["retry-after"] == "7"


async def test_timeout_is_504_timeout_error() -> None:
    """A handler's timeout is a 504 TIMEOUT_ERROR, not a 500."""
    async with client_for() as client:
        response = await client.get("/slow")
    assert_envelope(response, 504, "TIMEOUT_ERROR")


async def test_refused_cors_preflight_is_an_envelope() -> None:
    """A preflight from an origin that is not allowed is refused with the envelope."""
    async with client_for() as client:
        response = await client.options(
            "/health", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
        )
    body = assert_envelope(response, 400, "VALIDATION_ERROR")
    assert body["message"] == "Disallowed CORS origin"
    assert "access-control-allow-origin" not in response.headers


async def test_allowed_cors_preflight_and_request() -> None:
    """An allowed origin gets its preflight and can read the request ID header."""
    async with client_for() as client:
        preflight = await client.options("/health", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
        response = await client.get("/health", headers={"Origin": ORIGIN})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in preflight.headers
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()


@pytest.mark.parametrize(
    ("raised", "status", "code"),
    [
        (AuthenticationError(), 401, "AUTHENTICATION_ERROR"),
        (AuthorizationError(), 403, "AUTHORIZATION_ERROR"),
        (NotFoundError("No such order"), 404, "NOT_FOUND_ERROR"),
        (HTTPException(413), 413, "PAYLOAD_TOO_LARGE"),
        (HTTPException(404, "No such order"), 404, "NOT_FOUND_ERROR"),
        (HTTPException(500, "password authentication failed for user app"), 500, "INTERNAL_SERVER_ERROR"),
        (ServiceUnavailableError(retry_after=3), 503, "SERVICE_UNAVAILABLE"),
        (OperationTimeoutError(), 504, "TIMEOUT_ERROR"),
    ],
)
async def test_every_status_of_the_contract_table_has_its_code(raised: Exception, status: int, code: str) -> None:
    """Each row of the contract's error table: the status and `error` code a handler's raise gives."""
    response = await answer_to(raised)
    body = assert_envelope(response, status, code)
    if isinstance(raised, NotFoundError) or getattr(raised, "detail", None) == "No such order":
        assert body["message"] == "No such order"  # the raiser's own words, Starlette's exception too
    if isinstance(raised, HTTPException) and raised.status_code == 413:
        assert body["message"] == "Request body too large"  # no words of its own: the contract's
    if isinstance(raised, HTTPException) and raised.status_code == 500:
        assert body["message"] == "Internal server error"  # a 5xx's own words may tell internals
    if isinstance(raised, ServiceUnavailableError):
        assert response.headers["retry-after"] == "3"


class PaymentRequiredError(Exception):
    """An application's own exception, mapped by a handler it registers."""


@raising_routes.get("/pay", summary="An exception the app maps itself", errors=(402,))
async def pay() -> Done:
    raise PaymentRequiredError("card declined")


async def test_an_exception_handler_the_app_adds_answers_its_exception() -> None:
    """`app.add_exception_handler` works as in Starlette, sync or async, and keeps the request's headers."""

    def payment_required(request: Request, exc: Exception) -> Response:  # a sync handler, as Starlette allows
        return error_response(402, "PAYMENT_REQUIRED", str(exc))

    app = create_app(make_settings(), endpoints=[raising_routes])
    app.add_exception_handler(PaymentRequiredError, payment_required)
    async with serve(app) as client:
        response = await client.get("/pay", headers={"Origin": ORIGIN, "X-Request-ID": "pay-1"})
    body = assert_envelope(response, 402, "PAYMENT_REQUIRED")
    assert body["message"] == "card declined"
    assert response.headers["x-request-id"] == "pay-1"
    assert response.headers["access-control-allow-origin"] == ORIGIN


async def test_middleware_the_app_adds_runs_inside_the_request_layer() -> None:
    """A layer added with `app.add_middleware` sees the request ID, and what it raises is the envelope."""
    seen: list[str | None] = []

    class Auditing:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                seen.append(REQUEST.get()[0])
                if scope["path"] == "/forbidden-by-middleware":
                    raise AuthorizationError("audit said no")
            await self.app(scope, receive, send)

    app = create_app(make_settings(), endpoints=[raising_routes])
    app.add_middleware(Auditing)
    async with serve(app) as client:
        probe = await client.get("/health", headers={"X-Request-ID": "probe-1"})
        refused = await client.get("/forbidden-by-middleware")
    assert probe.status_code == 200
    assert seen[0] == "probe-1"  # probes pass through the app's middleware too
    body = assert_envelope(refused, 403, "AUTHORIZATION_ERROR")
    assert body["message"] == "audit said no"
    assert seen[1] == refused.headers["x-request-id"]


@pytest.mark.parametrize(
    ("raised", "message"),
    [
        (HTTPException(502, "upstream 10.0.0.5 refused: password authentication failed"), "Bad Gateway"),
        (HTTPException(418, {"field": "x"}), "I'm a Teapot"),  # type: ignore[arg-type]  # not text: a handler's bug
    ],
)
async def test_an_http_exception_without_a_message_of_the_contracts_is_answered_with_its_status_phrase(
    raised: HTTPException, message: str
) -> None:
    """A 5xx's own words may tell internals, and a detail that is not text is no message: both read as
    the status's phrase where the contract has no message for the status."""
    response = await answer_to(raised)
    assert response.status_code == raised.status_code
    assert response.json()["message"] == message


async def test_a_handler_registered_for_500_answers_what_nothing_else_handles(caplog: pytest.LogCaptureFixture) -> None:
    """As in Starlette, `add_exception_handler(500, ...)` answers unhandled exceptions; they are still logged."""

    async def apologise(request: Request, exc: Exception) -> Response:
        return error_response(500, "INTERNAL_SERVER_ERROR", f"Sorry: {type(exc).__name__}")

    app = create_app(make_settings(), endpoints=[raising_routes])
    app.add_exception_handler(500, apologise)
    async with serve(app) as client:
        response = await client.get("/explode")
        missing = await client.get("/no-such-thing")
    assert assert_envelope(response, 500, "INTERNAL_SERVER_ERROR")["message"] == "Sorry: RuntimeError"
    assert_envelope(missing, 404, "NOT_FOUND_ERROR")  # handled exceptions keep their own handlers
    logged = [r for r in caplog.records if r.getMessage() == "Unhandled exception in GET /explode"]
    assert len(logged) == 1
    assert logged[0].exc_info is not None


async def test_with_debug_a_failing_500_handler_leaves_the_detail_to_the_routes_own_exception() -> None:
    """The traceback was the one being handled when the envelope was built, the handler's, under the
    route's exception type and message."""

    def broken(request: Request, exc: Exception) -> Response:
        raise KeyError("the handler's own bug")

    app = create_app(make_settings(DEBUG="true"), endpoints=[raising_routes])
    app.add_exception_handler(500, broken)
    async with serve(app) as client:
        response = await client.get("/explode")
    detail = assert_envelope(response, 500, "INTERNAL_SERVER_ERROR")["detail"]
    assert isinstance(detail, dict)
    assert detail["type"] == "RuntimeError"
    assert detail["traceback"].rstrip().endswith("RuntimeError: secret internals: table users has 42 rows")
    assert "the handler's own bug" not in detail["traceback"]


async def test_an_exception_handler_that_fails_is_answered_with_the_500_envelope(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failing handler (or an envelope that cannot be encoded) still gets the envelope, its headers and a log line."""

    def broken(request: Request, exc: Exception) -> Response:
        raise KeyError("the handler's own bug")

    app = create_app(make_settings(), endpoints=[raising_routes])
    app.add_exception_handler(PaymentRequiredError, broken)
    async with serve(app) as client:
        response = await client.get("/pay", headers={"Origin": ORIGIN, "X-Request-ID": "pay-2"})
    assert assert_envelope(response, 500, "INTERNAL_SERVER_ERROR")["request_id"] == "pay-2"
    assert response.headers["access-control-allow-origin"] == ORIGIN
    [logged] = [r for r in caplog.records if r.getMessage() == "The error response to GET /pay failed"]
    assert logged.exc_info is not None
