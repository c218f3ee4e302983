"""The database: one lazily connecting asyncpg pool, a connection per request, the readiness probe.

Handlers get connections from `Database.connection`, which turns the failures of the database
itself into the envelope's 503 and 409; `python -m db ...` runs the migration command (migrate.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TypeAlias

import asyncpg
import msgspec

from errors import DATABASE_RETRY_AFTER, ConflictError, DatabaseConnectionError
from settings import Settings

# What a handler holds; generic only for the type checker (asyncpg's stubs), so written as a string.
Connection: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
# One round trip answers both questions: the server is reachable, and which migrations it has.
APPLIED_MIGRATIONS_SQL = "SELECT migration_id FROM _yoyo_migration"
NOT_CONFIGURED = "Database is not configured (DATABASE_URL is unset)"
CLOSE_TIMEOUT = 10.0  # seconds to close the pool gracefully before terminating connections
PREPARED_STATEMENT_LOST = (
    "Database lost a prepared statement (behind PgBouncer in transaction mode? set DATABASE_STATEMENT_CACHE_SIZE=0)"
)

# Errors that mean the connection died under us (typically: the server restarted), as
# opposed to a server that refuses or cannot be reached; a fresh connection may succeed.
_LOST_CONNECTION = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError)
# True while a connection that was used statelessly goes back to the pool (see `connection`).
_RELEASING_STATELESS: ContextVar[bool] = ContextVar("releasing_stateless", default=False)


class PoolUsage(msgspec.Struct):
    active_connections: int
    pool_size: int


class Probe(msgspec.Struct):
    """What one readiness probe found. `applied_migrations` is None when it cannot tell."""

    connected: bool
    response_time_ms: int | None
    pool: PoolUsage
    applied_migrations: frozenset[str] | None = None
    error: str | None = None


def asyncpg_dsn(url: str) -> str:
    """The app accepts `postgresql+asyncpg://` (SQLAlchemy style); asyncpg itself does not."""
    scheme, _, rest = url.partition("://")
    return f"postgresql://{rest}" if scheme.lower() == "postgresql+asyncpg" else url


class Database:
    """The pool and the settings that bound its use."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.pool_size = settings.database_pool_size
        self.acquire_timeout = settings.database_pool_timeout
        # Every user of a connection, probe or handler, queues here in arrival order: asyncpg's
        # pool lets a newcomer take a connection just released ahead of those already waiting,
        # which under a flood starves a few (a p99 of 64 ms against a median of 9 ms, measured).
        self._queue = asyncio.Semaphore(settings.database_pool_size)

    @classmethod
    async def open(cls, settings: Settings) -> Database:
        """Create the pool without connecting: a database that is down does not stop start-up."""
        assert settings.database_url is not None
        pool = await asyncpg.create_pool(
            asyncpg_dsn(settings.database_url),
            min_size=0,
            max_size=settings.database_pool_size,
            statement_cache_size=settings.database_statement_cache_size,
            server_settings={"application_name": settings.app_name[:63]},
            reset=_reset_session,
        )
        return cls(pool, settings)

    async def close(self) -> None:
        """Close every connection; terminate those that do not close in time (a hung server)."""
        try:
            await asyncio.wait_for(self.pool.close(), CLOSE_TIMEOUT)
        except TimeoutError:
            self.pool.terminate()

    def usage(self) -> PoolUsage:
        return PoolUsage(self.pool.get_size() - self.pool.get_idle_size(), self.pool_size)

    def open_connections(self) -> int:
        return self.pool.get_size()

    @asynccontextmanager
    async def connection(self, *, stateless: bool = False) -> AsyncIterator[Connection]:
        """A pooled connection for a handler, waiting at most `DATABASE_POOL_TIMEOUT`.

        Whatever the block raises, the connection goes back to the pool healthy (any open
        transaction rolled back), except where it cannot be: on cancellation or a timeout it may
        be mid-query, so it is closed. The database's own failures become the envelope's: not
        reachable, or the connection lost mid-query, `DatabaseConnectionError` (503, Retry-After);
        a unique key already taken, `ConflictError` (409).
        `stateless=True` promises that the block only reads outside any transaction, leaving
        nothing in the session (no SET, LISTEN, lock or cursor): release then skips the
        reset round trip.
        """
        try:
            # One timer for the whole wait, the queue and the pool's connecting alike (asyncpg's own
            # acquire timeout would start a task per call).
            async with asyncio.timeout(self.acquire_timeout):
                await self._queue.acquire()
                try:
                    conn = await self.pool.acquire()
                except BaseException:
                    self._queue.release()
                    raise
        except TimeoutError:
            raise DatabaseConnectionError("No database connection available", retry_after=1) from None
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            message = "Database temporarily unavailable"
            raise DatabaseConnectionError(message, retry_after=DATABASE_RETRY_AFTER) from exc
        try:
            yield conn
        except (asyncio.CancelledError, TimeoutError):
            _discard(conn)  # mid-query: a clean release could wait on the server
            raise
        except _LOST_CONNECTION as exc:
            _discard(conn)
            message = "Database connection lost"
            raise DatabaseConnectionError(message, retry_after=DATABASE_RETRY_AFTER) from exc
        except asyncpg.UniqueViolationError as exc:
            raise ConflictError(_conflict_message(exc)) from exc
        finally:
            token = _RELEASING_STATELESS.set(stateless)
            try:
                # A terminated connection only frees its place; the reset is bounded like the wait.
                await self.pool.release(conn, timeout=self.acquire_timeout)
            finally:
                _RELEASING_STATELESS.reset(token)
                self._queue.release()

    async def probe(self, timeout: float) -> Probe:
        """One bounded round trip: never longer than `timeout`, whatever the server does."""
        started = time.perf_counter()
        acquiring = True
        try:
            async with asyncio.timeout(timeout):
                for attempt in (1, 2):
                    acquiring = True
                    async with self.connection(stateless=True) as conn:
                        acquiring = False
                        try:
                            applied = await applied_migrations(conn)
                            usage = self.usage()  # taken while ours is checked out: it counts itself
                            break
                        except _LOST_CONNECTION:
                            if attempt == 2:
                                raise
                    # A restart left the pool's idle connections dead: drop them all, try once more.
                    await self.pool.expire_connections()
        except TimeoutError:
            waited = " waiting for a pooled connection" if acquiring and self._exhausted() else ""
            return self._failed(f"Database health check timed out after {timeout:g} seconds{waited}")
        except Exception as exc:  # the probe's boundary: every failure is an answer, not a 500
            return self._failed(describe_failure(exc))
        elapsed_ms = round((time.perf_counter() - started) * 1000)
        return Probe(True, elapsed_ms, usage, applied)

    def _exhausted(self) -> bool:
        return self.usage().active_connections >= self.pool_size

    def _failed(self, error: str) -> Probe:
        return Probe(False, None, self.usage(), None, error)


