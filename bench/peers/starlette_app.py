"""Plain Starlette, as its docs write an app: a route list, a lifespan, a JSON handler for 404."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    size = int(os.environ.get("DATABASE_POOL_SIZE", "10"))
    app.state.pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=0, max_size=size)
    yield
    await app.state.pool.close()


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "healthy", "timestamp": datetime.now(UTC).isoformat(), "version": "0.1.0"})


async def health_db(request: Request) -> JSONResponse:
    async with request.app.state.pool.acquire() as connection:
        await connection.fetchval("SELECT 1")
    now = datetime.now(UTC).isoformat()
    return JSONResponse({"status": "healthy", "timestamp": now, "database_connected": True})


async def not_found(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


app = Starlette(
    routes=[Route("/health", health), Route("/health/db", health_db)],
    exception_handlers={404: not_found},
    lifespan=lifespan,
)
