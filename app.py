"""The application: `create_app(settings)` builds routes, middleware and the lifespan.

Middleware, outermost first:
  RequestContextMiddleware  request ID on every response, one access line and metrics per request
  CORSMiddleware            answers preflights, adds CORS headers
  ServerErrorMiddleware     an unhandled exception becomes the 500 envelope, inside the above
  HotPaths                  probes straight to their endpoints, certain 404s without the router
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
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.middleware.cors import CORSMiddleware as StarletteCORSMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db import MIGRATIONS_DIR, Database, migrations_on_disk
from errors import EXCEPTION_HANDLERS, ServerErrorMiddleware, error_response, not_found
from health import LivenessEndpoint, ReadinessEndpoint
from logs import RequestContextMiddleware, configure_logging
from metrics import Metrics, MetricsEndpoint
from openapi import OPERATIONS, Operation, Reply, docs_routes
from responses import StructResponse
from settings import Settings, load_settings_or_exit, read_environment

logger = logging.getLogger("service")


class State(TypedDict):
    """What the lifespan hands to every request as `scope["state"]`."""

    database: Database | None
    started_at: float
    shutting_down: bool  # set by the production server (server.py) when SIGTERM starts its drain


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


class HotPaths:
    """The two commonest requests skip Starlette's router: probes, and paths nothing serves.

    - `GET`/`HEAD` of the exact probe paths go straight to their endpoints. Orchestrators call
      them more than anything else; the router would match every route and its
      ExceptionMiddleware build a `Request` each time, for endpoints that raise nothing it handles.
    - When every route is a fixed path (no parameters, no mounts), a path that is none of them,
      with or without a trailing slash, is certain to be a 404: it gets `errors.not_found`, the
      router's own answer, without the router's two passes (the second for the slash redirect).
      Scanners and typos make this the commonest error.

    Everything else (other methods, near-misses, a `root_path`) goes on to the router, which
    answers 405s, redirects and the rest as before. Like the router, it leaves the route it
    chose in `scope["route"]` (metrics label by it).
    """

    def __init__(self, app: ASGIApp, *, probes: list[Route]) -> None:
        self.app = app
        self.probes = {route.path: route for route in probes}
        self._routes_seen = -1
        self._fixed_paths: frozenset[str] | None = None

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
        if len(routes) != self._routes_seen:  # read from the live router: routes may be added late
            self._routes_seen = len(routes)
            fixed = all(isinstance(r, Route) and not r.param_convertors for r in routes)
            self._fixed_paths = frozenset(r.path for r in routes if isinstance(r, Route)) if fixed else None
        known = self._fixed_paths
        if known is None:
            return False
        bare = path.rstrip("/")
        return path not in known and bare not in known and bare + "/" not in known


class Service(Starlette):
    """Starlette without its own outermost `ServerErrorMiddleware`.

    `errors.ServerErrorMiddleware` already turns every exception raised below the request-ID
    and CORS layers into the envelope. Above it there is only our own middleware, and anything
    escaping from there is uvicorn's to answer: a plain 500, exactly what Starlette's layer
    gives without DEBUG. Starlette's layer would only add a wrapper to every request.
    """

    def build_middleware_stack(self) -> ASGIApp:
        if any(key in (500, Exception) for key in self.exception_handlers):
            raise ValueError("register 500 handling in errors.ServerErrorMiddleware, not as a handler")
        app: ASGIApp = ExceptionMiddleware(self.router, handlers=self.exception_handlers, debug=self.debug)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        if self.max_body_size is not None:
            app = RequestBodyLimitMiddleware(app, max_body_size=self.max_body_size)
        return app


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
        yield {"database": database, "started_at": time.monotonic(), "shutting_down": False}
    finally:
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        if database is not None:
            await database.close()
        if metrics is not None:
            metrics.close()


def create_app(settings: Settings | None = None, migrations_dir: Path = MIGRATIONS_DIR) -> Service:
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
        Middleware(
            RequestContextMiddleware,
            quiet_health=settings.environment == "production",
            observe=metrics.record if metrics is not None else None,
        ),
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        ),
        Middleware(ServerErrorMiddleware, debug=settings.debug),
        Middleware(HotPaths, probes=probes),
    ]
    app = Service(routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.router.default = not_found
    app.state.settings = settings
    app.state.metrics = metrics
    return app


if __name__ == "__main__":  # `python -m app`: the production server builds the app itself
    import server

    server.main(create_app)
elif __name__ != "__mp_main__":  # not in a worker's re-run of `__main__`: it imports `app` for that
    app = create_app()
