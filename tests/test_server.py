"""End to end: `python -m uvicorn app:app` as an operator runs it, with real signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from cluster import Cluster
from service import ROOT, UvicornProcess, running_uvicorn

pytestmark = pytest.mark.slow
SECRET_KEY = "e2e-" + "Qx7vLm2Rt9Wz4Kp8" * 3
GRACEFUL = (0, -signal.SIGTERM)  # uvicorn exits 0, or re-raises the signal after a graceful shutdown


def production(database_url: str, **extra: str) -> dict[str, str]:
    return {
        "ENVIRONMENT": "production",
        "SECRET_KEY": SECRET_KEY,
        "DATABASE_URL": database_url,
        "APP_NAME": "e2e-service",
        **extra,
    }


def test_unsafe_production_configuration_exits_with_one_message(tmp_path: Path, server_command: str) -> None:
    """Every offending variable is named, secrets masked, no traceback, and the port is never bound."""
    env = {"ENVIRONMENT": "production", "DEBUG": "true", "SECRET_KEY": "tiny-secret", "DATABASE_POOL_SIZE": "0"}
    server = UvicornProcess(env, log_path=tmp_path / "out.log", command=server_command)
    status = server.process.wait(30)
    output = server.output()
    assert status != 0
    for name in ("DEBUG", "SECRET_KEY", "DATABASE_URL", "DATABASE_POOL_SIZE"):
        assert name in output
    assert "tiny-secret" not in output
    assert "Traceback" not in output
    assert "Uvicorn running" not in output
    assert output.startswith("Invalid settings (4 problem(s)):")


def test_invalid_settings_stop_uvicorn_workers_instead_of_restarting_them(tmp_path: Path) -> None:
    """uvicorn reads WEB_CONCURRENCY itself: its supervisor restarted workers that exited 2, forever.

    On status 3 it stops, though it then exits 0 itself: uvicorn's choice, not ours to change.
    """
    env = {"ENVIRONMENT": "production", "WEB_CONCURRENCY": "2"}
    server = UvicornProcess(env, log_path=tmp_path / "out.log")
    try:
        server.process.wait(30)  # raises if it is still restarting them
    finally:
        server.kill()
    output = server.output()
    assert output.count("Invalid settings (2 problem(s)):") in (1, 2)  # one per worker that got that far
    assert "failed to start, stopping the parent process" in output
    assert "died" not in output  # uvicorn's line for a worker it starts again


def test_production_logs_are_json_lines_with_one_access_line_per_request(
    database_url: str, tmp_path: Path, server_command: str
) -> None:
    """Every line is JSON; each request has one access line with its ID; successful probes are quiet."""
    server = UvicornProcess(production(database_url), log_path=tmp_path / "out.log", command=server_command)
    try:
        server.wait_ready()
        for path, request_id in [("/", "e2e-root"), ("/missing", "e2e-404"), ("/health", "e2e-probe")]:
            response = httpx.get(f"{server.url}{path}", headers={"X-Request-ID": request_id})
            assert response.headers["x-request-id"] == request_id
        httpx.get(f"{server.url}/missing", headers={"X-Request-ID": SECRET_KEY})  # a valid ID: not to be logged
    finally:
        assert server.terminate() in GRACEFUL
    entries = [json.loads(line) for line in server.output().splitlines() if line.strip()]
    access = [e for e in entries if e["logger"] == "service.access"]
    assert [(e["request_id"], e["path"], e["status"]) for e in access] == [
        ("e2e-root", "/", 200),
        ("e2e-404", "/missing", 404),
        ("***", "/missing", 404),
    ]
    assert all(e["client"].startswith("127.0.0.1:") and e["duration_ms"] >= 0 for e in access)
    assert not [e for e in entries if e["logger"] == "uvicorn.access"]
    assert SECRET_KEY not in server.output()


def test_development_logs_are_text_with_one_access_line_per_request(tmp_path: Path, server_command: str) -> None:
    """Outside production: LOG_FORMAT text lines, one access line per request, probes included."""
    server = UvicornProcess({}, log_path=tmp_path / "out.log", command=server_command)
    try:
        server.wait_ready()
        httpx.get(f"{server.url}/health", headers={"X-Request-ID": "dev-1"})
    finally:
        assert server.terminate() in GRACEFUL
    lines = [line for line in server.output().splitlines() if "[request_id=dev-1]" in line]
    assert len(lines) == 1
    assert " - service.access - INFO - GET /health 200 " in lines[0]


def test_sigterm_lets_a_hung_probe_answer_then_exits_and_closes_the_pool(
    cluster: Cluster, database_url: str, tmp_path: Path, server_command: str
) -> None:
    """SIGTERM during a probe of a frozen database: the probe answers 503 in time, then a clean exit."""
    env = production(database_url, DATABASE_HEALTH_CHECK_TIMEOUT="2")
    server = UvicornProcess(env, log_path=tmp_path / "out.log", command=server_command)
    try:
        server.wait_ready()
        assert httpx.get(f"{server.url}/health/db").status_code == 200
        cluster.hang()
        answers: list[httpx.Response] = []
        in_flight = threading.Thread(target=lambda: answers.append(httpx.get(f"{server.url}/health/db", timeout=30)))
        in_flight.start()
        time.sleep(0.5)
        started = time.monotonic()
        status = server.terminate(timeout=30)
        in_flight.join(30)
        assert status in GRACEFUL
        assert time.monotonic() - started < 2 + 10 + 3  # probe bound + pool close bound + slack
        assert [r.status_code for r in answers] == [503]
        assert "Application shutdown complete" in server.output()
    finally:
        cluster.resume()
        server.kill()
    assert wait_for_no_backends(cluster, "e2e-service")


def test_sigterm_closes_every_backend_connection(
    cluster: Cluster, database_url: str, tmp_path: Path, server_command: str
) -> None:
    """After a graceful exit no backend of the service's pool remains on the server."""
    server = UvicornProcess(
        production(database_url, DATABASE_POOL_SIZE="4"), log_path=tmp_path / "out.log", command=server_command
    )
    try:
        server.wait_ready()
        with httpx.Client() as client:
            threads = [threading.Thread(target=client.get, args=(f"{server.url}/health/db",)) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert cluster.backend_count("e2e-service") >= 1
    finally:
        assert server.terminate() in GRACEFUL
    assert wait_for_no_backends(cluster, "e2e-service")


def test_factory_form_serves_the_same_app(tmp_path: Path) -> None:
    """`uvicorn --factory app:create_app` is the documented alternative."""
    log = tmp_path / "out.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app:create_app", "--port", "0"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "Uvicorn running on" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        url = log.read_text().split("Uvicorn running on ", 1)[1].split(" ", 1)[0]
        assert httpx.get(f"{url}/health").json()["status"] == "healthy"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) in GRACEFUL


