"""The ceiling: a bare ASGI callable with no framework, served by uvicorn like the service.

`/health` and any unknown path answer fixed bodies of the same size as the service's;
`/health/db` runs one `SELECT 1` through an asyncpg pool sized like the service's. Nothing
else: no request ID, no logging, no timestamps. Whatever the service does beyond this is
what the benchmark's ratios measure.

    DATABASE_URL=postgresql://... uvicorn --app-dir bench baseline:app --loop uvloop --http httptools
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import asyncpg

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

APPLICATION_NAME = "bench-baseline"
# Same shapes and lengths as the service's bodies (a timestamp, small counters, a UUID).
HEALTH_BODY = b'{"status":"healthy","timestamp":"2025-09-23T10:30:00Z","version":"0.1.0","uptime_seconds":12}'
DB_BODY = (
    b'{"status":"healthy","timestamp":"2025-09-23T10:30:00Z","database_connected":true,"response_time_ms":3,'
    b'"connection_pool":{"active_connections":10,"pool_size":10},"migration_status":"up_to_date"}'
)
NOT_FOUND_BODY = (
    b'{"error":"NOT_FOUND_ERROR","message":"Resource not found","timestamp":"2025-09-23T10:30:00Z",'
    b'"request_id":"550e8400-e29b-41d4-a716-446655440000"}'
)


# With BASELINE_CONTRACT_HEADERS=N, the first N of the headers the service may add to a health
# response: 3, the three every probe carries; 4, with the `Vary` a probe no longer sends
# (bench/headers_cost.py: what writing them costs the server alone).
CONTRACT_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-request-id", b"550e8400-e29b-41d4-a716-446655440000"),
    (b"x-content-type-options", b"nosniff"),
    (b"vary", b"Origin"),
]
EXTRA_HEADERS = CONTRACT_HEADERS[: int(os.environ.get("BASELINE_CONTRACT_HEADERS", "0"))]


def _start(status: int, body: bytes) -> Message:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *EXTRA_HEADERS]
    return {"type": "http.response.start", "status": status, "headers": headers}


class Baseline:
    """The pool is created by the lifespan, lazily connecting like the service's (`min_size=0`)."""

    def __init__(self) -> None:
        self.pool: asyncpg.Pool | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        path = scope["path"]
        if path == "/health":
            status, body = 200, HEALTH_BODY
        elif path == "/health/db" and self.pool is not None:
            async with self.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
            status, body = 200, DB_BODY
        else:
            status, body = 404, NOT_FOUND_BODY
        await send(_start(status, body))
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                url = os.environ.get("DATABASE_URL")
                if url:
                    size = int(os.environ.get("DATABASE_POOL_SIZE", "10"))
                    self.pool = await asyncpg.create_pool(
                        url, min_size=0, max_size=size, server_settings={"application_name": APPLICATION_NAME}
                    )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.pool is not None:
                    await self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


app = Baseline()