async def _reset_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release, after asyncpg has rolled back any open transaction.

    The default reset query (close cursors, unlisten, reset settings, release advisory
    locks) costs a round trip; a connection released statelessly has none of those to undo.
    """
    if not _RELEASING_STATELESS.get():
        await conn.execute(conn.get_reset_query())


def _discard(conn: Connection) -> None:
    """Close the connection now; one the server already closed has left the pool by itself."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


def _conflict_message(exc: asyncpg.UniqueViolationError) -> str:
    """Which key is taken, by constraint name only: the server's detail would echo the value."""
    constraint = getattr(exc, "constraint_name", None)
    return f"Already exists (unique constraint {constraint})" if constraint else "Already exists"


async def applied_migrations(conn: Connection) -> frozenset[str] | None:
    """Ids of applied migrations; empty when none ever were, None when we may not look."""
    try:
        rows = await conn.fetch(APPLIED_MIGRATIONS_SQL)
    except asyncpg.UndefinedTableError:
        return frozenset()
    except asyncpg.InsufficientPrivilegeError:
        return None
    return frozenset(row[0] for row in rows)


def describe_failure(exc: BaseException) -> str:
    """A short, safe reason: never the server's full message, which may name users or hosts."""
    match exc:
        case DatabaseConnectionError():
            return describe_failure(exc.__cause__) if exc.__cause__ else exc.message
        case asyncpg.InvalidAuthorizationSpecificationError():
            return "Database refused the credentials"
        case asyncpg.InvalidCatalogNameError():
            return "Database does not exist"
        case asyncpg.CannotConnectNowError():
            return "Database is starting up or shutting down"
        case asyncpg.TooManyConnectionsError():
            return "Database has too many connections"
        case asyncpg.InvalidSQLStatementNameError() | asyncpg.DuplicatePreparedStatementError():
            # The classic sign of a transaction-pooling PgBouncer in front of a statement cache.
            return PREPARED_STATEMENT_LOST
        case ConnectionRefusedError():
            return "Database is unreachable: connection refused"
        case OSError():
            return f"Database is unreachable: {exc.strerror or type(exc).__name__}"
        case asyncpg.PostgresError():
            return f"Database error (SQLSTATE {exc.sqlstate})"
        case _:
            return f"Database check failed ({type(exc).__name__})"


if __name__ == "__main__":
    import sys

    from migrate import main

    raise SystemExit(main(sys.argv[1:]))
