"""CPU per request of `uvicorn app:app` and `python -m app`, alternating, on pinned cores.

    uv run python bench/server_cpu.py /health 3
    uv run python bench/server_cpu.py /no-such-route 3 --also "granian --interface asgi --port {port} app:app"
    uv run python bench/server_cpu.py /health 5 --also "env PYTHONPATH=bench python -m app baseline:app" \\
        --also "python -m uvicorn --no-access-log --app-dir bench baseline:app --port {port}"

Each server runs alone on core 0, wrk on core 1 (2 s warm-up, 5 s measured, 64 connections);
the order alternates each round. CPU time is the server's process tree's own (`/proc/PID/stat`),
which other jobs on the machine disturb far less than requests per second. Production settings,
JSON access lines to a file, a database URL that is never reached (pick routes that need none).
Every server must answer the route with the same status (one GET each, before the load), or
no figure is printed: a figure of a wrong answer measures nothing.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORT = 8811


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of a process and its descendants."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        total += cpu_seconds(int(child))
    return total


def run_once(argv: list[str], route: str, log: Path) -> tuple[float, float, int]:
    """Requests/s, CPU µs per request and the route's status for one fresh server."""
    env = {
        **os.environ,
        "DATABASE_URL": "postgresql://bench:unused@127.0.0.1:1/unused",
        "ENVIRONMENT": "production",
        "SECRET_KEY": "bench-" + "Mw7Qk2Zt9Xr4Lp1Vn6Hd" * 2,
        "LOG_JSON": "true",
        "SHUTDOWN_DRAIN_SECONDS": "0",
        "PORT": str(PORT),
    }
    with log.open("wb") as out:
        server = subprocess.Popen(
            ["taskset", "-c", "0", *argv], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            time.sleep(1.5)
            status = _status(route)
            load = ["taskset", "-c", "1", "wrk", "-t1", "-c64"]
            subprocess.run([*load, "-d2s", f"http://127.0.0.1:{PORT}{route}"], capture_output=True, check=True)
            before = cpu_seconds(server.pid)
            report = subprocess.run(
                [*load, "-d5s", f"http://127.0.0.1:{PORT}{route}"], capture_output=True, text=True, check=True
            ).stdout
            used = cpu_seconds(server.pid) - before
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(20)
    requests = int(_find(r"(\d+) requests in", report))
    return float(_find(r"Requests/sec:\s+([\d.]+)", report)), used / requests * 1e6, status


def _status(route: str) -> int:
    """The status a GET of `route` gets: servers compared on a route must all answer it alike."""
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
    try:
        connection.request("GET", route)
        return connection.getresponse().status
    finally:
        connection.close()


def _find(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    if found is None:
        raise RuntimeError(f"wrk printed no {pattern!r}:\n{text}")
    return found.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("route")
    parser.add_argument("rounds", type=int)
    parser.add_argument(
        "--also", metavar="COMMAND", action="append", default=[], help="another server, repeatable; {port} is filled in"
    )
    args = parser.parse_args()
    python = sys.executable
    servers = {
        "uvicorn app:app": [python, "-m", "uvicorn", "app:app", "--port", str(PORT), "--loop", "uvloop"],
        "python -m app": [python, "-m", "app"],
    }
    for command in args.also:
        servers[command] = ["sh", "-c", "exec " + command.replace("{port}", str(PORT))]
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in servers}
    for number in range(args.rounds):
        order = list(servers) if number % 2 == 0 else list(reversed(servers))
        for name in order:
            log = Path(tempfile.gettempdir()) / f"server-cpu-{re.sub(r'[^A-Za-z0-9.-]+', '_', name)[:80]}.log"
            results[name].append(run_once(servers[name], args.route, log))
    statuses = {name: sorted({status for _, _, status in runs}) for name, runs in results.items()}
    if len({str(found) for found in statuses.values()}) > 1:  # a figure of a wrong answer is no figure
        raise SystemExit(f"the servers answer {args.route} differently: {statuses}")
    print(f"{args.route}: every server answered {statuses['uvicorn app:app'][0]}")
    base = results["uvicorn app:app"]
    for name, runs in results.items():
        rps = [round(r) for r, _, _ in runs]
        cpu = [round(c, 1) for _, c, _ in runs]
        print(f"{args.route} {name}: requests/s {rps}, CPU µs/request {cpu}")
        if name != "uvicorn app:app":
            ratios = [c / b for (_, c, _), (_, b, _) in zip(runs, base, strict=True)]
            shown = [round(ratio, 2) for ratio in ratios]  # the median of the ratios themselves, not of these
            print(f"  CPU/request vs uvicorn app:app per round {shown}, median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
