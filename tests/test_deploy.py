"""The container and Kubernetes files agree with the app: paths, ports, command and health check."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import msgspec
import pytest
import yaml
from dotenv import dotenv_values
from service import ROOT, free_port

from app import create_app
from db import CLOSE_TIMEOUT
from logstream import DRAIN_LIMIT
from settings import load_settings

DOCKERFILE = ROOT / "Dockerfile"
MANIFEST = ROOT / "deploy" / "kubernetes.yaml"
# The oldest Kubernetes the README promises the manifest works on; also checked against the newest
# schemas kubernetes-validate ships. Its schemas are files inside the package: no network.
OLDEST_KUBERNETES = "1.25"
NEWEST_KUBERNETES = ".".join(kubernetes_validate.latest_version().split(".")[:2])
PRODUCTION = {
    "ENVIRONMENT": "production",
    "DATABASE_URL": "postgresql://u:p-123456@127.0.0.1:1/db",
    "SECRET_KEY": "deploy-" + "Vq3Lx8Tz1Nw5Rb7Kc2Hm6" * 2,
}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each Dockerfile line, continuations joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _args(kind: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == kind]


def _exec_form(args: str) -> list[str]:
    command: list[str] = msgspec.json.decode(args)
    return command


def _env() -> dict[str, str]:
    """The image's ENV values, except those built from another variable ($PATH)."""
    return dict(kv.split("=", 1) for args in _args("ENV") for kv in shlex.split(args) if "$" not in kv)


def _serves_host_and_port_from_the_environment(command: list[str]) -> bool:
    """`python -m app` reads HOST and PORT itself; a shell form must pass both to uvicorn and exec it."""
    if command == ["python", "-m", "app"]:
        return True
    script = command[2] if command[:2] == ["sh", "-c"] else ""
    return script.startswith("exec uvicorn app:app ") and '--host "$HOST"' in script and '--port "$PORT"' in script


def _deployment() -> dict[str, Any]:
    documents = list(yaml.safe_load_all(MANIFEST.read_text()))
    deployment: dict[str, Any] = next(d for d in documents if d["kind"] == "Deployment")
    return deployment


def test_dockerfile_copies_only_files_that_exist_and_the_context_keeps() -> None:
    """Each COPY source matches a file in the repository and is let through by .dockerignore."""
    kept = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    sources = [s for args in _args("COPY") if not args.startswith("--from") for s in args.split()[:-1]]
    assert sources
    for source in sources:
        assert list(ROOT.glob(source.rstrip("/"))), f"COPY {source}: nothing matches"
        assert source in kept, f"COPY {source}: excluded by .dockerignore"
    assert set(ROOT.glob("*.py")) >= {ROOT / "app.py", ROOT / "metrics.py", ROOT / "openapi.py"}


def test_dockerignore_keeps_env_files_and_caches_out_of_the_folders_it_admits() -> None:
    """A stray `.env` or `__pycache__` inside `migrations/` or `static/` never reaches the image:
    those patterns come after every `!` line, and in .dockerignore the last matching line wins."""
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    last_admitted = max(i for i, line in enumerate(lines) if line.startswith("!"))
    after = set(lines[last_admitted + 1 :])
    assert {"**/.env", "**/__pycache__", "**/*.pyc"} <= after


def test_dockerfile_runs_the_app_as_a_non_root_user_with_a_python_health_check() -> None:
    """Slim base, dev tools left out, the app on HOST:PORT as a non-root user, no curl anywhere."""
    assert all("slim" in args for args in _args("ARG") if args.startswith("PYTHON_IMAGE="))
    install = next(args for args in _args("RUN") if "requirements.lock" in args)
    assert "--require-hashes" in install  # the deploy lock, every file checked against its hash
    user = _args("USER")[-1]
    assert user.split(":")[0] not in ("0", "root")
    assert _serves_host_and_port_from_the_environment(_exec_form(_args("CMD")[-1]))
    assert (_env()["HOST"], _env()["PORT"]) == ("0.0.0.0", "8000")  # noqa: S104 - every interface of the container
    healthcheck = _args("HEALTHCHECK")[-1]
    assert _exec_form(healthcheck.split("CMD", 1)[1])[0] == "python"
    assert "/health'" in healthcheck
    assert "os.environ['PORT']" in healthcheck  # follows the server when PORT moves it
    commands = " ".join(args for _, args in instructions())
    assert "curl" not in commands
    assert "wget" not in commands


