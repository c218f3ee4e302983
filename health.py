"""Liveness and readiness: pure ASGI endpoints, because probes call them more than anything else.

Their headers are built once and their bodies encoded straight from Structs, so a probe costs
little more than the server's own work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Literal

import msgspec
from starlette.types import Receive, Scope, Send

from db import NOT_CONFIGURED, Database, PoolUsage
from errors import SHUTTING_DOWN
from responses import ENCODER, JSON_HEADERS, Timestamp, send_bytes, utc_timestamp
from settings import Settings

HealthStatus = Literal["healthy", "degraded", "unhealthy"]
MigrationStatus = Literal["up_to_date", "pending", "unknown"]
_HEADERS = (*JSON_HEADERS, (b"cache-control", b"no-store"))
logger = logging.getLogger("service.health")


class Liveness(msgspec.Struct, omit_defaults=True):
    status: HealthStatus
    timestamp: Timestamp
    version: str
    uptime_seconds: int
    errors: list[str] | None = None


class Readiness(msgspec.Struct, omit_defaults=True):
    status: HealthStatus
    timestamp: Timestamp
    database_connected: bool
    response_time_ms: int | None
    connection_pool: PoolUsage
    migration_status: MigrationStatus
    errors: list[str] | None = None


class LivenessEndpoint:
    """`/health`: is this process able to serve? No I/O, so it cannot hang."""

    def __init__(self, settings: Settings) -> None:
        self.version = settings.app_version

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function handing on the response's awaitable: no coroutine of its own.
        started_at: float | None = scope.get("state", {}).get("started_at")
        if started_at is None:
            # The lifespan has not run: the pool and the rest of start-up are missing.
            body = Liveness("unhealthy", utc_timestamp(), self.version, 0, ["Application start-up has not completed"])
        else:
            body = Liveness("healthy", utc_timestamp(), self.version, int(time.monotonic() - started_at))
        return send_bytes(scope, send, 200 if body.status == "healthy" else 503, ENCODER.encode(body), _HEADERS)


class ReadinessEndpoint:
    """`/health/db`: one bounded probe through the pool, and the migration status it implies.

    While the production server drains (`state["shutting_down"]`, set on SIGTERM) it answers 503
    without probing, so balancers take the instance out before it stops listening. Each change
    of status is logged once, with its reason; the probes in between are not.
    """

    def __init__(self, settings: Settings, migrations: tuple[str, ...]) -> None:
        self.timeout = settings.database_health_check_timeout
        self.pool_size = settings.database_pool_size
        self.migrations = migrations
        self.last_status: HealthStatus | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state", {})
        database: Database | None = state.get("database")
        if state.get("shutting_down"):
            usage = database.usage() if database is not None else PoolUsage(0, self.pool_size)
            body = self._unhealthy(usage, SHUTTING_DOWN)
        elif database is None:
            body = self._unhealthy(PoolUsage(0, self.pool_size), NOT_CONFIGURED)
        else:
            probe = await database.probe(self.timeout)
            if not probe.connected:
                body = self._unhealthy(probe.pool, probe.error or "Database unavailable")
            else:
                body = self._reachable(probe.response_time_ms, probe.pool, probe.applied_migrations)
        if body.status != self.last_status:
            self._log_change(body)
        await send_bytes(scope, send, 503 if body.status == "unhealthy" else 200, ENCODER.encode(body), _HEADERS)

    def _log_change(self, body: Readiness) -> None:
        before, self.last_status = self.last_status, body.status
        reason = f": {'; '.join(body.errors)}" if body.errors else ""
        level = logging.INFO if body.status == "healthy" else logging.WARNING
        logger.log(level, "Readiness %s -> %s%s", before or "unknown", body.status, reason)

    def _unhealthy(self, pool: PoolUsage, error: str) -> Readiness:
        return Readiness("unhealthy", utc_timestamp(), False, None, pool, "unknown", [error])

    def _reachable(self, elapsed_ms: int | None, pool: PoolUsage, applied: frozenset[str] | None) -> Readiness:
        if applied is None:
            errors = ["Migration status unknown: the migration table cannot be read"]
            return Readiness("healthy", utc_timestamp(), True, elapsed_ms, pool, "unknown", errors)
        pending = [m for m in self.migrations if m not in applied]
        if pending:
            errors = [f"{len(pending)} pending migration(s): {', '.join(pending)}"]
            return Readiness("degraded", utc_timestamp(), True, elapsed_ms, pool, "pending", errors)
        return Readiness("healthy", utc_timestamp(), True, elapsed_ms, pool, "up_to_date")
