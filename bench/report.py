"""The benchmark's report: medians, ratios within each round, Markdown tables, the machine."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (figure, key in the summary, comparison, target); a target of None means the pool size.
TARGETS: list[tuple[str, str, str, float | None]] = [
    ("/health requests/s", "rps_ratio:/health", ">=", 0.80),
    ("/health/db requests/s", "rps_ratio:/health/db", ">=", 0.95),
    ("404 requests/s (with access line)", "rps_ratio:404", ">=", 0.55),
    ("/items/{absent id} requests/s, to the ceiling's /health/db", "rps_ratio:/items/{id} 404", ">=", 0.70),
    ("/health p99 latency", "p99_ratio:/health", "<=", 1.5),
    ("/health/db p99 latency", "p99_ratio:/health/db", "<=", 1.5),
    ("resident memory after load", "rss_ratio", "<=", 1.25),
    ("start-up to first 200", "startup_ratio", "<=", 2.0),
    ("DB connections opened under /health/db load", "db_connections", "<=", None),
]


def summarise(
    rounds: list[dict[str, dict[str, Any]]],
    subjects: list[str],
    routes: list[str],
    reference: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Medians per server, and per subject the median of its ratios to the baseline round by round.

    A route named in `reference` is compared with the baseline's answer to the route it maps to.
    """
    reference = reference or {}
    summary: dict[str, dict[str, float]] = {}
    for name in [*subjects, "baseline"]:
        runs = [r[name] for r in rounds]
        figures = {key: statistics.median(run[key] for run in runs) for key in ("startup_ms", "rss_idle_mib")}
        figures["rss_loaded_mib"] = statistics.median(run["rss_loaded_mib"] for run in runs)
        figures["db_connections"] = max(run["db_connections"] for run in runs)
        for route in routes:
            for key in ("rps", "p50_ms", "p99_ms", "non_2xx", "socket_errors", "body_bytes"):
                figures[f"{key}:{route}"] = statistics.median(run["routes"][route][key] for run in runs)
            # 1.0 when no route of the app served it (an app without the reference resource, say).
            figures[f"unrouted:{route}"] = float(any(run["routes"][route].get("unrouted") for run in runs))
        if name != "baseline":
            _spread(figures, "startup_ratio", [r[name]["startup_ms"] / r["baseline"]["startup_ms"] for r in rounds])
            _spread(figures, "rss_ratio", [r[name]["rss_loaded_mib"] / r["baseline"]["rss_loaded_mib"] for r in rounds])
            for route in routes:
                base = reference.get(route, route)
                for key, figure in (("rps_ratio", "rps"), ("p99_ratio", "p99_ms")):
                    ratios = [r[name]["routes"][route][figure] / r["baseline"]["routes"][base][figure] for r in rounds]
                    _spread(figures, f"{key}:{route}", ratios)
        summary[name] = figures
    return summary


def _spread(figures: dict[str, float], key: str, ratios: list[float]) -> None:
    """Ratios to the baseline, each taken within its own round: their median as `key`, and the lowest
    and highest round as `low:key` and `high:key` (the report shows that spread next to each target)."""
    figures[key], figures[f"low:{key}"], figures[f"high:{key}"] = statistics.median(ratios), min(ratios), max(ratios)


