"""The database: one lazily connecting asyncpg pool, a connection per request, the readiness probe.

Handlers get connections from `Database.connection`, which turns the database's failures and
refusals into the envelope's statuses (503, 409, 400, 504); `python -m db ...` runs the migration command (migrate.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeAlias

import asyncpg
import asyncpg.transaction
import msgspec

from dsn import asyncpg_dsn
from errors import (
    DATABASE_RETRY_AFTER,
    MESSAGES,
    ConflictError,
    DatabaseConnectionError,
    MalformedRequestError,
    OperationTimeoutError,
    QueryTimeoutError,
)
from settings import Settings

# What a handler holds; generic only for the type checker (asyncpg's stubs), so written as a string.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"
# One round trip answers both questions: the server is reachable, and which migrations it has.
APPLIED_MIGRATIONS_SQL = "SELECT migration_id FROM _yoyo_migration"
# Asked only when that table "does not exist": PostgreSQL skips a search_path schema the role may
# not use without a word, so a table applied there by another role is hidden, not absent. The
# catalog is readable by every role; the path is split here (`hidden_schemas`), as no function
# returns it whole (`current_schemas` drops the very schemas in question).
HIDDEN_MIGRATIONS_SQL = """\
SELECT current_setting('search_path'), current_user, array(
    SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relname = '_yoyo_migration' AND NOT has_schema_privilege(n.oid, 'USAGE'))"""
# One item of a search_path as the server splits it (SplitIdentifierString): "quoted" ("" a quote
# in it), or bare up to a comma or its white space.
_PATH_ITEM = re.compile(r'"((?:[^"]|"")*)"|([^, \t\n\r\f]+)')
NAME_BYTES = 63  # the server cuts identifiers to NAMEDATALEN - 1 bytes
NOT_CONFIGURED = "Database is not configured (DATABASE_URL is unset)"
# Seconds to close the pool's connections gracefully before terminating them. Saying goodbye needs
# no work of the server's, so a healthy one takes milliseconds; a hung one never answers, and a
# longer wait would only hold the exit back (past `docker stop`'s 10 s with the default drain).
CLOSE_TIMEOUT = 2.0
IDLE_LIFETIME = 300.0  # seconds an idle connection is kept (asyncpg's pool default)
PREPARED_STATEMENT_LOST = (
    "Database lost a prepared statement (behind PgBouncer in transaction mode? set DATABASE_STATEMENT_CACHE_SIZE=0)"
)

logger = logging.getLogger("service.database")
# Errors that mean the connection died under us (typically: the server restarted), as
# opposed to a server that refuses or cannot be reached; a fresh connection may succeed.
# asyncpg's InternalClientError: a connection whose server already sent its last word (a
# terminated backend) is handed a query before asyncpg has noticed it closed.
_LOST_CONNECTION = (OSError, asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError, asyncpg.InternalClientError)
# Lost only if the connection is closed: else the handler's own (a file it cannot open, two
# queries at once on one connection), a 500 with its traceback rather than a retry.
_LOST_IF_CLOSED = (OSError, asyncpg.InterfaceError)
# What a row already in the table refuses: a 409, as PostgREST answers them too.
_CONFLICTS = (asyncpg.UniqueViolationError, asyncpg.ForeignKeyViolationError, asyncpg.ExclusionViolationError)
# A value its column refuses: no column can hold it (SQLSTATE class 22, or asyncpg cannot encode
# it for its parameter), or the table's own rule (a CHECK, NOT NULL): a 400, the client's value.
_REFUSED_VALUE = (asyncpg.DataError, asyncpg.CheckViolationError, asyncpg.NotNullViolationError)
# What a concurrent transaction refuses (SQLSTATE class 40: a serialization failure, a deadlock;
# 55P03: a row locked, with NOWAIT or lock_timeout): a 409 too; the same request again may pass.
_CONCURRENT = (asyncpg.TransactionRollbackError, asyncpg.LockNotAvailableError)


class _Connection(asyncpg.Connection):
    """asyncpg's connection, whose reset on release also undoes what asyncpg's leaves behind.

    asyncpg's reset rolls back and closes cursors, LISTEN, settings and advisory locks. It
    leaves the role (`SET ROLE`, `SET SESSION AUTHORIZATION`: a tenant's role for row-level
    security would carry over to the next request) and temporary tables (one request's rows
    readable by the next). Same round trip: the statements join asyncpg's in one query, with
    `CLIENT_CHECK` again after its `RESET ALL`.
    """

    _service_reset: str | None = None
    checks_client = False  # whether the server took `CLIENT_CHECK` when the connection opened

    def transaction(
        self,
        *,
        isolation: Literal["read_committed", "read_uncommitted", "serializable", "repeatable_read"] | None = None,
        readonly: bool = False,
        deferrable: bool = False,
    ) -> asyncpg.transaction.Transaction:
        return _Transaction(self, isolation, readonly, deferrable)

    def get_reset_query(self) -> str:
        if self._service_reset is None:
            reset: str = super().get_reset_query()
            if "RESET ALL" in reset:  # PostgreSQL itself (not a look-alike without these statements)
                check = f"\n{CLIENT_CHECK}" if self.checks_client else ""
                reset = f"SET SESSION AUTHORIZATION DEFAULT;\nRESET ROLE;\n{reset}\nDISCARD TEMP;{check}"
            self._service_reset = reset
        return self._service_reset


class _Transaction(asyncpg.transaction.Transaction):
    """asyncpg's transaction, except that a block ended by a query the server left unanswered
    closes the connection rather than send `ROLLBACK` on it (the server rolls back a closed
    connection's transaction itself): asyncpg's `ROLLBACK` waited `DATABASE_COMMAND_TIMEOUT` again
    on a server that stopped answering, and the request's 504 came after twice its bound. A block
    ended by another timeout or a cancellation is rolled back within `CLOSE_TIMEOUT`, else closed.
    `Database.connection` drops such a connection anyway."""

    def __init__(self, connection: _Connection, *options: Any) -> None:
        super().__init__(connection, *options)
        self.owner = connection

    async def __aexit__(self, extype: object, ex: object, tb: object) -> None:
        if isinstance(ex, BaseException) and _unanswered(ex):
            _discard(self.owner)
            return
        if not isinstance(ex, TimeoutError | asyncio.CancelledError):
            await super().__aexit__(extype, ex, tb)
            return
        # Cut short, perhaps mid-query: a timeout of the handler's own (which it may catch and go on
        # with the connection) or a cancellation. Rolled back as asyncpg does, within a bound.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await super().__aexit__(extype, ex, tb)
        except Exception:  # the rollback failed or took too long: closing the connection rolls back
            _discard(self.owner)


# A connection closed mid-query (a request cancelled or timed out: the connection is dropped at
# once) leaves its backend running the query, a write that may still commit after the client was
# told 504, and one backend more than the pool holds. Told to check every second that its client
# is still there, the server ends such a query and rolls it back (PostgreSQL 14 and later; on
# Windows the server refuses it, and the pool goes on without).
CLIENT_CHECK = "SET client_connection_check_interval = 1000;"


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


class Database:
    """The service's connections to PostgreSQL: at most `DATABASE_POOL_SIZE`, opened when first needed.

    A pool of its own rather than asyncpg's: every user of a connection, probe or handler, waits
    in one queue in arrival order (asyncpg's lets a newcomer take a connection just released
    ahead of those already waiting, which under a flood starves a few: a p99 of 64 ms against a
    median of 9 ms, measured), and giving a connection back is a list append rather than a task,
    a timer and a reset under a timeout (11 µs of CPU per checkout less, measured in
    bench/README.md). Idle connections are reused most recent first, so those a burst opened
    age out: one idle for `IDLE_LIFETIME` is closed when the next is given back.
    """

    def __init__(self, settings: Settings) -> None:
        assert settings.database_url is not None
        self.dsn, connect_timeout = asyncpg_dsn(settings.database_url)
        self.connect_options: dict[str, Any] = {
            "connection_class": _Connection,
            **({"timeout": connect_timeout} if connect_timeout is not None else {}),
            "statement_cache_size": settings.database_statement_cache_size,
            # The client's own bound on each query: a server that stopped answering (frozen, a host
            # gone without a reset) never ends one, where statement_timeout, the server's, cannot act.
            "command_timeout": settings.database_command_timeout,
            "server_settings": {"application_name": settings.app_name[:63]},
        }
        self.pool_size = settings.database_pool_size
        self.acquire_timeout = settings.database_pool_timeout
        self.command_timeout = settings.database_command_timeout
        self._queue = asyncio.Semaphore(settings.database_pool_size)  # FIFO: waiters are served in order
        self._idle: list[tuple[Connection, float]] = []  # (connection, monotonic time given back), oldest first
        self._connections: set[Connection] = set()  # every open one, idle or in use
        self._closing = False
        self._failure: str | None = None  # why the last block failed, until one goes through
        self._client_check = True  # until the server refuses `CLIENT_CHECK`

    @classmethod
    async def open(cls, settings: Settings) -> Database:
        """Nothing is connected yet: a database that is down does not stop start-up."""
        return cls(settings)

    async def close(self) -> None:
        """Close the idle connections, and each one in use when it is given back; if the idle ones do
        not close within `CLOSE_TIMEOUT` (a hung server), terminate every connection, in use or not."""
        self._closing = True  # a connection still in use is closed when it is given back
        idle, self._idle = [conn for conn, _ in self._idle], []
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.gather(*(conn.close() for conn in idle), return_exceptions=True)
        except TimeoutError:
            for conn in list(self._connections):
                _discard(conn)
        self._connections.difference_update(idle)

    def usage(self) -> PoolUsage:
        return PoolUsage(len(self._connections) - len(self._idle), self.pool_size)

    def open_connections(self) -> int:
        return len(self._connections)

    def expire_idle(self) -> None:
        """Drop every idle connection (after a server restart they are all dead); in-use ones stay."""
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._connections.discard(conn)
            _discard(conn)

    @asynccontextmanager
    async def connection(self, *, stateless: bool = False) -> AsyncIterator[Connection]:
        """A connection for a handler, waiting at most `DATABASE_POOL_TIMEOUT` (opening one included).

        Whatever the block raises, the connection goes back healthy (any open transaction rolled
        back), except where it cannot be: on cancellation or a timeout it may be mid-query, so it
        is closed. The database's own failures become the envelope's: not reachable, or the
        connection lost mid-query, `DatabaseConnectionError` (503, Retry-After); a row other rows
        refuse (a unique key taken, a foreign key or exclusion constraint), `ConflictError` (409);
        a value no column can hold (SQLSTATE class 22: a NUL in text, a number out of range, or
        an argument asyncpg cannot encode for its parameter) or the table's rule refuses (CHECK,
        NOT NULL), `MalformedRequestError` (400), except a Python value of the wrong type for its
        parameter or a division by zero, the handler's bugs (a 500); a
        concurrent transaction's refusal (class 40, 55P03), `ConflictError` saying to try again;
        a statement timeout (57014), `OperationTimeoutError` (504), and a query unanswered for
        `DATABASE_COMMAND_TIMEOUT` a `QueryTimeoutError` (504 saying so, logged once, the connection
        closed; a `TimeoutError` too, and a write it carried may be applied when the server answers
        again); a server out of
        resources (class 53) or read-only (25006: a standby), `DatabaseConnectionError`. A block
        that ends with a transaction still open is the handler's bug: rolled back, and a 500. The
        handler's own misuse of its connection (two queries at once on it) or `OSError` stays a
        500, its traceback logged, instead of passing for a lost connection.
        `stateless=True` promises that the block only reads outside any transaction, leaving
        nothing in the session (no SET, LISTEN, lock or cursor), whether it ends or raises (a 404
        is the commonest end of a lookup): giving it back then skips the reset round trip, which
        would double a lookup's cost. A transaction left open is still rolled back.
        The connection is the caller's only inside the block: afterwards another request may hold it.
        """
        connecting_since = None  # monotonic, once out of the queue
        try:
            async with asyncio.timeout(self.acquire_timeout):  # one timer for the queue and the connecting
                await self._queue.acquire()
                connecting_since = time.monotonic()
                try:
                    conn = await self._take()
                except BaseException:
                    self._queue.release()
                    raise
        except TimeoutError:
            # Every connection in use until too late to open one: one is soon free. A slot that
            # came with little of the time left proves nothing against the database either.
            if connecting_since is None or time.monotonic() - connecting_since < min(1, self.acquire_timeout / 2):
                raise DatabaseConnectionError("No database connection available", retry_after=1) from None
            # A slot was free, and the database did not let us connect in time: it is the database.
            message = f"Database did not answer within {self.acquire_timeout:g} seconds"
            unanswered = DatabaseConnectionError(message, retry_after=DATABASE_RETRY_AFTER)
            self._failing_because(unanswered)
            raise unanswered from None
        # InternalClientError: a backend terminated as it was opened, its goodbye read mid-handshake
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
            self._failing_because(exc)
            message = "Database temporarily unavailable"
            raise DatabaseConnectionError(message, retry_after=DATABASE_RETRY_AFTER) from exc
        try:
            yield conn
            # Its reset would roll back what the client is about to be told is done. (A connection the
            # block closed itself has no transaction, and asyncpg cannot say so.)
            if not conn.is_closed() and conn.is_in_transaction():
                await conn.execute("ROLLBACK")
                raise RuntimeError("The handler left a transaction open: it was rolled back (use conn.transaction())")
            if self._failure is not None:  # a block went through: say so once, after the failure's line
                logger.info("Database available again (after: %s)", self._failure)
                self._failure = None
        except (asyncio.CancelledError, TimeoutError) as exc:
            _discard(conn)  # mid-query: a clean release could wait on the server
            if isinstance(exc, QueryTimeoutError):  # an inner block's: said and logged already
                raise
            if _unanswered(exc):  # not a timeout of the handler's own
                seconds = f"{self.command_timeout:g} seconds"
                self._failing_because(QueryTimeoutError(f"Database did not answer a query within {seconds}"))
                raise QueryTimeoutError(f"{MESSAGES[504]} (database: no answer within {seconds})") from exc
            raise
        except (*_LOST_CONNECTION, asyncpg.InterfaceError) as exc:
            if isinstance(exc, _LOST_IF_CLOSED) and not conn.is_closed():
                raise  # the handler's own: a 500 with its traceback, not a retry
            _discard(conn)
            lost = DatabaseConnectionError("Database connection lost", retry_after=DATABASE_RETRY_AFTER)
            # asyncpg's InterfaceError on a closed connection names no cause: the loss is the reason
            self._failing_because(lost if isinstance(exc, asyncpg.InterfaceError) else exc)
            raise lost from exc
        except _CONFLICTS as exc:
            if _inside_the_server(exc):
                raise
            raise ConflictError(_conflict_message(exc)) from exc
        except _CONCURRENT as exc:
            raise ConflictError(f"Conflicts with a concurrent transaction ({_condition(exc)}): try again") from exc
        except asyncpg.QueryCanceledError as exc:  # 57014: statement_timeout, or cancelled by an administrator
            raise OperationTimeoutError(f"{MESSAGES[504]} (database: {_condition(exc)})") from exc
        except asyncpg.ReadOnlySQLTransactionError as exc:  # 25006: a standby, or a primary demoted by a failover
            _discard(conn)  # a new connection may reach the new primary
            self._failing_because(exc)
            raise DatabaseConnectionError(describe_failure(exc), retry_after=DATABASE_RETRY_AFTER) from exc
        except asyncpg.InsufficientResourcesError as exc:  # SQLSTATE class 53: out of memory, disk full
            self._failing_because(exc)
            message = f"Database temporarily unavailable ({_condition(exc)})"
            raise DatabaseConnectionError(message, retry_after=DATABASE_RETRY_AFTER) from exc
        except asyncpg.DivisionByZeroError:  # 22012: the handler's arithmetic, not a value to store: a 500
            raise
        except _REFUSED_VALUE as exc:  # SQLSTATE class 22, 23502, 23514: a value sent that its column refuses
            if isinstance(exc.__cause__, TypeError | AttributeError):  # the handler's bug: a 500, its value unlogged
                raise _wrong_parameter(exc) from None
            if _inside_the_server(exc):
                raise
            raise MalformedRequestError(_refused_value_message(exc)) from exc
        finally:
            try:
                await self._give_back(conn, stateless)
            finally:
                self._queue.release()

    def _failing_because(self, exc: BaseException) -> None:
        """One warning when requests start failing for a reason (the envelope says only "unavailable").

        Logged per change, not per request: an outage under load would otherwise be a line per request.
        """
        reason = describe_failure(exc)
        if reason != self._failure:
            self._failure = reason
            logger.warning("Database unavailable to requests: %s", reason)

    async def _take(self) -> Connection:
        """The most recently used idle connection still open, else a new one (the queue bounds how many)."""
        while self._idle:
            conn, _ = self._idle.pop()
            if not conn.is_closed():
                return conn
            self._connections.discard(conn)  # the server closed it while it was idle
        opened: _Connection = await asyncpg.connect(self.dsn, **self.connect_options)
        self._connections.add(opened)
        if self._client_check and opened.get_server_version().major >= 14:
            try:
                await opened.execute(CLIENT_CHECK)
                opened.checks_client = True
            except asyncpg.InvalidParameterValueError as exc:  # a platform without the check (Windows)
                self._client_check = False
                logger.warning("The database will not end queries whose request is gone: %s", _condition(exc))
            except BaseException:
                self._connections.discard(opened)
                _discard(opened)
                raise
        return opened

    async def _give_back(self, conn: Connection, stateless: bool) -> None:
        if conn.is_closed() or self._closing:
            self._connections.discard(conn)
            if not conn.is_closed():  # the pool is closing: say goodbye to the server, briefly
                try:
                    await conn.close(timeout=CLOSE_TIMEOUT)  # on cancellation asyncpg aborts it itself
                except Exception:  # dropped either way; the request's own outcome stands
                    _discard(conn)
            return
        if not stateless or conn.is_in_transaction():
            try:
                # Rolls back, then the reset query: cursors, LISTEN, settings, advisory locks, role, temp tables.
                await conn.reset(timeout=self.acquire_timeout)
            except BaseException as exc:
                self._connections.discard(conn)
                _discard(conn)  # a reset that failed or was cancelled leaves the session unknown
                if not isinstance(exc, Exception):
                    raise  # cancellation goes on; a failed reset only costs the connection
                return
        now = time.monotonic()
        self._idle.append((conn, now))
        oldest, given_back = self._idle[0]
        if now - given_back > IDLE_LIFETIME:  # one at a time, checked as connections come back
            del self._idle[0]
            self._connections.discard(oldest)
            _discard(oldest)

    async def probe(self, timeout: float) -> Probe:
        """One bounded round trip: never longer than `timeout`, whatever the server does."""
        started = time.perf_counter()
        acquiring = True
        try:
            async with asyncio.timeout(timeout):
                for attempt in (1, 2):
                    acquiring = True
                    try:
                        async with self.connection(stateless=True) as conn:
                            acquiring = False
                            try:
                                applied = await applied_migrations(conn)
                            except _LOST_CONNECTION as exc:
                                if attempt == 2 or isinstance(exc, TimeoutError):  # (an OSError too)
                                    raise
                                # Out of the block: a block that ends normally tells the pool the
                                # database is back, and it may not be.
                                raise _Retry from exc
                            usage = self.usage()  # taken while ours is checked out: it counts itself
                            break
                    except _Retry:
                        # A restart left the pool's idle connections dead: drop them all, try once more.
                        self.expire_idle()
        except QueryTimeoutError:  # the command timeout, shorter than the probe's
            return self._failed(f"Database did not answer a query within {self.command_timeout:g} seconds")
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


class _Retry(Exception):
    """A probe's first attempt lost its connection: the probe tries once more on a new one."""


