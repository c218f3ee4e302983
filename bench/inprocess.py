"""The app's own CPU per request, without a server: where a change's microseconds go.

    uv run python bench/inprocess.py [--requests 20000] [--rounds 5] [--app examples.items:app]

Builds the app with production settings (JSON access lines to a file, metrics on) against a
throwaway PostgreSQL with the migrations applied, runs its lifespan, and calls it with
uvicorn-shaped scopes from 64 callers at once (wrk's connections), for each route; the ceiling
(`bench/baseline.py`) is called the same way, alternating with it. Figures are CPU time of this
process per request (`time.process_time`: the database's own work is not counted), the median
of `--rounds`. The server's parsing and writing are not in these figures: they are what
`bench/run.py` adds on top, the same for every app. The items lookup is put against the
ceiling's `/health/db`, as in `bench/run.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from servers import ROOT, Postgres

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ROUTES = {"/health": "/health", "/health/db": "/health/db", "404": "/no-such-route",
          "/items/{id} 404": "/items/01a22927-b7e3-7799-94c0-ac970239e0b2"}  # fmt: skip
# The route whose ceiling is another of the ceiling's routes (as in bench/run.py).
REFERENCE = {"/items/{id} 404": "/health/db"}
CONCURRENCY = 64  # callers at once, as wrk's connections: database round trips overlap
App = Callable[..., Any]


def scope(path: str, state: dict[str, Any]) -> dict[str, Any]:
    """What uvicorn's httptools protocol hands the app for `GET path` from wrk."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50412),
        "scheme": "http",
        "root_path": "",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000")],
        "state": state.copy(),  # uvicorn copies the lifespan state into every request
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: dict[str, Any]) -> None:
    return None


async def lifespan_state(app: App) -> tuple[dict[str, Any], asyncio.Queue[dict[str, Any]]]:
    """Starts the app's lifespan as uvicorn does; the queue ends it."""
    state: dict[str, Any] = {}
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started = asyncio.get_running_loop().create_future()
    await inbox.put({"type": "lifespan.startup"})

    async def lifespan_send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set_result(None)

    life = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
    asyncio.get_running_loop().create_task(app(life, inbox.get, lifespan_send))
    await started
    return state, inbox


async def per_request(app: App, path: str, state: dict[str, Any], count: int) -> float:
    """CPU µs per request over `count` requests of `path`, from `CONCURRENCY` callers at once."""

    async def caller(requests: int) -> None:
        for _ in range(requests):
            await app(scope(path, state), receive, send)

    await asyncio.gather(*(caller(200 // CONCURRENCY) for _ in range(CONCURRENCY)))  # warm: the pool connects
    cpu = time.process_time()
    await asyncio.gather(*(caller(count // CONCURRENCY) for _ in range(CONCURRENCY)))
    return (time.process_time() - cpu) / (count // CONCURRENCY * CONCURRENCY) * 1e6


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--app", default="examples.items:app", help="module:attribute (default examples.items:app)")
    args = parser.parse_args()
    postgres = Postgres()
    log = ROOT / "bench" / "results" / "inprocess.log"
    log.parent.mkdir(exist_ok=True)
    try:
        os.environ |= {
            "DATABASE_URL": postgres.url,
            "DATABASE_POOL_SIZE": "10",
            "ENVIRONMENT": "production",
            "SECRET_KEY": secrets.token_urlsafe(48),
            "LOG_JSON": "true",
            "LOG_LEVEL": "INFO",
        }
        stderr = os.dup(2)
        with log.open("wb") as out:
            os.dup2(out.fileno(), 2)  # the app's log lines go to the file, as in bench/run.py
            try:
                module, _, attribute = args.app.partition(":")
                apps = {"app": getattr(importlib.import_module(module), attribute),
                        "ceiling": importlib.import_module("baseline").app}  # fmt: skip
                states = {name: await lifespan_state(app) for name, app in apps.items()}
                figures: dict[str, dict[str, list[float]]] = {route: {n: [] for n in apps} for route in ROUTES}
                for number in range(args.rounds):
                    for route, path in ROUTES.items():
                        names = list(apps) if number % 2 == 0 else list(reversed(apps))
                        for name in names:
                            state = states[name][0]
                            figures[route][name].append(await per_request(apps[name], path, state, args.requests))
                for _, inbox in states.values():
                    await inbox.put({"type": "lifespan.shutdown"})
                await asyncio.sleep(0.5)
            finally:
                os.dup2(stderr, 2)
    finally:
        postgres.destroy()
    print(f"{args.app}, {args.requests} requests x {args.rounds} rounds, CPU µs per request (median)")
    print(f"| route | {args.app} | ceiling | difference |\n| --- | ---: | ---: | ---: |")
    for route, by_app in figures.items():
        ours = statistics.median(by_app["app"])
        ceiling = statistics.median(figures[REFERENCE.get(route, route)]["ceiling"])
        print(f"| {route} | {ours:.2f} | {ceiling:.2f} | {ours - ceiling:+.2f} |")
    return 0


if __name__ == "__main__":
    import uvloop  # the loop uvicorn runs the app on

    raise SystemExit(uvloop.run(main()))
