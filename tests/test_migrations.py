"""Migrations: the `python -m db` commands against a real server, and what `/health/db` makes of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlsplit

import asyncpg
import psycopg
import pytest
from cluster import Cluster
from psycopg.sql import SQL, Identifier
from service import ROOT, free_port, make_settings, migrated, pending, serve

from app import create_app
from db import hidden_schemas
from migrate import MIGRATIONS_DIR, UNANSWERED_GRACE, migrations_on_disk

FIRST = "0001.uuidv7"
# What `migrations/` holds: the foundation's, and any migration a team added beside it. Migrations
# the tests make for themselves are numbered 9xxx, to come after every one of these.
ON_DISK = migrations_on_disk(MIGRATIONS_DIR)
EXAMPLE_MIGRATIONS = ROOT / "examples" / "migrations"
COMMAND_TIMEOUT = 120  # seconds: bounds a wedged command, far above any real run


def run_db(url: str | None, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`python -m db ARGS` as an operator runs it, with only DATABASE_URL set."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PYTHONPATH"] = str(ROOT)
    if url is not None:
        env["DATABASE_URL"] = url
    command = [sys.executable, "-m", "db", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


def migrations_with(tmp_path: Path, extra: dict[str, str]) -> Path:
    """A second migrations folder holding the `extra` files (name: SQL), for `--source`."""
    directory = tmp_path / "migrations"
    directory.mkdir(parents=True)
    for name, text in extra.items():
        (directory / name).write_text(text)
    return directory


WIDGETS = {
    "9001.widgets.sql": "-- depends: 0001.uuidv7\nCREATE TABLE widgets (id uuid DEFAULT uuid_generate_v7());\n",
    "9001.widgets.rollback.sql": "DROP TABLE widgets;\n",
}


async def health_db(url: str, source: Path | None = None) -> dict[str, object]:
    """`/health/db` of the app built with the foundation's migrations, and `source`'s too."""
    migrations = [MIGRATIONS_DIR] if source is None else [MIGRATIONS_DIR, source]
    async with serve(create_app(make_settings(DATABASE_URL=url), migrations=migrations)) as client:
        response = await client.get("/health/db")
    assert response.status_code == 200
    body: dict[str, object] = response.json()
    return body


@contextmanager
def login_role(database_url: str, prefix: str) -> Iterator[tuple[str, str]]:
    """(name, URL) of a new role that may log in and nothing more (its password needs quoting in the
    URL); dropped afterwards, with whatever it was granted or created in this database."""
    role, password = f"{prefix}_{uuid.uuid4().hex[:12]}", "p@ss:w/rd %?#"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        parts = urlsplit(database_url)
        yield role, parts._replace(netloc=f"{role}:{quote(password, safe='')}@{parts.hostname}:{parts.port}").geturl()
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


async def fetch(url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


@pytest.mark.parametrize("directory", [MIGRATIONS_DIR, EXAMPLE_MIGRATIONS], ids=["foundation", "examples"])
def test_every_migration_has_a_rollback_and_yoyo_sees_the_same_ids(directory: Path) -> None:
    """What the app reads at start-up is exactly what yoyo applies, and each can be undone."""
    from yoyo import read_migrations

    ids = migrations_on_disk(directory)
    assert ids
    without_rollback = [f"{directory.name}/{m}.sql" for m in ids if not (directory / f"{m}.rollback.sql").is_file()]
    assert without_rollback == [], "every migration needs its .rollback.sql"
    assert tuple(sorted(m.id for m in read_migrations(str(directory)))) == ids


@pytest.mark.anyio
async def test_fresh_database_is_pending_and_degraded(database_url: str) -> None:
    """No tracking table at all counts as every migration pending."""
    body = await health_db(database_url)
    assert (body["status"], body["migration_status"]) == ("degraded", "pending")
    assert body["errors"] == [pending(ON_DISK)]
    assert await fetch(database_url, "SELECT 1 FROM pg_tables WHERE tablename = '_yoyo_migration'") == []


@pytest.mark.anyio
async def test_migrate_then_status_then_health_is_up_to_date(database_url: str) -> None:
    """`migrate` applies everything, `status` says so, and readiness turns healthy."""
    migrated = run_db(database_url, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert [line for line in migrated.stdout.splitlines() if line.startswith("applying ")] == [
        f"applying {m}" for m in ON_DISK
    ]

    status = run_db(database_url, "status", "--check")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [["applied", m] for m in ON_DISK]
    assert lines[-1] == f"{len(ON_DISK)} applied, 0 pending"

    body = await health_db(database_url)
    assert (body["status"], body["migration_status"]) == ("healthy", "up_to_date")
    assert "errors" not in body


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+asyncpg"])
def test_commands_accept_every_url_form_the_app_accepts(database_url: str, scheme: str) -> None:
    url = scheme + database_url.removeprefix("postgresql")
    assert run_db(url, "migrate").returncode == 0
    status = run_db(url, "status")
    assert (status.returncode, status.stdout.splitlines()[-1]) == (0, f"{len(ON_DISK)} applied, 0 pending")


def test_commands_take_libpqs_failover_form_of_the_url(database_url: str) -> None:
    """Two hosts, the first down: the app's pool fails over to the second, and so do the commands."""
    parts = urlsplit(database_url)
    url = parts._replace(netloc=parts.netloc.replace(f"{parts.hostname}:", f"127.0.0.1:{free_port()},127.0.0.1:", 1))
    assert "," in url.geturl()
    migrate = run_db(url.geturl(), "migrate")
    assert migrate.returncode == 0, migrate.stderr
    status = run_db(url.geturl(), "status")
    assert (status.returncode, status.stdout.splitlines()[-1]) == (0, f"{len(ON_DISK)} applied, 0 pending")


