"""The application: `create_app(settings)` builds routes, middleware and the lifespan.

Middleware, outermost first:
  RequestContextMiddleware  request ID on every response, one access line per request
  CORSMiddleware            answers preflights, adds CORS headers
  ServerErrorMiddleware     an unhandled exception becomes the 500 envelope, inside the above
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
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware as StarletteCORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from db import Database, migrations_on_disk
from errors import EXCEPTION_HANDLERS, ServerErrorMiddleware, error_response
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
    """Starlette's CORS, with a refused preflight answered by the error envelope."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = bytes(response.body).decode()  # e.g. "Disallowed CORS origin, method"
        headers = {k: v for k, v in response.headers.items() if k.startswith("access-control-") or k == "vary"}
        return error_response(400, "VALIDATION_ERROR", reason, headers=headers)


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

    routes = [
        Route("/health", LivenessEndpoint(settings), methods=["GET"], name="health"),
        Route("/health/db", ReadinessEndpoint(settings, migrations_on_disk()), methods=["GET"], name="health_db"),
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
    ]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.settings = settings
    return app


app = create_app()
