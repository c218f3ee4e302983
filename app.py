"""The application: `create_app(settings)` builds routes, middleware and the lifespan.

Middleware, outermost first:
  RequestContextMiddleware  request ID on every response, one access line per request
  CORSMiddleware            answers preflights, adds CORS headers
  ServerErrorMiddleware     an unhandled exception becomes the 500 envelope, inside the above
  ProbeRoutes               `GET`/`HEAD` of the exact probe paths straight to their endpoints
and Starlette's ExceptionMiddleware maps the expected exceptions (errors.EXCEPTION_HANDLERS).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypedDict

import msgspec
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware as StarletteCORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db import Database, migrations_on_disk
from errors import EXCEPTION_HANDLERS, ServerErrorMiddleware, error_response, not_found
from health import LivenessEndpoint, ReadinessEndpoint
from logs import RequestContextMiddleware, configure_logging
from responses import StructResponse
from settings import Settings, load_settings_or_exit, read_environment

logger = logging.getLogger("service")


class State(TypedDict):
    """What the lifespan hands to every request as `scope["state"]`."""

    database: Database | None
    started_at: float


class RootInfo(msgspec.Struct):
    message: str
    version: str
    environment: str


class CORSMiddleware(StarletteCORSMiddleware):
    """Starlette's CORS, with a refused preflight answered by the error envelope.

    Requests without an `Origin` (probes, servers, curl) get only what Starlette would give
    them, `Vary: Origin`, without its per-request header objects.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or any(name == b"origin" for name, _ in scope["headers"]):
            await super().__call__(scope, receive, send)
            return

        async def send_varying(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                for name, _ in headers:
                    if name.lower() == b"vary":  # rare: join it as Starlette does
                        vary = MutableHeaders(scope=message)
                        vary["Vary"] = ", ".join([*vary.getlist("Vary"), "Origin"])
                        break
                else:
                    headers.append((b"vary", b"Origin"))
            await send(message)

        await self.app(scope, receive, send_varying)

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = bytes(response.body).decode()  # e.g. "Disallowed CORS origin, method"
        headers = {k: v for k, v in response.headers.items() if k.startswith("access-control-") or k == "vary"}
        return error_response(400, "VALIDATION_ERROR", reason, headers=headers)


class ProbeRoutes:
    """Sends `GET` and `HEAD` of the probe paths straight to their endpoints.

    Orchestrators call the probes more than anything else; Starlette's router would match
    every route and its ExceptionMiddleware build a `Request` each time, for endpoints that
    raise nothing it handles. Every other request (another method, a trailing slash, a
    `root_path`) goes on to the router, where the same routes answer 405, redirects and docs.
    """

    def __init__(self, app: ASGIApp, *, endpoints: dict[str, ASGIApp]) -> None:
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path") and scope["method"] in ("GET", "HEAD"):
            endpoint = self.endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[State]:
    settings: Settings = app.state.settings
    # Again here: a server that configured logging after importing us would have undone it.
    configure_logging(settings)
    database = await Database.open(settings) if settings.database_url else None
    try:
        yield {"database": database, "started_at": time.monotonic()}
    finally:
        if database is not None:
            await database.close()


def create_app(settings: Settings | None = None) -> Starlette:
    """The service for `settings`, or for the environment (and `.env`) when none are given."""
    if settings is None:
        settings = load_settings_or_exit(read_environment())
    configure_logging(settings)
    if settings.secret_key_generated:
        logger.warning("SECRET_KEY is not set: using a random key that changes at every start")

    async def root(request: Request) -> Response:
        message = f"{settings.app_name} is running"
        return StructResponse(RootInfo(message, settings.app_version, settings.environment))

    probes: dict[str, ASGIApp] = {
        "/health": LivenessEndpoint(settings),
        "/health/db": ReadinessEndpoint(settings, migrations_on_disk()),
    }
    routes = [
        Route("/health", probes["/health"], methods=["GET"], name="health"),
        Route("/health/db", probes["/health/db"], methods=["GET"], name="health_db"),
        Route("/", root, methods=["GET"], name="root"),
    ]
    middleware = [
        Middleware(RequestContextMiddleware, quiet_health=settings.environment == "production"),
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        ),
        Middleware(ServerErrorMiddleware, debug=settings.debug),
        Middleware(ProbeRoutes, endpoints=probes),
    ]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.router.default = not_found
    app.state.settings = settings
    return app


app = create_app()
