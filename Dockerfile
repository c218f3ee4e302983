# The service image: `docker build -t service .` then `docker run -p 8000:8000 --env-file .env service`.
# Without access to Docker Hub: `bash .ci/build-image`, which builds this same file on a local
# stand-in for the base image (PYTHON_IMAGE, the only thing it changes).
# Two stages: uv resolves and installs the runtime dependencies (exactly the versions pinned in
# pyproject.toml's constraint-dependencies) into a virtualenv; the final image gets only that
# virtualenv and the service's files, and runs as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN pip install --no-cache-dir uv==0.13.9
# Bytecode compiled at build time (the runtime user cannot write it); no Python downloads:
# the virtualenv must use the image's own interpreter, which the final stage has too.
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /app
COPY pyproject.toml ./
RUN uv sync --no-dev --no-install-project --no-cache

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 service \
    && useradd --system --uid 10001 --gid service --no-create-home --home-dir /app service
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
COPY *.py ./
COPY migrations/ migrations/
COPY static/ static/
# HOST and PORT are the server's address; `docker run -e PORT=...` moves it, health check included.
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOST=0.0.0.0 PORT=8000
USER 10001:10001
EXPOSE 8000
# No curl in a slim image: the interpreter is already there. Exit 0 only on a 200 from /health.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:%s/health' % os.environ['PORT'], timeout=4).status != 200)"]
# The production server (PID 1, so it gets docker's SIGTERM itself): HOST:PORT from the
# environment, the edge limits, and the readiness drain (SHUTDOWN_DRAIN_SECONDS, within
# `docker stop`'s default 10 s grace).
CMD ["python", "-m", "app"]