@pytest.mark.slow
def test_dockerfile_command_and_health_check_work_from_a_clean_install(tmp_path: Path) -> None:
    """The build stage's install of the deploy lock in an empty directory, then CMD serves and HEALTHCHECK passes."""
    for args in _args("COPY"):
        if not args.startswith("--from"):
            for source in args.split()[:-1]:
                for path in ROOT.glob(source.rstrip("/")):
                    copy = shutil.copytree if path.is_dir() else shutil.copy
                    copy(path, tmp_path / path.name)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}  # keep pip's index and TLS settings
    env.update(_env())
    install = next(args for args in _args("RUN") if "requirements.lock" in args)
    # Into this directory's virtualenv, with pip's cache (the image's --no-cache-dir would download every time).
    install = install.replace("/app/.venv", str(tmp_path / ".venv")).replace("--no-cache-dir ", "")
    shutil.copy(ROOT / "requirements.lock", tmp_path)
    done = subprocess.run(["sh", "-c", install], cwd=tmp_path, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    command = _exec_form(_args("CMD")[-1])
    check = _exec_form(_args("HEALTHCHECK")[-1].split("CMD", 1)[1])
    env["PATH"] = f"{tmp_path / '.venv' / 'bin'}:{env['PATH']}"
    # As `docker run --network host -e HOST=...` would: the check asks where HOST says (it once asked
    # 127.0.0.1 whatever HOST was), an IPv6 address in brackets, spaces around it ignored as the server does.
    for host in ("127.0.0.1", " 127.0.0.2 ", "::1"):
        env.update(HOST=host, PORT=str(free_port()))
        server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                if subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, timeout=10).returncode == 0:
                    break
                assert server.poll() is None, "the container's command exited"
                subprocess.run(["sleep", "0.1"], check=True)
            else:
                pytest.fail(f"HEALTHCHECK never passed with HOST={host}")
        finally:
            server.terminate()
            assert server.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean stop


@pytest.mark.anyio
async def test_kubernetes_probes_hit_real_routes_on_the_container_port() -> None:
    """Every probe path answers GET in a production app, and every probe port is the container's port."""
    deployment = _deployment()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    assert _env()["PORT"] == "8000"
    assert _args("EXPOSE") == ["8000"]
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/health"
    assert probes["readinessProbe"]["path"] == "/health/db"
    app = create_app(load_settings(PRODUCTION))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://k8s") as client:
        for probe in probes.values():
            assert probe["port"] in ports or probe["port"] in ports.values()
            response = await client.get(probe["path"])
            assert response.status_code not in (404, 405), probe
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == 8000
    assert any(getattr(route, "path", None) == annotations["prometheus.io/path"] for route in app.routes)


def test_kubernetes_runs_the_production_server_and_reads_settings_from_a_secret() -> None:
    """`python -m app` drains within the grace period; settings come from a Secret; resources are set."""
    deployment = _deployment()
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "app"]
    assert "lifecycle" not in container  # the server's own drain replaces a preStop sleep
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HOST"] == "0.0.0.0"  # noqa: S104 - the container must listen beyond its loopback
    assert int(env["PORT"]) == 8000
    readiness_timeout = container["readinessProbe"]["timeoutSeconds"]
    drain = float(env["SHUTDOWN_DRAIN_SECONDS"])
    # The in-flight bound is DATABASE_HEALTH_CHECK_TIMEOUT, under the readiness probe's timeout; a log
    # stream that drains slowly is waited for by each worker, then by the supervisor.
    assert drain + readiness_timeout + CLOSE_TIMEOUT + 2 * DRAIN_LIMIT < pod["terminationGracePeriodSeconds"]
    assert pod["automountServiceAccountToken"] is False  # the service never calls the Kubernetes API
    assert readiness_timeout > 10  # longer than DATABASE_HEALTH_CHECK_TIMEOUT's default
    assert container["envFrom"] == [{"secretRef": {"name": "service-settings"}}]
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    assert pod["securityContext"]["runAsUser"] == int(_args("USER")[-1].split(":")[0])
    service = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d["kind"] == "Service")
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
def test_kubernetes_manifest_is_valid_for_the_oldest_and_newest_supported_versions(version: str) -> None:
    """Every document passes Kubernetes' own schema for that version, strictly: no unknown or misplaced field."""
    documents = list(yaml.safe_load_all(MANIFEST.read_text()))
    assert {d["kind"] for d in documents} == {"Deployment", "Service"}
    for document in documents:
        assert kubernetes_validate.validate(document, version, strict=True) == version


def test_kubernetes_schema_check_catches_a_misspelt_probe_field() -> None:
    """The same check fails on a manifest with one typo, so a pass above means something."""
    deployment = _deployment()
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    probe["httpGet"]["prot"] = probe["httpGet"].pop("port")
    with pytest.raises(kubernetes_validate.ValidationError, match="prot"):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)


def test_env_example_leaves_the_images_address_alone() -> None:
    """`docker run --env-file .env` with a copy of `.env.example` keeps the image's HOST=0.0.0.0."""
    values = dotenv_values(ROOT / ".env.example")
    assert "HOST" not in values
    assert values.get("PORT", _env()["PORT"]) == _env()["PORT"]
