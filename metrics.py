"""Prometheus metrics: requests by route template, pool gauges, process metrics; `/metrics`.

Routes are labelled by their template (`/items/{id}`), never the raw path, and every request
no route answered (unknown paths, CORS preflights) shares one label, so the number of series
stays bounded whatever clients send.

One process: each app has its own registry, with process metrics. Several (`uvicorn --workers
N`): prometheus-client's multiprocess mode, chosen by the library itself when
`PROMETHEUS_MULTIPROC_DIR` names an empty directory in the server's environment. Each worker
then writes its values to files there and `/metrics` merges them, whichever worker answers;
process metrics are absent, as prometheus-client cannot merge them.
"""

from __future__ import annotations

import asyncio
import os

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from starlette.types import Receive, Scope, Send

from db import Database
from responses import send_bytes

UNMATCHED = "<unmatched>"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Probes answer in well under a millisecond; the low buckets tell them apart from real work.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
POOL_REFRESH_INTERVAL = 5.0  # seconds between pool gauge updates in each worker (multiprocess)
_HEADERS = ((b"content-type", CONTENT_TYPE_PLAIN_0_0_4.encode()), (b"cache-control", b"no-store"))


def multiprocess_dir() -> str | None:
    """The directory prometheus-client shares between workers; it reads the same variable at import."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The service's metrics; labelled children are cached so a request costs one dict lookup."""

    def __init__(self) -> None:
        # One registry of our own (not prometheus-client's global one), so every app has its own.
        self.collectors = collectors = CollectorRegistry()
        self.multiprocess = multiprocess_dir() is not None
        if not self.multiprocess:
            ProcessCollector(registry=collectors)
            PlatformCollector(registry=collectors)
        self.requests = Counter("http_requests", "HTTP requests answered", ["method", "route", "status"],
                                registry=collectors)  # fmt: skip
        self.durations = Histogram("http_request_duration_seconds", "Time to answer an HTTP request",
                                   ["method", "route"], buckets=BUCKETS, registry=collectors)  # fmt: skip
        # livesum: in multiprocess mode the sum over the workers alive now (what this pod holds).
        self.pool_open = Gauge("db_pool_connections_open", "Connections the pool holds open",
                               multiprocess_mode="livesum", registry=collectors)  # fmt: skip
        self.pool_in_use = Gauge("db_pool_connections_in_use", "Connections checked out of the pool",
                                 multiprocess_mode="livesum", registry=collectors)  # fmt: skip
        self.pool_max = Gauge("db_pool_connections_max", "The pool's maximum size (DATABASE_POOL_SIZE)",
                              multiprocess_mode="livesum", registry=collectors)  # fmt: skip
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        series = self._series.get((method, route, status))
        if series is None:
            counter = self.requests.labels(method, route, str(status))
            series = self._series[method, route, status] = (counter, self.durations.labels(method, route))
        series[0].inc()
        series[1].observe(seconds)

    def record(self, scope: Scope, status: int, seconds: float) -> None:
        """One answered request, as `logs.RequestContextMiddleware` reports it.

        Labelled by the route template the router (or `app.HotPaths`) left in the scope,
        so a path parameter never becomes a label; unrouted paths share one label.
        """
        route = scope.get("route")
        template: str = route.path if route is not None else UNMATCHED
        method: str = scope["method"]
        self.observe(method if method in METHODS else "OTHER", template, status, seconds)

    def update_pool(self, database: Database | None) -> None:
        usage = database.usage() if database is not None else None
        self.pool_open.set(database.open_connections() if database is not None else 0)
        self.pool_in_use.set(usage.active_connections if usage is not None else 0)
        self.pool_max.set(usage.pool_size if usage is not None else 0)

    async def refresh_pool_gauges(self, database: Database | None) -> None:
        """Keep this worker's pool gauges current for whichever worker answers a scrape."""
        while True:
            self.update_pool(database)
            await asyncio.sleep(POOL_REFRESH_INTERVAL)

    def exposition(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.collectors)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]  # not annotated upstream
        return generate_latest(merged)

    def close(self) -> None:
        """A stopping worker's live gauges leave the sums (multiprocess mode)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]  # not annotated upstream


class MetricsEndpoint:
    """`/metrics` in Prometheus text format; the pool gauges are read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.update_pool(scope.get("state", {}).get("database"))
        await send_bytes(scope, send, 200, self.metrics.exposition(), _HEADERS)