def _unanswered(exc: BaseException) -> bool:
    """Whether `exc` says the server left a query unanswered for the command timeout: asyncpg's
    `TimeoutError` for a call without a `timeout=` of its own, or the `QueryTimeoutError` an inner
    block made of one. A timeout of the handler's own (`asyncio.timeout` around a query) is raised
    outside asyncpg. The call's own `timeout=` is read from the first asyncpg frame that has one:
    the method the handler called (`fetchrow(..., timeout=None)`); asyncpg puts the command
    timeout in the `timeout` of the frames below it.
    """
    if isinstance(exc, QueryTimeoutError):
        return True
    if not isinstance(exc, TimeoutError):
        return False
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_globals.get("__name__", "").startswith("asyncpg.") and "timeout" in frame.tb_frame.f_locals:
            return frame.tb_frame.f_locals["timeout"] is None
        frame = frame.tb_next
    return False


def _discard(conn: Connection) -> None:
    """Close the connection now; one the server already closed has left the pool by itself."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


def _conflict_message(exc: asyncpg.IntegrityConstraintViolationError) -> str:
    """Which constraint refused the row, by name only: the server's detail would echo the values."""
    constraint = getattr(exc, "constraint_name", None)
    if isinstance(exc, asyncpg.UniqueViolationError):
        return f"Already exists (unique constraint {constraint})" if constraint else "Already exists"
    kind = "foreign key" if isinstance(exc, asyncpg.ForeignKeyViolationError) else "exclusion"
    return f"Conflicts with other rows ({kind} constraint {constraint})" if constraint else "Conflicts with other rows"


