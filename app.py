"""The application: `create_app(settings, endpoints=...)` builds routes, middleware and the lifespan.

Every request goes through one layer, `middleware.RequestContext` (request ID, CORS, body limit,
the error envelope, access line, metrics), then the user's middleware, `routing.HotPaths` and
the router. Endpoints come from `api.Endpoints` groups (see api.py and examples/items.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from api import Context, Endpoints, State
from db import Database
from docs import docs_routes
from envfile import read_environment
from errors import EXCEPTION_HANDLERS, not_found
from health import LivenessEndpoint, ReadinessEndpoint
from logs import configure_logging
from logstream import finish_logs
from metrics import Metrics, MetricsEndpoint
from middleware import CORS, RequestContext
from migrate import MIGRATIONS_DIR, migrations_on_disk
from openapi import OPERATIONS, Operation
from routing import HotPaths
from settings import Redactor, Settings, load_settings_or_exit

logger = logging.getLogger("service")


class RootInfo(msgspec.Struct):
    message: str
    version: str
    environment: str


service = Endpoints(tag="service")


@service.get("/", summary="Service identity")
async def root(ctx: Context) -> RootInfo:
    """Name, version and environment."""
    settings = ctx.settings
    return RootInfo(f"{settings.app_name} is running", settings.app_version, settings.environment)


class Service(Starlette):
    """Starlette whose middleware stack is `RequestContext` around the user's middleware, `HotPaths`
    and the router.

    `RequestContext` is the 500 boundary and maps every exception to the envelope by the app's
    `exception_handlers`, so Starlette's own two layers for those (its `ServerErrorMiddleware`
    and `ExceptionMiddleware`) are not added: a request passes through one layer, not three.
    """

    def __init__(self, *, settings: Settings, probes: list[Route], metrics: Metrics | None, **options: Any) -> None:
        super().__init__(**options)
        self.probes = probes
        self.state.settings = settings
        self.state.redact = Redactor(settings.secrets)  # what masks secrets in an envelope's DEBUG detail
        self.state.metrics = metrics

    def build_middleware_stack(self) -> ASGIApp:
        settings: Settings = self.state.settings
        metrics: Metrics | None = self.state.metrics
        app: ASGIApp = HotPaths(self.router, probes=self.probes)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        cors = functools.partial(
            CORS,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After", "Location", "ETag", "WWW-Authenticate"],
        )
        return RequestContext(
            app,
            quiet=self.probes if settings.environment == "production" else (),
            observe=metrics.record if metrics is not None else None,
            cors=cors,
            max_body_bytes=settings.max_body_bytes,
            handlers=self.exception_handlers,
            debug=self.state.redact if settings.debug else None,
        )


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[State]:
    settings: Settings = app.state.settings
    # Again here: a server that configured logging after importing us would have undone it.
    configure_logging(settings)
    metrics: Metrics | None = app.state.metrics
    # Undone in the reverse order, each step whatever the ones before it raised.
    async with contextlib.AsyncExitStack() as undo:
        undo.callback(finish_logs)  # every line on the stream before the process ends, uvicorn's last ones included
        if metrics is not None:
            undo.callback(metrics.close)
        database = await Database.open(settings) if settings.database_url else None
        if database is not None:
            undo.push_async_callback(database.close)
        if metrics is not None and metrics.multiprocess:
            undo.push_async_callback(_stopped, asyncio.create_task(metrics.refresh_pool_gauges(database)))
        yield {"database": database, "started_at": time.monotonic(), "shutting_down": False, "metrics": metrics}


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(
    settings: Settings | None = None,
    *,
    endpoints: Sequence[Endpoints] = (),
    migrations: Sequence[Path] = (MIGRATIONS_DIR,),
) -> Starlette:
    """The service for `settings` (else the environment and `.env`), serving `endpoints` too.

    `migrations` are the folders whose migrations `/health/db` expects applied, read once, here.
    Every route must be documented: a route without an OpenAPI operation stops start-up.
    """
    if settings is None:
        settings = load_settings_or_exit(*read_environment())
    configure_logging(settings)
    if settings.secret_key_generated:
        logger.warning("SECRET_KEY is not set: using a random key that changes at every start")
    for name, meant in settings.unknown_variables:
        logger.warning("%s is set but is not a setting, so it is ignored: did you mean %s?", name, meant)

    readiness = ReadinessEndpoint(settings, migrations_on_disk(*migrations))
    probes = [
        Route("/health", LivenessEndpoint(settings), methods=["GET"], name="health"),
        Route("/health/db", readiness, methods=["GET"], name="health_db"),
    ]
    routes: list[BaseRoute] = list(probes)
    operations: dict[str, Operation] = dict(OPERATIONS)
    for route, operation in [pair for group in (service, *endpoints) for pair in group.bind(settings)]:
        if route.name in operations:
            raise ValueError(f"two routes are named {route.name!r}: each handler needs a name of its own")
        routes.append(route)
        operations[route.name] = operation
    metrics = Metrics() if settings.enable_metrics else None
    if metrics is not None and settings.web_concurrency > 1 and not metrics.multiprocess:
        # uvicorn reads WEB_CONCURRENCY as its --workers; `python -m app` gives its workers a directory.
        logger.warning(
            "WEB_CONCURRENCY=%d without PROMETHEUS_MULTIPROC_DIR: each worker's /metrics counts only its "
            "own requests (python -m app merges them; see deploy/README.md)",
            settings.web_concurrency,
        )
    if metrics is not None:
        routes.append(Route("/metrics", MetricsEndpoint(metrics), methods=["GET"], name="metrics"))
    if settings.enable_docs:
        routes += docs_routes(settings, routes, operations)
    undocumented = [r.path for r in routes if isinstance(r, Route) and r.name not in operations]
    if undocumented:
        raise ValueError(f"routes without an OpenAPI operation: {', '.join(undocumented)}")
    app = Service(
        settings=settings,
        probes=probes,
        metrics=metrics,
        routes=routes,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.router.default = not_found
    return app


def __getattr__(name: str) -> Starlette:
    """`app`, built from the environment (and `.env`) when first asked for: what `uvicorn app:app`
    serves. Importing `create_app` from here builds nothing (PEP 562 module `__getattr__`)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    built = globals()["app"] = create_app()
    return built


if __name__ == "__main__":  # `python -m app`: the production server builds the app itself
    import server

    server.main(create_app)
