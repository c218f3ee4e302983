"""The benchmark: the service against a bare ASGI baseline, alternately, on pinned cores.

    uv run python bench/run.py                        # the full method (see bench/README.md)
    uv run python bench/run.py --smoke                # seconds, for CI: it runs, it answers
    uv run python bench/run.py --compare "CMD {port}" # any other server next to ours
    uv run python bench/run.py --soak                 # 200k mixed requests, memory throughout
    uv run python bench/run.py --peers                # FastAPI, Litestar, Starlette, BlackSheep too
    uv run python bench/run.py --scale                # 1, 64 and 512 connections; 2 workers against 1
    uv run python bench/run.py --app examples.items:app --server uvicorn --server python-m-app

A throwaway PostgreSQL (tests/cluster.py) gets the migrations; each server is started under
uvicorn with one worker, uvloop and httptools, pinned to one core while wrk runs on the
other. Servers take turns within each round, and every ratio is taken within one round, so
noise from the rest of the machine hits both sides of it alike.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from report import machine, render, render_own_ceiling, render_side_by_side, render_soak, summarise
from servers import ROOT, SERVER_CORE, Postgres, Running, Server
from venvs import peer_pins, peer_python

RESULTS = ROOT / "bench" / "results"
LOAD_CORE = "1"  # the servers get the other one
# The reference resource's keyed lookup of an id that is not there: a query, a 404 and its access
# line (under app:app the same path is an unknown path). Its ratio is to the ceiling's /health/db.
ITEMS = "/items/{id} 404"
ROUTES = {"/health": "/health", "/health/db": "/health/db", "404": "/no-such-route",
          ITEMS: "/items/01a22927-b7e3-7799-94c0-ac970239e0b2"}  # fmt: skip
SCALE_ROUTES = {"/health": "/health", "/health/db": "/health/db"}
SCALE = [(1, 1), (64, 1), (512, 1), (64, 2)]  # (connections, workers) of each --scale table
UNKNOWN_PATH = b'"message":"Resource not found"'  # the 404 of a path no route serves (not the items lookup's)
EXPECTED_STATUS = {"/health": 200, "/health/db": 200, "404": 404, ITEMS: 404}
REFERENCE = {ITEMS: "/health/db"}  # a route whose ratio is to another of the ceiling's routes
EDGE_BASELINE = "baseline on python -m app's server"
OURS = ("uvicorn ", "python -m app")  # the names of this project's servers (the targets are theirs)
SETTLE = 0.5  # seconds of quiet before reading idle or after-load memory
UVICORN = ["-m", "uvicorn", "--host", "127.0.0.1", "--loop", "uvloop", "--http", "httptools"]
SOAK_SCRIPT = """
local paths = {"/health", "/health/db", "/no-such-route"}
local sent = 0
function request()
  sent = sent + 1
  return wrk.format(nil, paths[sent % #paths + 1])
end
"""


# ---------------------------------------------------------------------------- load


def wrk(port: int, path: str, seconds: int, connections: int, script: Path | None = None) -> dict[str, Any]:
    argv = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    argv += [f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    return _parse_wrk(out)


def _parse_wrk(out: str) -> dict[str, Any]:
    def number(pattern: str) -> float:
        match = re.search(pattern, out)
        return float(match.group(1)) if match else 0.0

    percentiles = {p: _ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE)}
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": int(number(r"(\d+) requests in")),
        "rps": number(r"Requests/sec:\s+([\d.]+)"),
        "p50_ms": percentiles.get("50", 0.0),
        "p99_ms": percentiles.get("99", 0.0),
        "non_2xx": int(number(r"Non-2xx or 3xx responses: (\d+)")),
        "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0,
    }


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def measure_round(
    order: list[Server], postgres: Postgres, args: argparse.Namespace, number: int, routes: dict[str, str]
) -> dict[str, Any]:
    """One round: every server started, then each route loaded on each server back to back.

    The two runs of a ratio sit at most one route's turn apart (a warm-up and a measured run per
    server: about 20 s with two servers, 50 s with six), so a burst of load from elsewhere on the
    machine is unlikely to hit one side of a ratio only.
    """
    running: dict[str, Running] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for server in order:
            print(f"round {number}/{args.rounds}: starting {server.name}", file=sys.stderr, flush=True)
            running[server.name] = Running(server, RESULTS / "logs" / f"{server.name}-round{number}.log")
        time.sleep(SETTLE)
        for name, live in running.items():
            results[name] = {"startup_ms": live.startup_ms, "rss_idle_mib": live.rss_mib(), "routes": {}}
        for route, path in routes.items():
            for name, live in running.items():
                with postgres.counting_connections() as opened:  # the first GET may open the first connection
                    status, body = live.get(path)
                    wrk(live.port, path, args.warmup, args.connections)
                    figures = wrk(live.port, path, args.duration, args.connections)
                    if route == "/health/db":
                        results[name]["db_connections"] = opened()
                results[name]["routes"][route] = {
                    "status": status, "body_bytes": len(body), "unrouted": body.find(UNKNOWN_PATH) >= 0, **figures
                }  # fmt: skip
        time.sleep(SETTLE)
        for name, live in running.items():
            results[name]["rss_loaded_mib"] = live.rss_mib()
        return results
    finally:
        for live in running.values():
            live.stop()


def soak(server: Server, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """`args.soak_requests` requests across all routes in runs of `args.duration` seconds; memory
    sampled every quarter second. One in three requests is the 404 route: those are the non-2xx."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(SOAK_SCRIPT)
    running = Running(server, log)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        began = time.perf_counter()
        while not done.wait(0.25):
            samples.append((round(time.perf_counter() - began, 2), running.rss_mib()))

    try:
        time.sleep(SETTLE)
        idle = running.rss_mib()
        sampler = threading.Thread(target=sample)
        sampler.start()
        figures: dict[str, float] = {"requests": 0, "non_2xx": 0, "socket_errors": 0}
        began = time.perf_counter()
        try:
            while figures["requests"] < args.soak_requests:
                chunk = wrk(running.port, "/", args.duration, args.connections, script)
                for key in figures:
                    figures[key] += chunk[key]
        finally:
            done.set()
            sampler.join()
        figures["rps"] = figures["requests"] / (time.perf_counter() - began)
        time.sleep(SETTLE)
        end = running.rss_mib()
    finally:
        running.stop()
        script.unlink()
    half = samples[len(samples) // 2][1] if samples else idle
    return {
        "requests": figures["requests"], "rps": figures["rps"], "non_2xx": figures["non_2xx"],
        "socket_errors": figures["socket_errors"], "rss_idle_mib": idle, "rss_peak_mib": max(s[1] for s in samples),
        "rss_end_mib": end, "growth_mib": end - idle, "growth_second_half_mib": end - half, "samples": samples,
    }  # fmt: skip


# ---------------------------------------------------------------------------- main


def servers(postgres: Postgres, args: argparse.Namespace, workers: int = 1) -> tuple[list[Server], Server]:
    """The service, the peers and `--compare` if asked for, and the ceiling, each with `workers` processes.

    One worker is pinned to one core (wrk has the other); several share both cores with wrk.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PG"))}
    env |= {
        "DATABASE_URL": postgres.url,
        "DATABASE_POOL_SIZE": str(args.pool_size),
        "ENVIRONMENT": "production",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "LOG_JSON": "true",
        "LOG_LEVEL": "INFO",
    }
    cores = SERVER_CORE if workers == 1 else "0,1"
    python = sys.executable
    uvicorn = [*UVICORN, "--workers", str(workers), "--port", "{port}"]
    # The service's own access line is on (and uvicorn's off, by the service); the others log nothing.
    subjects = []
    for kind in args.server or ["uvicorn"]:
        if kind == "python-m-app":  # the production server: HOST, PORT and WEB_CONCURRENCY from the environment
            production = env | {"HOST": "127.0.0.1", "WEB_CONCURRENCY": str(workers), "SHUTDOWN_DRAIN_SECONDS": "0"}
            for app in args.app or ["app:app"]:
                named = [] if app == "app:app" else [app]  # python -m app [MODULE:ATTRIBUTE]
                subjects.append(
                    Server(" ".join(["python -m app", *named]), [python, "-m", "app", *named], production, cores)
                )
            if workers == 1:  # the same ceiling on python -m app's own server, which serves any import string
                ceiling = production | {"PYTHONPATH": str(ROOT / "bench")}
                subjects.append(Server(EDGE_BASELINE, [python, "-m", "app", "baseline:app"], ceiling, cores))
        else:
            subjects += [
                Server(f"uvicorn {app}", [python, *uvicorn, app], env, cores) for app in args.app or ["app:app"]
            ]
    baseline = Server(
        "baseline", [python, *uvicorn, "--no-access-log", "--app-dir", "bench", "baseline:app"], env, cores
    )
    if args.peers:
        for name, pins in peer_pins().items():
            argv = [str(peer_python(name, pins)), *uvicorn, "--no-access-log", "--app-dir", "bench/peers"]
            subjects.append(Server(name, [*argv, f"{name}_app:app"], env, cores))
    if args.compare:
        subjects.append(Server("compare", ["sh", "-c", f"exec {args.compare}"], env, cores))
    return subjects, baseline


def measure(postgres: Postgres, args: argparse.Namespace, routes: dict[str, str], workers: int = 1) -> dict[str, Any]:
    """`args.rounds` rounds of every server, the order turning each round; medians and ratios."""
    subjects, baseline = servers(postgres, args, workers)
    rounds = []
    for number in range(args.rounds):
        order = [*subjects, baseline]
        order = order[number % len(order) :] + order[: number % len(order)]  # alternate who goes first
        if number % 2:  # and reversed every other round: with fewer rounds than servers, no one always goes last
            order.reverse()
        rounds.append(measure_round(order, postgres, args, number + 1, routes))
    names = [s.name for s in subjects]
    return {"names": names, "rounds": rounds, "summary": summarise(rounds, names, list(routes), REFERENCE)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds; servers alternate within each (default 5)")
    parser.add_argument("--duration", type=int, default=5, help="seconds of measured load per route (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up load per route (default 2)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--pool-size", type=int, default=10, help="DATABASE_POOL_SIZE for every server (default 10)")
    parser.add_argument(
        "--app",
        action="append",
        help="the service, as an import string, under each --server "
        "(default app:app; repeat to measure several side by side, e.g. examples.items:app)",
    )
    parser.add_argument("--server", choices=["uvicorn", "python-m-app"], action="append",
                        help="uvicorn APP (default) and/or `python -m app`, the production server")  # fmt: skip
    parser.add_argument("--peers", action="store_true", help="also FastAPI, Litestar, Starlette and BlackSheep")
    parser.add_argument("--scale", action="store_true", help="instead: 1, 64, 512 connections, and 2 workers")
    parser.add_argument("--compare", metavar="COMMAND", help='another server, e.g. "uvicorn other:app --port {port}"')
    parser.add_argument("--soak", action="store_true", help="instead: mixed requests, memory sampled throughout")
    parser.add_argument("--soak-requests", type=int, default=200_000, help="requests in the soak (default 200000)")
    parser.add_argument("--smoke", action="store_true", help="one short round: checks that it all runs (for CI)")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.duration, args.warmup = 1, 1, 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "logs").mkdir(exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "arguments": vars(args)}
    postgres = Postgres()
    try:
        if args.soak:
            subjects, _ = servers(postgres, args)
            report["soak"] = {s.name: soak(s, args, RESULTS / "logs" / f"{s.name}-soak.log") for s in subjects}
            text = render_soak(report["soak"])
        elif args.scale:
            report["scale"], sections = [], []
            for connections, workers in SCALE:
                args.connections = connections
                result = measure(postgres, args, SCALE_ROUTES, workers)
                report["scale"].append({"connections": connections, "workers": workers, **result})
                sections.append(((connections, workers), result["summary"]))
            text = render_side_by_side(sections, result["names"], list(SCALE_ROUTES))
        else:
            result = measure(postgres, args, ROUTES)
            report |= {"rounds": result["rounds"], "summary": result["summary"]}
            text = render(result["summary"], result["names"], list(ROUTES), args.pool_size, REFERENCE)
            if EDGE_BASELINE in result["names"]:
                for name in [n for n in result["names"] if n.startswith("python -m app")]:
                    text += "\n\n" + render_own_ceiling(result["rounds"], name, EDGE_BASELINE, list(ROUTES), REFERENCE)
            if args.peers:
                text = (
                    render_side_by_side([(None, result["summary"])], result["names"], list(ROUTES), REFERENCE)
                    + "\n\n"
                    + text
                )
    finally:
        postgres.destroy()
    kind = "smoke" if args.smoke else "soak" if args.soak else "scale" if args.scale else "bench"
    (RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{kind}-latest.md").write_text(text + "\n")
    print(f"load average before: {report['machine']['load']}; after: {os.getloadavg()[0]:.2f}")
    print(text)
    rounds = report.get("rounds", []) + [r for s in report.get("scale", []) for r in s["rounds"]]
    return _problems(rounds)


def _problems(rounds: list[dict[str, Any]]) -> int:
    """Non-zero when our own servers answered wrongly: a benchmark of errors measures nothing."""
    problems = []
    for number, results in enumerate(rounds, 1):
        for name in [n for n in results if n in ("baseline", EDGE_BASELINE, "compare") or n.startswith(OURS)]:
            for route, figures in results[name]["routes"].items():
                if figures["status"] != EXPECTED_STATUS[route] and not (name.startswith("baseline") and route == ITEMS):
                    problems.append(f"round {number}: {name} answered {route} with {figures['status']}")
                if EXPECTED_STATUS[route] < 400 and figures["non_2xx"]:
                    problems.append(f"round {number}: {name} gave {figures['non_2xx']} non-2xx on {route}")
                if figures["requests"] == 0 or figures["socket_errors"] > figures["requests"] // 1000:
                    problems.append(
                        f"round {number}: {name} served {figures['requests']} requests on {route}"
                        f" with {figures['socket_errors']} socket errors"
                    )
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
