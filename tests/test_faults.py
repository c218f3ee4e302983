"""Database faults produced for real: the cluster stopped, restarted, frozen, or saturated."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import msgspec
import pytest
from cluster import Cluster
from service import make_settings, serve

from api import Context, Endpoints
from app import create_app

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
TIMEOUT = 2  # DATABASE_HEALTH_CHECK_TIMEOUT for these tests, seconds
SLACK = 1.5  # scheduling allowance on a loaded 2-core machine, seconds


class Hold(msgspec.Struct):
    seconds: float


hold_routes = Endpoints(tag="test")


@hold_routes.get("/hold", summary="Test only: keep a pooled connection busy in the server for `seconds`")
async def hold_connection(ctx: Context, query: Hold) -> None:
    async with ctx.connection() as conn:
        await conn.execute("SELECT pg_sleep($1)", query.seconds)


@hold_routes.get("/work-in-transaction", summary="Test only: a transaction, `seconds` of work, then a query")
async def work_in_transaction(ctx: Context, query: Hold) -> None:
    async with ctx.connection() as conn, conn.transaction():
        await asyncio.sleep(query.seconds)
        await conn.fetchval("SELECT $1::int", 1)  # with an argument: asyncpg's other path to the server


@hold_routes.get("/impatient", summary="Test only: a query under a timeout of the handler's own")
async def impatient(ctx: Context, query: Hold) -> None:
    async with ctx.connection() as conn, asyncio.timeout(query.seconds):
        await conn.execute("SELECT pg_sleep(5)")


@hold_routes.get("/savepoint", summary="Test only: a slow step under its own timeout, in a savepoint")
async def savepoint(ctx: Context) -> None:
    async with ctx.connection() as conn, conn.transaction():
        try:
            async with conn.transaction(), asyncio.timeout(0.3):
                await conn.execute("SELECT pg_sleep(5)")
        except TimeoutError:
            pass  # the optional step is given up, the transaction goes on
        await conn.execute("SELECT 1")


@hold_routes.get("/timeout-around-transaction", summary="Test only: a timed-out transaction, caught")
async def timeout_around_transaction(ctx: Context) -> None:
    async with ctx.connection() as conn:
        try:
            async with asyncio.timeout(0.3), conn.transaction():
                await conn.execute("SELECT pg_sleep(5)")
        except TimeoutError:
            pass  # given up; the connection goes on
        await conn.execute("SELECT 1")


@hold_routes.get("/own-bound", summary="Test only: a query under asyncpg's per-call timeout")
async def own_bound(ctx: Context) -> None:
    async with ctx.connection() as conn:
        await conn.execute("SELECT pg_sleep(5)", timeout=0.3)


@asynccontextmanager
async def service(database_url: str, **env: str) -> AsyncIterator[httpx.AsyncClient]:
    defaults = {"DATABASE_URL": database_url, "DATABASE_HEALTH_CHECK_TIMEOUT": str(TIMEOUT), "APP_NAME": "faults-test"}
    settings = make_settings(**{**defaults, **env})
    async with serve(create_app(settings, endpoints=[hold_routes])) as client:
        yield client


async def timed_get(client: httpx.AsyncClient, path: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.get(path, timeout=60)
    return response, time.monotonic() - started


async def timed_get_while_hung(cluster: Cluster, client: httpx.AsyncClient, path: str) -> tuple[httpx.Response, float]:
    """`timed_get` with the server frozen, and running again afterwards whatever happened."""
    cluster.hang()
    try:
        return await timed_get(client, path)
    finally:
        cluster.resume()


async def wait_until_ready(client: httpx.AsyncClient, within: float) -> int:
    """Poll `/health/db` until 200; returns how many probes failed first."""
    deadline, failures = time.monotonic() + within, 0
    while time.monotonic() < deadline:
        response = await client.get("/health/db", timeout=60)
        if response.status_code == 200:
            return failures
        assert response.status_code == 503
        failures += 1
        await asyncio.sleep(0.2)
    raise AssertionError(f"/health/db not ready within {within} s")


async def test_stopped_database_gives_503_fast_while_liveness_stays_200(cluster: Cluster, database_url: str) -> None:
    """A stopped server is refused at once: 503 with a safe reason, and `/health` is unaffected."""
    async with service(database_url) as client:
        assert (await client.get("/health/db")).status_code == 200
        cluster.stop()
        response, elapsed = await timed_get(client, "/health/db")
        assert response.status_code == 503
        assert elapsed < TIMEOUT + SLACK
        body = response.json()
        assert body["errors"] == ["Database is unreachable: connection refused"]
        assert body["database_connected"] is False
        assert body["response_time_ms"] is None
        assert (await client.get("/health")).status_code == 200


async def test_requests_failing_on_the_database_log_why_once_and_its_return_once(
    cluster: Cluster, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The 503 envelope says only "unavailable"; the log says why, once per change, not once per request."""
    async with service(database_url) as client:
        assert (await client.get("/hold?seconds=0")).status_code == 204
        cluster.stop()
        with caplog.at_level(logging.INFO, logger="service.database"):
            failed = [(await client.get("/hold?seconds=0")).status_code for _ in range(5)]
            cluster.start()
            served = [(await client.get("/hold?seconds=0")).status_code for _ in range(3)]
    assert failed == [503] * 5
    assert served == [204] * 3
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "service.database"]
    assert lines[0] == ("WARNING", "Database unavailable to requests: Database connection lost")
    assert lines[-1][0] == "INFO"
    assert lines[-1][1].startswith("Database available again (after: ")
    assert len(lines) <= 3  # lost, then refused while it is down, then back: never one per request
    assert all(level == "WARNING" for level, _ in lines[:-1])


