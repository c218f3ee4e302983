"""The drain of `python -m app`: readiness 503 from SIGTERM on, everything else served, then a clean exit."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cluster import Cluster
from service import UvicornProcess, pending
from test_server import production, wait_for_no_backends

from migrate import MIGRATIONS_DIR, migrations_on_disk
from workers import REPEAT_WINDOW

pytestmark = pytest.mark.slow


def readiness_when_draining(server: UvicornProcess, within: float) -> float:
    """Seconds until `/health/db` says the service is shutting down (fails after `within`)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        with httpx.Client(timeout=5) as fresh:
            response = fresh.get(f"{server.url}/health/db")
        if response.status_code == 503 and response.json()["errors"] == ["Service is shutting down"]:
            assert response.json()["status"] == "unhealthy"
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"readiness still {response.status_code} {within} s after SIGTERM")


def signal_again_ends_the_drain(server: UvicornProcess, within: float) -> None:
    """An operator's second SIGTERM, past `REPEAT_WINDOW` (sooner, it is the first delivered twice): the
    shutdown starts at once, and the exit is still 0."""
    time.sleep(REPEAT_WINDOW)
    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    assert time.monotonic() - sent < within


def test_sigterm_drains_readiness_then_exits_cleanly(cluster: Cluster, database_url: str, tmp_path: Path) -> None:
    """Readiness turns 503 within 0.5 s of SIGTERM; new connections are served for the drain; exit 0, no backend."""
    env = production(database_url, SHUTDOWN_DRAIN_SECONDS="3")
    server = UvicornProcess(env, log_path=tmp_path / "out.log", command="python -m app")
    try:
        server.wait_ready()
        for _ in range(3):
            assert httpx.get(f"{server.url}/health/db", timeout=15).status_code == 200
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert readiness_when_draining(server, within=0.5) < 0.5
        time.sleep(1)
        with httpx.Client(timeout=5) as fresh:  # a new connection, well into the drain
            assert fresh.get(f"{server.url}/").status_code == 200
            assert fresh.get(f"{server.url}/health").status_code == 200
            assert fresh.get(f"{server.url}/health/db").status_code == 503
        assert server.process.wait(30) == 0
        assert time.monotonic() - signalled >= 3
    finally:
        server.kill()
    assert wait_for_no_backends(cluster, "e2e-service")
    entries = [json.loads(line) for line in server.output().splitlines()]
    changes = [e["message"] for e in entries if e["message"].startswith("Readiness ")]
    assert changes == [f"Readiness unknown -> degraded: {pending(migrations_on_disk(MIGRATIONS_DIR))}",
                       "Readiness degraded -> unhealthy: Service is shutting down"]  # fmt: skip


def test_a_second_signal_ends_the_drain(tmp_path: Path) -> None:
    """With a 60 s drain, a second SIGTERM starts the shutdown at once; the exit is still 0."""
    server = UvicornProcess({"SHUTDOWN_DRAIN_SECONDS": "60"}, log_path=tmp_path / "out.log", command="python -m app")
    try:
        server.wait_ready()
        server.process.send_signal(signal.SIGTERM)
        readiness_when_draining(server, within=0.5)
        signal_again_ends_the_drain(server, within=3)
    finally:
        server.kill()


@contextlib.contextmanager
def two_workers(tmp_path: Path, drain_seconds: str) -> Iterator[UvicornProcess]:
    """`python -m app` with 2 workers, both started; killed afterwards, whatever the test did."""
    env = {"SHUTDOWN_DRAIN_SECONDS": drain_seconds, "WEB_CONCURRENCY": "2", "LOG_JSON": "true"}
    server = UvicornProcess(env, log_path=tmp_path / "out.log", command="python -m app")
    try:
        server.wait_ready()
        while server.output().count("Application startup complete") < 2:
            time.sleep(0.1)
        yield server
    finally:
        server.kill()


def test_every_worker_drains(tmp_path: Path) -> None:
    """With 2 workers, each answers 503 during the drain and serves the rest; a second signal ends both drains."""
    with two_workers(tmp_path, drain_seconds="60") as server:
        server.process.send_signal(signal.SIGTERM)
        readiness_when_draining(server, within=0.5)
        time.sleep(0.3)
        for _ in range(20):  # new connections spread over both workers: no worker is still ready
            with httpx.Client(timeout=5) as fresh:
                assert fresh.get(f"{server.url}/health/db").json()["errors"] == ["Service is shutting down"]
                assert fresh.get(f"{server.url}/").status_code == 200
        assert server.output().count("Draining: /health/db answers 503") == 2
        second = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
        assert time.monotonic() - second < 5


