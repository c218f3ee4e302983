"""The health contract, field by field, against a real PostgreSQL."""

from __future__ import annotations

import importlib
import logging
import re
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
from cluster import Cluster
from service import make_settings, pending, serve_settings

from app import create_app
from migrate import MIGRATIONS_DIR, migrations_on_disk

BENCH = Path(__file__).resolve().parent.parent / "bench"
ON_DISK = migrations_on_disk(MIGRATIONS_DIR)  # the foundation's, and any migration a team added beside it
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
pytestmark = pytest.mark.anyio


async def test_liveness_reports_healthy_with_contract_fields() -> None:
    """`/health` answers 200 with status, UTC timestamp, version and integer uptime."""
    async with serve_settings(APP_VERSION="2.3.4") as client:
        response = await client.get("/health")
    body = response.json()
    assert response.status_code == 200
    assert set(body) == {"status", "timestamp", "version", "uptime_seconds"}
    assert body["status"] == "healthy"
    assert body["version"] == "2.3.4"
    assert RFC3339_UTC.match(body["timestamp"])
    assert isinstance(body["uptime_seconds"], int)
    assert body["uptime_seconds"] >= 0


async def test_health_responses_are_json_and_never_cached() -> None:
    """Both health routes send `application/json` and `Cache-Control: no-store`."""
    async with serve_settings() as client:
        for path in ("/health", "/health/db"):
            response = await client.get(path)
            assert response.headers["content-type"] == "application/json"
            assert response.headers["cache-control"] == "no-store"
            assert int(response.headers["content-length"]) == len(response.content)


async def test_liveness_never_touches_the_database(database_url: str) -> None:
    """`/health` stays 200 with a database URL that points nowhere."""
    async with serve_settings(DATABASE_URL="postgresql://u:pw@127.0.0.1:1/nowhere") as client:
        assert (await client.get("/health")).status_code == 200


@pytest.mark.parametrize("path", ["/", "/health", "/health/db"])
async def test_head_answers_with_get_headers_and_no_body(path: str) -> None:
    """Every route answers HEAD where it answers GET: same status and headers, empty body."""
    async with serve_settings() as client:
        get, head = await client.get(path), await client.head(path)
    assert head.status_code == get.status_code
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.headers["content-length"] == get.headers["content-length"]


async def test_readiness_without_database_url_is_503_not_configured() -> None:
    """In development the service runs without a database and says so on `/health/db`."""
    async with serve_settings() as client:
        response = await client.get("/health/db")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["database_connected"] is False
    assert body["response_time_ms"] is None
    assert body["migration_status"] == "unknown"
    assert body["connection_pool"] == {"active_connections": 0, "pool_size": 10}
    assert body["errors"] == ["Database is not configured (DATABASE_URL is unset)"]


async def test_readiness_on_a_fresh_database_is_degraded_with_migrations_pending(database_url: str) -> None:
    """Reachable, but no migration ever applied: 200, degraded, naming what is pending."""
    async with serve_settings(DATABASE_URL=database_url, DATABASE_POOL_SIZE="7") as client:
        response = await client.get("/health/db")
    body = response.json()
    assert response.status_code == 200
    assert set(body) == {
        "status", "timestamp", "database_connected", "response_time_ms",
        "connection_pool", "migration_status", "errors",
    }  # fmt: skip
    assert body["status"] == "degraded"
    assert body["migration_status"] == "pending"
    assert body["database_connected"] is True
    assert isinstance(body["response_time_ms"], int)
    assert body["response_time_ms"] >= 0
    assert body["connection_pool"]["pool_size"] == 7
    assert body["errors"] == [pending(ON_DISK)]
    assert RFC3339_UTC.match(body["timestamp"])


async def test_readiness_is_healthy_and_up_to_date_when_every_migration_is_recorded(database_url: str) -> None:
    """With every on-disk migration recorded as applied, the status is healthy and up_to_date."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CREATE TABLE _yoyo_migration (migration_hash text, migration_id text)")
        await conn.executemany("INSERT INTO _yoyo_migration VALUES ('h', $1)", [(m,) for m in ON_DISK])
    finally:
        await conn.close()
    async with serve_settings(DATABASE_URL=database_url) as client:
        response = await client.get("/health/db")
    body = response.json()
    assert response.status_code == 200
    assert body["status"] == "healthy"
    assert body["migration_status"] == "up_to_date"
    assert "errors" not in body


async def test_readiness_counts_the_probe_connection_as_active(database_url: str) -> None:
    """`active_connections` counts connections checked out while probing: at least the probe's own."""
    async with serve_settings(DATABASE_URL=database_url) as client:
        body = (await client.get("/health/db")).json()
    assert body["connection_pool"]["active_connections"] == 1