def _inside_the_server(exc: asyncpg.PostgresError) -> bool:
    """Raised inside a trigger or function (PostgreSQL says where): the server side's own fault, a 500,
    not the client's row or value, which the statement itself would have been refused for."""
    context = getattr(exc, "context", None) or ""  # also names a bad parameter ("portal parameter $2"): not that
    return "function " in context


def _wrong_parameter(exc: asyncpg.PostgresError) -> TypeError:
    """A Python value of the wrong type for a query parameter (an Enum, not its value; a str for a date),
    named by its parameter and the types: asyncpg's message would put the value itself in the log."""
    parameter = re.search(r"query argument (\$\d+)", str(exc))
    where = f"query argument {parameter[1]}" if parameter else "a query argument"
    return TypeError(f"{where}: {exc.__cause__}").with_traceback(exc.__traceback__)


def _refused_value_message(exc: asyncpg.PostgresError) -> str:
    """The kind of value the database refused (its condition's name, the constraint or column), never the value."""
    if isinstance(exc, asyncpg.CheckViolationError):
        constraint = getattr(exc, "constraint_name", None)
        return (
            f"A value the table refuses (check constraint {constraint})" if constraint else "A value the table refuses"
        )
    if isinstance(exc, asyncpg.NotNullViolationError):
        column = getattr(exc, "column_name", None)
        return f"A value the table refuses ({column} may not be null)" if column else "A value the table refuses"
    kind = _condition(exc)
    return f"A value the database cannot store ({kind})" if kind != "data" else "A value the database cannot store"