async def test_restarted_database_recovers_without_restarting_the_service(cluster: Cluster, database_url: str) -> None:
    """After a restart the pool's dead connections are replaced; no probe fails once it is back."""
    async with service(database_url, DATABASE_POOL_SIZE="3") as client:
        await asyncio.gather(*(client.get("/health/db") for _ in range(6)))  # fill the pool
        cluster.restart()
        assert await wait_until_ready(client, within=10) == 0
        statuses = [(await client.get("/health/db")).status_code for _ in range(5)]
        assert statuses == [200] * 5


async def test_hung_database_answers_503_within_the_timeout(cluster: Cluster, database_url: str) -> None:
    """SIGSTOP on the server: the probe gives up at its bound, and liveness answers meanwhile."""
    async with service(database_url) as client:
        assert (await client.get("/health/db")).status_code == 200
        cluster.hang()
        probe = asyncio.ensure_future(timed_get(client, "/health/db"))
        await asyncio.sleep(0.3)
        liveness, liveness_elapsed = await timed_get(client, "/health")
        response, elapsed = await probe
        assert liveness.status_code == 200
        assert liveness_elapsed < 0.5
        assert response.status_code == 503
        assert TIMEOUT - 0.1 <= elapsed < TIMEOUT + SLACK
        assert response.json()["errors"] == [f"Database health check timed out after {TIMEOUT} seconds"]
        cluster.resume()
        await wait_until_ready(client, within=10)


async def test_a_query_the_hung_database_never_answers_is_a_504_within_the_command_timeout(
    cluster: Cluster, database_url: str
) -> None:
    """statement_timeout is the server's, and a frozen server enforces nothing: DATABASE_COMMAND_TIMEOUT,
    the client's own bound, ends the request, drops its connection, and the next request is served."""
    async with service(database_url, DATABASE_COMMAND_TIMEOUT="1") as client:
        assert (await client.get("/hold?seconds=0")).status_code == 204  # a pooled connection, ready
        response, elapsed = await timed_get_while_hung(cluster, client, "/hold?seconds=0")
        assert (response.status_code, response.json()["error"]) == (504, "TIMEOUT_ERROR")
        assert response.json()["message"] == "The operation timed out (database: no answer within 1 seconds)"
        assert 1 - 0.1 <= elapsed < 1 + SLACK
        await wait_until_ready(client, within=10)
        assert (await client.get("/hold?seconds=0")).status_code == 204


