"""A real, disposable PostgreSQL server for the test suite, with fault controls.

Health and reconnect behaviour can only be trusted if it is tested against a
server that really goes away, really refuses, and really stops answering.  So
the suite runs its own cluster in a temporary directory and can stop, restart
or freeze (SIGSTOP) it.  When ``TEST_DATABASE_URL`` points at an existing
server, only the URL-based helpers work and every fault test is skipped.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

# Upper bound for any single subprocess call, so a wedged server can never
# hang the suite forever.
SUBPROCESS_TIMEOUT = 60.0
# psycopg connect timeout (seconds) for the administrative connection.
ADMIN_CONNECT_TIMEOUT = 10

_SUPERUSER = "postgres"
# Postgres refuses to run as root; when we are root, the server runs as this
# existing OS account instead.
_OS_OWNER = "postgres" if os.geteuid() == 0 else None
# Libpq variables that would silently redirect pg_ctl/initdb or psycopg.
_PG_ENV_VARS = (
    "PGDATA",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "PGSERVICE",
    "PGOPTIONS",
)


class ClusterError(RuntimeError):
    """A cluster control operation failed; the message carries the tool output."""


def _binary(name: str) -> str:
    """PATH first, then the newest server in Debian's usual place (not on PATH by default)."""
    found = shutil.which(name)
    if found is not None:
        return found
    debian = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if not debian:
        raise ClusterError(f"{name} not found on PATH or in /usr/lib/postgresql/*/bin")
    return str(debian[-1])


