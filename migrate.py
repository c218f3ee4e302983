"""`python -m db new | migrate | rollback | status | unlock`: yoyo migrations with the app's DATABASE_URL.

The migrations are the `.sql` files of `migrations/` plus those of each `--source DIR` (an
application's own folder, e.g. `examples/migrations`), read together so that one may depend on
another. Only the commands import yoyo and its synchronous driver (psycopg 3), when they run: the
app imports this module for `migrations_on_disk` alone and learns which migrations are applied
through asyncpg (`db.applied_migrations`). Every failure is one line on stderr and a non-zero
exit: 1 when the operation failed, 2 for a usage or configuration mistake.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import glob
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from dsn import mask_url, yoyo_url
from envfile import read_environment
from settings import Redactor, Settings, SettingsError, load_settings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_NAME = re.compile(r"[a-z0-9_]{1,60}")
_NUMBERED = re.compile(r"(\d{4})\.[^.]+\.sql")
# Seconds a replica waits for another one's migrations before giving up: long enough for any
# migration fit for a rolling deploy; a lock left by a killed process needs `unlock`.
LOCK_TIMEOUT = 60.0
# Seconds a database that stopped answering gets, beyond the lock's own timeout or after SIGTERM,
# before the command gives up on it and exits: its clean-up would otherwise wait forever.
UNANSWERED_GRACE = 10.0
APPLIED_SQL = "SELECT migration_id, applied_at_utc FROM _yoyo_migration ORDER BY applied_at_utc, migration_id"
LOCK_HOLDER_SQL = "SELECT pid, ctime FROM yoyo_lock"
RELEASE_SQL = "DELETE FROM yoyo_lock WHERE pid = :pid"

Backend = Any  # yoyo is untyped: a yoyo.backends.DatabaseBackend


class Terminated(BaseException):
    """SIGTERM (a pod being deleted) as an exception, so the lock is released on the way out."""


class CommandError(Exception):
    """A failure the command reports as one line, exiting with `status`."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def migrations_on_disk(*sources: Path) -> tuple[str, ...]:
    """Migration ids as yoyo records them (file names without `.sql`, rollbacks excluded), sorted.

    A folder that does not exist raises `FileNotFoundError`: a folder left out of an image would
    otherwise make `/health/db` report `up_to_date` for tables that were never created.
    """
    directories = sources or (MIGRATIONS_DIR,)
    if missing := [str(d) for d in directories if not d.is_dir()]:
        raise FileNotFoundError(f"no migrations directory at {', '.join(missing)}")
    names = (p.name for d in directories for p in d.glob("*.sql") if not p.name.endswith(".rollback.sql"))
    return tuple(sorted({name.removesuffix(".sql") for name in names}))


def next_id(directory: Path, name: str) -> str:
    """The id `new` gives migration `name` in `directory`: numbered after the folder's highest."""
    numbers = [int(m.group(1)) for p in directory.glob("*.sql") if (m := _NUMBERED.fullmatch(p.name))]
    return f"{max(numbers, default=0) + 1:04d}.{name}"


def new(directory: Path, stem: str, latest: str | None) -> tuple[Path, Path]:
    """Write migration `stem` (`next_id`'s) and its rollback into `directory`, ready to edit."""
    name = stem.partition(".")[2]
    forward, backward = directory / f"{stem}.sql", directory / f"{stem}.rollback.sql"
    depends = f"-- depends: {latest}\n" if latest else ""
    forward.write_text(f"-- {name}\n{depends}\n-- Write the change here, e.g. CREATE TABLE ...;\n")
    backward.write_text(f"-- Undo {stem}: the exact reverse of {forward.name}, e.g. DROP TABLE ...;\n")
    return forward, backward


def migrate(backend: Backend, migrations: Any, args: argparse.Namespace) -> int:
    """Apply every pending migration in order; the first failure stops the run."""
    with _locked(backend, args):
        pending = backend.to_apply(migrations)
        for migration in pending:  # before applying any: an unwritten one would be recorded as applied
            if _only_comments(Path(migration.path)):
                raise CommandError(f"{migration.id} has no SQL yet, only comments: write the change first", status=2)
            _check_undo(migration)
        for migration in pending:
            print(f"applying {migration.id}", flush=True)
            # apply_one, not apply_migrations: that one silently skips a migration it cannot load.
            _run_step(backend.apply_one, migration)
    print(f"applied {len(pending)} migration(s); the database is up to date")
    return 0


