"""The ceiling served as `python -m app` serves: `baseline:app` behind `server.DrainingServer`.

`python -m app` is uvicorn with a protocol of our own (`edge.EdgeProtocol`), which writes each
response whole. Next to the uvicorn ceiling, this one shows how much of `python -m app`'s speed
is its server's and how close its app comes to the bare callable on that same server.

    DATABASE_URL=postgresql://... ENVIRONMENT=production SECRET_KEY=... PORT=8000 python bench/edge_baseline.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, beside bench/

from baseline import app

from server import DrainingServer, EdgeConfig
from settings import load_settings_or_exit, read_environment

if __name__ == "__main__":
    DrainingServer(EdgeConfig(app, load_settings_or_exit(read_environment()))).run()
