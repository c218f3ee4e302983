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
import http.client
import json
import os
import platform
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psycopg
from yoyo import get_backend, read_migrations  # type: ignore[import-untyped]  # yoyo ships no type hints

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from cluster import Cluster  # noqa: E402 - the test suite's throwaway cluster, importable once tests/ is on the path

RESULTS = ROOT / "bench" / "results"
SERVER_CORE, LOAD_CORE = "0", "1"
DATABASE = "bench"
ROUTES = {"/health": "/health", "/health/db": "/health/db", "404": "/no-such-route"}
EXPECTED_STATUS = {"/health": 200, "/health/db": 200, "404": 404}
START_TIMEOUT = 30.0  # seconds from spawn to the first 200 before the server counts as broken
STOP_TIMEOUT = 20.0  # seconds for a graceful shutdown before SIGKILL
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
# (figure, key in the summary, comparison, target); a target of None means the pool size.
TARGETS: list[tuple[str, str, str, float | None]] = [
    ("/health requests/s", "rps_ratio:/health", ">=", 0.60),
    ("/health/db requests/s", "rps_ratio:/health/db", ">=", 0.75),
    ("404 requests/s (with access line)", "rps_ratio:404", ">=", 0.35),
    ("/health p99 latency", "p99_ratio:/health", "<=", 2.0),
    ("/health/db p99 latency", "p99_ratio:/health/db", "<=", 2.0),
    ("resident memory after load", "rss_ratio", "<=", 1.25),
    ("start-up to first 200", "startup_ratio", "<=", 2.0),
    ("DB connections opened under /health/db load", "db_connections", "<=", None),
]


# ---------------------------------------------------------------------------- servers