def rollback(backend: Backend, migrations: Any, args: argparse.Namespace) -> int:
    """Roll back the most recently applied migration, and only that one."""
    with _locked(backend, args):
        applied = _applied(backend)
        if not applied:
            print("nothing to roll back: no migration is applied")
            return 0
        last = applied[-1][0]
        found = [m for m in migrations if m.id == last]
        if not found:
            where = _names(args.sources)
            raise CommandError(
                f"the last applied migration {last} is not in {where}: roll back with the code that has it"
            )
        _check_undo(found[0])  # without one, yoyo would report the rollback done, and undo nothing
        print(f"rolling back {last}", flush=True)
        _run_step(backend.rollback_one, found[0])
    print(f"rolled back {last}")
    return 0


def status(backend: Backend, migrations: Any, args: argparse.Namespace) -> int:
    """One line per migration, applied or pending; exit 0 unless `--check` finds some pending."""
    applied = dict(_applied(backend))
    pending = [m.id for m in migrations if m.id not in applied]
    for migration in migrations:
        when = applied.get(migration.id)
        print(f"applied  {migration.id}  ({when:%Y-%m-%d %H:%M:%S} UTC)" if when else f"pending  {migration.id}")
    on_disk = {m.id for m in migrations}
    for unknown, when in applied.items():
        if unknown not in on_disk:
            print(f"applied  {unknown}  ({when:%Y-%m-%d %H:%M:%S} UTC, not in {_names(args.sources)})")
    print(f"{len(migrations) - len(pending)} applied, {len(pending)} pending")
    return 1 if args.check and pending else 0


def unlock(backend: Backend, migrations: Any, args: argparse.Namespace) -> int:
    """Remove the lock row a killed `migrate` left behind. It cannot tell a live holder from a dead
    one: run it only when no `migrate` is running."""
    holders = backend.execute(LOCK_HOLDER_SQL).fetchall()
    backend.break_lock()
    for pid, since in holders:
        print(f"removed the migration lock held by process {pid} since {since:%Y-%m-%d %H:%M:%S} UTC")
    if not holders:
        print("the migration lock was not held")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.sources = list(dict.fromkeys([MIGRATIONS_DIR, *args.source]))  # the foundation's first, each once
    if args.name == "new":
        return _new(args)
    # Imported here, not at the top: the app imports this module and must not load either.
    import psycopg
    from yoyo.exceptions import BadMigration, LockTimeout, MigrationConflict

    _name_the_user()
    # Our own lines say what happened; yoyo's logging would add tracebacks for a bad migration.
    logging.getLogger("yoyo").propagate = False
    logging.getLogger("yoyo").addHandler(logging.NullHandler())
    command: Callable[[Backend, Any, argparse.Namespace], int] = args.command
    signal.signal(signal.SIGTERM, functools.partial(_terminate, args.name))
    secrets: tuple[str, ...] = ()
    try:
        settings = _settings()
        url, secrets = settings.database_url, settings.secrets
        assert url is not None
        migrations = _read(args.sources) if command is not unlock else None  # unlocking needs no files
        args.url = url
        backend = _connect(url)
        with backend:
            return command(backend, migrations, args)
    except CommandError as exc:
        _fail(args.name, str(exc), secrets)
        return exc.status
    except LockTimeout:
        message = (f"gave up after {args.lock_timeout:g} s waiting for the migration lock; if no migrate "
                   "is running, a killed one left it: remove it with `python -m db unlock`")  # fmt: skip
        _fail(args.name, message, secrets)
        return 1
    except BadMigration as exc:
        _fail(args.name, f"bad migration: {' '.join(map(str, exc.args))}", secrets)
        return 1
    except MigrationConflict as exc:  # `_read` refuses an id in two folders; yoyo may find others
        _fail(args.name, f"bad migration: {exc.args[0]} is defined twice", secrets)
        return 2
    except psycopg.Error as exc:
        _fail(args.name, f"database error: {_one_line(exc)}", secrets)
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        signal.setitimer(signal.ITIMER_REAL, 0)  # the clean-up is done: its deadline is not needed
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        _fail(args.name, f"stopped by {signum.name}; a migration in progress was not recorded as applied", secrets)
        return 128 + signum


def _name_the_user() -> None:
    """yoyo records who applied each migration (`getpass.getuser()`), which fails for a user the
    system does not list: a container run with an arbitrary UID, as OpenShift runs them. Such a
    user is recorded by its UID (`uid 1000680000`), rather than the migration failing."""
    try:
        getpass.getuser()
    except (KeyError, OSError):  # KeyError up to Python 3.12, OSError from 3.13
        os.environ["LOGNAME"] = f"uid {os.getuid()}"