def _free_port() -> int:
    """Ask the kernel for an unused port; racy, so callers retry on bind failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a live process, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces or parentheses; fields after the
    # last ')' are fixed.
    fields = raw.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _descendants(root: int) -> list[int]:
    """All live descendants of ``root`` (postgres children are normally direct)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        info = _stat(int(entry.name))
        if info is not None:
            children.setdefault(info[1], []).append(int(entry.name))
    found: list[int] = []
    frontier = [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


def _signal(pids: Sequence[int], signum: signal.Signals) -> None:
    """Signal each pid, ignoring ones that have already exited."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


class Cluster:
    """Handle on the PostgreSQL server the tests talk to.

    Build one with :meth:`start_throwaway` (a private cluster this object owns
    and can break on purpose) or :meth:`external` (someone else's server:
    URL helpers only, fault methods skip the calling test).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        password: str | None,
        dbname: str,
        base_dir: Path | None,
        external_url: str | None = None,
    ) -> None:
        """Low-level constructor; use :meth:`start_throwaway` or :meth:`external`."""
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.dbname = dbname
        self._base_dir = base_dir
        self._external_url = external_url
        self._stopped_pids: list[int] = []
        self._destroyed = False

    # ------------------------------------------------------------------ build

    @classmethod
    def start_throwaway(cls) -> Cluster:
        """Create, initialise and start a private cluster on 127.0.0.1.

        Local (unix-socket) connections are trusted so the suite can always
        administer it; TCP connections require ``password`` (SCRAM), so tests
        can observe real authentication failures.  The cluster is also
        destroyed at interpreter exit as a last resort.
        """
        base = Path(tempfile.mkdtemp(prefix="pgtest-"))
        if _OS_OWNER is not None:
            shutil.chown(base, _OS_OWNER, _OS_OWNER)
        password = secrets.token_hex(16)
        cluster = cls(
            host="127.0.0.1",
            port=_free_port(),
            user=_SUPERUSER,
            password=password,
            dbname="postgres",
            base_dir=base,
        )
        atexit.register(cluster.destroy)
        try:
            pwfile = base / "pwfile"
            pwfile.write_text(password + "\n")
            pwfile.chmod(0o600)
            if _OS_OWNER is not None:
                shutil.chown(pwfile, _OS_OWNER, _OS_OWNER)
            cluster._run(
                [
                    _binary("initdb"),
                    "-D",
                    str(cluster._data_path),
                    "-U",
                    _SUPERUSER,
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            )
            pwfile.unlink()
            # The probed port can be taken before the server binds it.
            for attempt in range(3):
                try:
                    cluster._pg_ctl_start()
                    break
                except ClusterError:
                    if attempt == 2:
                        raise
                    cluster.port = _free_port()
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    @classmethod
    def external(cls, url: str) -> Cluster:
        """Wrap an existing server; it is never stopped, frozen or removed."""
        parts = urlsplit(url)
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or 5432,
            user=unquote(parts.username) if parts.username else _SUPERUSER,
            password=unquote(parts.password) if parts.password else None,
            dbname=unquote(parts.path.lstrip("/")) or "postgres",
            base_dir=None,
            external_url=url,
        )

    # ------------------------------------------------------------- addresses

    @property
    def controllable(self) -> bool:
        """Whether fault methods work (False for an external server)."""
        return self._external_url is None

    @property
    def data_dir(self) -> Path | None:
        """PGDATA of the throwaway cluster; None for an external server."""
        return None if self._base_dir is None else self._data_path

    @property
    def url(self) -> str:
        """URL of the maintenance database, password included."""
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        """Same server and credentials, different database."""
        if self._external_url is not None:
            parts = urlsplit(self._external_url)
            return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))
        auth = quote(self.user, safe="")
        if self.password is not None:
            auth += ":" + quote(self.password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    # ----------------------------------------------------------------- state

    @property
    def running(self) -> bool:
        """Whether the postmaster process is alive (it may still be hung).

        Not observable for an external server, so asking skips the test.
        """
        if not self.controllable:
            pytest.skip("needs the throwaway cluster")
        return self._postmaster_pid() is not None

    @property
    def hung(self) -> bool:
        """Whether :meth:`hang` froze the server and :meth:`resume` has not run."""
        return bool(self._stopped_pids)

    # ---------------------------------------------------------------- faults

    def start(self) -> None:
        """Bring the server up and wait until it accepts connections; no-op if up."""
        self._require_control()
        if self.hung:
            self.resume()
        if not self.running:
            self._pg_ctl_start()

    def stop(self) -> None:
        """Shut down cleanly (fast mode ends open sessions); no-op if down."""
        self._require_control()
        if self.hung:
            # A frozen postmaster cannot honour the shutdown request.
            self.resume()
        if self.running:
            self._pg_ctl_stop("fast")

    def restart(self) -> None:
        """Stop then start on the same port; every existing session is lost."""
        self.stop()
        self.start()

    def hang(self) -> None:
        """Freeze the postmaster and all its children with SIGSTOP.

        The kernel keeps completing TCP handshakes into the listen backlog, so
        clients connect but never get an answer: the "server is up but not
        responding" fault that only timeouts can detect.
        """
        self._require_control()
        pid = self._postmaster_pid()
        if pid is None:
            raise ClusterError("cannot hang a cluster that is not running")
        # Postmaster first, so it cannot fork new children behind our back.
        _signal([pid], signal.SIGSTOP)
        children = _descendants(pid)
        _signal(children, signal.SIGSTOP)
        self._stopped_pids = list(dict.fromkeys([*self._stopped_pids, pid, *children]))

    def hang_listener(self) -> None:
        """Freeze the postmaster alone (SIGSTOP): the sessions already open keep answering, while a new
        connection completes its TCP handshake and then gets no answer. Undone by :meth:`resume`."""
        self._require_control()
        pid = self._postmaster_pid()
        if pid is None:
            raise ClusterError("cannot hang a cluster that is not running")
        _signal([pid], signal.SIGSTOP)
        self._stopped_pids = list(dict.fromkeys([*self._stopped_pids, pid]))

    def resume(self) -> None:
        """Undo :meth:`hang`; guarantees no cluster process is left stopped."""
        self._require_control()
        self._resume()

    def ensure_running(self) -> None:
        """Return to the normal state (running, not hung) whatever a test did.

        A no-op for an external server, which is never broken on purpose.
        """
        if not self.controllable or self._destroyed:
            return
        self._resume()
        if self._postmaster_pid() is None:
            self._pg_ctl_start()

    def destroy(self) -> None:
        """Kill the throwaway cluster and delete its files; idempotent.

        For an external server this does nothing: it is not ours to remove.
        """
        if self._destroyed or self._base_dir is None:
            self._destroyed = True
            return
        self._destroyed = True
        atexit.unregister(self.destroy)
        try:
            with contextlib.suppress(ClusterError):
                self._resume()
            if self._postmaster_pid() is not None:
                try:
                    self._pg_ctl_stop("immediate")
                except ClusterError:
                    self._kill_everything()
        finally:
            shutil.rmtree(self._base_dir, ignore_errors=True)

    # ------------------------------------------------------------- SQL helpers

    def backend_count(self, application_name: str) -> int:
        """Server-side sessions with this application_name, excluding our own."""
        with self._admin_connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()",
                (application_name,),
            ).fetchone()
        assert row is not None
        count: int = row[0]
        return count

    def create_database(self, name: str) -> None:
        """CREATE DATABASE; the name is quoted as an identifier."""
        with self._admin_connection() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        """Drop even with clients still connected (WITH (FORCE)); missing is fine."""
        with self._admin_connection() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # --------------------------------------------------------------- private

    @property
    def _base(self) -> Path:
        assert self._base_dir is not None, "only the throwaway cluster has files"
        return self._base_dir

    @property
    def _data_path(self) -> Path:
        return self._base / "data"

    def _require_control(self) -> None:
        """Skip the calling test when the server is not ours to break."""
        if not self.controllable:
            pytest.skip("needs the throwaway cluster")
        if self._destroyed:
            raise ClusterError("cluster has been destroyed")

    @contextlib.contextmanager
    def _admin_connection(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """Superuser autocommit connection to the maintenance database."""
        if self._external_url is not None:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=ADMIN_CONNECT_TIMEOUT)
        else:
            # The unix socket is trusted, so this works even if a test changed
            # the password or exhausted TCP-side settings.
            conn = psycopg.connect(
                host=str(self._base_dir),
                port=self.port,
                user=self.user,
                dbname=self.dbname,
                autocommit=True,
                connect_timeout=ADMIN_CONNECT_TIMEOUT,
            )
        with conn:
            yield conn

    def _run(self, args: Sequence[str]) -> str:
        """Run a server tool as the cluster's OS owner, bounded by a timeout.

        Output goes to a file rather than a pipe: the postmaster launched by
        ``pg_ctl start`` could otherwise inherit the pipe and block us.
        """
        env = {k: v for k, v in os.environ.items() if k not in _PG_ENV_VARS}
        env["LC_ALL"] = "C"
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self._base_dir,
                    env=env,
                    timeout=SUBPROCESS_TIMEOUT,
                    user=_OS_OWNER,
                    group=_OS_OWNER,
                    extra_groups=[] if _OS_OWNER is not None else None,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise ClusterError(f"{args[0]} timed out after {SUBPROCESS_TIMEOUT}s{self._log_tail()}") from exc
            out.seek(0)
            output = out.read().decode(errors="replace")
        if proc.returncode != 0:
            raise ClusterError(f"{' '.join(args)} exited with {proc.returncode}:\n{output}{self._log_tail()}")
        return output

    def _log_tail(self) -> str:
        """Last lines of the server log, for error messages."""
        if self._base_dir is None:
            return ""
        try:
            lines = (self._base_dir / "log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\nserver log tail:\n" + "\n".join(lines[-20:])

    def _pg_ctl_start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {shlex.quote(str(self._base))}",
                "-c listen_addresses=127.0.0.1",
                "-c fsync=off",
                "-c max_connections=200",
            ]
        )
        self._run(
            [
                _binary("pg_ctl"),
                "-D",
                str(self._data_path),
                "-l",
                str(self._base / "log"),
                "-o",
                options,
                "-t",
                str(int(SUBPROCESS_TIMEOUT) - 5),
                "-w",
                "start",
            ]
        )

    def _pg_ctl_stop(self, mode: str) -> None:
        self._run(
            [
                _binary("pg_ctl"),
                "-D",
                str(self._data_path),
                "-m",
                mode,
                "-t",
                str(int(SUBPROCESS_TIMEOUT) - 5),
                "-w",
                "stop",
            ]
        )

    def _postmaster_pid(self) -> int | None:
        """Pid of a live postmaster for our data dir, from postmaster.pid."""
        if self._base_dir is None:
            return None
        try:
            first = (self._data_path / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError):
            return None
        info = _stat(pid)
        if info is None or info[0] == "Z":
            return None
        return pid

    def _resume(self) -> None:
        """SIGCONT until no postmaster/child is stopped (fresh pids included)."""
        for _ in range(100):
            pid = self._postmaster_pid()
            group = list(self._stopped_pids)
            if pid is not None:
                group = [pid, *group, *_descendants(pid)]
            _signal(group, signal.SIGCONT)
            if not any((_stat(p) or ("R", 0))[0] in "Tt" for p in group):
                break
            time.sleep(0.02)
        else:
            raise ClusterError("cluster processes stay stopped after SIGCONT")
        self._stopped_pids = []

    def _kill_everything(self) -> None:
        """Last resort when pg_ctl cannot stop the server."""
        pid = self._postmaster_pid()
        if pid is not None:
            _signal([pid, *_descendants(pid)], signal.SIGKILL)
