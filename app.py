"""The application: `create_app(settings)` builds routes, middleware and the lifespan.

Middleware, outermost first:
  RequestContextMiddleware  request ID on every response, one access line per request
  MetricsMiddleware         counts and times requests by route template (ENABLE_METRICS)
  CORSMiddleware            answers preflights, adds CORS headers
  ServerErrorMiddleware     an unhandled exception becomes the 500 envelope, inside the above
  ProbeRoutes               `GET`/`HEAD` of the exact probe paths straight to their endpoints
and Starlette's ExceptionMiddleware maps the expected exceptions (errors.EXCEPTION_HANDLERS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypedDict

import msgspec
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware as StarletteCORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db import MIGRATIONS_DIR, Database, migrations_on_disk
from errors import EXCEPTION_HANDLERS, ServerErrorMiddleware, error_response, not_found
from health import LivenessEndpoint, ReadinessEndpoint
from logs import RequestContextMiddleware, configure_logging
from metrics import Metrics, MetricsEndpoint, MetricsMiddleware
from openapi import OPERATIONS, Operation, Reply, docs_routes
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


ROOT_OPERATION = Operation("Service identity", "Name, version and environment.", "service", {
    200: Reply("Running", RootInfo, {"running": {
        "message": "AgentifUI Pro API is running", "version": "0.1.0", "environment": "development"}}),
})  # fmt: skip


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
    Like the router, it leaves the route it chose in `scope["route"]` (metrics label by it).
    """

    def __init__(self, app: ASGIApp, *, routes: list[Route]) -> None:
        self.app = app
        self.routes = {route.path: route for route in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path") and scope["method"] in ("GET", "HEAD"):
            route = self.routes.get(scope["path"])
            if route is not None:
                scope["route"] = route
                await route.app(scope, receive, send)
                return
        await self.app(scope, receive, send)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[State]:
    settings: Settings = app.state.settings
    # Again here: a server that configured logging after importing us would have undone it.
    configure_logging(settings)
    metrics: Metrics | None = app.state.metrics
    database = await Database.open(settings) if settings.database_url else None
    refresher = None
    if metrics is not None and metrics.multiprocess:
        refresher = asyncio.create_task(metrics.refresh_pool_gauges(database))
    try:
        yield {"database": database, "started_at": time.monotonic()}
    finally:
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        if database is not None:
            await database.close()
        if metrics is not None:
            metrics.close()


def create_app(settings: Settings | None = None, migrations_dir: Path = MIGRATIONS_DIR) -> Starlette:
    """The service for `settings`, or for the environment (and `.env`) when none are given.

    `migrations_dir` is read once, here: `/health/db` compares the database with these ids.
    """
    if settings is None:
        settings = load_settings_or_exit(read_environment())
    configure_logging(settings)
    if settings.secret_key_generated:
        logger.warning("SECRET_KEY is not set: using a random key that changes at every start")

    async def root(request: Request) -> Response:
        message = f"{settings.app_name} is running"
        return StructResponse(RootInfo(message, settings.app_version, settings.environment))

    probes = [
        Route("/health", LivenessEndpoint(settings), methods=["GET"], name="health"),
        Route(
            "/health/db",
            ReadinessEndpoint(settings, migrations_on_disk(migrations_dir)),
            methods=["GET"],
            name="health_db",
        ),
    ]
    routes: list[BaseRoute] = [*probes, Route("/", root, methods=["GET"], name="root")]
    metrics = Metrics() if settings.enable_metrics else None
    if metrics is not None:
        routes.append(Route("/metrics", MetricsEndpoint(metrics), methods=["GET"], name="metrics"))
    if settings.enable_docs:
        routes += docs_routes(settings, routes, {**OPERATIONS, "root": ROOT_OPERATION})
    middleware = [
        Middleware(RequestContextMiddleware, quiet_health=settings.environment == "production"),
        *([Middleware(MetricsMiddleware, metrics=metrics)] if metrics is not None else []),
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        ),
        Middleware(ServerErrorMiddleware, debug=settings.debug),
        Middleware(ProbeRoutes, routes=probes),
    ]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.router.default = not_found
    app.state.settings = settings
    app.state.metrics = metrics
    return app


app = create_app()
