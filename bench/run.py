"""The benchmark: the service against a bare ASGI baseline, alternately, on pinned cores.

    uv run python bench/run.py                        # the full method (see bench/README.md)
    uv run python bench/run.py --smoke                # seconds, for CI: it runs, it answers
    uv run python bench/run.py --compare "CMD {port}" # any other server next to ours
    uv run python bench/run.py --soak                 # 200k mixed requests, memory throughout

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

from report import machine, render, render_soak, summarise
from servers import ROOT, Postgres, Running, Server

RESULTS = ROOT / "bench" / "results"
LOAD_CORE = "1"  # the servers get the other one
ROUTES = {"/health": "/health", "/health/db": "/health/db", "404": "/no-such-route"}
EXPECTED_STATUS = {"/health": 200, "/health/db": 200, "404": 404}
SETTLE = 0.5  # seconds of quiet before reading idle or after-load memory
UVICORN = ["-m", "uvicorn", "--host", "127.0.0.1", "--workers", "1", "--loop", "uvloop", "--http", "httptools"]
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


def measure_round(order: list[Server], postgres: Postgres, args: argparse.Namespace, number: int) -> dict[str, Any]:
    """One round: every server started, then each route loaded on each server back to back.

    Pairs of runs that are compared sit seconds apart, so a burst of load from elsewhere on
    the machine is unlikely to hit one side of a ratio only.
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
        for route, path in ROUTES.items():
            for name, live in running.items():
                status, body = live.get(path)
                with postgres.counting_connections() as opened:
                    wrk(live.port, path, args.warmup, args.connections)
                    figures = wrk(live.port, path, args.duration, args.connections)
                    if route == "/health/db":
                        results[name]["db_connections"] = opened()
                results[name]["routes"][route] = {"status": status, "body_bytes": len(body), **figures}
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


def servers(postgres: Postgres, args: argparse.Namespace) -> tuple[list[Server], Server]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PG"))}
    env |= {
        "DATABASE_URL": postgres.url,
        "DATABASE_POOL_SIZE": str(args.pool_size),
        "ENVIRONMENT": "production",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "LOG_JSON": "true",
        "LOG_LEVEL": "INFO",
    }
    python = sys.executable
    # The service's own access line is on (and uvicorn's off, by the service); the baseline logs nothing.
    service = Server("service", [python, *UVICORN, "--port", "{port}", "app:app"], env)
    baseline_argv = [python, *UVICORN, "--port", "{port}", "--no-access-log", "--app-dir", "bench", "baseline:app"]
    baseline = Server("baseline", baseline_argv, env)
    subjects = [service]
    if args.compare:
        subjects.append(Server("compare", ["sh", "-c", f"exec {args.compare}"], env))
    return subjects, baseline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds; servers alternate within each (default 5)")
    parser.add_argument("--duration", type=int, default=5, help="seconds of measured load per route (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up load per route (default 2)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--pool-size", type=int, default=10, help="DATABASE_POOL_SIZE for every server (default 10)")
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
        subjects, baseline = servers(postgres, args)
        names = [s.name for s in subjects]
        if args.soak:
            report["soak"] = {s.name: soak(s, args, RESULTS / "logs" / f"{s.name}-soak.log") for s in subjects}
            text = render_soak(report["soak"])
        else:
            rounds = []
            for number in range(args.rounds):
                order = [*subjects, baseline]
                order = order[number % len(order) :] + order[: number % len(order)]  # alternate who goes first
                rounds.append(measure_round(order, postgres, args, number + 1))
            report["rounds"] = rounds
            report["summary"] = summarise(rounds, names, list(ROUTES))
            text = render(report["summary"], names, list(ROUTES), args.pool_size)
    finally:
        postgres.destroy()
    kind = "smoke" if args.smoke else "soak" if args.soak else "bench"
    (RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{kind}-latest.md").write_text(text + "\n")
    print(text)
    return _problems(report, names)


def _problems(report: dict[str, Any], names: list[str]) -> int:
    """Non-zero when our own servers answered wrongly: a benchmark of errors measures nothing."""
    problems = []
    for number, results in enumerate(report.get("rounds", []), 1):
        for name in ("service", "baseline"):
            for route, figures in results[name]["routes"].items():
                if figures["status"] != EXPECTED_STATUS[route]:
                    problems.append(f"round {number}: {name} answered {route} with {figures['status']}")
                if route != "404" and figures["non_2xx"]:
                    problems.append(f"round {number}: {name} gave {figures['non_2xx']} non-2xx on {route}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