def _condition(exc: asyncpg.PostgresError) -> str:
    """The server's condition by its name (`deadlock detected`), never its message, which may echo values."""
    return " ".join(re.findall(r"[A-Z][a-z0-9]*", type(exc).__name__.removesuffix("Error"))).lower()


async def applied_migrations(conn: Connection) -> frozenset[str] | None:
    """Ids of applied migrations; empty when none ever were, None when we may not look.

    One query when the table is there. When it is not, a second asks the catalog whether it is in
    a schema of our search_path that we may not use: then we cannot tell (None), not "none applied".
    Both only read, outside a transaction, so the probe's `stateless` connection stays clean.
    """
    try:
        rows = await conn.fetch(APPLIED_MIGRATIONS_SQL)
    except asyncpg.UndefinedTableError:
        [(search_path, user, unusable)] = await conn.fetch(HIDDEN_MIGRATIONS_SQL)  # always one row
        return None if hidden_schemas(search_path, user, unusable) else frozenset()
    except asyncpg.InsufficientPrivilegeError:
        return None
    return frozenset(row[0] for row in rows)


def hidden_schemas(search_path: str, user: str, unusable: list[str]) -> list[str]:
    """Those of `unusable` that `search_path` names, in its order, read as the server reads it: a
    bare name in ASCII lower case, a quoted one as written, both cut to 63 bytes; `$user` the role."""
    named = []
    for quoted, bare in _PATH_ITEM.findall(search_path):
        name = quoted.replace('""', '"').encode() if quoted else bare.encode().lower()  # bytes: ASCII only
        schema = name[:NAME_BYTES].decode(errors="ignore")  # a character cut in two is dropped, as the server does
        named.append(user if schema == "$user" else schema)
    return [schema for schema in dict.fromkeys(named) if schema in unusable]


