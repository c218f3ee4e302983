"""The production server, `python -m app`: uvicorn with every connection bounded, and a drain.

- `EdgeProtocol` is uvicorn's httptools protocol with the request head bounded where its bytes
  arrive: a head over `MAX_REQUEST_HEAD_BYTES` gets the 431 envelope and the connection is
  closed; the parser stops at most two reads past the limit, so nothing large is buffered.
- `DrainingServer` is uvicorn's server that, every half second, closes connections still
  without a complete head `REQUEST_HEAD_TIMEOUT` after they opened (or after their previous
  response), and that drains on SIGTERM: readiness answers 503 for `SHUTDOWN_DRAIN_SECONDS`
  while everything is still served, then the usual graceful shutdown. A second signal ends
  the drain at once. It exits 0 rather than re-raising the signal.
- `WEB_CONCURRENCY` > 1: `workers.supervise` runs one `DrainingServer` per worker process.

The request hot path pays only a few attribute updates per request; the head timeout and
uvicorn's keep-alive timeout cost one sweep of the open connections per half second, not a
timer per request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import httptools
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from errors import CODES, MESSAGES, ErrorBody
from logs import configure_logging
from middleware import new_request_id
from responses import ENCODER, utc_timestamp
from settings import Settings, load_settings_or_exit, read_environment
from workers import supervise

logger = logging.getLogger("service.server")
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
        )
        self.max_head_bytes = settings.max_request_head_bytes
        self.head_timeout = settings.request_head_timeout
        self.drain_seconds = settings.shutdown_drain_seconds


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the request head bounded in size and in time.

    Size: bytes are counted per chunk from the chunk after the one a head began in, so the
    count never exceeds the head's real size (no false 431), and the parser is stopped with at
    most two reads (256 KiB each under uvloop) past the limit. A head that completes is measured
    exactly only when its chunks could have held more than the limit, which ordinary requests
    never reach. Time: `awaiting_head_since` and `idle_since`, read by `DrainingServer.sweep`:
    the head timeout, and uvicorn's keep-alive timeout without uvicorn's timer per response
    (`call_later` and its `cancel` on the next request cost uvloop about 1 µs a request; the
    sweep looks at every connection twice a second instead).
    """

    def __init__(self, config: EdgeConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.max_head_bytes = config.max_head_bytes
        self.awaiting_head_since: float | None = None  # monotonic; None while a request is served
        self.idle_since: float | None = None  # monotonic; set after a response, None once bytes arrive
        self._head_bytes: int | None = None  # counted bytes of the head being parsed, None outside one
        self._head_slack = 0  # length of the chunk the head began in (an upper bound of its share)
        self._chunk = 0
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.awaiting_head_since = time.monotonic()

    def data_received(self, data: bytes) -> None:
        # uvicorn's own, with the head limit around the parser.
        if self._refused:  # only the answer to what came before is still to be sent
            return
        self.idle_since = None  # (uvicorn cancels its keep-alive timer here; there is none)
        self._chunk = len(data)
        if self._head_bytes is not None:
            self._head_bytes += self._chunk
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._refused:
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        if self._head_bytes is not None and self._head_bytes > self.max_head_bytes:
            self.refuse_head()

    # The three callbacks below run for every request: they call uvicorn's own directly rather
    # than through `super()`, which builds a proxy object each time.
    def on_message_begin(self) -> None:
        _on_message_begin(self)
        self._head_bytes = 0
        self._head_slack = self._chunk

    def on_headers_complete(self) -> None:
        counted = self._head_bytes or 0
        self._head_bytes = None
        self.awaiting_head_since = None
        if counted + self._head_slack > self.max_head_bytes and self._head_size() > self.max_head_bytes:
            self.refuse_head()
            raise _HeadRefused  # stops the parser; data_received knows it was answered
        _on_headers_complete(self)

    def on_response_complete(self) -> None:
        # uvicorn's own, without arming a keep-alive timer: the server's sweep closes idle connections.
        self.server_state.total_requests += 1
        if self._refused and not self.pipeline:  # the refused head came after this response
            self._send_431()
            return
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:  # unblock the next pipelined request
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:  # idle, waiting for the next request's head
            self.awaiting_head_since = self.idle_since = time.monotonic()

    def _head_size(self) -> int:
        """The head's size as sent, give or take optional whitespace."""
        request_line = len(self.parser.get_method()) + len(self.url) + len(b"  HTTP/1.1\r\n")
        return request_line + sum(len(name) + len(value) + 4 for name, value in self.headers) + 2

    def refuse_head(self) -> None:
        """Answer 431 with the error envelope and close; nothing more is read or parsed.

        A head pipelined behind requests still being answered gets its 431 after their responses.
        """
        self._refused = True
        self._head_bytes = None
        self.awaiting_head_since = None
        if self.cycle is not None and not self.cycle.response_complete:
            self.flow.pause_reading()
            return
        self._send_431()

    def _send_431(self) -> None:
        if self.transport.is_closing():
            return
        body = ENCODER.encode(ErrorBody(CODES[431], MESSAGES[431], utc_timestamp(), new_request_id()))
        head = [
            STATUS_LINE[431],
            *(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-content-type-options: nosniff\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


_on_message_begin = HttpToolsProtocol.on_message_begin
_on_headers_complete = HttpToolsProtocol.on_headers_complete


class _HeadRefused(Exception):
    """Raised inside a parser callback: the head was refused and answered."""


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the head timeout sweep and the readiness drain on SIGTERM."""

    config: EdgeConfig

    def __init__(self, config: EdgeConfig, supervisor: int | None = None) -> None:
        super().__init__(config)
        self.supervisor = supervisor  # a worker's parent: if it dies, the worker shuts down too
        self.drain_ends: float | None = None
        self._drain_announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler: only flags here; on_tick does the rest (and the logging).
        if self.drain_ends is None and self.started and self.config.drain_seconds > 0:
            self.drain_ends = time.monotonic() + self.config.drain_seconds
            self.lifespan.state["shutting_down"] = True  # read by health.ReadinessEndpoint
            return
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
        """Close every connection idle past the keep-alive timeout, or waiting for a head past the head timeout."""
        now = time.monotonic()
        head_cutoff, idle_cutoff = now - self.config.head_timeout, now - self.config.timeout_keep_alive
        for connection in list(self.server_state.connections):
            if isinstance(connection, EdgeProtocol):
                head, idle = connection.awaiting_head_since, connection.idle_since
                if (head is not None and head < head_cutoff) or (idle is not None and idle < idle_cutoff):
                    connection.awaiting_head_since = connection.idle_since = None
                    connection.transport.close()


def main(create_app: Callable[[Settings], ASGIApp]) -> None:
    """Run the production server; `create_app` builds the app in a single process."""
    settings = load_settings_or_exit(read_environment())  # exits 2, before binding, when invalid
    if settings.web_concurrency == 1:
        DrainingServer(EdgeConfig(create_app(settings), settings)).run()
        return
    configure_logging(settings)
    # Each worker imports `app` and builds the app from the environment, once.
    config = EdgeConfig("app:app", settings)
    raise SystemExit(supervise(config, settings.web_concurrency, functools.partial(run_worker, config)))


def run_worker(config: EdgeConfig, sockets: list[socket.socket]) -> None:
    """One worker process's server, on the supervisor's socket."""
    DrainingServer(config, supervisor=os.getppid()).run(sockets)
