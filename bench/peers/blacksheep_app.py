"""BlackSheep, as its docs write an app: decorated routes, on_start/on_stop, the pool injected by type."""

import os
from datetime import UTC, datetime

import asyncpg
from blacksheep import Application, Request, Response, get, json

app = Application()


async def open_pool(application: Application) -> None:
    size = int(os.environ.get("DATABASE_POOL_SIZE", "10"))
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=0, max_size=size)
    application.services.add_instance(pool, asyncpg.Pool)


async def close_pool(application: Application) -> None:
    await application.services.resolve(asyncpg.Pool).close()


app.on_start += open_pool
app.on_stop += close_pool


@get("/health")
async def health() -> Response:
    return json({"status": "healthy", "timestamp": datetime.now(UTC).isoformat(), "version": "0.1.0"})


@get("/health/db")
async def health_db(pool: asyncpg.Pool) -> Response:
    async with pool.acquire() as connection:
        await connection.fetchval("SELECT 1")
    return json({"status": "healthy", "timestamp": datetime.now(UTC).isoformat(), "database_connected": True})


async def not_found(application: Application, request: Request, exc: Exception) -> Response:
    return json({"detail": "Not Found"}, status=404)


app.exceptions_handlers[404] = not_found