@pytest.mark.anyio
async def test_libpq_options_reach_the_database_from_the_app_and_the_commands(database_url: str) -> None:
    """Options libpq knows and asyncpg does not (as in Neon's and RDS's URLs) are not sent to the server
    as settings, which it refuses: the app and the commands both connect."""
    url = f"{database_url}?connect_timeout=5&channel_binding=prefer&keepalives=1&gssencmode=disable"
    assert run_db(url, "migrate").returncode == 0
    body = await health_db(url)
    assert (body["status"], body["database_connected"], body["migration_status"]) == ("healthy", True, "up_to_date")


@pytest.mark.anyio
async def test_a_socket_directory_written_as_the_host_serves_the_app_and_the_commands(
    cluster: Cluster, database_url: str
) -> None:
    """libpq's `postgresql://user@%2Frun%2Fpostgresql/db`: asyncpg reads the host unquoted, and so do the commands."""
    if cluster.data_dir is None:
        pytest.skip("needs the throwaway cluster's socket directory")
    parts = urlsplit(database_url)
    host = quote(str(cluster.data_dir.parent), safe="")
    url = parts._replace(netloc=f"{parts.netloc.rpartition('@')[0]}@{host}:{parts.port}").geturl()
    migrate = run_db(url, "migrate")
    assert migrate.returncode == 0, migrate.stderr
    body = await health_db(url)
    assert (body["status"], body["migration_status"]) == ("healthy", "up_to_date")


@pytest.mark.anyio
async def test_new_migration_on_disk_is_pending_until_migrated(database_url: str, tmp_path: Path) -> None:
    """A file the database has not seen makes readiness degraded, naming it; `migrate` fixes that."""
    assert run_db(database_url, "migrate").returncode == 0
    directory = migrations_with(tmp_path, WIDGETS)

    body = await health_db(database_url, directory)
    assert (body["status"], body["migration_status"]) == ("degraded", "pending")
    assert body["errors"] == ["1 pending migration(s): 9001.widgets"]
    status = run_db(database_url, "status", "--source", str(directory))
    assert status.returncode == 0
    assert "pending  9001.widgets" in status.stdout.splitlines()
    assert run_db(database_url, "status", "--source", str(directory), "--check").returncode == 1

    assert run_db(database_url, "migrate", "--source", str(directory)).returncode == 0
    assert (await health_db(database_url, directory))["migration_status"] == "up_to_date"


@pytest.mark.anyio
async def test_rollback_undoes_only_the_last_migration(database_url: str, tmp_path: Path) -> None:
    directory = migrations_with(tmp_path, WIDGETS)
    assert run_db(database_url, "migrate", "--source", str(directory)).returncode == 0

    rolled = run_db(database_url, "rollback", "--source", str(directory))
    assert rolled.returncode == 0, rolled.stderr
    assert "rolled back 9001.widgets" in rolled.stdout
    assert await fetch(database_url, "SELECT 1 FROM pg_tables WHERE tablename = 'widgets'") == []
    assert await fetch(database_url, "SELECT 1 FROM pg_proc WHERE proname = 'uuid_generate_v7'") != []

    again = run_db(database_url, "rollback", "--source", str(directory))
    assert (again.returncode, again.stdout.splitlines()[-1]) == (0, f"rolled back {ON_DISK[-1]}")
    # The foundation's own rollback drops the function (when its migration is the last on disk).
    kept = await fetch(database_url, "SELECT 1 FROM pg_proc WHERE proname = 'uuid_generate_v7'") != []
    assert kept == (ON_DISK[-1] != FIRST)
    body = await health_db(database_url)
    assert (body["status"], body["migration_status"], body["errors"]) == (
        "degraded", "pending", [pending(ON_DISK[-1:])],
    )  # fmt: skip
    assert run_db(database_url, "migrate", "--source", str(directory)).returncode == 0
    unknown = run_db(database_url, "rollback")  # the code at hand lacks 9001.widgets
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("rollback: the last applied migration 9001.widgets is not in ")
    assert await fetch(database_url, "SELECT 1 FROM pg_tables WHERE tablename = 'widgets'") != []

    for _ in (*ON_DISK, "9001.widgets"):
        assert run_db(database_url, "rollback", "--source", str(directory)).returncode == 0
    nothing = run_db(database_url, "rollback")
    assert (nothing.returncode, nothing.stdout) == (0, "nothing to roll back: no migration is applied\n")


