"""The benchmark's servers and database: started fresh, pinned, timed, measured, stopped."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psycopg
from yoyo import get_backend, read_migrations

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from cluster import Cluster  # noqa: E402 - the test suite's throwaway cluster, importable once tests/ is on the path

SERVER_CORE = "0"  # wrk gets the other one
DATABASE = "bench"
START_TIMEOUT = 30.0  # seconds from spawn to the first 200 before the server counts as broken
STOP_TIMEOUT = 20.0  # seconds for a graceful shutdown before SIGKILL


class Server:
    """A command that serves HTTP on `{port}`; started fresh for every round."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cores: str = SERVER_CORE) -> None:
        self.name, self.argv, self.env, self.cores = name, argv, env, cores


class Running:
    """A started server: its process group, its start-up time, its memory."""

    def __init__(self, server: Server, log: Path) -> None:
        self.port = _free_port()
        argv = ["taskset", "-c", server.cores, *(arg.replace("{port}", str(self.port)) for arg in server.argv)]
        env = {**server.env, "PORT": str(self.port)}
        self.log = log.open("wb")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.startup_ms = self._wait_for_200(started)

    def _wait_for_200(self, started: float) -> float:
        while time.perf_counter() - started < START_TIMEOUT:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log.name}")
            with suppress(OSError, http.client.HTTPException):
                if self.get("/health")[0] == 200:
                    return (time.perf_counter() - started) * 1000
            time.sleep(0.005)
        raise RuntimeError(f"no 200 from /health within {START_TIMEOUT:g}s; see {self.log.name}")

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def rss_mib(self) -> float:
        """Resident memory of the server and its children (a wrapper like `uv run` included)."""
        kib = 0
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            with suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        kib += int(line.split()[1])
        return kib / 1024

    def stop(self) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        with suppress(OSError, IndexError, ValueError):
            if entry.name.isdigit():
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


class Postgres:
    """The throwaway cluster with the migrations applied and `log_connections` on."""

    def __init__(self) -> None:
        self.cluster = Cluster.start_throwaway()
        self.cluster.create_database(DATABASE)
        self.url = self.cluster.url_for(DATABASE)
        with psycopg.connect(self.cluster.url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET log_connections = on")
            conn.execute("SELECT pg_reload_conf()")
        backend = get_backend(self.url.replace("postgresql://", "postgresql+psycopg://", 1))
        with backend.lock():
            sources = (str(ROOT / "migrations"), str(ROOT / "examples" / "migrations"))  # the reference resource's too
            backend.apply_migrations(backend.to_apply(read_migrations(*sources)))
        assert self.cluster.data_dir is not None
        self.log = self.cluster.data_dir.parent / "log"

    @contextmanager
    def counting_connections(self) -> Iterator[Callable[[], int]]:
        """Counts backends authorised for the bench database while the block runs."""
        start = self.log.stat().st_size
        marker = f"connection authorized: user={self.cluster.user} database={DATABASE} "
        yield lambda: sum(marker in line + " " for line in _read_from(self.log, start).splitlines())

    def destroy(self) -> None:
        self.cluster.destroy()


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace")
