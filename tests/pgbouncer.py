"""A real PgBouncer in transaction-pooling mode in front of the test cluster.

Transaction pooling is what lets many replicas share one database: a server connection
belongs to a client only for one transaction. It is also what breaks named prepared
statements, so the tests run the service through it rather than trusting the settings table.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from cluster import Cluster
from service import free_port

BINARY = shutil.which("pgbouncer") or next((p for p in ("/usr/sbin/pgbouncer",) if Path(p).exists()), None)
START_TIMEOUT = 15.0
# PgBouncer refuses to run as root; as root, it runs as the account that owns the cluster.
_OS_USER = "postgres" if os.geteuid() == 0 else None


class PgBouncer:
    def __init__(self, cluster: Cluster, port: int) -> None:
        self.cluster = cluster
        self.port = port

    def url_for(self, dbname: str) -> str:
        """The cluster's credentials, PgBouncer's address."""
        password = quote(self.cluster.password or "", safe="")
        return f"postgresql://{quote(self.cluster.user, safe='')}:{password}@127.0.0.1:{self.port}/{dbname}"


def _config(cluster: Cluster, port: int, directory: Path, server_connections: int) -> str:
    return f"""\
[databases]
* = host={cluster.host} port={cluster.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {directory}/userlist.txt
pool_mode = transaction
default_pool_size = {server_connections}
max_client_conn = 500
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
"""


@contextmanager
def running_pgbouncer(cluster: Cluster, *, server_connections: int = 2) -> Iterator[PgBouncer]:
    """PgBouncer on a free port, pooling each database onto `server_connections` server connections.

    Clients authenticate with the cluster's own user and password (SCRAM), and PgBouncer logs
    in to PostgreSQL with the same plaintext secret from its auth file.
    """
    assert BINARY is not None
    with tempfile.TemporaryDirectory(prefix="pgbouncer-") as tmp:
        directory = Path(tmp)
        port = free_port()
        (directory / "userlist.txt").write_text(f'"{cluster.user}" "{cluster.password}"\n')
        (directory / "pgbouncer.ini").write_text(_config(cluster, port, directory, server_connections))
        if _OS_USER is not None:
            for path in (directory, *directory.iterdir()):
                shutil.chown(path, _OS_USER, _OS_USER)
        process = subprocess.Popen(
            [BINARY, str(directory / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=_OS_USER,
            group=_OS_USER,
            extra_groups=[] if _OS_USER is not None else None,
        )
        try:
            _wait_for_port(port, process, directory / "pgbouncer.log")
            yield PgBouncer(cluster, port)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"pgbouncer exited with {process.returncode}:\n{text}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"pgbouncer did not listen on {port} within {START_TIMEOUT:g}s")
