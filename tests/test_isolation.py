"""The suite ignores the developer's environment: their shell's variables and their `.env`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests that read settings in process, in a uvicorn subprocess, in `python -m db` and from a
# real cluster: each broke, or would break, when the developer's environment leaked in.
SENSITIVE = (
    "tests/test_server.py::test_unsafe_production_configuration_exits_with_one_message",
    "tests/test_server.py::test_development_logs_are_text_with_one_access_line_per_request",
    "tests/test_migrations.py::test_missing_or_invalid_database_url_is_a_configuration_error",
    "tests/test_health.py",
    "tests/test_settings.py",
)
# Values a developer could well have: a `.env` for production, a local database that answers
# nothing, libpq pointed elsewhere.
HOSTILE_DOTENV = (
    "ENVIRONMENT=production\nDEBUG=true\nSECRET_KEY=tiny\nLOG_LEVEL=nonsense\nDATABASE_POOL_SIZE=0\n"
    "DATABASE_URL=postgresql://app:app-password@127.0.0.1:1/app\n"
)
HOSTILE_SHELL = {
    "DATABASE_URL": "postgresql://dev:dev@127.0.0.1:1/dev",
    "SECRET_KEY": "isolation-" + "Gd5Nq8Wt2Lx6Zr1Vk4Hc" * 2,
    "ENVIRONMENT": "staging",
    "LOG_JSON": "true",
    "PGHOST": "/nonexistent",
    "PGPASSWORD": "wrong",
}
RUN_TIMEOUT = 300  # seconds: bounds a wedged run, far above a normal one


@pytest.mark.slow
def test_tests_pass_with_a_bad_dotenv_in_the_checkout_and_variables_exported(checkout: Path) -> None:
    """A copy of the checkout with a bad `.env` and service variables exported still passes its sensitive tests."""
    (checkout / ".env").write_text(HOSTILE_DOTENV)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_DOTENV_DISABLED"}
    env.update(HOSTILE_SHELL)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "addopts=", *SENSITIVE]
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
    assert "skipped" not in done.stdout
