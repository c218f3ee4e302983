"""What one access line and one metrics update cost the request's thread, before and after.

    uv run python bench/micro.py [--count 50000] [--rounds 5]

- log line: the access record (`makeRecord` + `handle`, as the middleware does) through
  logging's synchronous `StreamHandler` (before) and through `logstream.BufferedHandler` (after),
  both with the production JSON formatter, writing to a pipe that `cat` drains to /dev/null
  and to a file. "thread" is CPU time of the logging thread per line (what the event loop
  pays); "wall" is elapsed time per line until every line is written (the writer included).
- write_access_line: the same line through `access.write_access_line` (no LogRecord), the
  buffered handler being the root's only one, as in production.
- metrics: one request recorded with prometheus-client's labelled Counter and Histogram
  children (before) and with `metrics.Metrics.record` (after).

Best of `--rounds` (interference only ever adds time). In-process figures: a server adds its own work
around them, so read them as differences, not as shares of a request.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry, Counter, Histogram  # noqa: E402 - after the path is set

from access import write_access_line  # noqa: E402
from logs import JsonFormatter  # noqa: E402
from logstream import BufferedHandler  # noqa: E402
from metrics import BUCKETS, Metrics  # noqa: E402
from settings import Redactor  # noqa: E402

REQUEST_ID = "550e8400-e29b-41d4-a716-446655440000"
FIELDS = {"method": "GET", "path": "/no-such-route", "status": 404, "duration_ms": 0.31,
          "client": "127.0.0.1:50412", "request_id": REQUEST_ID}  # fmt: skip


Runner = Callable[[logging.Handler, int], tuple[float, float]]


def log_lines(handler: logging.Handler, count: int) -> tuple[float, float]:
    """(thread CPU µs, wall µs) per line for `count` access records through `handler`."""
    logger = logging.Logger("service.access")
    logger.addHandler(handler)
    args = ("GET", "/no-such-route", 404, 0.31, "127.0.0.1:50412")
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(count):
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "%s %s %d %.2fms client=%s", args, None,
                                   "log_lines", FIELDS)  # fmt: skip
        logger.handle(record)
    cpu = time.thread_time() - cpu
    if isinstance(handler, BufferedHandler):
        handler.drain(60)
    else:
        handler.flush()
    wall = time.perf_counter() - wall
    return cpu / count * 1e6, wall / count * 1e6


def direct_lines(handler: logging.Handler, count: int) -> tuple[float, float]:
    """As `log_lines`, through `access.write_access_line` with `handler` the root's only handler."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(count):
            write_access_line("GET", "/no-such-route", 404, 0.00031, ("127.0.0.1", 50412), REQUEST_ID)
        cpu = time.thread_time() - cpu
        assert isinstance(handler, BufferedHandler)
        handler.drain(60)
        wall = time.perf_counter() - wall
    finally:
        root.handlers[:] = saved
    return cpu / count * 1e6, wall / count * 1e6


def to_pipe(make: Callable[[TextIO], logging.Handler], count: int, run: Runner = log_lines) -> tuple[float, float]:
    reader = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert reader.stdin is not None
    stream = open(reader.stdin.fileno(), "w", closefd=False)  # noqa: SIM115 - closed below, after the handler
    handler = make(stream)
    try:
        return run(handler, count)
    finally:
        handler.close()
        stream.close()
        reader.stdin.close()
        reader.wait()


def to_file(make: Callable[[TextIO], logging.Handler], count: int, run: Runner = log_lines) -> tuple[float, float]:
    with tempfile.TemporaryFile("w") as stream:
        handler = make(stream)
        try:
            return run(handler, count)
        finally:
            handler.close()


def metrics_before(count: int) -> float:
    registry = CollectorRegistry()
    requests = Counter("http_requests", "", ["method", "route", "status"], registry=registry)
    durations = Histogram("http_request_duration_seconds", "", ["method", "route"], buckets=BUCKETS, registry=registry)
    cache: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
    began = time.perf_counter()
    for _ in range(count):  # the previous Metrics.observe, line for line
        series = cache.get(("GET", "/health", 200))
        if series is None:
            series = cache["GET", "/health", 200] = (requests.labels("GET", "/health", "200"),
                                                      durations.labels("GET", "/health"))  # fmt: skip
        series[0].inc()
        series[1].observe(0.0003)
    return (time.perf_counter() - began) / count * 1e6


def metrics_after(count: int) -> float:
    metrics = Metrics()
    scope = {"method": "GET", "route": None}
    began = time.perf_counter()
    for _ in range(count):
        metrics.record(scope, 200, 0.0003)
    return (time.perf_counter() - began) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    formatter = JsonFormatter(Redactor(()))

    def synchronous(stream: TextIO) -> logging.Handler:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        return handler

    def buffered(stream: TextIO) -> logging.Handler:
        handler = BufferedHandler(stream)
        handler.setFormatter(formatter)
        return handler

    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False  # as configure_logging does
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; {options.count} lines x {options.rounds}")
    print("| figure | before: thread µs | before: wall µs | after: thread µs | after: wall µs "
          "| write_access_line: thread µs | wall µs |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, sink in (("access line to a drained pipe", to_pipe), ("access line to a file", to_file)):
        before = [sink(synchronous, options.count) for _ in range(options.rounds)]
        after = [sink(buffered, options.count) for _ in range(options.rounds)]
        direct = [sink(buffered, options.count, direct_lines) for _ in range(options.rounds)]
        print(f"| {name} | {min(b[0] for b in before):.2f} | {min(b[1] for b in before):.2f} "
              f"| {min(a[0] for a in after):.2f} | {min(a[1] for a in after):.2f} "
              f"| {min(d[0] for d in direct):.2f} | {min(d[1] for d in direct):.2f} |")  # fmt: skip
    old = min(metrics_before(options.count) for _ in range(options.rounds))
    new = min(metrics_after(options.count) for _ in range(options.rounds))
    print(f"| metrics, one request | {old:.2f} | | {new:.2f} | |")


if __name__ == "__main__":
    main()
