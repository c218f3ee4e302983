"""The README's development server reloads when code, a migration or `.env` changes."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from service import ROOT, free_port, stop

# Exactly as the README writes it, after `uv run`.
RELOAD_COMMAND = "uvicorn app:app --reload --reload-include '*.sql' --reload-include .env"
RELOAD_TIMEOUT = 20  # seconds for a change to restart the worker and the worker to answer
STARTED = "Started server process"


def _wait_for(server: subprocess.Popen[bytes], log: Path, url: str, ready: Callable[[str], bool]) -> None:
    """Until the log is `ready` and /health answers 200."""
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()
        if ready(log.read_text()):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    pytest.fail(f"not ready within {RELOAD_TIMEOUT} s:\n{log.read_text()}")


def _reloaded_by(path: Path, checkout: Path) -> Callable[[str], bool]:
    """Whether a log shows a change to `path` detected and a worker started after it. The reloader
    starts watching only after its first worker is up, which nothing tells: so each look at a log
    that shows no such change yet edits `path` again, at most every 2 s (an edit made before the
    watching began is never seen)."""
    detected = f"detected changes in '{path.relative_to(checkout)}'"
    next_edit = 0.0

    def ready(text: str) -> bool:
        nonlocal next_edit
        if detected in text:
            return STARTED in text.rpartition(detected)[2]
        if time.monotonic() >= next_edit:
            with path.open("a") as file:
                file.write("\n# edited\n" if path.suffix in (".py", "") else "\n-- edited\n")
            next_edit = time.monotonic() + 2
        return False

    return ready


def test_readme_documents_the_reload_command() -> None:
    """The command tested here is the one the README gives."""
    assert f"uv run {RELOAD_COMMAND}" in (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_reload_restarts_the_worker_on_python_sql_and_dotenv_changes(checkout: Path) -> None:
    """Editing a module, a migration and `.env` each starts a new worker that serves again."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = checkout / "reload.log"
    command = [sys.executable, "-m", *shlex.split(RELOAD_COMMAND), "--port", str(port)]
    with log.open("wb") as out:
        server = subprocess.Popen(command, cwd=checkout, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(server, log, url, lambda text: STARTED in text)
        edits = [
            checkout / "responses.py",
            next((checkout / "migrations").glob("*.sql")),
            checkout / ".env",
        ]
        for path in edits:
            _wait_for(server, log, url, _reloaded_by(path, checkout))
    finally:
        stop(server)
