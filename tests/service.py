"""Two ways to run the service in tests: in-process over ASGI, or as a real server process.

A real process runs either command an operator runs: `uvicorn app:app` (development) or
`python -m app` (production); end-to-end tests take `server_command` (conftest.py) to run both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send
from yoyo import get_backend, read_migrations

from app import create_app
from dsn import yoyo_url
from migrate import MIGRATIONS_DIR
from settings import VARIABLES, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
SERVER_COMMANDS = ("uvicorn app:app", "python -m app")


def pending(ids: Sequence[str]) -> str:
    """Readiness's error naming pending migrations, as `health.ReadinessEndpoint` writes it."""
    return f"{len(ids)} pending migration(s): {', '.join(ids)}"


def make_settings(**env: str) -> Settings:
    """Settings as the service would read them from these environment variables."""
    return load_settings(env)


@asynccontextmanager
async def serve(app: Starlette, root_path: str = "", timeout: float = 5) -> AsyncIterator[httpx.AsyncClient]:
    """A client for `app` with its lifespan run, as a server would run it (behind `root_path` if given)."""
    async with LifespanManager(_state_per_request(app), startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=timeout) as client:
            yield client


def _state_per_request(app: ASGIApp) -> ASGIApp:
    """`app` with each request's `scope["state"]` a copy of the lifespan's, as uvicorn hands it.

    asgi-lifespan hands every request the one dict, so a middleware's `request.state.user` would
    reach the next request in tests, never under a server.
    """

    async def copied(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            scope["state"] = scope["state"].copy()
        await app(scope, receive, send)

    return copied


@asynccontextmanager
async def serve_settings(**env: str) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(create_app(make_settings(**env))) as client:
        yield client


def migrated(database_url: str, *folders: Path) -> str:
    """`database_url` with the foundation's migrations applied, and those in `folders`; returned.

    A resource keeping its migrations in a folder of its own makes its fixture from this:
    `return migrated(database_url, ORDERS_MIGRATIONS)`.
    """
    with get_backend(yoyo_url(database_url)) as backend, backend.lock():
        backend.apply_migrations(backend.to_apply(read_migrations(str(MIGRATIONS_DIR), *map(str, folders))))
    return database_url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class UvicornProcess:
    """`uvicorn app:app` or `python -m app` in a clean environment: exactly what an operator runs.

    `args` are uvicorn's options (`command="uvicorn"`: an import string first), or `python -m app`'s
    (an import string); `python -m app` takes its port from `PORT`.
    `port` reuses a port (a replacement instance); by default a free one is picked.
    """

    def __init__(
        self, env: Mapping[str, str], *args: str, log_path: Path, command: str = "uvicorn app:app", port: int = 0
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = command
        clean = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARIABLES}
        if command == "uvicorn app:app":
            argv = [sys.executable, "-m", "uvicorn", "app:app", "--port", str(self.port), *args]
        elif command == "uvicorn":  # another app: `args` name it first
            argv = [sys.executable, "-m", "uvicorn", *args, "--port", str(self.port)]
        elif command == "python -m app":
            argv = [sys.executable, "-m", "app", *args]
            clean["PORT"] = str(self.port)
            clean["SHUTDOWN_DRAIN_SECONDS"] = "1"  # the drain runs in every test, shortened; `env` may change it
        else:
            raise ValueError(f"unknown server command {command!r} with options {args}")
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, cwd=ROOT, env={**clean, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"uvicorn did not answer within {timeout} s:\n{self.output()}")

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, as Kubernetes sends it; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL to the whole process group: workers of a killed supervisor must not outlive the test."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `timeout`: no test leaves a server behind."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@contextmanager
def running_uvicorn(env: Mapping[str, str], *args: str, command: str = "uvicorn app:app") -> Iterator[UvicornProcess]:
    """A ready server for the block, stopped with SIGTERM afterwards (killed if it will not stop)."""
    with tempfile.TemporaryDirectory(prefix="uvicorn-") as tmp:
        server = UvicornProcess(env, *args, log_path=Path(tmp) / "out.log", command=command)
        try:
            server.wait_ready()
            yield server
        finally:
            try:
                server.terminate()
            except subprocess.TimeoutExpired:
                server.kill()


_SERVICE_VARIABLES = VARIABLES  # a test's server reads only what the test gives it
