"""The proof of the drain: a rolling restart behind a real HAProxy loses no request."""

from __future__ import annotations

import csv
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from service import UvicornProcess, free_port
from test_server import production

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()), reason="needs haproxy"),
    pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk"),
]
INSTANCES = 3
DRAIN_SECONDS = "2"
# No retries, no redispatch: a request sent to an instance that stopped listening is a client's 503.
HAPROXY_CONFIG = """
global
    stats socket {stats} mode 600
defaults
    mode http
    retries 0
    no option redispatch
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend service
    bind 127.0.0.1:{port}
    default_backend instances
backend instances
    balance roundrobin
    option httpchk GET /health/db
    http-check expect status 200
    default-server check inter 200ms fall 1 rise 2
{servers}
"""


@contextmanager
def haproxy(tmp_path: Path, ports: list[int]) -> Iterator[tuple[int, Path]]:
    """HAProxy in the foreground on a free port, balancing over `ports`; yields its port and stats socket."""
    port, stats = free_port(), tmp_path / "haproxy.sock"
    servers = "\n".join(f"    server i{n} 127.0.0.1:{p}" for n, p in enumerate(ports))
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(stats=stats, port=port, servers=servers))
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    with (tmp_path / "haproxy.log").open("wb") as log:
        process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not stats.exists():
            assert time.monotonic() < deadline, (tmp_path / "haproxy.log").read_text()
            time.sleep(0.05)
        yield port, stats
    finally:
        process.terminate()
        process.wait(10)


def server_states(stats: Path) -> dict[str, str]:
    """Each instance's state as HAProxy sees it (`UP`, `DOWN`, ...), from its stats socket."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    rows = csv.DictReader(data.decode().lstrip("# ").splitlines())
    return {row["svname"]: row["status"] for row in rows if row["pxname"] == "instances" and row["svname"][0] == "i"}


def wait_for(stats: Path, name: str, state: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while server_states(stats).get(name, "").split(" ")[0] != state:
        assert time.monotonic() < deadline, f"{name} never became {state}: {server_states(stats)}"
        time.sleep(0.05)


def test_rolling_restart_behind_haproxy_loses_no_request(database_url: str, tmp_path: Path) -> None:
    """Steady load while each instance in turn is SIGTERMed, exits 0 and is replaced: zero errors, zero non-2xx."""
    env = production(database_url, DATABASE_POOL_SIZE="3", SHUTDOWN_DRAIN_SECONDS=DRAIN_SECONDS)
    ports = [free_port() for _ in range(INSTANCES)]
    instances = [
        UvicornProcess(env, log_path=tmp_path / f"i{n}-0.log", command="python -m app", port=port)
        for n, port in enumerate(ports)
    ]
    try:
        for instance in instances:
            instance.wait_ready()
        with haproxy(tmp_path, ports) as (port, stats):
            for n in range(INSTANCES):
                wait_for(stats, f"i{n}", "UP")
            load = subprocess.Popen(
                ["wrk", "-t2", "-c16", "-d60s", f"http://127.0.0.1:{port}/"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                time.sleep(1)
                for n, old in enumerate(instances):
                    old.process.send_signal(signal.SIGTERM)
                    wait_for(stats, f"i{n}", "DOWN", within=2)  # the drain's 503 takes it out of rotation
                    assert old.process.wait(30) == 0, old.output()
                    instances[n] = UvicornProcess(
                        env, log_path=tmp_path / f"i{n}-1.log", command="python -m app", port=ports[n]
                    )
                    instances[n].wait_ready()
                    wait_for(stats, f"i{n}", "UP")
                time.sleep(1)
            finally:
                load.send_signal(signal.SIGINT)  # wrk stops and prints its summary
                report, _ = load.communicate(timeout=30)
    finally:
        for instance in instances:
            instance.kill()
    print(report)
    requests = int(re.search(r"(\d+) requests in", report).group(1))  # type: ignore[union-attr]
    assert requests > 1000, report
    assert "Socket errors" not in report, report
    assert "Non-2xx" not in report, report