class Server:
    """A command that serves HTTP on `{port}`; started fresh for every round."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name, self.argv, self.env = name, argv, env


class Running:
    """A started server: its process group, its start-up time, its memory."""

    def __init__(self, server: Server, log: Path) -> None:
        self.port = _free_port()
        argv = ["taskset", "-c", SERVER_CORE, *(arg.replace("{port}", str(self.port)) for arg in server.argv)]
        env = {**server.env, "PORT": str(self.port)}
        self.log = log.open("wb")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.startup_ms = self._wait_for_200(started)

    def _wait_for_200(self, started: float) -> float:
        while time.perf_counter() - started < START_TIMEOUT:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log.name}")
            with suppress(OSError, http.client.HTTPException):
                if self.get("/health")[0] == 200:
                    return (time.perf_counter() - started) * 1000
            time.sleep(0.005)
        raise RuntimeError(f"no 200 from /health within {START_TIMEOUT:g}s; see {self.log.name}")

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def rss_mib(self) -> float:
        """Resident memory of the server and its children (a wrapper like `uv run` included)."""
        kib = 0
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            with suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        kib += int(line.split()[1])
        return kib / 1024

    def stop(self) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        with suppress(OSError, IndexError, ValueError):
            if entry.name.isdigit():
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


# ---------------------------------------------------------------------------- database


class Postgres:
    """The throwaway cluster with the migrations applied and `log_connections` on."""

    def __init__(self) -> None:
        self.cluster = Cluster.start_throwaway()
        self.cluster.create_database(DATABASE)
        self.url = self.cluster.url_for(DATABASE)
        with psycopg.connect(self.cluster.url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET log_connections = on")
            conn.execute("SELECT pg_reload_conf()")
        backend = get_backend(self.url.replace("postgresql://", "postgresql+psycopg://", 1))
        with backend.lock():
            backend.apply_migrations(backend.to_apply(read_migrations(str(ROOT / "migrations"))))
        assert self.cluster.data_dir is not None
        self.log = self.cluster.data_dir.parent / "log"

    @contextmanager
    def counting_connections(self) -> Iterator[Callable[[], int]]:
        """Counts backends authorised for the bench database while the block runs."""
        start = self.log.stat().st_size
        marker = f"connection authorized: user={self.cluster.user} database={DATABASE} "
        yield lambda: sum(marker in line for line in _read_from(self.log, start).splitlines())

    def destroy(self) -> None:
        self.cluster.destroy()


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace")


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


# ---------------------------------------------------------------------------- report


def summarise(rounds: list[dict[str, dict[str, Any]]], subjects: list[str]) -> dict[str, dict[str, float]]:
    """Medians per server, and per subject the median of its ratios to the baseline round by round."""
    summary: dict[str, dict[str, float]] = {}
    for name in [*subjects, "baseline"]:
        runs = [r[name] for r in rounds]
        figures = {key: statistics.median(run[key] for run in runs) for key in ("startup_ms", "rss_idle_mib")}
        figures["rss_loaded_mib"] = statistics.median(run["rss_loaded_mib"] for run in runs)
        figures["db_connections"] = max(run["db_connections"] for run in runs)
        for route in ROUTES:
            for key in ("rps", "p50_ms", "p99_ms", "non_2xx", "socket_errors", "body_bytes"):
                figures[f"{key}:{route}"] = statistics.median(run["routes"][route][key] for run in runs)
        if name != "baseline":
            figures["startup_ratio"] = _ratio(rounds, name, lambda run: run["startup_ms"])
            figures["rss_ratio"] = _ratio(rounds, name, lambda run: run["rss_loaded_mib"])
            for route in ROUTES:
                figures[f"rps_ratio:{route}"] = _ratio(rounds, name, lambda run, r=route: run["routes"][r]["rps"])
                figures[f"p99_ratio:{route}"] = _ratio(rounds, name, lambda run, r=route: run["routes"][r]["p99_ms"])
        summary[name] = figures
    return summary


def _ratio(rounds: list[dict[str, dict[str, Any]]], name: str, pick: Callable[..., float]) -> float:
    """The median over rounds of subject/baseline, each ratio taken within its own round."""
    return statistics.median(pick(r[name]) / pick(r["baseline"]) for r in rounds)


def render(summary: dict[str, dict[str, float]], subjects: list[str], pool_size: int) -> str:
    names = [*subjects, "baseline"]
    lines = [
        "| route | server | requests/s | ratio | p50 ms | p99 ms | p99 ratio | non-2xx | socket errors | body bytes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for route in ROUTES:
        for name in names:
            f = summary[name]
            ratio = f"{f[f'rps_ratio:{route}']:.2f}" if name != "baseline" else ""
            p99 = f"{f[f'p99_ratio:{route}']:.2f}x" if name != "baseline" else ""
            lines.append(
                f"| {route} | {name} | {f[f'rps:{route}']:.0f} | {ratio} | {f[f'p50_ms:{route}']:.2f} "
                f"| {f[f'p99_ms:{route}']:.2f} | {p99} | {f[f'non_2xx:{route}']:.0f} "
                f"| {f[f'socket_errors:{route}']:.0f} | {f[f'body_bytes:{route}']:.0f} |"
            )
    lines += [
        "",
        "| server | start-up ms | ratio | RSS idle MiB | RSS after load MiB | ratio | DB connections opened |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        f = summary[name]
        startup = f"{f['startup_ratio']:.2f}x" if name != "baseline" else ""
        rss = f"{f['rss_ratio']:.2f}x" if name != "baseline" else ""
        lines.append(
            f"| {name} | {f['startup_ms']:.0f} | {startup} | {f['rss_idle_mib']:.1f} | {f['rss_loaded_mib']:.1f} "
            f"| {rss} | {f['db_connections']:.0f} |"
        )
    for name in subjects:
        lines += ["", f"| target ({name}) | goal | measured | met |", "| --- | --- | ---: | --- |"]
        for figure, key, op, goal in TARGETS:
            bound = float(pool_size) if goal is None else goal
            value = summary[name][key]
            met = value >= bound if op == ">=" else value <= bound
            shown = f"{op} {pool_size} (pool size)" if goal is None else f"{op} {goal}"
            lines.append(f"| {figure} | {shown} | {value:.2f} | {'yes' if met else '**no**'} |")
    return "\n".join(lines)


def machine() -> dict[str, str]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "wrk": wrk_version.strip(),
    }


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
            report["summary"] = summarise(rounds, names)
            text = render(report["summary"], names, args.pool_size)
    finally:
        postgres.destroy()
    kind = "smoke" if args.smoke else "soak" if args.soak else "bench"
    (RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{kind}-latest.md").write_text(text + "\n")
    print(text)
    return _problems(report, names)


def render_soak(soak: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| server | requests | requests/s | non-2xx | socket errors | RSS idle MiB | peak MiB | end MiB "
        "| growth MiB | growth over 2nd half MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in soak.items():
        lines.append(
            f"| {name} | {s['requests']:.0f} | {s['rps']:.0f} | {s['non_2xx']:.0f} | {s['socket_errors']:.0f} "
            f"| {s['rss_idle_mib']:.1f} | {s['rss_peak_mib']:.1f} | {s['rss_end_mib']:.1f} "
            f"| {s['growth_mib']:+.1f} | {s['growth_second_half_mib']:+.1f} |"
        )
    return "\n".join(lines)


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
