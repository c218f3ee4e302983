"""The pool: a probe in one round trip, no reset it does not need, fair under load, dead and idle ones dropped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from cluster import Cluster

import db
from db import Database
from errors import DatabaseConnectionError
from settings import Settings

APP_NAME = "probe-pool-test"


@asynccontextmanager
async def _admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def _opened(database_url: str, pool_size: int) -> AsyncIterator[Database]:
    """A pool for the block, closed after it whatever the test did."""
    database = await _open(database_url, pool_size)
    try:
        yield database
    finally:
        await database.close()


async def _open(database_url: str, pool_size: int, pool_timeout: float = 30.0) -> Database:
    settings = Settings(
        database_url=database_url, database_pool_size=pool_size, database_pool_timeout=pool_timeout, app_name=APP_NAME
    )
    return await Database.open(settings)


@pytest.mark.anyio
async def test_release_resets_what_a_handler_changed_in_the_session(database_url: str) -> None:
    """An ordinary release undoes a SET, so the next user of the connection starts clean."""
    async with _opened(database_url, pool_size=1) as database:
        async with database.connection() as conn:
            await conn.execute("SET statement_timeout = '1234s'")
        async with database.connection() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == "0"


@pytest.mark.anyio
async def test_stateless_release_skips_the_reset_round_trip(database_url: str) -> None:
    """Released with `stateless=True`, the session is handed on as it is: no reset query ran."""
    async with _opened(database_url, pool_size=1) as database:
        # Breaking the promise on purpose is the only way to see from outside that no reset ran.
        async with database.connection(stateless=True) as conn:
            await conn.execute("SET statement_timeout = '1234s'")
        async with database.connection() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == "1234s"
        async with database.connection() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == "0"


@pytest.mark.anyio
async def test_a_stateless_block_that_raises_skips_the_reset_too(database_url: str) -> None:
    """A lookup's 404 is raised inside its stateless block: a reset there doubled the cost of every 404
    (measured: the reference resource's absent-id lookups fell from 9,451 to 6,647 requests/s)."""
    async with _opened(database_url, pool_size=1) as database:

        async def lookup() -> None:
            async with database.connection(stateless=True) as conn:
                await conn.execute("SET statement_timeout = '1234s'")  # the promise broken, to see the reset
                raise LookupError("the handler's 404")

        with pytest.raises(LookupError):
            await lookup()
        async with database.connection() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == "1234s"


@pytest.mark.anyio
async def test_many_concurrent_probes_share_the_pool_without_opening_more(database_url: str, cluster: Cluster) -> None:
    """Far more probes than connections all answer, and the pool never opens past its size."""
    async with _opened(database_url, pool_size=2) as database:
        probes = await asyncio.gather(*(database.probe(10) for _ in range(40)))
        assert all(probe.connected for probe in probes)
        assert cluster.backend_count(APP_NAME) <= 2
        assert database.open_connections() <= 2


@pytest.mark.anyio
async def test_a_connection_the_server_closed_while_idle_is_replaced(database_url: str) -> None:
    """A backend terminated while its connection sat idle costs the next user nothing: a new one is opened."""
    async with _opened(database_url, pool_size=1) as database:
        async with database.connection() as conn:
            first = await conn.fetchval("SELECT pg_backend_pid()")
        async with _admin(database_url) as admin:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", first)
        await asyncio.sleep(0.2)  # the server's close reaches the idle connection
        async with database.connection() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") != first
        assert database.open_connections() == 1


@pytest.mark.anyio
async def test_a_connection_idle_past_its_lifetime_is_closed_when_another_comes_back(
    database_url: str, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a burst, connections nobody reuses are closed, the most recently used ones kept."""
    async with _opened(database_url, pool_size=3) as database:
        burst = [database.connection(stateless=True) for _ in range(3)]
        for block in burst:
            await block.__aenter__()
        for block in burst:
            await block.__aexit__(None, None, None)
        assert database.open_connections() == 3
        monkeypatch.setattr(db, "IDLE_LIFETIME", 0.05)
        await asyncio.sleep(0.1)
        for _ in range(3):  # one user at a time reuses the newest; each return closes the oldest
            async with database.connection(stateless=True) as conn:
                await conn.fetchval("SELECT 1")
        assert database.open_connections() == 1
        assert cluster.backend_count(APP_NAME) == 1


@pytest.mark.anyio
async def test_closing_closes_a_connection_still_in_use_when_it_comes_back(database_url: str, cluster: Cluster) -> None:
    """`close` during a request does not cut it short; its connection is closed as it is given back."""
    database = await _open(database_url, pool_size=2)
    async with database.connection() as conn:
        await database.close()
        assert await conn.fetchval("SELECT 1") == 1
    assert database.open_connections() == 0
    assert cluster.backend_count(APP_NAME) == 0


@pytest.mark.anyio
async def test_a_reset_the_server_never_answers_costs_the_connection_not_the_request(
    database_url: str, cluster: Cluster
) -> None:
    """The block's work is done when its connection goes back: a hung reset drops the connection, silently."""
    if not cluster.controllable:
        pytest.skip("needs the throwaway cluster (TEST_DATABASE_URL names a server we may not freeze)")
    database = await _open(database_url, pool_size=1, pool_timeout=0.5)
    try:
        async with database.connection() as conn:  # not stateless: a reset follows
            await conn.execute("SET statement_timeout = '5s'")
            cluster.hang()
        assert database.open_connections() == 0  # the reset timed out: terminated, not pooled
        cluster.resume()
        async with database.connection() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == "0"  # a fresh session
    finally:
        cluster.resume()
        await database.close()


async def _run(database: Database, *statements: str) -> None:
    """`statements`, one after the other, on a connection of `database`'s."""
    async with database.connection() as conn:
        for statement in statements:
            await conn.execute(statement)


@pytest.mark.anyio
async def test_a_probe_that_retries_a_lost_connection_says_nothing_of_the_database_coming_back(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A probe's first attempt losing its connection ended its block normally, which the pool read as
    a block that went through: it logged "Database available again" in the middle of an outage."""
    caplog.set_level(logging.INFO, logger="service.database")
    base, dbname = database_url.rsplit("/", 1)
    async with (
        _opened(database_url, pool_size=2) as database,
        _admin(database_url) as admin,
        _admin(f"{base}/postgres") as superuser,
    ):
        await admin.execute("CREATE TABLE _yoyo_migration (migration_id text)")  # what the probe reads
        async with database.connection() as first, database.connection() as second:  # two idle ones after
            assert first is not second
        await superuser.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            with pytest.raises(DatabaseConnectionError):  # requests fail: a read-only database
                await _run(database, "SET default_transaction_read_only = on", "CREATE TABLE refused (x int)")
            async with admin.transaction():
                await admin.execute("LOCK TABLE _yoyo_migration IN ACCESS EXCLUSIVE MODE")
                probe = asyncio.create_task(database.probe(10))
                waiting = "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'"
                for _ in range(100):
                    if pid := await admin.fetchval(waiting, APP_NAME):
                        break
                    await asyncio.sleep(0.05)
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                failed = await probe
        finally:
            await superuser.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        assert not failed.connected
        assert [r.getMessage() for r in caplog.records if "available again" in r.getMessage()] == []
        assert (await database.probe(10)).connected
        assert [r.getMessage() for r in caplog.records if "available again" in r.getMessage()] != []


@pytest.mark.anyio
async def test_a_slot_freed_too_late_to_connect_is_the_pools_fault_not_the_databases(
    database_url: str, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A request that queued for most of `DATABASE_POOL_TIMEOUT` and got a slot with too little of it
    left to open a connection was told, and the log said, that the database did not answer."""
    if not cluster.controllable:
        pytest.skip("freezes the server's postmaster")
    caplog.set_level(logging.INFO, logger="service.database")
    database = await _open(database_url, pool_size=1, pool_timeout=2)
    try:
        async with database.connection() as conn:
            cluster.hang_listener()  # no new connection opens from now on; this session still answers
            queued = asyncio.create_task(_run(database, "SELECT 1"))
            await asyncio.sleep(1.95)
            assert await conn.fetchval("SELECT 1") == 1
            conn.terminate()  # the slot is freed with a new connection to open, and 50 ms to open it
        with pytest.raises(DatabaseConnectionError, match=r"^No database connection available$"):
            await queued
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
        with pytest.raises(DatabaseConnectionError, match=r"^Database did not answer within 2 seconds$"):
            await _run(database, "SELECT 1")  # the whole timeout to connect: the database's
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warned == ["Database unavailable to requests: Database did not answer within 2 seconds"]
    finally:
        cluster.resume()
        await database.close()
