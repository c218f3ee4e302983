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
import logging
import re
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from dsn import mask_url, yoyo_url
from settings import Redactor, Settings, SettingsError, load_settings, read_environment

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_NAME = re.compile(r"[a-z0-9_]{1,60}")
_NUMBERED = re.compile(r"(\d{4})\.[^.]+\.sql")
# Seconds a replica waits for another one's migrations before giving up: long enough for any
# migration fit for a rolling deploy; a lock left by a killed process needs `unlock`.
LOCK_TIMEOUT = 60.0
APPLIED_SQL = "SELECT migration_id, applied_at_utc FROM _yoyo_migration ORDER BY applied_at_utc, migration_id"
LOCK_HOLDER_SQL = "SELECT pid, ctime FROM yoyo_lock"

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
    with backend.lock(args.lock_timeout):
        pending = backend.to_apply(migrations)
        for migration in pending:  # before applying any: an unwritten one would be recorded as applied
            if _only_comments(Path(migration.path)):
                raise CommandError(f"{migration.id} has no SQL yet, only comments: write the change first")
            _check_undo(migration)
        for migration in pending:
            print(f"applying {migration.id}", flush=True)
            # apply_one, not apply_migrations: that one silently skips a migration it cannot load.
            _run_step(backend.apply_one, migration)
    print(f"applied {len(pending)} migration(s); the database is up to date")
    return 0


def rollback(backend: Backend, migrations: Any, args: argparse.Namespace) -> int:
    """Roll back the most recently applied migration, and only that one."""
    with backend.lock(args.lock_timeout):
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
    """Remove the lock row a killed `migrate` left behind; only when none is running."""
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
    from yoyo import get_backend
    from yoyo.exceptions import BadMigration, LockTimeout, MigrationConflict

    # Our own lines say what happened; yoyo's logging would add tracebacks for a bad migration.
    logging.getLogger("yoyo").propagate = False
    logging.getLogger("yoyo").addHandler(logging.NullHandler())
    command: Callable[[Backend, Any, argparse.Namespace], int] = args.command
    signal.signal(signal.SIGTERM, _terminate)
    secrets: tuple[str, ...] = ()
    try:
        settings = _settings()
        url, secrets = settings.database_url, settings.secrets
        assert url is not None
        migrations = _read(args.sources)
        try:
            backend = get_backend(yoyo_url(url))
        except psycopg.Error as exc:
            raise CommandError(f"cannot connect to {mask_url(url)}: {_one_line(exc)}") from exc
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
    except (BadMigration, MigrationConflict) as exc:
        _fail(args.name, f"bad migration: {' '.join(map(str, exc.args))}", secrets)
        return 1
    except psycopg.Error as exc:
        _fail(args.name, f"database error: {_one_line(exc)}", secrets)
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        _fail(args.name, f"stopped by {signum.name}; a migration in progress was not recorded as applied", secrets)
        return 128 + signum


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
    raw = read_environment().get("DATABASE_URL")
    if not raw:
        raise CommandError("DATABASE_URL is not set: it names the database to migrate", status=2)
    try:
        return load_settings({"DATABASE_URL": raw})
    except SettingsError as exc:
        raise CommandError(exc.problems[0], status=2) from None


def _read(directories: list[Path]) -> Any:
    from yoyo import read_migrations

    for directory in directories:
        if not directory.is_dir():
            raise CommandError(f"no migrations directory at {directory}", status=2)
        if any(directory.glob("*.py")):  # yoyo would import and record them as migrations
            raise CommandError(f"{directory} holds Python files: a migrations folder holds only .sql files", status=2)
    return read_migrations(*map(str, directories))


def _applied(backend: Backend) -> list[tuple[str, datetime]]:
    """(id, applied at, UTC) in the order applied; empty when the tracking table does not exist."""
    import psycopg

    try:
        return [(row[0], row[1]) for row in backend.execute(APPLIED_SQL).fetchall()]
    except psycopg.errors.UndefinedTable:
        return []


def _check_undo(migration: Any) -> None:
    """CommandError unless `migration` has a rollback with SQL in it (the contract: each has one)."""
    undo = Path(migration.path).with_suffix(".rollback.sql")
    if not undo.is_file() or _only_comments(undo):
        state = "has no SQL, only comments" if undo.is_file() else "is missing"
        raise CommandError(f"{undo.name} {state}: write the undo first (with nothing to undo, say so: SELECT 1;)")


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


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def _one_line(exc: BaseException) -> str:
    """The driver's message on one line (libpq may report several addresses it tried)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _fail(command: str, message: str, secrets: Sequence[str]) -> None:
    """One line on stderr; no secret in it even if a driver message quoted one."""
    print(f"{command}: {Redactor(secrets)(message)}", file=sys.stderr, flush=True)