async def test_readiness_names_a_server_that_refuses_the_ssl_the_url_requires(database_url: str) -> None:
    """The server is reachable; it speaks no SSL, which `sslmode=require` insists on: said so, not "unreachable"."""
    conn = await asyncpg.connect(database_url)
    try:
        if await conn.fetchval("SHOW ssl") == "on":
            pytest.skip("TEST_DATABASE_URL names a server that speaks SSL")
    finally:
        await conn.close()
    async with serve_settings(DATABASE_URL=f"{database_url}?sslmode=require") as client:
        response = await client.get("/health/db")
    assert (response.status_code, response.json()["errors"]) == (
        503,
        ["Database refused SSL, which the URL's sslmode requires"],
    )


async def test_readiness_with_wrong_password_is_503_and_never_shows_it(database_url: str) -> None:
    """Refused credentials are a short, safe reason; the password appears nowhere."""
    bad_url = database_url.replace("postgresql://postgres:", "postgresql://postgres:wrong-", 1)
    async with serve_settings(DATABASE_URL=bad_url) as client:
        response = await client.get("/health/db")
    assert response.status_code == 503
    assert response.json()["errors"] == ["Database refused the credentials"]
    password = bad_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert password not in response.text


async def test_readiness_of_a_missing_database_is_503(database_url: str) -> None:
    """A database name that does not exist is reported as such."""
    url = database_url.rsplit("/", 1)[0] + "/no_such_database"
    async with serve_settings(DATABASE_URL=url) as client:
        response = await client.get("/health/db")
    assert response.status_code == 503
    assert response.json()["errors"] == ["Database does not exist"]


async def test_root_names_the_app_version_and_environment() -> None:
    """`GET /` says what is running."""
    async with serve_settings(APP_NAME="Orders", APP_VERSION="1.2.3") as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"message": "Orders is running", "version": "1.2.3", "environment": "development"}


async def test_liveness_is_503_before_the_lifespan_has_started() -> None:
    """Served without its start-up (no pool, no clock), the process reports itself unhealthy."""
    app = create_app(make_settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get("/health")
    body = response.json()
    assert response.status_code == 503
    assert body["status"] == "unhealthy"
    assert body["errors"] == ["Application start-up has not completed"]
    assert body["uptime_seconds"] == 0


async def test_readiness_changes_are_logged_once_each_never_per_probe(
    cluster: Cluster, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Healthy to unhealthy (with the reason) and back: one line per change, whatever the number of probes."""
    caplog.set_level(logging.INFO, logger="service.health")
    async with serve_settings(DATABASE_URL=database_url, DATABASE_HEALTH_CHECK_TIMEOUT="2") as client:
        statuses = [(await client.get("/health/db")).status_code for _ in range(3)]
        cluster.stop()
        try:
            statuses += [(await client.get("/health/db")).status_code for _ in range(3)]
        finally:
            cluster.ensure_running()
        statuses += [(await client.get("/health/db")).status_code for _ in range(3)]
    assert statuses == [200] * 3 + [503] * 3 + [200] * 3
    changes = [r.getMessage() for r in caplog.records if r.name == "service.health"]
    assert changes == [
        f"Readiness unknown -> degraded: {pending(ON_DISK)}",
        "Readiness degraded -> unhealthy: Database is unreachable: connection refused",
        f"Readiness unhealthy -> degraded: {pending(ON_DISK)}",
    ]


async def test_the_bench_floor_answers_health_as_the_service_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench/floor.py` answers `/health` with the service's status, headers and fields, or it measures less work."""
    monkeypatch.syspath_prepend(str(BENCH))
    floor = importlib.import_module("floor")
    async with serve_settings() as client:
        ours = await client.get("/health", headers={"X-Request-ID": "probe-1"})
    transport = httpx.ASGITransport(app=floor.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        least = await client.get("/health", headers={"X-Request-ID": "probe-1"})
        fresh = await client.get("/health")
    assert least.status_code == ours.status_code == 200
    # The same headers with the same values; only the length may differ (the uptime's digits).
    assert set(least.headers) == set(ours.headers)
    assert {**least.headers, "content-length": ""} == {**ours.headers, "content-length": ""}
    assert set(least.json()) == set(ours.json())
    assert uuid.UUID(fresh.headers["x-request-id"]).version == 4