def test_every_worker_is_unready_at_once_when_the_supervisor_is_signalled(tmp_path: Path) -> None:
    """With 2 workers, /health/db is the drain's 503 5 ms after SIGTERM: the supervisor relays it at once."""
    with two_workers(tmp_path, drain_seconds="2") as server:
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.005)  # room for a busy machine to schedule the supervisor, then a worker (its old poll: 100 ms)
        for _ in range(5):  # new connections, to either worker
            fresh = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)  # no TLS context to build first
            fresh.request("GET", "/health/db")
            assert json.loads(fresh.getresponse().read())["errors"] == ["Service is shutting down"]
            fresh.close()
        assert server.process.wait(30) == 0


@pytest.mark.parametrize(("first", "second"), [("SIGTERM", "group"), ("SIGINT", "supervisor")])
def test_a_signal_to_the_process_group_drains_every_worker_once(tmp_path: Path, first: str, second: str) -> None:
    """2 workers: SIGTERM or SIGINT to the whole group (systemd, Ctrl-C) reaches each worker directly and
    relayed by the supervisor, and is one signal: the drain runs. A second one, to the group or the supervisor, ends it.
    """
    with two_workers(tmp_path, drain_seconds="60") as server:
        os.killpg(server.process.pid, getattr(signal, first))  # its own session: the test is not in the group
        readiness_when_draining(server, within=0.5)
        time.sleep(1)
        for _ in range(20):  # new connections spread over both workers: both still drain, and serve
            with httpx.Client(timeout=5) as fresh:
                assert fresh.get(f"{server.url}/health/db").json()["errors"] == ["Service is shutting down"]
                assert fresh.get(f"{server.url}/").status_code == 200
        assert server.output().count("Draining: /health/db answers 503") == 2
        assert "Shutting down" not in server.output()
        ended = time.monotonic()
        if second == "group":
            os.killpg(server.process.pid, signal.SIGTERM)
        else:
            server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
        assert time.monotonic() - ended < 5


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_same_signal_delivered_twice_at_once_drains_once(tmp_path: Path, workers: str) -> None:
    """`uv run python -m app` and a signal to the group: the server gets it directly and forwarded by uv, 0.1 ms
    apart. It counted two, and the second ended the drain the first started: the drain was skipped."""
    env = {"SHUTDOWN_DRAIN_SECONDS": "60", "WEB_CONCURRENCY": workers}
    server = UvicornProcess(env, log_path=tmp_path / "out.log", command="python -m app")
    try:
        server.wait_ready()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.02)  # handled by then: sent at once, the kernel would merge the two into one
        server.process.send_signal(signal.SIGTERM)  # as uv forwards it, a little later
        readiness_when_draining(server, within=0.5)
        time.sleep(1)
        assert server.process.poll() is None  # still draining
        assert httpx.get(f"{server.url}/", timeout=5).status_code == 200
        signal_again_ends_the_drain(server, within=5)
    finally:
        server.kill()


def test_a_request_that_never_ends_cannot_hold_the_shutdown_back(tmp_path: Path) -> None:
    """A body trickling forever is given DATABASE_HEALTH_CHECK_TIMEOUT (2 s) after the drain, then cancelled; exit 0."""
    env = {"SHUTDOWN_DRAIN_SECONDS": "1", "DATABASE_HEALTH_CHECK_TIMEOUT": "2"}
    server = UvicornProcess(env, "examples.items:app", log_path=tmp_path / "out.log", command="python -m app")
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:  # a byte every 0.5 s: never idle for the head timeout
        with contextlib.suppress(OSError):
            sock.sendall(
                b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 900\r\n\r\n"
            )
            while not stop.wait(0.5):
                sock.sendall(b" ")

    try:
        server.wait_ready()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sender = threading.Thread(target=trickle, args=(sock,))
            sender.start()
            time.sleep(1)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            try:
                assert server.process.wait(15) == 0
            finally:
                stop.set()
                sender.join()
            answer = sock.recv(65536)
        assert 1 + 2 <= time.monotonic() - signalled < 1 + 2 + 3  # the drain, the bound, then the pool's close
    finally:
        server.kill()
    assert "timeout graceful shutdown exceeded" in server.output()
    # The request cut short is answered with the envelope (not the server's plain text), and logged as such.
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert json.loads(body)["error"] == "SERVICE_UNAVAILABLE"
    assert json.loads(body)["message"] == "Service is shutting down"
    assert "POST /items 503 " in server.output()
