"""Many replicas, one database: the service through PgBouncer in transaction-pooling mode."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import asyncpg
import httpx
import psycopg
import pytest
from cluster import Cluster
from pgbouncer import BINARY, PgBouncer, running_pgbouncer
from service import ROOT, serve
from yoyo import get_backend, read_migrations

from app import create_app
from db import PREPARED_STATEMENT_LOST
from migrate import MIGRATIONS_DIR, migrations_on_disk
from settings import load_settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(BINARY is None, reason="needs pgbouncer (apt-get install pgbouncer)"),
]
CONCURRENT = 200
# What asyncpg's named prepared statements meet when consecutive transactions of one client
# connection land on different server connections: "does not exist" (26000), or "already
# exists" (42P05) when another client's statement of the same name got there first.
PREPARED_STATEMENT_ERRORS = (asyncpg.InvalidSQLStatementNameError, asyncpg.DuplicatePreparedStatementError)


@pytest.fixture
def bouncer(cluster: Cluster) -> Iterator[PgBouncer]:
    if cluster.password is None:
        pytest.skip("PgBouncer needs the server's password")
    with running_pgbouncer(cluster, server_connections=2) as running:
        yield running


@pytest.fixture
def migrated_database(database_url: str) -> str:
    """The test database with every migration applied, so a healthy probe says `up_to_date`."""
    backend = get_backend(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with backend.lock():
        backend.apply_migrations(backend.to_apply(read_migrations(str(MIGRATIONS_DIR))))
    return urlsplit(database_url).path.lstrip("/")


async def _client(url: str, cache_size: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings({"DATABASE_URL": url, "DATABASE_STATEMENT_CACHE_SIZE": cache_size})
    async with serve(create_app(settings), timeout=30) as http:
        yield http


async def _probe_concurrently(http: httpx.AsyncClient) -> list[httpx.Response]:
    return await asyncio.gather(*(http.get("/health/db") for _ in range(CONCURRENT)))


@pytest.mark.anyio
async def test_db_health_is_healthy_through_pgbouncer_without_a_statement_cache(
    bouncer: PgBouncer, migrated_database: str
) -> None:
    """With DATABASE_STATEMENT_CACHE_SIZE=0, 200 concurrent probes over 2 server connections all pass."""
    async for http in _client(bouncer.url_for(migrated_database), "0"):
        for _ in range(3):
            responses = await _probe_concurrently(http)
            bodies = [r.json() for r in responses]
            assert [r.status_code for r in responses] == [200] * CONCURRENT, bodies[:3]
            assert {(b["status"], b["migration_status"]) for b in bodies} == {("healthy", "up_to_date")}


@pytest.mark.anyio
async def test_db_health_fails_through_pgbouncer_with_the_statement_cache_on(
    bouncer: PgBouncer, migrated_database: str
) -> None:
    """With asyncpg's default cache, probes fail (503) and say which setting fixes it."""
    async for http in _client(bouncer.url_for(migrated_database), "100"):
        responses = [r for _ in range(3) for r in await _probe_concurrently(http)]
    failed = [r.json() for r in responses if r.status_code == 503]
    assert failed, "every probe passed: the statement cache no longer breaks under transaction pooling?"
    assert {error for body in failed for error in body["errors"]} == {PREPARED_STATEMENT_LOST}
    assert "DATABASE_STATEMENT_CACHE_SIZE=0" in PREPARED_STATEMENT_LOST


@pytest.mark.anyio
async def test_asyncpg_prepared_statements_break_under_transaction_pooling(
    bouncer: PgBouncer, migrated_database: str
) -> None:
    """The cause, without the service: asyncpg's named statements raise; unnamed ones do not."""
    url = bouncer.url_for(migrated_database)

    async def run(statement_cache_size: int) -> list[BaseException | None]:
        pool = await asyncpg.create_pool(url, min_size=10, max_size=10, statement_cache_size=statement_cache_size)
        try:

            async def query(i: int) -> None:
                for _ in range(5):
                    assert await pool.fetchval("SELECT $1::int + 1", i) == i + 1

            results = await asyncio.gather(*(query(i) for i in range(50)), return_exceptions=True)
            return [r if isinstance(r, BaseException) else None for r in results]
        finally:
            await pool.close()

    cached = [e for e in await run(100) if e is not None]
    assert cached, "named prepared statements survived transaction pooling"
    assert all(isinstance(e, PREPARED_STATEMENT_ERRORS) for e in cached), {type(e).__name__ for e in cached}
    assert "pgbouncer" in str(cached[0]).lower()  # asyncpg's own hint names the cause and the fix
    assert [e for e in await run(0) if e is not None] == []


def test_migrations_run_through_pgbouncer_in_transaction_mode(bouncer: PgBouncer, database_url: str) -> None:
    """A migration job reads DATABASE_URL as the app does, which may name PgBouncer: migrate, rollback
    and migrate again all succeed (psycopg's server-side prepared statements would collide, "_pg3_0
    already exists", once a query ran five times), and no lock is left behind."""
    url = bouncer.url_for(urlsplit(database_url).path.lstrip("/"))
    source = ["--source", str(ROOT / "examples" / "migrations")]
    env = {**{k: v for k, v in os.environ.items() if k != "DATABASE_URL"}, "DATABASE_URL": url}
    for command in ("migrate", "rollback", "rollback", "migrate", "rollback", "migrate", "status"):
        done = subprocess.run([sys.executable, "-m", "db", command, *source], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, (command, done.stderr)
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT * FROM yoyo_lock").fetchall() == []
        applied = conn.execute("SELECT migration_id FROM _yoyo_migration ORDER BY 1").fetchall()
    assert [m for (m,) in applied] == sorted([*migrations_on_disk(MIGRATIONS_DIR), "0001.create_items"])
