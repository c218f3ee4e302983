"""The docs pages render in a real browser that can reach no host but the service."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import pytest
from service import running_uvicorn

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Every other host is unreachable: names do not resolve, and anything else (an IP literal)
# goes to a proxy that refuses; Chromium never proxies loopback, so only the service answers.
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9"]
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--virtual-time-budget=10000"]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
]


CONSOLE = ["--enable-logging=stderr", "--log-level=0"]
_BLOCKED = re.compile(r"Loading the \w+ '([^']+)' violates the following Content Security Policy")


def rendered_dom(url: str) -> str:
    """The DOM after the page's scripts ran, as headless Chromium with a fresh profile saw it.

    Whatever the page's Content-Security-Policy refused must be on another host: the policy
    may block the vendored bundles' outside calls, never the page's own assets.
    """
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [CHROMIUM, *HEADLESS, *OFFLINE, *CONSOLE, f"--user-data-dir={profile}", "--dump-dom", url]
        done = subprocess.run(command, capture_output=True, timeout=120, check=True)
    local = url.split("/", 3)[2]
    for line in done.stderr.decode(errors="replace").splitlines():
        if "Content Security Policy" in line:
            blocked = _BLOCKED.search(line)
            assert blocked is not None, line  # e.g. the inline script itself refused
            assert local not in blocked.group(1), line
    return done.stdout.decode()


def test_swagger_ui_renders_the_health_operations_offline() -> None:
    """/docs, loaded with no CDN reachable, shows an operation block for each health route."""
    with running_uvicorn({"ENABLE_DOCS": "true"}) as server:
        dom = rendered_dom(f"{server.url}/docs")
    paths = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))
    assert {"/health", "/health/db", "/"} <= paths
    assert "Liveness" in dom
    assert "Readiness" in dom


def test_redoc_renders_the_health_operations_offline() -> None:
    """/redoc, loaded with no CDN reachable, renders a section for each health operation."""
    with running_uvicorn({"ENABLE_DOCS": "true"}) as server:
        dom = rendered_dom(f"{server.url}/redoc")
    operations = set(re.findall(r'id="operation/([a-z_]+)"', dom))
    assert {"health", "health_db", "root"} <= operations