def test_broken_migration_fails_loudly_and_stops(database_url: str, tmp_path: Path) -> None:
    """A migration that fails is an error naming it, not a skip; later ones are not applied."""
    directory = migrations_with(
        tmp_path,
        {
            "9001.broken.sql": "CREATE TABLEE oops ();\n",
            "9001.broken.rollback.sql": "SELECT 1;\n",
            "9002.after.sql": "CREATE TABLE after (id int);\n",
            "9002.after.rollback.sql": "DROP TABLE after;\n",
        },
    )
    migrated = run_db(database_url, "migrate", "--source", str(directory))
    assert migrated.returncode == 1
    assert migrated.stderr.startswith("migrate: 9001.broken failed: syntax error")
    assert migrated.stderr.count("\n") == 1
    status = run_db(database_url, "status", "--source", str(directory)).stdout.splitlines()
    assert [line.split()[:2] for line in status[: len(ON_DISK) + 2]] == [
        *(["applied", m] for m in ON_DISK), ["pending", "9001.broken"], ["pending", "9002.after"],
    ]  # fmt: skip


def test_unresolvable_dependency_fails_instead_of_being_skipped(database_url: str, tmp_path: Path) -> None:
    """yoyo's apply_migrations would skip a migration it cannot load; migrate must not."""
    directory = migrations_with(tmp_path, {"0002.orphan.sql": "-- depends: 0001.missing\nCREATE TABLE t (id int);\n"})
    migrated = run_db(database_url, "migrate", "--source", str(directory))
    assert migrated.returncode == 1
    assert migrated.stderr.startswith("migrate: bad migration: ")
    assert "Traceback" not in migrated.stderr


@pytest.mark.slow
def test_concurrent_migrates_apply_each_migration_exactly_once(database_url: str, tmp_path: Path) -> None:
    """Three replicas migrating at once all succeed; the lock makes each migration run once."""
    directory = migrations_with(
        tmp_path,
        # Slow enough that the others really wait on the lock; fails if run a second time.
        {"9001.slow.sql": "DO $$ BEGIN PERFORM pg_sleep(1); END $$;\nCREATE TABLE slow (id int);\n",
         "9001.slow.rollback.sql": "DROP TABLE slow;\n"},
    )  # fmt: skip
    env = {**os.environ, "DATABASE_URL": database_url}
    command = [sys.executable, "-m", "db", "migrate", "--source", str(directory)]
    replicas = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [replica.communicate(timeout=COMMAND_TIMEOUT) for replica in replicas]
    assert [replica.returncode for replica in replicas] == [0, 0, 0], [err for _, err in outputs]
    # Exactly one replica did the work; the others found nothing left to do.
    assert sorted(out.count("applying ") for out, _ in outputs) == [0, 0, len(ON_DISK) + 1]

    with psycopg.connect(database_url) as conn:
        recorded = conn.execute("SELECT migration_id, count(*) FROM _yoyo_migration GROUP BY 1 ORDER BY 1").fetchall()
        applies = "SELECT migration_id, count(*) FROM _yoyo_log WHERE operation = 'apply' GROUP BY 1 ORDER BY 1"
        log = conn.execute(applies).fetchall()
        locks = conn.execute("SELECT * FROM yoyo_lock").fetchall()
    assert recorded == [*((m, 1) for m in ON_DISK), ("9001.slow", 1)]
    assert log == [*((m, 1) for m in ON_DISK), ("9001.slow", 1)]
    assert locks == []


def test_lock_left_by_a_killed_migrate_times_out_until_unlocked(database_url: str) -> None:
    """A dead holder's lock row makes migrate give up with a hint; `unlock` clears it."""
    assert run_db(database_url, "migrate").returncode == 0
    with psycopg.connect(database_url, autocommit=True) as conn:  # the row a SIGKILLed migrate leaves
        conn.execute("INSERT INTO yoyo_lock (locked, ctime, pid) VALUES (1, now() AT TIME ZONE 'UTC', 424242)")

    stuck = run_db(database_url, "migrate", "--lock-timeout", "1")
    assert stuck.returncode == 1
    assert stuck.stderr.startswith("migrate: gave up after 1 s waiting for the migration lock")
    assert stuck.stderr.rstrip("\n").endswith("remove it with `python -m db unlock`")

    unlocked = run_db(database_url, "unlock")
    assert unlocked.returncode == 0
    assert unlocked.stdout.startswith("removed the migration lock held by process 424242 since ")
    assert run_db(database_url, "migrate", "--lock-timeout", "1").returncode == 0


