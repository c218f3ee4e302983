"""Reliability under real conditions: restarts under load, secrets in failures, shutdown with work in flight."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from cluster import Cluster
from service import UvicornProcess

pytestmark = pytest.mark.slow
SECRET_KEY = "rel-" + "Hq4Zt8Wn2Vb6Xc1M" * 3
PROBE_TIMEOUT = 2
ROUTES = ("/", "/health", "/health/db", "/missing", "/health?x=1")


def production(database_url: str, **extra: str) -> dict[str, str]:
    return {
        "ENVIRONMENT": "production",
        "SECRET_KEY": SECRET_KEY,
        "DATABASE_URL": database_url,
        "DATABASE_HEALTH_CHECK_TIMEOUT": str(PROBE_TIMEOUT),
        "APP_NAME": "reliability",
        **extra,
    }


def test_restart_under_load_gives_503s_in_time_then_only_200s(
    cluster: Cluster, database_url: str, tmp_path: Path, server_command: str
) -> None:
    """Clients keep probing across a restart: 503s bounded by the timeout, then 200 again, never a 500."""
    server = UvicornProcess(production(database_url), log_path=tmp_path / "out.log", command=server_command)
    results: list[tuple[float, int, float]] = []  # (sent at, status, seconds taken)
    stop = threading.Event()

    def probe_forever() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                sent = time.monotonic()
                status = client.get(f"{server.url}/health/db").status_code
                results.append((sent, status, time.monotonic() - sent))
                time.sleep(0.02)

    try:
        server.wait_ready()
        clients = [threading.Thread(target=probe_forever) for _ in range(4)]
        for thread in clients:
            thread.start()
        time.sleep(1)
        cluster.stop()
        time.sleep(1.5)
        cluster.start()
        back_at = time.monotonic()
        time.sleep(4)
        stop.set()
        for thread in clients:
            thread.join(30)
    finally:
        stop.set()
        server.terminate()
    statuses = {status for _, status, _ in results}
    assert statuses == {200, 503}, statuses
    assert all(taken < PROBE_TIMEOUT + 1.5 for _, _, taken in results)
    recovered_by = min(sent for sent, status, _ in results if sent > back_at and status == 200)
    assert recovered_by - back_at < 3
    after = [status for sent, status, _ in results if sent >= recovered_by]
    assert set(after) == {200}, f"{after.count(503)} probe(s) failed after recovery"


@pytest.mark.parametrize("fault", ["stopped", "wrong password", "hung"])
def test_no_response_or_log_line_contains_a_secret(
    cluster: Cluster, database_url: str, tmp_path: Path, fault: str, server_command: str
) -> None:
    """With the database down, refusing the password or frozen, secrets appear in no body and no log line."""
    url = database_url
    password = cluster.password or ""
    if fault == "wrong password":
        password = "Wr0ng-Passw0rd-Xyz"
        url = database_url.replace(f":{cluster.password}@", f":{password}@")
    server = UvicornProcess(production(url, LOG_LEVEL="DEBUG"), log_path=tmp_path / "out.log", command=server_command)
    bodies: list[str] = []
    try:
        server.wait_ready()
        if fault == "stopped":
            cluster.stop()
        elif fault == "hung":
            cluster.hang()
        for route in ROUTES:
            response = httpx.get(f"{server.url}{route}", timeout=30)
            bodies.append(response.text + str(response.headers))
        assert any('"database_connected":false' in body for body in bodies)
    finally:
        cluster.ensure_running()
        server.terminate()
    captured = [*bodies, *server.output().splitlines()]
    assert len(captured) > len(ROUTES)
    for secret in (password, SECRET_KEY):
        assert [line for line in captured if secret in line] == []


def test_misconfigured_database_url_never_prints_its_password(tmp_path: Path, server_command: str) -> None:
    """A refused URL is shown with its password masked in the start-up message."""
    env = production("mysql://app:Sup3r-Secret-Pw@db/app")
    server = UvicornProcess(env, log_path=tmp_path / "out.log", command=server_command)
    assert server.process.wait(30) != 0
    output = server.output()
    assert "mysql://app:***@db/app" in output
    assert "Sup3r-Secret-Pw" not in output
    assert SECRET_KEY not in output


def test_sigterm_with_requests_in_flight_answers_every_one(
    cluster: Cluster, database_url: str, tmp_path: Path, server_command: str
) -> None:
    """Requests in flight when SIGTERM arrives all get complete responses before the process exits."""
    server = UvicornProcess(production(database_url), log_path=tmp_path / "out.log", command=server_command)
    answers: list[int] = []
    try:
        server.wait_ready()
        httpx.get(f"{server.url}/health/db")
        cluster.hang()  # holds every /health/db in flight for the probe's bound

        def call(path: str) -> None:
            answers.append(httpx.get(f"{server.url}{path}", timeout=30).status_code)

        threads = [threading.Thread(target=call, args=("/health/db",)) for _ in range(5)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        status = server.terminate(timeout=30)
        for thread in threads:
            thread.join(30)
    finally:
        cluster.resume()
        server.kill()
    assert status in (0, -15)
    assert sorted(answers) == [503] * 5
