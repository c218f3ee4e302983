# The service image: `docker build -t service .` then
# `docker run --stop-timeout 30 -p 8000:8000 --env-file .env service`.
# Without access to Docker Hub: `bash .ci/build-image`, which builds this same file on a local
# stand-in for the base image (PYTHON_IMAGE, the only thing it changes).
# Two stages: pip installs the deploy lock (requirements.lock: every runtime package at its
# pinned version, each file checked against its recorded hash) into a virtualenv; the final
# image gets only that virtualenv and the service's files, and runs as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /app
COPY requirements.lock ./
# The virtualenv uses the image's own interpreter, which the final stage has too; pip compiles
# the packages' bytecode as it installs them (the runtime user cannot write it).
RUN python -m venv /app/.venv \
    && /app/.venv/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps \
        -r requirements.lock

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 service \
    && useradd --system --uid 10001 --gid service --no-create-home --home-dir /app service
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
COPY *.py ./
COPY migrations/ migrations/
COPY static/ static/
# The service's own bytecode too: each worker would otherwise compile every module at start-up.
RUN python -m compileall -q /app/*.py
# HOST and PORT are the server's address; `docker run -e PORT=...` moves it, health check included.
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOST=0.0.0.0 PORT=8000
USER 10001:10001
EXPOSE 8000
# No curl in a slim image: the interpreter is already there. Exit 0 only on a 200 from /health,
# asked where the server listens: HOST itself, or loopback when HOST is every address (0.0.0.0, ::).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; h = os.environ['HOST'].strip(); h = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); h = '[%s]' % h if ':' in h else h; sys.exit(u.urlopen('http://%s:%s/health' % (h, os.environ['PORT'].strip()), timeout=4).status != 200)"]
# The production server (PID 1, so it gets docker's SIGTERM itself): HOST:PORT from the
# environment, the edge limits, and the readiness drain. Its exit comes within
# SHUTDOWN_DRAIN_SECONDS (5 s) + in-flight requests' bound (DATABASE_HEALTH_CHECK_TIMEOUT, 10 s)
# + the pool's close (2 s): more than `docker stop`'s default 10 s when requests are in flight
# against a hung database, so run it with `--stop-timeout 30` (compose: `stop_grace_period: 30s`).
CMD ["python", "-m", "app"]
