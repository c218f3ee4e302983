"""`uvicorn app:app --workers 2`: both workers serve, `/metrics` merges them, SIGTERM stops cleanly."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from service import running_uvicorn
from test_metrics import value

from metrics import FLUSH_INTERVAL

pytestmark = pytest.mark.slow


def _metrics(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=5)
    assert response.status_code == 200
    return response.text


def test_two_workers_serve_and_share_metrics(database_url: str, tmp_path: Path) -> None:
    """Every /health answered by either worker is counted once, and each worker's pool is in the gauges."""
    shared = tmp_path / "prometheus"
    shared.mkdir()
    environ = {"DATABASE_URL": database_url, "DATABASE_POOL_SIZE": "3", "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    with running_uvicorn(environ, "--workers", "2") as server:
        deadline = time.monotonic() + 20
        while value(_metrics(server.url), "db_pool_connections_max") != 6:  # 2 workers x pool of 3
            assert time.monotonic() < deadline, "the second worker never published its pool"
            time.sleep(0.2)
        time.sleep(FLUSH_INTERVAL * 2)  # each worker's counts so far (the readiness polls) reach its file
        before = value(_metrics(server.url), "http_requests_total", method="GET", route="/health", status="200") or 0
        for _ in range(20):
            with httpx.Client(timeout=5) as fresh:  # a new connection each time, so both workers answer
                assert fresh.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/health/db", timeout=15).status_code == 200  # degraded: migrations pending
        time.sleep(FLUSH_INTERVAL * 2)  # the other worker's counts reach its file within one interval
        text = _metrics(server.url)
        assert value(text, "http_requests_total", method="GET", route="/health", status="200") == before + 20
        assert value(text, "http_requests_total", method="GET", route="/health/db", status="200") == 1
        assert len(list(shared.glob("requests_*.json"))) == 2  # one file per worker
        assert server.terminate() == 0
    assert not list(shared.glob("gauge_livesum_*.db"))  # stopped workers left the live sums


def test_a_scrape_counts_its_own_worker_at_once_and_keeps_stopped_workers(tmp_path: Path) -> None:
    """The answering worker's requests are in its scrape with no delay; a restart loses no count."""
    shared = tmp_path / "prometheus"
    shared.mkdir()
    environ = {"PROMETHEUS_MULTIPROC_DIR": str(shared)}
    with running_uvicorn(environ) as server, httpx.Client(timeout=5) as client:  # one worker, one connection
        for _ in range(7):
            assert client.get(f"{server.url}/nope").status_code == 404
        text = client.get(f"{server.url}/metrics").text
        assert value(text, "http_requests_total", method="GET", route="<unmatched>", status="404") == 7
    with running_uvicorn(environ) as server:  # a new process: the stopped one's file still counts
        assert httpx.get(f"{server.url}/nope", timeout=5).status_code == 404
        text = _metrics(server.url)
        assert value(text, "http_requests_total", method="GET", route="<unmatched>", status="404") == 8
        assert value(text, "http_request_duration_seconds_count", method="GET", route="<unmatched>") == 8