def wait_for_no_backends(cluster: Cluster, application_name: str, within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if cluster.backend_count(application_name) == 0:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_python_m_app_serves_the_app_it_is_named(workers: str) -> None:
    """`python -m app examples.items:app` serves the reference resource, in one process or in workers."""
    with running_uvicorn({"WEB_CONCURRENCY": workers}, "examples.items:app", command="python -m app") as server:
        response = httpx.get(f"{server.url}/items/not-a-uuid", timeout=5)
        assert response.status_code == 422
        assert response.json()["validation_errors"][0]["field"] == "item_id"
        assert httpx.get(f"{server.url}/openapi.json", timeout=5).json()["paths"].keys() >= {"/items/{item_id}"}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_python_m_app_on_a_port_already_taken_says_which_and_stops(tmp_path: Path, workers: str) -> None:
    """With workers, uvicorn's line said only "[Errno 98] Address already in use": the address is named too."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = UvicornProcess({"WEB_CONCURRENCY": workers}, port=port, log_path=tmp_path / "out.log",
                                command="python -m app")  # fmt: skip
        status = server.process.wait(30)
    assert status != 0
    assert str(port) in server.output()  # uvicorn's own line names it in one process; ours, with workers
    assert "in use" in server.output()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_python_m_app_stops_at_once_on_an_app_it_cannot_import(tmp_path: Path, workers: str) -> None:
    """A wrong import string is one message and a non-zero exit, never workers replaced in a loop."""
    server = UvicornProcess({"WEB_CONCURRENCY": workers}, "no_such_module:app", log_path=tmp_path / "out.log",
                            command="python -m app")  # fmt: skip
    status = server.process.wait(30)
    assert status != 0
    assert 'Could not import module "no_such_module"' in server.output()
    # At most once per worker: none replaced (the supervisor may stop a worker before it says it).
    assert 1 <= server.output().count("Could not import module") <= int(workers)
