"""The real image, built from the Dockerfile and run by a real docker daemon on the host's network.

Built by `.ci/build-image` (a local stand-in base when Docker Hub is out of reach); every
container runs with `--network host`, bound to 127.0.0.1 on a free port: no bridge, no
address outside loopback. Skipped when no docker daemon answers (`.ci/run` starts one).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import psycopg
import pytest
from cluster import Cluster
from service import ROOT, free_port

TAG = "service:test"
BUILD_TIMEOUT = 1800  # seconds: a first build makes the base image from Debian's mirror
COMMAND_TIMEOUT = 120  # seconds: any other docker command
START_TIMEOUT = 60  # seconds to the first 200 from /health
# The image's HEALTHCHECK polls every 30 s; the test asks the same command for every second.
HEALTH_INTERVAL = "1s"
DRAIN_SECONDS = 2
STOP_GRACE = DRAIN_SECONDS + 15  # docker stop's wait before SIGKILL
MAX_IMAGE_BYTES = 400 * 1024 * 1024  # the stand-in base is ~240 MB; the official slim one is smaller
ARBITRARY_USER = ("--user", "1000680000:0", "--read-only")  # as OpenShift runs an image
DOCKER_STOP_GRACE = 10  # seconds: `docker stop`'s default wait before SIGKILL


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _docker_answers(), reason="no docker daemon reachable (.ci/run starts one)"),
]


def docker(*args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    """The image of this checkout, built as CI and air-gapped users build it."""
    done = subprocess.run(
        ["bash", str(ROOT / ".ci" / "build-image"), TAG],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return TAG


class Container:
    def __init__(self, name: str, port: int, host: str = "127.0.0.1") -> None:
        self.name = name
        self.url = f"http://{host}:{port}"

    def inspect(self, template: str) -> str:
        return docker("inspect", "--format", template, self.name).stdout.strip()

    def logs(self) -> str:
        done = docker("logs", self.name)
        return done.stdout + done.stderr


@contextmanager
def running(image: str, *env: str, host: str = "127.0.0.1") -> Iterator[Container]:
    """The image's own command on `host`:<free port>, answering /health; removed afterwards."""
    port = free_port()
    container = Container(f"service-test-{uuid.uuid4().hex[:12]}", port, host)
    environment = [f"HOST={host}", f"PORT={port}", f"SHUTDOWN_DRAIN_SECONDS={DRAIN_SECONDS}", *env]
    run = ["run", "--detach", "--name", container.name, "--network", "host", "--health-interval", HEALTH_INTERVAL]
    started = docker(*run, *(arg for value in environment for arg in ("--env", value)), image)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if httpx.get(f"{container.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert container.inspect("{{.State.Running}}") == "true", container.logs()
            assert time.monotonic() < deadline, f"no 200 from /health within {START_TIMEOUT} s:\n{container.logs()}"
            time.sleep(0.2)
        yield container
    finally:
        docker("rm", "--force", container.name)


# 127.0.0.2 is loopback too: the check once asked 127.0.0.1 whatever HOST said, and failed there.
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2"])
def test_image_serves_health_as_a_non_root_user_and_its_health_check_passes(image: str, host: str) -> None:
    """/health is 200 on HOST:PORT, the server (PID 1) is not root, and HEALTHCHECK turns healthy."""
    with running(image, host=host) as container:
        body = httpx.get(f"{container.url}/health", timeout=5).json()
        assert body["status"] == "healthy"
        status = docker("exec", container.name, "cat", "/proc/1/status").stdout
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert uids == ["10001"] * 4, status  # real, effective, saved and filesystem: the USER of the image
        deadline = time.monotonic() + 30
        while (health := container.inspect("{{.State.Health.Status}}")) != "healthy":
            assert health == "starting", container.inspect("{{json .State.Health}}")
            assert time.monotonic() < deadline, "HEALTHCHECK never passed"
            time.sleep(0.5)


def test_docker_stop_ends_the_server_cleanly_within_the_drain(image: str) -> None:
    """`docker stop` returns before its SIGKILL deadline and the server exits with status 0."""
    with running(image) as container:
        started = time.monotonic()
        stopped = docker("stop", "--time", str(STOP_GRACE), container.name)
        elapsed = time.monotonic() - started
        assert stopped.returncode == 0, stopped.stderr
        assert elapsed < STOP_GRACE, f"took {elapsed:.1f} s: docker had to SIGKILL it"
        state = json.loads(container.inspect("{{json .State}}"))
        # uvicorn re-raises SIGTERM after a graceful shutdown, but as PID 1 without a handler left
        # the kernel ignores it: a clean stop is status 0 in a container.
        assert state["ExitCode"] == 0, container.logs()
        assert not state["OOMKilled"]
        assert "Application shutdown complete" in container.logs()


def test_docker_stop_default_grace_is_enough_while_the_database_hangs(
    image: str, cluster: Cluster, database_url: str
) -> None:
    """With a pooled connection to a frozen database and the default drain, a plain `docker stop`
    (10 s) sees a clean exit: closing the pool does not wait out the hung server."""
    with running(image, f"DATABASE_URL={database_url}", "SHUTDOWN_DRAIN_SECONDS=5") as container:
        assert httpx.get(f"{container.url}/health/db", timeout=10).status_code == 200  # a pooled connection
        cluster.hang()
        try:
            started = time.monotonic()
            stopped = docker("stop", container.name)
            elapsed = time.monotonic() - started
        finally:
            cluster.resume()
        assert stopped.returncode == 0, stopped.stderr
        state = json.loads(container.inspect("{{json .State}}"))
        assert state["ExitCode"] == 0, f"exit {state['ExitCode']} after {elapsed:.1f} s:\n{container.logs()}"
        assert elapsed < DOCKER_STOP_GRACE


def test_workers_without_a_writable_tmp_stop_with_one_line_saying_so(image: str) -> None:
    """WEB_CONCURRENCY=2 on a read-only root without a tmpfs: exit 3 and one line naming the fix, no traceback."""
    environment = ["HOST=127.0.0.1", f"PORT={free_port()}", "WEB_CONCURRENCY=2"]
    done = docker("run", "--rm", "--network", "host", *ARBITRARY_USER,
                  *(arg for value in environment for arg in ("--env", value)), image)  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    assert "mount a tmpfs or an emptyDir at /tmp" in done.stderr
    assert "Traceback" not in done.stderr


def test_migrate_runs_inside_the_image_against_a_database_on_loopback(image: str, database_url: str) -> None:
    """`python -m db migrate` in the image migrates a database on the host's loopback; `status --check` agrees.

    As OpenShift runs images: an arbitrary UID that /etc/passwd does not list, a read-only root filesystem.
    """
    command = ["run", "--rm", "--network", "host", *ARBITRARY_USER, "--env", f"DATABASE_URL={database_url}", image]
    command += ["python", "-m", "db"]
    migrated = docker(*command, "migrate")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    checked = docker(*command, "status", "--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with psycopg.connect(database_url) as connection:  # the first migration's function, from the host
        version = connection.execute("SELECT substr(uuid_generate_v7()::text, 15, 1)").fetchone()
    assert version == ("7",)


def test_image_is_of_a_reasonable_size(image: str) -> None:
    """The image stays small: the runtime virtualenv and the service, no build tools."""
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    assert 0 < size < MAX_IMAGE_BYTES, f"{size / 1e6:.0f} MB"
    listing = docker("run", "--rm", "--network", "host", image, "sh", "-c", "ls /app/.venv/bin; command -v uv || true")
    assert "uvicorn" in listing.stdout
    assert "pytest" not in listing.stdout
    assert "/uv" not in listing.stdout