def describe_failure(exc: BaseException) -> str:
    """A short, safe reason: never the server's full message, which may name users or hosts."""
    match exc:
        case DatabaseConnectionError():
            return describe_failure(exc.__cause__) if exc.__cause__ else exc.message
        case OperationTimeoutError():  # written by `connection` itself: no secret in it
            return exc.message
        case asyncpg.InvalidAuthorizationSpecificationError():
            return "Database refused the credentials"
        case asyncpg.InvalidCatalogNameError():
            return "Database does not exist"
        case asyncpg.ReadOnlySQLTransactionError():
            return "Database is read-only (a standby, or a failover under way)"
        case asyncpg.CannotConnectNowError():
            return "Database is starting up or shutting down"
        case asyncpg.TooManyConnectionsError():
            return "Database has too many connections"
        case asyncpg.InvalidSQLStatementNameError() | asyncpg.DuplicatePreparedStatementError():
            # The classic sign of a transaction-pooling PgBouncer in front of a statement cache.
            return PREPARED_STATEMENT_LOST
        case (
            asyncpg.ConnectionDoesNotExistError()
            | asyncpg.ConnectionFailureError()
            | asyncpg.AdminShutdownError()
            | asyncpg.InternalClientError()  # a terminated backend's goodbye, read before asyncpg noticed
        ):
            return "Database connection lost"
        case ConnectionError() if "rejected SSL upgrade" in str(exc):  # asyncpg's words for it
            return "Database refused SSL, which the URL's sslmode requires"
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