@pytest.mark.slow
def test_sigterm_mid_migration_releases_the_lock(database_url: str, tmp_path: Path) -> None:
    """A migrate stopped by SIGTERM (a deleted pod) leaves no lock and no half-recorded migration."""
    directory = migrations_with(
        tmp_path,
        {"9001.hang.sql": "DO $$ BEGIN PERFORM pg_sleep(60); END $$;\n", "9001.hang.rollback.sql": "SELECT 1;\n"},
    )
    env = {**os.environ, "DATABASE_URL": database_url}
    command = [sys.executable, "-m", "db", "migrate", "--source", str(directory)]
    migrating = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with psycopg.connect(database_url, autocommit=True) as conn:
        running = "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'DO $$ BEGIN PERFORM pg_sleep(60)%'"
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not conn.execute(running).fetchall():
            assert time.monotonic() < deadline, "the migration never started"
            time.sleep(0.05)
        migrating.send_signal(signal.SIGTERM)
        _, stderr = migrating.communicate(timeout=COMMAND_TIMEOUT)
        assert migrating.returncode == 128 + signal.SIGTERM
        assert stderr == "migrate: stopped by SIGTERM; a migration in progress was not recorded as applied\n"
        assert conn.execute("SELECT * FROM yoyo_lock").fetchall() == []
        assert conn.execute("SELECT migration_id FROM _yoyo_migration ORDER BY 1").fetchall() == [(m,) for m in ON_DISK]


@pytest.mark.anyio
async def test_unreadable_tracking_table_is_unknown(database_url: str) -> None:
    """A role that may not read `_yoyo_migration` gets `unknown` from readiness, an error from status."""
    assert run_db(database_url, "migrate").returncode == 0
    with login_role(database_url, "reader") as (_, url):
        body = await health_db(url)
        assert (body["status"], body["database_connected"], body["migration_status"]) == ("healthy", True, "unknown")

        status = run_db(url, "status")
        assert status.returncode == 1
        assert status.stderr == "status: database error: permission denied for table _yoyo_migration\n"


