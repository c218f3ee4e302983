"""What `/metrics` instrumentation costs `/health`: requests per second with ENABLE_METRICS on and off.

    uv run python bench/metrics_overhead.py [--rounds 5] [--seconds 10] [--connections 32]

Starts one `uvicorn app:app` per mode (same flags as production: uvloop, httptools, one worker)
and runs `wrk` against each in alternating rounds, so drift on a shared machine hits both
modes alike. Reports the median throughput of each and, because throughput on a shared machine
mostly measures the neighbours, also the server's own CPU time per request (from /proc), which
is what bounds throughput once a core is saturated. Both servers are pinned to the same core,
and the CPU figure is the best (lowest) run of each mode: interference only ever adds time.
Needs `wrk` (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start(enable_metrics: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {"PATH": os.environ["PATH"], "LOG_LEVEL": "WARNING", "ENABLE_METRICS": str(enable_metrics).lower()}
    command = [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port), "--no-access-log"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.sched_setaffinity(process.pid, {max(os.sched_getaffinity(0))})
    url = f"http://127.0.0.1:{port}/health"
    for _ in range(100):
        try:
            with urllib.request.urlopen(url, timeout=1):
                return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"server with ENABLE_METRICS={enable_metrics} did not start")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wrk(process: subprocess.Popen[bytes], url: str, seconds: int, connections: int) -> tuple[float, float]:
    """(requests per second, server CPU microseconds per request) for one run."""
    cpu_before = _cpu_seconds(process.pid)
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    cpu = _cpu_seconds(process.pid) - cpu_before
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rate is None or total is None:
        raise SystemExit(f"unexpected wrk output:\n{out}")
    return float(rate.group(1)), cpu / int(total.group(1)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    options = parser.parse_args()
    servers = {mode: _start(mode) for mode in (False, True)}
    rates: dict[bool, list[float]] = {False: [], True: []}
    costs: dict[bool, list[float]] = {False: [], True: []}
    try:
        for process, url in servers.values():
            _wrk(process, url, 2, options.connections)  # warm-up
        for round_number in range(options.rounds):
            order = (False, True) if round_number % 2 == 0 else (True, False)
            for mode in order:
                rate, cost = _wrk(*servers[mode], options.seconds, options.connections)
                rates[mode].append(rate)
                costs[mode].append(cost)
            print(f"round {round_number + 1}: off {rates[False][-1]:.0f} req/s {costs[False][-1]:.1f} us, "
                  f"on {rates[True][-1]:.0f} req/s {costs[True][-1]:.1f} us")  # fmt: skip
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"/health throughput (median): metrics off {off:.0f} req/s, on {on:.0f} req/s, {(on - off) / off:+.1%}")
    off, on = min(costs[False]), min(costs[True])
    print(f"/health server CPU per request (best run): off {off:.1f} us, on {on:.1f} us, {(on - off) / off:+.1%}")


if __name__ == "__main__":
    main()