async def test_a_query_in_a_transaction_the_hung_database_never_answers_is_a_504_within_the_command_timeout(
    cluster: Cluster, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncpg's transaction sent ROLLBACK on the connection whose query had timed out, and waited the
    command timeout again: the 504 came after twice its bound. And the log says why, once."""
    async with service(database_url, DATABASE_COMMAND_TIMEOUT="2") as client:
        request = asyncio.ensure_future(timed_get(client, "/work-in-transaction?seconds=1"))
        await asyncio.sleep(0.5)  # the transaction has begun: the server freezes during the work
        cluster.hang()
        try:
            response, elapsed = await request
        finally:
            cluster.resume()
        assert (response.status_code, response.json()["error"]) == (504, "TIMEOUT_ERROR")
        assert 1 + 2 - 0.1 <= elapsed < 1 + 2 + SLACK
        assert response.json()["message"] == "The operation timed out (database: no answer within 2 seconds)"
        await wait_until_ready(client, within=10)
        assert (await client.get("/work-in-transaction?seconds=0")).status_code == 204
    logged = [r.getMessage() for r in caplog.records if r.name == "service.database" and r.levelname == "WARNING"]
    assert logged == ["Database unavailable to requests: Database did not answer a query within 2 seconds"]


async def test_a_timeout_of_the_handlers_own_around_a_query_is_no_database_outage(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The 504 of a handler's `asyncio.timeout`, or of a query's own `timeout=`, says nothing of the
    database, in the answer or the log."""
    async with service(database_url) as client:
        answers = [await client.get(path) for path in ("/impatient?seconds=0.3", "/own-bound")]
    assert [(r.status_code, r.json()["message"]) for r in answers] == [(504, "The operation timed out")] * 2
    assert [r for r in caplog.records if r.name == "service.database" and r.levelname == "WARNING"] == []


async def test_a_timeout_caught_inside_a_transaction_rolls_back_to_its_savepoint_and_the_transaction_goes_on(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A timeout of the handler's own that it catches is not a server that stopped answering: the
    savepoint is rolled back, as asyncpg does, rather than the connection closed under the handler."""
    async with service(database_url) as client:
        answers = [(await client.get(path)).status_code for path in ("/savepoint", "/timeout-around-transaction")]
    assert answers == [204, 204]
    assert [r for r in caplog.records if r.name == "service.database" and r.levelname == "WARNING"] == []


async def test_a_probe_whose_query_the_hung_database_never_answers_says_so(cluster: Cluster, database_url: str) -> None:
    """With DATABASE_COMMAND_TIMEOUT under the probe's own timeout, the probe's query ends first: its
    503 says the query went unanswered, not that the probe's timer ran out, which it did not."""
    async with service(database_url, DATABASE_COMMAND_TIMEOUT="1") as client:
        assert (await client.get("/health/db")).status_code == 200  # a pooled connection, ready
        response, elapsed = await timed_get_while_hung(cluster, client, "/health/db")
        assert response.status_code == 503
        assert response.json()["errors"] == ["Database did not answer a query within 1 seconds"]
        assert 1 - 0.1 <= elapsed < 1 + SLACK
        await wait_until_ready(client, within=10)


async def test_hung_database_never_hangs_new_connections_either(cluster: Cluster, database_url: str) -> None:
    """With an empty pool, connecting to a frozen server is bounded by the same timeout."""
    async with service(database_url) as client:
        cluster.hang()
        responses = await asyncio.gather(*(timed_get(client, "/health/db") for _ in range(3)))
        assert all(r.status_code == 503 and t < TIMEOUT + SLACK for r, t in responses)
        cluster.resume()
        await wait_until_ready(client, within=10)


async def test_service_starts_while_database_is_down_and_recovers_later(cluster: Cluster, database_url: str) -> None:
    """The pool connects lazily: start-up succeeds, then readiness follows the database."""
    cluster.stop()
    async with service(database_url) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/health/db")).status_code == 503
        cluster.start()
        await wait_until_ready(client, within=10)


async def test_a_database_that_will_not_let_us_connect_is_named_not_the_pool(
    cluster: Cluster, database_url: str
) -> None:
    """Connecting to a frozen server outlasts DATABASE_POOL_TIMEOUT with no connection in use: the 503 says the
    database did not answer (and waits as long as any database failure), not that the pool ran out."""
    async with service(database_url, DATABASE_POOL_TIMEOUT="1") as client:
        cluster.hang()
        try:
            response, elapsed = await timed_get(client, "/hold?seconds=0")
            probe = (await client.get("/health/db")).json()
        finally:
            cluster.resume()
        body = response.json()
        assert (response.status_code, body["message"]) == (503, "Database did not answer within 1 seconds")
        assert body["retry_after"] > 1
        assert elapsed < 1 + SLACK
        assert probe["errors"] == ["Database did not answer within 1 seconds"]
        assert probe["connection_pool"]["active_connections"] == 0
        await wait_until_ready(client, within=10)


async def test_exhausted_pool_answers_within_the_timeout_and_says_why(database_url: str) -> None:
    """Every pooled connection busy: the probe does not queue forever and names the reason."""
    async with service(database_url, DATABASE_POOL_SIZE="2") as client:
        holders = [asyncio.ensure_future(client.get("/hold", params={"seconds": TIMEOUT + 3})) for _ in range(2)]
        await asyncio.sleep(0.5)
        response, elapsed = await timed_get(client, "/health/db")
        assert response.status_code == 503
        assert elapsed < TIMEOUT + SLACK
        body = response.json()
        assert body["errors"] == [
            f"Database health check timed out after {TIMEOUT} seconds waiting for a pooled connection"
        ]
        assert body["connection_pool"] == {"active_connections": 2, "pool_size": 2}
        assert [r.status_code for r in await asyncio.gather(*holders)] == [204, 204]
        assert (await client.get("/health/db")).status_code == 200


async def test_probe_storm_never_opens_more_than_the_pool_size(cluster: Cluster, database_url: str) -> None:
    """500 concurrent probes share DATABASE_POOL_SIZE connections, and every one answers."""
    async with service(database_url, DATABASE_POOL_SIZE="5", DATABASE_HEALTH_CHECK_TIMEOUT="30") as client:
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, await asyncio.to_thread(cluster.backend_count, "faults-test"))
                await asyncio.sleep(0.05)

        watcher = asyncio.ensure_future(watch())
        responses = await asyncio.gather(*(client.get("/health/db", timeout=60) for _ in range(500)))
        watcher.cancel()
        assert [r.status_code for r in responses] == [200] * 500
        assert 1 <= peak <= 5