@pytest.mark.anyio
async def test_tracking_table_in_a_schema_the_role_may_not_use_is_unknown(database_url: str) -> None:
    """Applied into a schema of the search path the role has no USAGE on, the table is not refused
    but hidden (the server skips that schema): readiness says `unknown`, not every migration pending,
    and the commands refuse rather than start a second table where the role may create one."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "App Schema"')
        database = Identifier(urlsplit(database_url).path.removeprefix("/"))
        conn.execute(SQL('ALTER DATABASE {} SET search_path = "App Schema", public').format(database))
    migrated(database_url)  # on a new connection, so into "App Schema"
    with login_role(database_url, "reader") as (role, url):
        await fetch(database_url, f"GRANT CREATE ON SCHEMA public TO {role}")
        body = await health_db(url)
        assert (body["status"], body["database_connected"], body["migration_status"], body["errors"]) == (
            "healthy", True, "unknown", ["Migration status unknown: the migration table cannot be read"],
        )  # fmt: skip

        for command in ("status", "migrate"):
            result = run_db(url, command)
            assert (result.returncode, result.stderr) == (
                1,
                f"{command}: permission denied for schema App Schema, which holds _yoyo_migration: the role "
                "needs USAGE on it, or run the command as the role that applied the migrations\n",
            )
    tracking = "SELECT relnamespace::regnamespace::text FROM pg_class WHERE relname = '_yoyo_migration'"
    assert [row[0] for row in await fetch(database_url, tracking)] == ['"App Schema"']


@pytest.mark.anyio
async def test_tracking_table_off_the_roles_search_path_leaves_it_pending(database_url: str) -> None:
    """A role that can see no tracking table, even with one it may not use elsewhere (in a schema its
    search path does not name), has every migration pending, as on a fresh database."""
    await fetch(database_url, "CREATE SCHEMA elsewhere")
    await fetch(database_url, f"CREATE TABLE elsewhere._yoyo_migration AS SELECT '{ON_DISK[0]}' AS migration_id")
    with login_role(database_url, "reader") as (_, url):
        body = await health_db(url)
        assert (body["status"], body["migration_status"], body["errors"]) == ("degraded", "pending", [pending(ON_DISK)])

        status = run_db(url, "status")
        assert (status.returncode, status.stdout.splitlines()[-1]) == (0, f"0 applied, {len(ON_DISK)} pending")


def test_search_path_is_read_as_the_server_reads_it(database_url: str) -> None:
    """`hidden_schemas` finds the schemas the server's own reading of a search_path finds: quoted names
    holding commas, spaces and quotes, bare names in lower case (ASCII letters only), `$user` for the
    role, names cut to 63 bytes (never inside a character)."""
    path = f'"$user",public , "App Schema",MiXeD,"MiXeD",  "q""uote","a, b",ÄBC,{"X" * 70},{"ü" * 40}'
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA AUTHORIZATION CURRENT_USER")  # named after the role
        for name in ("App Schema", "mixed", "MiXeD", 'q"uote', "a, b", "Äbc", "x" * 63, "ü" * 31):
            conn.execute(SQL("CREATE SCHEMA {}").format(Identifier(name)))
        conn.execute("SELECT set_config('search_path', %s, false)", (path,))
        row = conn.execute(
            "SELECT current_setting('search_path'), current_user, array(SELECT nspname::text FROM pg_namespace), "
            "current_schemas(false)"
        ).fetchone()
    assert row is not None
    setting, user, every, schemas = row
    assert len(schemas) == 10
    assert hidden_schemas(setting, user, every) == schemas


@pytest.mark.parametrize("command", ["migrate", "rollback", "status", "unlock"])
def test_unreachable_database_is_one_clean_line(command: str) -> None:
    password = "hunter2-" + uuid.uuid4().hex
    url = f"postgresql://app:{password}@127.0.0.1:{free_port()}/app"
    result = run_db(url, command)
    assert result.returncode == 1
    assert result.stderr.startswith(f"{command}: cannot connect to postgresql://app:***@127.0.0.1:")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert password not in result.stderr + result.stdout


def test_missing_or_invalid_database_url_is_a_configuration_error(tmp_path: Path) -> None:
    missing = run_db(None, "status", cwd=tmp_path)  # tmp_path: no .env to fall back on
    assert (missing.returncode, missing.stderr) == (
        2,
        "status: DATABASE_URL is not set: it names the database to migrate\n",
    )
    invalid = run_db("mysql://u:secret@db/app", "migrate", cwd=tmp_path)
    assert invalid.returncode == 2
    assert invalid.stderr.startswith("migrate: DATABASE_URL=")
    assert "secret" not in invalid.stderr


def test_a_dotenv_that_cannot_be_parsed_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines python-dotenv cannot parse: one line naming each, and status 2, like any configuration mistake."""
    (tmp_path / ".env").write_text('A B\nDATABASE_URL="postgresql://app:secret@127.0.0.1:1/app\n')
    monkeypatch.delenv("PYTHON_DOTENV_DISABLED")
    broken = run_db(None, "status", cwd=tmp_path)
    assert (broken.returncode, broken.stderr) == (
        2,
        "status: .env, line 1: cannot be parsed as NAME=value (an unclosed quote?); "
        ".env, line 2 (DATABASE_URL): cannot be parsed as NAME=value (an unclosed quote?)\n",
    )


@pytest.mark.anyio
async def test_uuid_generate_v7_makes_time_ordered_version_7_uuids(database_url: str) -> None:
    assert run_db(database_url, "migrate").returncode == 0
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT uuid_generate_v7(), now()")
        made = await conn.fetch(
            "SELECT u FROM (SELECT n, uuid_generate_v7() AS u FROM generate_series(1, 1000) AS n) s ORDER BY n"
        )
    finally:
        await conn.close()

    assert row is not None
    value, now = uuid.UUID(bytes=row[0].bytes), row[1]
    assert value.version == 7
    assert value.int >> 62 & 0b11 == 0b10  # the RFC 9562 variant
    embedded = datetime.fromtimestamp((value.int >> 80) / 1000, UTC)
    assert abs((embedded - now).total_seconds()) < 1
    sequence = [uuid.UUID(bytes=r["u"].bytes) for r in made]
    assert sequence == sorted(sequence)
    assert len(set(sequence)) == 1000


def test_new_writes_the_next_numbered_pair_depending_on_the_latest(tmp_path: Path) -> None:
    """`python -m db new NAME --source DIR`: NNNN.NAME.sql and its rollback, paths printed, ready to edit."""
    first = run_db(None, "new", "create_orders", "--source", str(tmp_path))
    second = run_db(None, "new", "add_order_notes", "--source", str(tmp_path))
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert first.stdout.splitlines() == [
        str(tmp_path / "0001.create_orders.sql"), str(tmp_path / "0001.create_orders.rollback.sql"),
    ]  # fmt: skip
    assert second.stdout.splitlines()[0] == str(tmp_path / "0002.add_order_notes.sql")
    # An empty folder builds on the foundation's latest migration; the next on its own folder's latest.
    assert f"-- depends: {ON_DISK[-1]}\n" in (tmp_path / "0001.create_orders.sql").read_text()
    assert "-- depends: 0001.create_orders\n" in (tmp_path / "0002.add_order_notes.sql").read_text()
    assert migrations_on_disk(tmp_path) == ("0001.create_orders", "0002.add_order_notes")


