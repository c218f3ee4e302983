"""Prometheus metrics: requests by route template, pool gauges, process metrics; `/metrics`.

Routes are labelled by their template (`/items/{id}`), never the raw path, and every request
no route answered (unknown paths, CORS preflights) shares one label, so the number of series
stays bounded whatever clients send.

Requests are counted in plain Python (a list per series, updated on the event loop's thread
only, so no lock) and turned into Prometheus families when `/metrics` is scraped.

One process: each app has its own registry, with process metrics. Several (`uvicorn --workers
N`): when `PROMETHEUS_MULTIPROC_DIR` names an empty directory in the server's environment,
each worker writes its counts to `requests_<pid>.json` there every `FLUSH_INTERVAL` seconds and
when it stops, and `/metrics` adds up every worker's file, with the answering worker's own
counts live, written to its file first. A scrape is exact for the worker that answers it and at
most `FLUSH_INTERVAL` seconds behind for the others, and never reads a counter lower than a scrape
before it did, whichever workers answer or are killed. The pool gauges use prometheus-client's own multiprocess mode
(which the library chooses by itself from the same variable); process metrics are absent, as
prometheus-client cannot merge them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import msgspec
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from starlette.types import Receive, Scope, Send

from db import Database
from logstream import dropped_log_lines
from responses import send_bytes

logger = logging.getLogger("service.metrics")
UNMATCHED = "<unmatched>"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Probes answer in well under a millisecond; the low buckets tell them apart from real work.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FLUSH_INTERVAL = 1.0  # seconds between a worker's writes of its counts and pool gauges (multiprocess)
_LE = [*(repr(b) for b in BUCKETS), "+Inf"]
_HEADERS = ((b"content-type", CONTENT_TYPE_PLAIN_0_0_4.encode()), (b"cache-control", b"no-store"))

# One series: [count, sum of seconds, then one count per bucket, +Inf last (not cumulative)].
Series = list[float]
SeriesKey = tuple[str, str, int]  # method, route, status
Key = TypeVar("Key", tuple[str, str, int], tuple[str, str])


class _Counts(msgspec.Struct):
    """What a worker writes to its file: its series and its dropped log lines, since it started."""

    series: list[tuple[str, str, int, Series]]
    log_lines_dropped: int


def multiprocess_dir() -> str | None:
    """The directory prometheus-client shares between workers; it reads the same variable at import."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The service's metrics; a request costs one dict lookup and three list updates, no lock."""

    def __init__(self) -> None:
        # One registry of our own (not prometheus-client's global one), so every app has its own.
        self.collectors = collectors = CollectorRegistry()
        shared = multiprocess_dir()
        self.multiprocess = shared is not None
        self.series: dict[SeriesKey, Series] = {}
        self._file = Path(shared, f"requests_{os.getpid()}.json") if shared is not None else None
        self._dropped_before = 0  # a previous process with our pid left its counts: they go on from there
        if self._file is not None and self._file.exists():
            earlier = _read(self._file)
            self.series = {(m, r, s): values for m, r, s, values in earlier.series}
            self._dropped_before = earlier.log_lines_dropped
        if not self.multiprocess:
            ProcessCollector(registry=collectors)
            PlatformCollector(registry=collectors)
            collectors.register(self)
        # livesum: in multiprocess mode the sum over the workers alive now (what this pod holds).
        self.pool_open = Gauge("db_pool_connections_open", "Connections the pool holds open",
                               multiprocess_mode="livesum", registry=collectors)  # fmt: skip
        self.pool_in_use = Gauge("db_pool_connections_in_use", "Connections checked out of the pool",
                                 multiprocess_mode="livesum", registry=collectors)  # fmt: skip
        self.pool_max = Gauge("db_pool_connections_max", "The pool's maximum size (DATABASE_POOL_SIZE)",
                              multiprocess_mode="livesum", registry=collectors)  # fmt: skip

    def record(self, scope: Scope, status: int, seconds: float) -> None:
        """One answered request, as `middleware.RequestContext` reports it (and `python -m app`'s
        edge its refusals, with a scope holding only the method).

        Labelled by the route template the router (or `routing.HotPaths`) left in the scope,
        so a path parameter never becomes a label; unrouted paths share one label.
        """
        route = scope.get("route")
        method: str = scope["method"]
        key = (method if method in METHODS else "OTHER", route.path if route is not None else UNMATCHED, status)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0] * (len(BUCKETS) + 3)
        series[0] += 1
        series[1] += seconds
        series[2 + bisect_left(BUCKETS, seconds)] += 1  # the first bucket whose bound is >= seconds

    def collect(self) -> Iterator[Metric]:
        """The request and log families at scrape time, every worker's counts added up."""
        totals = {key: list(values) for key, values in self.series.items()}
        dropped = self._dropped_before + dropped_log_lines()
        if self._file is not None:
            for path in self._file.parent.glob("requests_*.json"):
                if path != self._file:
                    counts = _read(path)
                    dropped += counts.log_lines_dropped
                    for method, route, status, values in counts.series:
                        _add(totals, (method, route, status), values)
        return _families(totals, dropped)

    def update_pool(self, database: Database | None) -> None:
        usage = database.usage() if database is not None else None
        self.pool_open.set(database.open_connections() if database is not None else 0)
        self.pool_in_use.set(usage.active_connections if usage is not None else 0)
        self.pool_max.set(usage.pool_size if usage is not None else 0)

    async def refresh_pool_gauges(self, database: Database | None) -> None:
        """Keep this worker's counts and pool gauges current for whichever worker answers a scrape.

        A directory that cannot be written (full, removed) is logged once, and tried again each time.
        """
        failing = False
        while True:
            self.update_pool(database)
            try:
                self.write_counts()
            except OSError as exc:
                if not failing:
                    logger.warning("Cannot write this worker's counts for other workers' scrapes: %s", exc)
                failing = True
            else:
                if failing:
                    logger.info("This worker's counts are written again")
                failing = False
            await asyncio.sleep(FLUSH_INTERVAL)

    def write_counts(self) -> None:
        """This worker's counts to its file, replaced whole so a reader never sees half of it."""
        if self._file is None:
            return
        counts = _Counts(
            [(m, r, s, values) for (m, r, s), values in self.series.items()],
            self._dropped_before + dropped_log_lines(),
        )
        partial = self._file.with_suffix(".tmp")
        partial.write_bytes(msgspec.json.encode(counts))
        partial.replace(self._file)

    def exposition(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.collectors)
        assert self._file is not None  # multiprocess: the shared directory is known
        # What this scrape reports of this worker is on disk first: killed right after, the worker
        # would otherwise leave older counts, and every later scrape would read a counter gone back.
        self.write_counts()
        _forget_the_dead(self._file.parent)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]  # not annotated upstream
        merged.register(self)
        return generate_latest(merged)

    def close(self) -> None:
        """A stopping worker writes its last counts; its live gauges leave the sums (multiprocess mode)."""
        if self.multiprocess:
            try:
                self.write_counts()
            except OSError as exc:  # the directory is gone or full: the stop goes on, said
                logger.warning("Cannot write this worker's last counts for other workers' scrapes: %s", exc)
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]  # not annotated upstream