def render(
    summary: dict[str, dict[str, float]],
    subjects: list[str],
    routes: list[str],
    pool_size: int,
    reference: dict[str, str] | None = None,
) -> str:
    names = [*subjects, "baseline"]
    lines = [
        "| route | server | requests/s | ratio | p50 ms | p99 ms | p99 ratio | non-2xx | socket errors | body bytes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for route in routes:
        for name in names:
            f = summary[name]
            ratio = f"{f[f'rps_ratio:{route}']:.2f}" if name != "baseline" else ""
            if ratio and route in (reference or {}):
                ratio += f" (to {(reference or {})[route]})"
            p99 = f"{f[f'p99_ratio:{route}']:.2f}x" if name != "baseline" else ""
            if p99 and route in (reference or {}):
                p99 += f" (to {(reference or {})[route]})"
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
    for name in (s for s in subjects if s == "compare" or s.startswith(("uvicorn ", "python -m app"))):
        lines += ["", f"| target ({name}) | goal | measured | rounds | met |", "| --- | --- | ---: | ---: | --- |"]
        for figure, key, op, goal in TARGETS:
            if key not in summary[name]:
                continue
            route = key.partition(":")[2]
            if route in (reference or {}) and summary[name].get(f"unrouted:{route}"):
                lines.append(f"| {figure} | {op} {goal} | (no such route) | | |")
                continue
            bound = float(pool_size) if goal is None else goal
            value = round(summary[name][key], 2)  # the verdict of the figure shown, not of digits not shown
            met = value >= bound if op == ">=" else value <= bound
            shown = f"{op} {pool_size} (pool size)" if goal is None else f"{op} {goal}"
            low, high = summary[name].get(f"low:{key}"), summary[name].get(f"high:{key}")
            spread = f"{low:.2f} to {high:.2f}" if low is not None and high is not None else ""
            lines.append(f"| {figure} | {shown} | {value:.2f} | {spread} | {'yes' if met else '**no**'} |")
    return "\n".join(lines)


def render_own_ceiling(
    rounds: list[dict[str, dict[str, Any]]],
    name: str,
    ceiling: str,
    routes: list[str],
    reference: dict[str, str] | None = None,
) -> str:
    """`name`'s requests/s against `ceiling` (the bare callable on `name`'s own server), round by round.

    A route named in `reference` is put against the ceilings' answers to the route it maps to.
    """
    reference = reference or {}
    lines = [
        f"| route | {name} to the uvicorn ceiling | {name} to {ceiling} | {ceiling} to the uvicorn ceiling |",
        "| --- | ---: | ---: | ---: |",
    ]
    for route in routes:
        base = reference.get(route, route)
        pairs = ((name, route, "baseline"), (name, route, ceiling), (ceiling, base, "baseline"))
        ratios = [
            statistics.median(r[a]["routes"][own]["rps"] / r[b]["routes"][base]["rps"] for r in rounds)
            for a, own, b in pairs
        ]
        shown = f"{route} (to {base})" if base != route else route
        lines.append(f"| {shown} | " + " | ".join(f"{ratio:.2f}" for ratio in ratios) + " |")
    return "\n".join(lines)


def render_side_by_side(
    sections: Sequence[tuple[tuple[int, int] | None, dict[str, dict[str, float]]]],
    subjects: list[str],
    routes: list[str],
    reference: dict[str, str] | None = None,
) -> str:
    """One table: every server on every route, with its ratios to the ceiling of the same round.

    `sections` pairs each summary with its (connections, workers), or None for the default run.
    A route named in `reference` is put against the ceiling's answer to the route it maps to.
    """
    reference = reference or {}
    scaled = sections[0][0] is not None
    head = "| connections | workers " if scaled else ""
    lines = [
        f"{head}| route | server | requests/s | ratio | p99 ms | p99 ratio | RSS after load MiB | start-up ms |",
        "| ---: | ---: " * scaled + "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for config, summary in sections:
        cells = f"| {config[0]} | {config[1]} " if config is not None else ""
        for route in routes:
            for name in [*subjects, "baseline"]:
                f = summary[name]
                ceiling = name == "baseline"
                to = f" (to {reference[route]})" if route in reference else ""
                # The ceiling's own answer to a route put against another of its routes is no 1.00.
                ratio = ("" if to else "1.00 (ceiling)") if ceiling else f"{f[f'rps_ratio:{route}']:.2f}{to}"
                p99 = "" if ceiling else f"{f[f'p99_ratio:{route}']:.2f}x{to}"
                lines.append(
                    f"{cells}| {route} | {name} | {f[f'rps:{route}']:.0f} | {ratio} | {f[f'p99_ms:{route}']:.2f} "
                    f"| {p99} | {f['rss_loaded_mib']:.1f} | {f['startup_ms']:.0f} |"
                )
    if scaled:
        lines += ["", _workers_gain(sections, subjects, routes)]
    return "\n".join(lines)


def _workers_gain(
    sections: Sequence[tuple[tuple[int, int] | None, dict[str, dict[str, float]]]],
    subjects: list[str],
    routes: list[str],
) -> str:
    """Requests/s with 2 workers over 1, at the same connections: what a second process buys."""
    by_config = dict(sections)
    lines = ["| server | route | 2 workers / 1 worker, 64 connections |", "| --- | --- | ---: |"]
    one, two = by_config.get((64, 1)), by_config.get((64, 2))
    if one is None or two is None:
        return ""
    for name in [*subjects, "baseline"]:
        for route in routes:
            lines.append(f"| {name} | {route} | {two[name][f'rps:{route}'] / one[name][f'rps:{route}']:.2f}x |")
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
        "load": " ".join(f"{n:.2f}" for n in os.getloadavg()),  # other work on the machine skews every figure
    }


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