def test_new_starts_a_folder_that_does_not_exist_yet(tmp_path: Path) -> None:
    """An application's first migration creates its folder (and the folders above it), and says so."""
    folder = tmp_path / "orders" / "migrations"
    result = run_db(None, "new", "create_orders", "--source", str(folder))
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"created {folder}/\n"
    assert migrations_on_disk(folder) == ("0001.create_orders",)
    assert f"-- depends: {ON_DISK[-1]}\n" in (folder / "0001.create_orders.sql").read_text()


def test_new_refuses_a_source_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "migrations").write_text("")
    result = run_db(None, "new", "create_orders", "--source", str(tmp_path / "migrations"))
    assert (result.returncode, result.stderr) == (2, f"new: {tmp_path / 'migrations'} is not a directory\n")


def test_new_refuses_an_id_another_folder_already_has(tmp_path: Path) -> None:
    """Folders number on their own: a second `0001.add_orders` would stop every command (yoyo: bad migration)."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_db(None, "new", "add_orders", "--source", str(first)).returncode == 0
    result = run_db(None, "new", "add_orders", "--source", str(first), "--source", str(second))
    assert (result.returncode, result.stderr) == (
        2, f"new: 0001.add_orders is already a migration in {first}: give this one another name\n",
    )  # fmt: skip
    assert not second.exists()
    assert run_db(None, "new", "add_order_lines", "--source", str(first), "--source", str(second)).returncode == 0


def test_a_source_holding_python_files_is_refused_not_applied(database_url: str, tmp_path: Path) -> None:
    """yoyo would import `.py` files as migrations and record them: `--source examples` is a typo, not a folder."""
    (tmp_path / "items.py").write_text("print('imported')\n")
    result = run_db(database_url, "migrate", "--source", str(tmp_path))
    assert (result.returncode, result.stderr) == (
        2, f"migrate: {tmp_path} holds Python files: a migrations folder holds only .sql files\n",
    )  # fmt: skip
    assert "imported" not in result.stdout


def test_an_app_told_of_a_migrations_folder_that_is_missing_does_not_start(tmp_path: Path) -> None:
    """A folder left out of an image would make `/health/db` call tables that were never made `up_to_date`."""
    with pytest.raises(FileNotFoundError, match=f"no migrations directory at {tmp_path / 'orders'}$"):
        create_app(make_settings(), migrations=[MIGRATIONS_DIR, tmp_path / "orders"])


def test_a_migration_or_rollback_left_as_new_wrote_it_is_refused(database_url: str, tmp_path: Path) -> None:
    """Only comments (nested ones too), or no rollback at all: applied, a migration would be recorded as
    done and do nothing, and its rollback report one it did not make. Refused, before anything is applied."""
    assert run_db(None, "new", "create_orders", "--source", str(tmp_path)).returncode == 0
    forward, undo = tmp_path / "0001.create_orders.sql", tmp_path / "0001.create_orders.rollback.sql"
    refusals = []
    for sql in ("", "/* outer /* inner */ still a comment */\n"):
        forward.write_text(forward.read_text().split("\n\n")[0] + "\n\n" + sql)
        refusals.append(run_db(database_url, "migrate", "--source", str(tmp_path)))
    forward.write_text(forward.read_text() + "CREATE TABLE scratch_orders (id int);\n")
    refusals.append(run_db(database_url, "migrate", "--source", str(tmp_path)))  # the rollback as `new` wrote it
    assert [(r.returncode, r.stderr) for r in refusals] == [
        (2, "migrate: 0001.create_orders has no SQL yet, only comments: write the change first\n"),
        (2, "migrate: 0001.create_orders has no SQL yet, only comments: write the change first\n"),
        (2, "migrate: 0001.create_orders.rollback.sql has no SQL, only comments: write the undo first "
            "(with nothing to undo, say so: SELECT 1;)\n"),
    ]  # fmt: skip
    status = run_db(database_url, "status", "--source", str(tmp_path)).stdout.splitlines()
    assert [line.split()[0] for line in status[:-1]] == ["pending"] * (len(ON_DISK) + 1)  # not even the foundation's

    undo.write_text("DROP TABLE scratch_orders;\n")
    assert run_db(database_url, "migrate", "--source", str(tmp_path)).returncode == 0
    undo.unlink()
    missing = run_db(database_url, "rollback", "--source", str(tmp_path))
    assert (missing.returncode, missing.stderr) == (
        2,
        "rollback: 0001.create_orders.rollback.sql is missing: write the undo first "
        "(with nothing to undo, say so: SELECT 1;)\n",
    )
    assert run_db(database_url, "status", "--source", str(tmp_path)).stdout.count("applied ") == len(ON_DISK) + 1


def test_new_migrations_apply_in_order_with_the_foundations(database_url: str, tmp_path: Path) -> None:
    """What `new` writes is valid for yoyo: filled in, both apply after 0001.uuidv7 and roll back."""
    assert run_db(None, "new", "create_orders", "--source", str(tmp_path)).returncode == 0
    (tmp_path / "0001.create_orders.sql").write_text(
        f"-- depends: {FIRST}\nCREATE TABLE scratch_orders (id uuid PRIMARY KEY DEFAULT uuid_generate_v7());\n"
    )
    (tmp_path / "0001.create_orders.rollback.sql").write_text("DROP TABLE scratch_orders;\n")
    migrated = run_db(database_url, "migrate", "--source", str(tmp_path))
    assert migrated.returncode == 0, migrated.stderr
    applied = [line.removeprefix("applying ") for line in migrated.stdout.splitlines() if line.startswith("applying ")]
    assert sorted(applied) == sorted([*ON_DISK, "0001.create_orders"])
    assert applied.index(FIRST) < applied.index("0001.create_orders")
    rolled = run_db(database_url, "rollback", "--source", str(tmp_path))
    assert rolled.stdout.splitlines()[-1] == "rolled back 0001.create_orders"


@pytest.mark.parametrize("name", ["Orders", "add orders", "", "x" * 61, "../escape"])
def test_new_refuses_a_name_that_is_not_a_plain_identifier(tmp_path: Path, name: str) -> None:
    result = run_db(None, "new", name, "--source", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"new: {name!r}: a name is 1 to 60 of a-z, 0-9 and _")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.anyio
async def test_the_examples_migrations_apply_with_the_source_option(database_url: str) -> None:
    """The contract's command for the reference resource: migrate, status, rollback with --source."""
    source = str(EXAMPLE_MIGRATIONS)
    assert run_db(database_url, "migrate", "--source", source).returncode == 0
    status = run_db(database_url, "status", "--source", source, "--check")
    assert (status.returncode, status.stdout.splitlines()[-1]) == (0, f"{len(ON_DISK) + 1} applied, 0 pending")
    assert await fetch(database_url, "SELECT 1 FROM pg_tables WHERE tablename = 'items'") != []
    body = await health_db(database_url, EXAMPLE_MIGRATIONS)
    assert (body["status"], body["migration_status"]) == ("healthy", "up_to_date")
    rolled = run_db(database_url, "rollback", "--source", source)
    assert rolled.stdout.splitlines()[-1] == "rolled back 0001.create_items"
    assert await fetch(database_url, "SELECT 1 FROM pg_tables WHERE tablename = 'items'") == []


