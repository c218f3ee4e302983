"""The README's development server reloads when code, a migration or `.env` changes."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from service import ROOT, free_port, stop

# Exactly as the README writes it, after `uv run`.
RELOAD_COMMAND = "uvicorn app:app --reload --reload-include '*.sql' --reload-include .env"
RELOAD_TIMEOUT = 20  # seconds for a change to restart the worker and the worker to answer
STARTED = "Started server process"


def _wait_for(server: subprocess.Popen[bytes], log: Path, url: str, starts: int) -> None:
    """Until the log shows `starts` worker starts and /health answers 200."""
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()
        if log.read_text().count(STARTED) >= starts:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    pytest.fail(f"no worker start number {starts} within {RELOAD_TIMEOUT} s:\n{log.read_text()}")


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
        _wait_for(server, log, url, starts=1)
        edits = [
            checkout / "responses.py",
            next((checkout / "migrations").glob("*.sql")),
            checkout / ".env",
        ]
        for number, path in enumerate(edits, start=2):
            with path.open("a") as file:
                file.write("\n# edited\n" if path.suffix in (".py", "") else "\n-- edited\n")
            _wait_for(server, log, url, starts=number)
            assert f"detected changes in '{path.relative_to(checkout)}'" in log.read_text()
    finally:
        stop(server)
