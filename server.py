"""The production server, `python -m app`: uvicorn with every connection bounded, and a drain.

- `edge.EdgeProtocol` serves each connection: request heads bounded in size, and a response
  with a `Content-Length` written in one piece.
- `DrainingServer` is uvicorn's server that, every half second, closes connections still
  without a complete head `REQUEST_HEAD_TIMEOUT` after they opened (or after their previous
  response), or whose request body the app waits for and no byte of it has come for as long;
  and that drains on SIGTERM: readiness answers 503 for `SHUTDOWN_DRAIN_SECONDS`
  while everything is still served, then the usual graceful shutdown. A second signal ends
  the drain at once (a worker counts a signal to its process group once, though it arrives
  both directly and relayed by the supervisor). It exits 0 rather than re-raising the signal.
- `WEB_CONCURRENCY` > 1: `workers.supervise` runs one `DrainingServer` per worker process.

The request hot path pays only a few attribute updates per request; the head timeout and
uvicorn's keep-alive timeout cost one sweep of the open connections per half second, not a
timer per request.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from edge import EdgeProtocol
from envfile import read_environment
from logs import configure_logging
from settings import Settings, load_settings_or_exit
from workers import Repeats, supervise

logger = logging.getLogger("service.server")
FOUNDATION = "app:app"  # what `python -m app` serves when not told otherwise
SWEEP_TICKS = 5  # uvicorn ticks every 0.1 s: slow heads and idle connections are looked for every 0.5 s


class EdgeConfig(uvicorn.Config):
    """uvicorn's configuration plus the edge settings; picklable, so workers get it too."""

    def __init__(self, app: ASGIApp | str, settings: Settings) -> None:
        super().__init__(
            app,
            host=settings.host,
            port=settings.port,
            http=EdgeProtocol,
            lifespan="on",
            log_config=None,  # logs.configure_logging owns every handler and format
            access_log=False,  # the app writes its own access line, with the request ID
            server_header=False,  # no `server: uvicorn` on every response: it tells scanners what to try
            # After the drain, requests still in flight get as long as a /health/db probe may take
            # (rounded up: uvicorn counts whole seconds), so a probe of a hung database still
            # answers, as the contract promises; then they are cancelled, so a client that never
            # finishes sending its request cannot hold the exit back. The exit comes within
            # SHUTDOWN_DRAIN_SECONDS + this + the pool's close (db.CLOSE_TIMEOUT, 2 s): 22 s with
            # deploy/kubernetes.yaml's settings (and the log stream's wait at exit, README's
            # Shutdown), inside its 45 s grace period, whose arithmetic
            # already counted on in-flight requests ending within this. Not a setting of its own:
            # that would be one more number to keep inside the grace period.
            timeout_graceful_shutdown=math.ceil(settings.database_health_check_timeout),
        )
        self.settings = settings  # a worker's logging is configured from it before the app is imported
        self.max_head_bytes = settings.max_request_head_bytes
        self.head_timeout = settings.request_head_timeout
        self.drain_seconds = settings.shutdown_drain_seconds


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the head timeout sweep and the readiness drain on SIGTERM."""

    config: EdgeConfig

    def __init__(self, config: EdgeConfig, supervisor: int | None = None, relay: socket.socket | None = None) -> None:
        super().__init__(config)
        self.supervisor = supervisor  # a worker's parent: if it dies, the worker shuts down too
        self.relay = relay  # a worker's end of the supervisor's relay: each signal it receives, a byte each
        self.drain_ends: float | None = None
        self._drain_announced = False
        self._signals = self._direct = self._relayed = 0  # acted on; received here; received by the supervisor
        self._repeats = Repeats()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        if self.relay is not None:
            self.relay.setblocking(False)
            self._loop.add_reader(self.relay.fileno(), self._read_relay)
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.relay is not None:  # a worker: tell the supervisor it serves (workers.supervise)
            self.relay.send(b"\0")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler, which may interrupt the relay's reader mid-count: the loop
        # acts on it instead, right after.
        self._loop.call_soon_threadsafe(self._signalled, sig, False)

    def _read_relay(self) -> None:
        assert self.relay is not None  # only read when there is one
        try:
            received = self.relay.recv(64)
        except BlockingIOError:
            return
        if not received:  # the supervisor is gone: on_tick notices and shuts down
            self._loop.remove_reader(self.relay.fileno())
            return
        for sig in received:
            self._signalled(sig, relayed=True)

    def _signalled(self, sig: int, relayed: bool) -> None:
        """Act once on each SIGTERM or SIGINT the operator sent, however many ways it came.

        A signal sent to a worker's whole process group (Ctrl-C in a terminal, `kill -TERM -PGID`,
        systemd's `KillMode=control-group`) reaches it twice: directly, and relayed by the
        supervisor, which received it too. Each way is counted apart, and the operator sent as many
        signals as the larger count: only a signal that raises it is acted on. The same signal
        again within `workers.REPEAT_WINDOW` is the same one delivered twice (`uv run` forwards it).
        The first starts the drain, the next ends it, and one more SIGINT forces the exit (uvicorn's own).
        """
        if relayed:  # the supervisor counted a signal delivered twice once (`Repeats`)
            self._relayed += 1
        elif self._repeats.counts(sig):
            self._direct += 1
        else:
            return  # `uv run` forwarded what the process group already brought here
        if max(self._direct, self._relayed) == self._signals:
            return  # this one came the other way first
        self._signals += 1
        if self.drain_ends is None and self.started and self.config.drain_seconds > 0:
            self.drain_ends = time.monotonic() + self.config.drain_seconds
            self.lifespan.state["shutting_down"] = True  # read by health.ReadinessEndpoint
            return  # on_tick logs it, and ends the drain when its time is up
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True  # uvicorn's handler would also re-raise the signal at exit: we exit 0

    async def on_tick(self, counter: int) -> bool:
        if self.drain_ends is not None and not self.should_exit:
            if not self._drain_announced:
                self._drain_announced = True
                logger.info("Draining: /health/db answers 503 for %g s, then shutdown", self.config.drain_seconds)
            if time.monotonic() >= self.drain_ends:
                self.should_exit = True
        if counter % SWEEP_TICKS == 0:
            self.sweep()
            if self.supervisor is not None and os.getppid() != self.supervisor and not self.should_exit:
                logger.error("Supervisor [%d] is gone: shutting down", self.supervisor)
                self.should_exit = True
        return await super().on_tick(counter)

    def sweep(self) -> None:
        """Close every connection that has kept the server waiting on its client too long.

        Waiting for a request head: past the head timeout since the connection opened or its
        previous response, or idle past the keep-alive timeout since that response. Waiting for
        request body bytes the app asked for: none for the head timeout, counted from the first
        sweep that sees the wait (so up to one sweep more) in `idle_since`, which every byte
        received clears. A body trickling faster than that is not cut off, as with nginx's
        `client_body_timeout`; what bounds it is `MAX_BODY_BYTES`, and the shutdown's own bound.

        Waiting for the client to read its answer (the writes paused: the buffers are full): none of
        it read for the head timeout, as with nginx's `send_timeout`, and the connection is aborted,
        its unsent bytes dropped; a graceful close would wait for a reader that never comes, and
        hold the answer's memory until shutdown.
        """
        now = time.monotonic()
        head_cutoff, idle_cutoff = now - self.config.head_timeout, now - self.config.timeout_keep_alive
        for connection in list(self.server_state.connections):
            if not isinstance(connection, EdgeProtocol):
                continue
            if connection.flow.write_paused and connection.unread_since(now) < head_cutoff:
                connection.transport.abort()
                continue
            head, idle = connection.awaiting_head_since, connection.idle_since
            if head is not None:
                expired = head < head_cutoff or (idle is not None and idle < idle_cutoff)
            elif connection.awaits_body():
                expired = idle is not None and idle < head_cutoff
                if idle is None:
                    connection.idle_since = now
            else:  # the app is at work: a wait for its body starts again when it asks for more
                connection.idle_since = None
                continue
            if expired:
                connection.awaiting_head_since = connection.idle_since = None
                connection.transport.close()


def main(create_app: Callable[[Settings], ASGIApp], argv: Sequence[str] | None = None) -> None:
    """`python -m app [MODULE:ATTRIBUTE]`: serve the foundation, or an app built on it, in production.

    Without an argument, `create_app` builds the foundation (in a single process; workers
    import `app:app`, the same foundation). With one, the server imports that app (e.g.
    `examples.items:app`, or a module of your own), as `uvicorn MODULE:ATTRIBUTE` would. With
    `WEB_CONCURRENCY` > 1, each worker imports it.
    """
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="The production server: edge limits, the SIGTERM drain, WEB_CONCURRENCY workers. "
        "Settings come from the environment (and .env), as for uvicorn app:app.",
    )
    served = f"the app to serve, e.g. examples.items:app (default: {FOUNDATION}, the foundation)"
    parser.add_argument("app", nargs="?", default=FOUNDATION, metavar="MODULE:ATTRIBUTE", help=served)
    target: str = parser.parse_args(argv).app
    _open_standard_descriptors()
    settings = load_settings_or_exit(*read_environment())  # exits 3, before binding, when invalid
    configure_logging(settings)  # again by the app; before it, so a failure to import it is logged alike
    if settings.web_concurrency == 1:
        DrainingServer(EdgeConfig(create_app(settings) if target == FOUNDATION else target, settings)).run()
        return
    # Each worker imports the app and builds it from the environment, once.
    config = EdgeConfig(target, settings)
    raise SystemExit(supervise(config, settings.web_concurrency, functools.partial(run_worker, config)))


def _open_standard_descriptors() -> None:
    """Descriptors 0 to 2 open, on /dev/null where they are closed (`2>&-`, a careless daemon),
    as `2>/dev/null` would leave them: else the event loop takes one for itself, and libuv aborts
    the process when it closes it at exit; with workers, the listening socket took it, and their
    log lines went into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
            if fd == 2 and sys.stderr is None:  # Python found it closed: the log lines' stream, for good
                sys.stderr = open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115


def run_worker(config: EdgeConfig, relay: socket.socket, sockets: list[socket.socket]) -> None:
    """One worker process's server, on the supervisor's socket; `relay` brings the signals the supervisor receives.

    Logging first, as in one process: an app that cannot be imported is reported in the service's
    format (JSON in production), its traceback included, not as multiprocessing's plain text.
    """
    configure_logging(config.settings)
    try:
        DrainingServer(config, supervisor=os.getppid(), relay=relay).run(sockets)
    except Exception:  # the worker's boundary: whatever escapes is logged in the format, then the worker exits 1
        logger.exception("Worker [%d] failed", os.getpid())
        raise SystemExit(1) from None