def _new(args: argparse.Namespace) -> int:
    """`new NAME`: into the last `--source` (default `migrations/`), depending on the latest migration."""
    directory: Path = args.sources[-1]
    if not _NAME.fullmatch(args.migration_name):
        _fail("new", f"{args.migration_name!r}: a name is 1 to 60 of a-z, 0-9 and _ (e.g. add_orders)", ())
        return 2
    if directory.exists() and not directory.is_dir():
        _fail("new", f"{directory} is not a directory", ())
        return 2
    stem = next_id(directory, args.migration_name)
    # Folders are numbered on their own; the same id in two of them is one id yoyo refuses to apply.
    if taken := [d for d in args.sources if d != directory and (d / f"{stem}.sql").exists()]:
        _fail("new", f"{stem} is already a migration in {taken[0]}: give this one another name", ())
        return 2
    if not directory.exists():  # an application's first migration starts its folder
        directory.mkdir(parents=True)
        print(f"created {directory}/", file=sys.stderr)
    # The latest of the target folder, else of the folders before it (the foundation's, whose
    # uuid_generate_v7 a new table's key uses).
    latest = next((ids[-1] for d in reversed(args.sources) if (ids := migrations_on_disk(d))), None)
    for path in new(directory, stem, latest):
        print(path)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m db", description="Database migrations (yoyo), using DATABASE_URL.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    source = f"also the migrations in DIR, besides {MIGRATIONS_DIR.name}/ (repeatable)"
    new_help = "write the next numbered migration and its rollback, ready to edit"
    for name, function in (("new", None), ("migrate", migrate), ("rollback", rollback), ("status", status),
                           ("unlock", unlock)):  # fmt: skip
        summary = new_help if function is None else (function.__doc__ or "").splitlines()[0]
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.set_defaults(command=function, name=name)
        sub.add_argument("--source", type=Path, action="append", default=[], metavar="DIR", help=source)
        if name == "new":
            sub.add_argument("migration_name", metavar="NAME", help="what it does, e.g. add_orders")
        if name in ("migrate", "rollback"):
            wait = "wait this long for another process's migrations; 0 waits forever (default: %(default)g)"
            sub.add_argument("--lock-timeout", type=float, default=LOCK_TIMEOUT, metavar="SECONDS", help=wait)
        if name == "status":
            sub.add_argument("--check", action="store_true", help="exit 1 when a migration is pending")
    return parser


def _settings() -> Settings:
    """DATABASE_URL as the app reads it (environment over `.env`), checked by the same rule.

    Only DATABASE_URL: a migration job needs no SECRET_KEY or CORS settings to be valid.
    """
    environ, problems = read_environment()
    if problems:  # a `.env` that cannot be read: its DATABASE_URL may be the one meant
        raise CommandError("; ".join(problems), status=2)
    raw = environ.get("DATABASE_URL")
    if not raw:
        raise CommandError("DATABASE_URL is not set: it names the database to migrate", status=2)
    try:
        return load_settings({"DATABASE_URL": raw})
    except SettingsError as exc:
        raise CommandError(exc.problems[0], status=2) from None


def _read(directories: list[Path]) -> Any:
    """The migrations of `directories`, read together; CommandError (status 2) for a folder or file
    yoyo would misread: missing, holding Python, not UTF-8, an id in two folders, a dependency loop.
    yoyo's BadMigration (a dependency on no migration) is raised for every command, not only migrate."""
    from yoyo import read_migrations
    from yoyo.migrations import topological_sort
    from yoyo.topologicalsort import CycleError

    where: dict[str, Path] = {}
    for directory in directories:
        if not directory.is_dir():
            raise CommandError(f"no migrations directory at {directory}", status=2)
        if any(directory.glob("*.py")):  # yoyo would import and record them as migrations
            raise CommandError(f"{directory} holds Python files: a migrations folder holds only .sql files", status=2)
        for path in sorted(directory.glob("*.sql")):
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise CommandError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})", status=2) from None
            forward = not path.name.endswith(".rollback.sql")
            if forward and (other := where.setdefault(path.stem, directory)) != directory:
                raise CommandError(f"{path.stem} is in both {other} and {directory}: rename one", status=2)
    # A folder's name is a glob pattern to yoyo: `app[v2]` would match nothing, and be skipped.
    migrations = read_migrations(*(glob.escape(str(d)) for d in directories))
    try:
        list(topological_sort(migrations))  # lazy; status and rollback would not sort them, and never notice
    except CycleError as exc:  # yoyo turns most into BadMigration, but not every one
        looped = ", ".join(m.id for m in exc.args[1])
        raise CommandError(f"the migrations' dependencies form a loop among {looped}", status=2) from None
    return migrations


