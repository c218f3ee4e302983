"""Litestar, as its docs write an app: decorated handlers, a lifespan context manager for the pool."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
from litestar import Litestar, get
from litestar.datastructures import State


@asynccontextmanager
async def database(app: Litestar) -> AsyncIterator[None]:
    size = int(os.environ.get("DATABASE_POOL_SIZE", "10"))
    app.state.pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=0, max_size=size)
    try:
        yield
    finally:
        await app.state.pool.close()


@get("/health")
async def health() -> dict[str, str]:
    return {"status": "healthy", "timestamp": datetime.now(UTC).isoformat(), "version": "0.1.0"}


@get("/health/db")
async def health_db(state: State) -> dict[str, object]:
    async with state.pool.acquire() as connection:
        await connection.fetchval("SELECT 1")
    return {"status": "healthy", "timestamp": datetime.now(UTC).isoformat(), "database_connected": True}


# An unknown path gets Litestar's default JSON 404: {"status_code": 404, "detail": "Not Found"}.
app = Litestar([health, health_db], lifespan=[database])
