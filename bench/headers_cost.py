"""What uvicorn spends writing the headers the contract and README put on every health response.

    uv run python bench/headers_cost.py [rounds]

The ceiling (`bench/baseline.py`) alone, with the three headers every probe carries
(`Cache-Control`, `X-Request-ID`, `X-Content-Type-Options`: BASELINE_CONTRACT_HEADERS=3), and with
`Vary` too (=4, what probes sent before the fourth round), alternating, pinned as in
`bench/server_cpu.py`: requests/s and CPU µs per request of `/health`.
The difference is the server's own work for those headers (uvicorn checks each against two
patterns and lowercases it), a cost no app under uvicorn can avoid while it sends them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from server_cpu import PORT, run_once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rounds", type=int, nargs="?", default=4, help="alternating rounds (default 4)")
    rounds = parser.parse_args().rounds
    uvicorn = [sys.executable, "-m", "uvicorn", "--app-dir", "bench", "baseline:app", "--port", str(PORT),
               "--loop", "uvloop", "--http", "httptools", "--no-access-log"]  # fmt: skip
    variants = {"ceiling": "0", "ceiling + the probe's three headers": "3", "ceiling + those and Vary": "4"}
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in variants}
    for number in range(rounds):
        for name in list(variants) if number % 2 == 0 else list(reversed(variants)):
            os.environ["BASELINE_CONTRACT_HEADERS"] = variants[name]  # inherited by the server
            log = Path(tempfile.gettempdir()) / "headers-cost.log"
            results[name].append(run_once(uvicorn, "/health", log))
    for name, runs in results.items():
        rps, cpu = statistics.median(r for r, _, _ in runs), statistics.median(c for _, c, _ in runs)
        print(f"/health {name}: requests/s {rps:.0f}, CPU µs/request {cpu:.2f} (medians of {rounds})")


if __name__ == "__main__":
    main()