def _connect(url: str) -> Backend:
    """yoyo's backend on `url`, its connection made fit for PgBouncer in transaction mode.

    psycopg prepares a statement on the server once it has run five times; through PgBouncer,
    the next transaction may land on a server connection that has it already ("prepared
    statement _pg3_0 already exists") or lacks it. A migration job reads `DATABASE_URL` as the
    app does, which may name PgBouncer: so nothing is prepared (`prepare_threshold = None`).
    """
    import psycopg
    from yoyo import get_backend

    try:
        backend = get_backend(yoyo_url(url))
    except psycopg.Error as exc:
        raise CommandError(f"cannot connect to {mask_url(url)}: {_one_line(exc)}") from exc
    backend.connection.prepare_threshold = None
    return backend


@contextmanager
def _locked(backend: Backend, args: argparse.Namespace) -> Iterator[None]:
    """yoyo's migration lock (one run at a time across replicas), kept to its promises:

    - taking it never waits past `--lock-timeout` (and `UNANSWERED_GRACE`), even on a database
      that stopped answering, where yoyo's own wait would block in a query;
    - a database that refuses yoyo its lock table (no CREATE on the schema) is said so at once,
      not after the timeout as "relation yoyo_lock does not exist";
    - a tracking table out of this role's sight (`_refuse_hidden`) is refused, not started again
      beside it with every migration applied a second time;
    - it is released even when the connection that took it died (the database restarted under
      the run): on a new connection; the run's own failure is what is reported.
    """
    import psycopg

    timeout = args.lock_timeout
    waiting = f"{args.name}: gave up after {timeout:g} s waiting for the migration lock: the database stopped answering"
    with _deadline(timeout + UNANSWERED_GRACE if timeout else 0, waiting):
        if backend.execute("SELECT to_regclass('_yoyo_migration')").fetchone()[0] is None:
            _refuse_hidden(backend)
        _ensure_lock_table(backend)
        lock = backend.lock(timeout)
        lock.__enter__()
    failure: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        failure = exc
        raise
    finally:
        try:
            lock.__exit__(None, None, None)
        except psycopg.Error as exc:
            _release(args, exc, failure)


def _release(args: argparse.Namespace, error: Exception, failure: BaseException | None) -> None:
    """Delete this process's lock row on a new connection, the one that took it having failed with
    `error`; `failure` is the run's own error, if it had one, which the caller reports."""
    import psycopg

    deadline = time.monotonic() + UNANSWERED_GRACE  # a restarting database takes a moment to come back
    while True:
        try:
            fresh = _connect(args.url)
            with fresh, fresh.transaction():
                fresh.execute(RELEASE_SQL, {"pid": os.getpid()})
            return
        except (psycopg.Error, CommandError) as exc:
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            stuck = (f"the migration lock could not be released ({_one_line(error)}; then {exc}): once the "
                     "database answers, run `python -m db unlock`")  # fmt: skip
            if failure is None:
                raise CommandError(stuck) from None
            print(f"{args.name}: {stuck}", file=sys.stderr, flush=True)  # and the caller reports `failure`
            return


def _ensure_lock_table(backend: Backend) -> None:
    """yoyo creates its lock table and swallows any error doing so; then its lock waits for a row
    in a table that is not there. Create it here when missing, so a refusal is said at once."""
    import psycopg

    if backend.execute("SELECT to_regclass('yoyo_lock')").fetchone()[0] is not None:
        return
    try:
        with backend.transaction():
            backend.execute(backend.format_sql(backend.create_lock_table_sql))
    except psycopg.errors.InsufficientPrivilege as exc:
        raise CommandError(
            f"cannot create yoyo's tables ({exc.diag.message_primary}): the role needs CREATE on the schema "
            "(PostgreSQL 15 gives it only to the database's owner), or run migrations as the owner"
        ) from None
    except psycopg.errors.DuplicateTable:  # another replica made it meanwhile
        pass


@contextmanager
def _deadline(seconds: float, line: str) -> Iterator[None]:
    """Exit 1 with `line` on stderr if the block takes longer than `seconds` (0: no limit).

    A query to a database that stopped answering blocks, and so would any clean-up after it
    (yoyo's rollback, the lock's release): the only bounded way out is to leave the process.
    """
    if not seconds:
        yield
        return
    _give_up_in(seconds, line, 1)
    try:
        yield
    finally:
        if not _stopping:  # SIGTERM armed the clean-up's own deadline: it stays
            signal.setitimer(signal.ITIMER_REAL, 0)