def _wait_for_query(url: str, text: str) -> None:
    """Until the server is running a query that starts with `text` (a migration under way)."""
    with psycopg.connect(url, autocommit=True) as conn:
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not conn.execute("SELECT 1 FROM pg_stat_activity WHERE query LIKE %s", (text + "%",)).fetchall():
            assert time.monotonic() < deadline, f"no query {text!r} started"
            time.sleep(0.05)


def _start_db(url: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": url}
    command = [sys.executable, "-m", "db", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


SLOW = "DO $$ BEGIN PERFORM pg_sleep(60); END $$;"


def _migrating_slowly(cluster: Cluster, url: str, tmp_path: Path) -> tuple[Path, subprocess.Popen[str]]:
    """A `migrate` in the middle of a minute-long migration (9001.slow, in the folder returned)."""
    if not cluster.controllable:
        pytest.skip("needs the throwaway cluster")
    directory = migrations_with(tmp_path, {"9001.slow.sql": f"{SLOW}\n", "9001.slow.rollback.sql": "SELECT 1;\n"})
    migrating = _start_db(url, "migrate", "--source", str(directory))
    _wait_for_query(url, SLOW)
    return directory, migrating


@pytest.mark.slow
def test_a_database_restart_under_a_migration_leaves_no_lock_and_names_the_migration(
    cluster: Cluster, database_url: str, tmp_path: Path
) -> None:
    """The connection that took the lock dies with the restart: the lock is released on a new one
    once the server is back, and the error is the migration's, so the next deploy migrates at once."""
    directory, migrating = _migrating_slowly(cluster, database_url, tmp_path)
    cluster.restart()
    _, stderr = migrating.communicate(timeout=COMMAND_TIMEOUT)
    assert migrating.returncode == 1
    assert stderr.startswith("migrate: 9001.slow failed: ")
    assert stderr.count("\n") == 1
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT * FROM yoyo_lock").fetchall() == []
    (directory / "9001.slow.sql").write_text("SELECT 1;\n")
    assert run_db(database_url, "migrate", "--source", str(directory), "--lock-timeout", "1").returncode == 0


@pytest.mark.slow
def test_waiting_for_the_lock_on_a_database_that_stops_answering_still_ends(
    cluster: Cluster, database_url: str
) -> None:
    """`--lock-timeout` holds even when the database freezes while a replica waits: yoyo's own wait
    would block in its next query; the command exits after the timeout and a grace period."""
    if not cluster.controllable:
        pytest.skip("needs the throwaway cluster")
    assert run_db(database_url, "migrate").returncode == 0
    with psycopg.connect(database_url, autocommit=True) as conn:  # another replica's lock
        conn.execute("INSERT INTO yoyo_lock (locked, ctime, pid) VALUES (1, now() AT TIME ZONE 'UTC', 424242)")
    waiting = _start_db(database_url, "migrate", "--lock-timeout", "5")
    _wait_for_query(database_url, "ROLLBACK")  # of its INSERT of the lock row, which the held row refuses
    started = time.monotonic()
    cluster.hang()
    try:
        _, stderr = waiting.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        cluster.resume()
    assert waiting.returncode == 1
    assert time.monotonic() - started < 5 + UNANSWERED_GRACE + 2
    expected = "migrate: gave up after 5 s waiting for the migration lock: the database stopped answering\n"
    assert stderr == expected


@pytest.mark.slow
def test_sigterm_while_the_database_does_not_answer_ends_the_command_with_a_hint(
    cluster: Cluster, database_url: str, tmp_path: Path
) -> None:
    """A SIGTERM's clean-up (rolling back, releasing the lock) cannot reach a frozen database: after a
    grace period the command exits 143 and says the lock may be left, rather than waiting forever."""
    _, migrating = _migrating_slowly(cluster, database_url, tmp_path)
    cluster.hang()
    try:
        migrating.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, stderr = migrating.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        cluster.resume()
    assert migrating.returncode == 128 + signal.SIGTERM
    assert time.monotonic() - started < UNANSWERED_GRACE + 2
    assert stderr.endswith("the migration lock may be left: once it answers, run `python -m db unlock`\n")


def test_a_role_that_cannot_create_yoyos_tables_is_told_at_once(cluster: Cluster, database_url: str) -> None:
    """PostgreSQL 15 lets only the database's owner create in `public`: yoyo swallows the refusal and
    then waits out the lock timeout for a table that is not there; the command says why, at once."""
    with login_role(database_url, "migrator") as (_, url):
        started = time.monotonic()
        refused = run_db(url, "migrate")
    assert time.monotonic() - started < 10
    assert refused.returncode == 1
    assert refused.stderr.startswith("migrate: cannot create yoyo's tables (permission denied for schema public)")
    assert "CREATE on the schema" in refused.stderr


def test_migration_files_yoyo_would_misread_are_refused_by_every_command(database_url: str, tmp_path: Path) -> None:
    """Not UTF-8, an id in two folders, dependencies in a loop: one line and status 2, for `status`
    too, never a traceback; a folder whose name has glob characters is read, not skipped."""
    latin = migrations_with(tmp_path / "latin", {"9001.latin.sql": "-- caf\xe9\nSELECT 1;\n"})
    (latin / "9001.latin.sql").write_bytes(b"-- caf\xe9\nSELECT 1;\n")
    twice = migrations_with(tmp_path / "twice", {"0001.uuidv7.sql": "SELECT 1;\n"})
    loop = migrations_with(tmp_path / "loop", {"9001.a.sql": "-- depends: 9002.b\nSELECT 1;\n",
                                               "9002.b.sql": "-- depends: 9001.a\nSELECT 1;\n"})  # fmt: skip
    expected = {
        latin: f"{latin / '9001.latin.sql'} is not UTF-8 text (invalid continuation byte at byte 6)",
        twice: f"0001.uuidv7 is in both {MIGRATIONS_DIR} and {twice}: rename one",
        loop: "the migrations' dependencies form a loop among 9001.a, 9002.b",
    }
    for directory, message in expected.items():
        for command in ("migrate", "status"):
            result = run_db(database_url, command, "--source", str(directory))
            assert (result.returncode, result.stderr) == (2, f"{command}: {message}\n")
    globbed = migrations_with(tmp_path / "app[v2]", dict(WIDGETS))
    assert run_db(database_url, "migrate", "--source", str(globbed)).returncode == 0
    status = run_db(database_url, "status", "--source", str(globbed)).stdout
    assert "applied  9001.widgets" in status
