"""Shared fixtures: one real PostgreSQL per session, one fresh database per test.

Set ``TEST_DATABASE_URL`` to run against an existing server instead of a
throwaway cluster; tests that need to break the server are then skipped.

The suite runs in a clean environment whatever the developer's shell and ``.env`` say: every
test passes the settings it means explicitly, so a ``DATABASE_URL`` exported for a local
server, or a ``.env`` copied from ``.env.example``, must never reach it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster
from service import ROOT, SERVER_COMMANDS, migrated

from settings import VARIABLES

# What the service reads besides its settings (prometheus-client's multiprocess directory), and
# libpq's variables, which would redirect or alter the tests' own connections.
_OTHER_SERVICE_VARIABLES = ("PROMETHEUS_MULTIPROC_DIR",)
_LIBPQ_PREFIX = "PG"


def pytest_configure(config: pytest.Config) -> None:
    """Leave the developer's service variables and `.env` out of the whole run, subprocesses included.

    A hook, not a fixture: collecting the tests imports app.py, whose `app = create_app()`
    reads the environment and `.env` before any fixture could run.
    """
    names = VARIABLES | set(_OTHER_SERVICE_VARIABLES)
    for name in list(os.environ):
        if name in names or name.startswith(_LIBPQ_PREFIX):
            del os.environ[name]
    os.environ["PYTHON_DOTENV_DISABLED"] = "1"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (``@pytest.mark.anyio``) run on asyncio, as the service does."""
    return "asyncio"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The session's server; a throwaway one is always torn down, even on failure."""
    external_url = os.environ.get("TEST_DATABASE_URL")
    instance = Cluster.external(external_url) if external_url else Cluster.start_throwaway()
    try:
        yield instance
    finally:
        instance.destroy()


@pytest.fixture
def database_url(cluster: Cluster) -> Iterator[str]:
    """URL of an empty database of its own, on a running, responsive server.

    Whatever fault an earlier test left behind (stopped, frozen) is undone
    first, and again afterwards so the drop can succeed.
    """
    cluster.ensure_running()
    name = f"test_{uuid.uuid4().hex}"
    cluster.create_database(name)
    try:
        yield cluster.url_for(name)
    finally:
        cluster.ensure_running()
        cluster.drop_database(name)


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """`database_url` with every migration applied: the foundation's and the reference resource's."""
    return migrated(database_url, ROOT / "examples" / "migrations")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the repository's files to change freely: no .git, virtualenv, caches or `.env`."""
    copy = tmp_path / "checkout"
    shutil.copytree(
        ROOT,
        copy,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".env", "__pycache__", ".*_cache", ".hypothesis", ".coverage*", "htmlcov"
        ),
    )
    return copy


@pytest.fixture(params=SERVER_COMMANDS)
def server_command(request: pytest.FixtureRequest) -> str:
    """Each end-to-end promise is checked under both commands: `uvicorn app:app` and `python -m app`."""
    command: str = request.param
    return command
