"""Shared fixtures: one real PostgreSQL per session, one fresh database per test.

Set ``TEST_DATABASE_URL`` to run against an existing server instead of a
throwaway cluster; tests that need to break the server are then skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from cluster import Cluster
from service import SERVER_COMMANDS


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


@pytest.fixture(params=SERVER_COMMANDS)
def server_command(request: pytest.FixtureRequest) -> str:
    """Each end-to-end promise is checked under both commands: `uvicorn app:app` and `python -m app`."""
    command: str = request.param
    return command
