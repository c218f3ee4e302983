"""The readiness probe's use of the pool: one round trip, no reset it does not need, fair under load."""

from __future__ import annotations

import asyncio

import pytest
from cluster import Cluster

from db import Database
from settings import Settings

APP_NAME = "probe-pool-test"


async def _open(database_url: str, pool_size: int) -> Database:
    return await Database.open(Settings(database_url=database_url, database_pool_size=pool_size, app_name=APP_NAME))


@pytest.mark.anyio
async def test_release_resets_what_a_handler_changed_in_the_session(database_url: str) -> None:
    """An ordinary release undoes a SET, so the next user of the connection starts clean."""
    database = await _open(database_url, pool_size=1)
    try:
        async with database.connection() as conn:
            await conn.execute("SET statement_timeout = '1234s'")
        async with database.connection() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == "0"
    finally:
        await database.close()


@pytest.mark.anyio
async def test_stateless_release_skips_the_reset_round_trip(database_url: str) -> None:
    """Released with `stateless=True`, the session is handed on as it is: no reset query ran."""
    database = await _open(database_url, pool_size=1)
    try:
        # Breaking the promise on purpose is the only way to see from outside that no reset ran.
        async with database.connection(stateless=True) as conn:
            await conn.execute("SET statement_timeout = '1234s'")
        async with database.connection() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == "1234s"
        async with database.connection() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == "0"
    finally:
        await database.close()


@pytest.mark.anyio
async def test_many_concurrent_probes_share_the_pool_without_opening_more(database_url: str, cluster: Cluster) -> None:
    """Far more probes than connections all answer, and the pool never opens past its size."""
    database = await _open(database_url, pool_size=2)
    try:
        probes = await asyncio.gather(*(database.probe(10) for _ in range(40)))
        assert all(probe.connected for probe in probes)
        assert cluster.backend_count(APP_NAME) <= 2
        assert database.pool.get_size() <= 2
    finally:
        await database.close()
