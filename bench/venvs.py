"""The peers' throwaway virtual environments: one per framework, built once and cached.

Each peer (`bench/peers/<name>_app.py`) runs from its own environment under `bench/results/venvs/`
(git-ignored), made with `uv venv` and `uv pip install` from the pins in
`bench/peers/requirements.txt`, so no peer's dependencies ever touch the project's. An
environment is reused while its pins are unchanged; delete the folder to rebuild them all.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from servers import ROOT

PEERS_DIR = ROOT / "bench" / "peers"
VENVS = ROOT / "bench" / "results" / "venvs"


def peer_pins() -> dict[str, list[str]]:
    """Each peer's requirements: its framework's pins plus the common server and driver."""
    lines = (PEERS_DIR / "requirements.txt").read_text().splitlines()
    entries = dict(line.split(":", 1) for line in lines if line.strip() and not line.startswith("#"))
    common = entries.pop("common").split()
    return {name: [*pins.split(), *common] for name, pins in entries.items()}


def peer_python(name: str, pins: list[str]) -> Path:
    """The Python of `name`'s environment, built first if its pins changed or it is missing."""
    digest = hashlib.sha256("\n".join([sys.version, *pins]).encode()).hexdigest()[:12]
    venv = VENVS / f"{name}-{digest}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        print(f"peers: building {venv.relative_to(ROOT)} ({' '.join(pins)})", file=sys.stderr, flush=True)
        subprocess.run(["uv", "venv", "--quiet", "--clear", "--python", sys.executable, str(venv)], check=True)
        subprocess.run(["uv", "pip", "install", "--quiet", "--python", str(python), *pins], check=True)
        (venv / ".complete").touch()
    return python