def _give_up_in(seconds: float, line: str, status: int) -> None:
    """In `seconds`, write `line` and exit with `status` at once, whatever the process is waiting for."""

    def give_up(signum: int, frame: object) -> None:
        print(line, file=sys.stderr, flush=True)
        os._exit(status)

    signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _applied(backend: Backend) -> list[tuple[str, datetime]]:
    """(id, applied at, UTC) in the order applied; empty when the tracking table does not exist."""
    import psycopg

    try:
        return [(row[0], row[1]) for row in backend.execute(APPLIED_SQL).fetchall()]
    except psycopg.errors.UndefinedTable:
        _refuse_hidden(backend)
        return []


def _refuse_hidden(backend: Backend) -> None:
    """CommandError when `_yoyo_migration` is in a schema of the search_path this role may not use.

    The server skips such a schema without a word: `status` would list every migration pending,
    and `migrate` would start a second table wherever the role may create one and apply them all again.
    """
    from db import HIDDEN_MIGRATIONS_SQL, hidden_schemas

    hidden = hidden_schemas(*backend.execute(HIDDEN_MIGRATIONS_SQL).fetchone())
    if hidden:
        raise CommandError(
            f"permission denied for schema {hidden[0]}, which holds _yoyo_migration: the role needs USAGE "
            "on it, or run the command as the role that applied the migrations"
        )


def _check_undo(migration: Any) -> None:
    """CommandError unless `migration` has a rollback with SQL in it (the contract: each has one)."""
    undo = Path(migration.path).with_suffix(".rollback.sql")
    if not undo.is_file() or _only_comments(undo):
        state = "has no SQL, only comments" if undo.is_file() else "is missing"
        message = f"{undo.name} {state}: write the undo first (with nothing to undo, say so: SELECT 1;)"
        raise CommandError(message, status=2)


def _only_comments(path: Path) -> bool:
    """Whether an SQL file holds nothing but comments, blanks and `;`, as `new` writes it.

    Read as PostgreSQL does: `--` to the end of the line, `/* */` nested. The first other
    character is a statement.
    """
    text, at = path.read_text(encoding="utf-8-sig"), 0
    while at < len(text):
        if text[at].isspace() or text[at] == ";":
            at += 1
        elif text.startswith("--", at):
            end = text.find("\n", at)
            at = len(text) if end < 0 else end + 1
        elif text.startswith("/*", at):
            depth, at = 1, at + 2
            while depth and at < len(text):
                if text.startswith("/*", at):
                    depth, at = depth + 1, at + 2
                elif text.startswith("*/", at):
                    depth, at = depth - 1, at + 2
                else:
                    at += 1
        else:
            return False
    return True


def _run_step(step: Callable[[Any], None], migration: Any) -> None:
    import psycopg

    try:
        step(migration)
    except psycopg.Error as exc:
        # A signal mid-query leaves the connection busy, so yoyo's ROLLBACK fails in turn: report the signal.
        context = exc.__context__
        while context is not None and not isinstance(context, (KeyboardInterrupt, Terminated)):
            context = context.__context__
        if context is not None:
            raise context from None
        raise CommandError(f"{migration.id} failed: {_one_line(exc)}") from exc


def _names(directories: list[Path]) -> str:
    return ", ".join(str(d) for d in directories)


_stopping = False  # SIGTERM came: its clean-up runs under a deadline of its own


def _terminate(command: str, signum: int, frame: object) -> None:
    """SIGTERM: stop the run through `Terminated`, so the lock is released on the way out; a database
    that does not answer that clean-up gets `UNANSWERED_GRACE` seconds, then the process exits."""
    global _stopping
    if not _stopping:
        _stopping = True
        line = (f"{command}: stopped by SIGTERM; the database did not answer the clean-up, so the migration "
                "lock may be left: once it answers, run `python -m db unlock`")  # fmt: skip
        _give_up_in(UNANSWERED_GRACE, line, 128 + signal.SIGTERM)
    raise Terminated


def _one_line(exc: BaseException) -> str:
    """The driver's message on one line (libpq may report several addresses it tried)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _fail(command: str, message: str, secrets: Sequence[str]) -> None:
    """One line on stderr; no secret in it even if a driver message quoted one."""
    print(f"{command}: {Redactor(secrets)(message)}", file=sys.stderr, flush=True)
