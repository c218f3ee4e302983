"""The supervisor of `WEB_CONCURRENCY` worker processes, for `python -m app` (server.py).

It binds the socket once, spawns the workers on it, relays every SIGTERM and SIGINT to each the
moment it arrives (the first starts each worker's drain, the next ends it), replaces a worker that
dies, and stops everything, exit status 3, when one fails to start: exits, whatever its status,
before it said it serves (an app that cannot be imported exits 1, and would be replaced forever).
Once stopping, it closes its copy of the listening socket: when the last worker closes its own,
new connections are refused at once rather than queued for nobody.

It relays a signal as a byte on a socket pair of the worker's own, not as a signal: one sent to
the whole process group (Ctrl-C, systemd) reaches each worker directly too, and the worker must
tell the two apart to count it once. Its own lines go through the service's logging, so in
production every line of every process is JSON. When the operator set no
`PROMETHEUS_MULTIPROC_DIR`, it gives the workers a fresh private one and removes it at exit, so
`/metrics` counts every request whichever worker answers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from types import FrameType

import uvicorn
from prometheus_client import multiprocess
from uvicorn._subprocess import get_subprocess
from uvicorn.config import STARTUP_FAILURE

from settings import CONFIGURATION_ERROR

logger = logging.getLogger("service.server")
_NO_METRICS_DIR = (
    "the workers merge their metrics in a directory of their own, and no temporary directory is "
    "writable (TMPDIR, /tmp, /var/tmp, the working directory): mount a tmpfs or an emptyDir at "
    "/tmp, or set PROMETHEUS_MULTIPROC_DIR to a writable directory"
)


def supervise(config: uvicorn.Config, workers: int, serve: Callable[..., None]) -> int:
    """Run `workers` processes of `serve(relay, sockets=...)` on one socket until a signal; returns the exit status.

    `serve` must be picklable (a module-level function, or a partial of one): workers are spawned.
    `relay` is the worker's end of a socket pair on which each signal the supervisor receives
    arrives as a byte, its number.
    """
    try:
        sockets = [config.bind_socket()]  # first: a port already taken leaves nothing behind
    except SystemExit:  # uvicorn logged the error alone ("[Errno 98] Address already in use"): say where
        host = f"[{config.host}]" if ":" in config.host else config.host
        logger.error("Cannot listen on %s:%d (HOST and PORT)", host, config.port)
        raise
    private_metrics = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        try:
            private_metrics = tempfile.mkdtemp(prefix="prometheus-")
        except OSError as exc:  # a read-only filesystem without a writable /tmp: a deployment's mistake
            sockets[0].close()
            print(f"WEB_CONCURRENCY={workers}: {_NO_METRICS_DIR} ({exc})", file=sys.stderr, flush=True)
            return CONFIGURATION_ERROR
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = private_metrics  # inherited by every worker
        logger.info("Workers merge their metrics in %s (removed at exit)", private_metrics)
    # The handlers do nothing themselves: Python's own handler writes each signal's number to the
    # wakeup socket the moment it arrives, and that wakes `wait` below at once, so the workers hear
    # of it without delay (the readiness 503 starts then). The loop relays it, not the handler,
    # which could run in the middle of a worker being replaced.
    wakeup, wakeup_writer = socket.socketpair()
    wakeup.setblocking(False)
    wakeup_writer.setblocking(False)
    signal.set_wakeup_fd(wakeup_writer.fileno(), warn_on_full_buffer=False)
    for handled in (signal.SIGINT, signal.SIGTERM):
        signal.signal(handled, _written_to_the_wakeup_socket)
    logger.info("Supervisor [%d] starting %d workers", os.getpid(), workers)
    relays: dict[multiprocessing.process.BaseProcess, socket.socket] = {}  # each worker's, the supervisor's end
    processes = [_start_worker(config, sockets, serve, relays) for _ in range(workers)]
    serving: set[multiprocessing.process.BaseProcess] = set()  # said so on its relay (server.DrainingServer.startup)
    status, stopping = 0, False
    repeats = Repeats()
    try:
        # Until stopped and every worker is gone: workers all killed at once (the OOM killer) are
        # replaced, not taken for the end.
        while (running := [process for process in processes if process.exitcode is None]) or not stopping:
            # Only live workers' sentinels: a dead one's is always ready, and would spin the loop.
            # And a look each second: in loaded test runs a worker killed outright sometimes went
            # unnoticed here (cause not found), and was never replaced; its exit code still tells.
            wait([wakeup, *(process.sentinel for process in running)], timeout=1.0 if running else 0)
            signals = [sig for sig in _signals_received(wakeup) if repeats.counts(sig)]
            # Every worker's relay, the dead ones' too: a byte written before it died is still there.
            serving.update(process for process in processes if process not in serving and _said(relays[process]))
            for index, process in enumerate(processes):
                if stopping or signals:
                    break
                code = process.exitcode  # read once: it may exit between two readings
                if code is not None and process not in serving:
                    logger.error("Worker [%s] failed to start (exit status %s): stopping", process.pid, code)
                    status, signals = STARTUP_FAILURE, [signal.SIGTERM]
                elif code is not None:
                    logger.error("Worker [%s] exited with %s: replacing it", process.pid, code)
                    # A worker killed outright never took its live gauges (open connections) out of the
                    # sums itself; its counters' files stay, so what it counted still counts.
                    multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]  # not annotated upstream
                    relays.pop(process).close()
                    processes[index] = _start_worker(config, sockets, serve, relays)
            if signals:  # each one: the first starts the drain, the next ends it
                if not stopping:  # no worker is started again: the workers' copies serve the drain
                    for sock in sockets:
                        sock.close()
                stopping = True
                for process in processes:
                    with contextlib.suppress(OSError):  # the worker has exited (its end is closed)
                        relays[process].send(bytes(signals))
    finally:
        signal.set_wakeup_fd(-1)
        for sock in (*sockets, *relays.values(), wakeup, wakeup_writer):
            sock.close()
        if private_metrics is not None:
            shutil.rmtree(private_metrics, ignore_errors=True)
    logger.info("Supervisor [%d] stopped", os.getpid())
    return status


# Seconds within which the same signal again is the same signal: `uv run` forwards a signal its
# process group received to its child, which received it too (measured: 0.1 ms apart), and
# the second would end the drain the first started. An operator's own second Ctrl-C comes later.
REPEAT_WINDOW = 0.25


class Repeats:
    """Tells a signal the operator sent again from the same one delivered twice within `REPEAT_WINDOW`."""

    def __init__(self) -> None:
        self.last: tuple[int, float] = (0, -math.inf)  # the last signal counted, and when

    def counts(self, sig: int) -> bool:
        now = time.monotonic()
        if sig == self.last[0] and now - self.last[1] < REPEAT_WINDOW:
            return False
        self.last = (sig, now)
        return True


def _start_worker(
    config: uvicorn.Config,
    sockets: list[socket.socket],
    serve: Callable[..., None],
    relays: dict[multiprocessing.process.BaseProcess, socket.socket],
) -> multiprocessing.process.BaseProcess:
    relay, workers_end = socket.socketpair()
    relay.setblocking(False)  # a byte per signal never fills it; should it, the supervisor still never waits
    process = get_subprocess(config, functools.partial(serve, workers_end), sockets)
    process.start()
    workers_end.close()  # the worker has its own copy
    relays[process] = relay
    return process


def _written_to_the_wakeup_socket(number: int, frame: FrameType | None) -> None:
    """A signal's Python handler: installed for Python to write the signal to the wakeup socket (SIG_IGN would not)."""


def _said(relay: socket.socket) -> bool:
    """Whether the worker wrote on its relay, which it does once, when it serves."""
    try:
        return bool(relay.recv(16))
    except OSError:  # nothing yet (BlockingIOError), or its end is gone
        return False


def _signals_received(wakeup: socket.socket) -> list[int]:
    """The signals written to the wakeup socket since the last call, in order; one byte each."""
    try:
        return list(wakeup.recv(1024))  # any more are still there, and wake the next `wait` at once
    except BlockingIOError:
        return []
