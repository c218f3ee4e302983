"""FastAPI, as its tutorial writes an app: path operations returning dicts, a lifespan for the pool."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
from fastapi import FastAPI, Request


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    size = int(os.environ.get("DATABASE_POOL_SIZE", "10"))
    app.state.pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=0, max_size=size)
    yield
    await app.state.pool.close()


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "healthy", "timestamp": datetime.now(UTC).isoformat(), "version": "0.1.0"}


@app.get("/health/db")
async def health_db(request: Request) -> dict[str, object]:
    async with request.app.state.pool.acquire() as connection:
        await connection.fetchval("SELECT 1")
    return {"status": "healthy", "timestamp": datetime.now(UTC).isoformat(), "database_connected": True}


# An unknown path gets FastAPI's default JSON 404: {"detail": "Not Found"}.
