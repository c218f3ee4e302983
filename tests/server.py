"""The service as operators run it: `uvicorn app:app` in a real process, on a free local port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0  # seconds for uvicorn to import the app and answer /health
STOP_TIMEOUT = 30.0  # seconds for a graceful shutdown after SIGTERM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A running uvicorn; `stop()` sends SIGTERM and returns the exit status."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(STOP_TIMEOUT)


@contextmanager
def serve(environ: Mapping[str, str], *args: str) -> Iterator[Server]:
    """Run `python -m uvicorn app:app *args` with exactly `environ` (plus PATH); always stopped."""
    port = free_port()
    env = {"PATH": os.environ["PATH"], "LOG_LEVEL": "WARNING", **environ}
    with tempfile.TemporaryDirectory(prefix="uvicorn-") as tmp:
        log = Path(tmp) / "server.log"
        with log.open("wb") as out:
            command = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port), *args]
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        server = Server(process, port, log)
        try:
            _wait_until_serving(server)
            yield server
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _wait_until_serving(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {server.process.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"uvicorn did not answer /health within {START_TIMEOUT:g}s:\n{server.output()}")
