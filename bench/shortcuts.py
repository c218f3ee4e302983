"""What each remaining shortcut buys, in process: the app with it, and with it switched off.

    uv run python bench/shortcuts.py [--requests 50000] [--rounds 5]

The foundation's app (production settings, JSON access lines to a file, metrics on, no
database: the routes measured need none) is called with uvicorn-shaped scopes, as in
`bench/inprocess.py`. Each shortcut is switched off by replacing it with what the code would
do without it, in a fresh app; the figures are CPU µs per request, medians of `--rounds`
alternating runs. Put them against the server's CPU per request (1 / requests per second of
`bench/run.py`) to get the share the issue's 3% rule asks for.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import inprocess  # noqa: E402 - after the path is set

import logs  # noqa: E402
import middleware  # noqa: E402
import responses  # noqa: E402
import routing  # noqa: E402
from app import create_app  # noqa: E402
from settings import Settings  # noqa: E402


def without_probe_dispatch() -> AbstractContextManager[Any]:
    """Probes go to the router like any route."""
    original = routing.HotPaths.__init__

    def no_probes(self: routing.HotPaths, app: Any, *, probes: list[Any]) -> None:
        original(self, app, probes=[])

    return mock.patch.object(routing.HotPaths, "__init__", no_probes)


def without_certain_404() -> AbstractContextManager[Any]:
    """Every unknown path goes to the router's two passes."""

    def never_certain(self: routing.HotPaths, router: Any, path: str) -> int | None:
        return None  # a plain function: a Mock's own call would cost more than what is measured

    return mock.patch.object(routing.HotPaths, "_certain_answer", never_certain)


def without_origin_dispatch() -> AbstractContextManager[Any]:
    """Every request goes through Starlette's CORS, which adds `Vary: Origin` itself."""
    original = middleware.RequestContext.__init__

    def cors_for_all(self: middleware.RequestContext, app: Any, **options: Any) -> None:
        original(self, app, **options)
        self.app = self.with_origin

    return mock.patch.object(middleware.RequestContext, "__init__", cors_for_all)


def without_direct_access_line() -> AbstractContextManager[Any]:
    """The access line goes through `logging` (a filter on the access logger turns the direct path off)."""
    return mock.patch.object(logs.access_logger, "filters", [lambda record: True])


@contextmanager
def without_clock_cache() -> Iterator[None]:
    """Every timestamp formatted from scratch, for responses and log lines alike."""

    def fresh(seconds: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))

    with mock.patch.object(responses, "utc_second", fresh), mock.patch.object(logs, "utc_second", fresh):
        yield


SHORTCUTS: dict[str, tuple[Callable[[], Any], list[str]]] = {
    "probes dispatched ahead of the router (routing.HotPaths)": (without_probe_dispatch, ["/health"]),
    "certain 404s from one pattern (routing.HotPaths)": (without_certain_404, ["/no-such-route"]),
    "CORS only for requests with an Origin (middleware.RequestContext)": (without_origin_dispatch,
                                                                          ["/health", "/no-such-route"]),
    "access line as fields, made by the log writer (access.write_access_line)": (without_direct_access_line,
                                                                               ["/no-such-route"]),
    "one clock cache (responses.utc_second)": (without_clock_cache, ["/health", "/no-such-route"]),
}  # fmt: skip


async def measure(path: str, requests: int) -> float:
    settings = Settings(environment="production", secret_key="bench-" + "Mw7Qk2Zt9Xr4Lp1Vn6Hd" * 2, log_json=True)
    app = create_app(settings)
    state, inbox = await inprocess.lifespan_state(app)
    try:
        return await inprocess.per_request(app, path, state, requests)
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.sleep(0.05)  # the lifespan ends (its logs are written) before the next app


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    log = ROOT / "bench" / "results" / "shortcuts.log"
    log.parent.mkdir(exist_ok=True)
    stderr = os.dup(2)
    rows = []
    with log.open("wb") as out:
        os.dup2(out.fileno(), 2)  # the app's log lines go to the file
        try:
            for name, (switch_off, paths) in SHORTCUTS.items():
                for path in paths:
                    with_it, without_it = [], []
                    for number in range(args.rounds):
                        for off in (False, True) if number % 2 == 0 else (True, False):
                            if off:
                                with switch_off():
                                    without_it.append(await measure(path, args.requests))
                            else:
                                with_it.append(await measure(path, args.requests))
                    rows.append((name, path, statistics.median(with_it), statistics.median(without_it)))
        finally:
            os.dup2(stderr, 2)
            logging.shutdown()
    print(f"CPU µs per request, medians of {args.rounds} alternating runs of {args.requests} requests")
    print("| shortcut | route | with | without | saved |\n| --- | --- | ---: | ---: | ---: |")
    for name, path, with_us, without_us in rows:
        print(f"| {name} | {path} | {with_us:.2f} | {without_us:.2f} | {without_us - with_us:.2f} |")
    return 0


if __name__ == "__main__":
    import uvloop  # the loop uvicorn runs the app on

    raise SystemExit(uvloop.run(main()))