def _forget_the_dead(directory: Path) -> None:
    """Take the live gauges of processes that are gone out of the sums.

    A worker killed outright never says it stopped (`close`): `python -m app`'s supervisor says
    so for it, but `uvicorn --workers N` replaces it without a word, and a server killed whole
    leaves its files to the next one on the directory. Their pool gauges would count forever.
    Their request counts stay: a counter never goes back.
    """
    for path in directory.glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid))  # type: ignore[no-untyped-call]  # not annotated upstream


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only whether it exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def _read(path: Path) -> _Counts:
    try:
        return msgspec.json.decode(path.read_bytes(), type=_Counts)
    except (OSError, msgspec.DecodeError):  # removed meanwhile, or not ours: nothing to add
        return _Counts([], 0)


def _add(totals: dict[Key, Series], key: Key, values: Series) -> None:
    mine = totals.get(key)
    if mine is None:
        totals[key] = list(values)
    else:
        for i, v in enumerate(values):
            mine[i] += v


def _families(totals: dict[SeriesKey, Series], dropped: int) -> Iterator[Metric]:
    requests = CounterMetricFamily("http_requests", "HTTP requests answered", labels=["method", "route", "status"])
    durations = HistogramMetricFamily(
        "http_request_duration_seconds", "Time to answer an HTTP request", labels=["method", "route"]
    )
    by_route: dict[tuple[str, str], Series] = {}
    for (method, route, status), values in sorted(totals.items()):
        requests.add_metric([method, route, str(status)], values[0])
        _add(by_route, (method, route), values)
    for (method, route), values in by_route.items():
        cumulative, buckets = 0.0, []
        for le, count in zip(_LE, values[2:], strict=True):
            cumulative += count
            buckets.append((le, cumulative))
        durations.add_metric([method, route], buckets, values[1])
    dropped_lines = CounterMetricFamily(
        "log_lines_dropped", "Log lines dropped because the log stream was not draining", value=dropped
    )
    return iter([requests, durations, dropped_lines])


class MetricsEndpoint:
    """`/metrics` in Prometheus text format; the pool gauges are read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.update_pool(scope.get("state", {}).get("database"))
        await send_bytes(scope, send, 200, self.metrics.exposition(), _HEADERS)
