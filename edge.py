"""One connection of `python -m app`: its request heads bounded, its responses written whole.

`EdgeProtocol` is uvicorn's httptools protocol with these changes, made where the bytes pass:
- a request head over `MAX_REQUEST_HEAD_BYTES` gets the 431 envelope and the connection is
  closed; the parser stops at most two reads past the limit, so nothing large is buffered; the
  time a head may take is kept by `server.DrainingServer.sweep`, from the marks left here;
- a request the parser refuses (malformed HTTP, TLS on the plain port) gets the 400 envelope
  where uvicorn sends plain text, after the answers to the requests before it; one whose chunked
  body turns out malformed (a bad chunk size) while its app reads it is answered by the app, told
  so at its next read (`errors.UNREADABLE_BODY`), and the connection is closed after;
- an HTTP/1.1 request without a Host header, any request with more than one Host line, or
  one whose Host is not `host[:port]` (RFC 9112 §3.2) gets the 400 envelope, and the connection
  is closed; HTTP/1.0 without Host is served, as is an empty Host (a target without authority);
- a request asking for a protocol the server does not speak (`Upgrade: h2c`, from `curl
  --http2`) is served as HTTP/1.1 with its body, where uvicorn lost the body and parsed it as
  the next request if it came later;
- a chunked body's trailer fields never join the request's headers (uvicorn appends them to
  `scope["headers"]`, where a trailer `X-Request-ID` or `Origin` would override the head's);
- each refused request (400, 431) gets its access line and is counted in `/metrics`, as every
  request the app answers is;
- a response with a `Content-Length` leaves in one write (`ResponseWriter`), not two;
- a client that leaves is told to the request being answered, not only to the newest one
  (pipelined behind it), which went on writing to the closed connection; one that stops reading
  its answer is found by the sweep (`unread_since`).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from access import log_refusal
from errors import CODES, MESSAGES, UNREADABLE_BODY, ErrorBody
from middleware import incoming_request_id, new_request_id
from responses import ENCODER, utc_timestamp

if TYPE_CHECKING:
    from metrics import Metrics
    from server import EdgeConfig

MALFORMED_BODY = "Malformed request body: its framing (Transfer-Encoding, chunk sizes) is invalid"
TRANSFER_ENCODING_UPGRADE = (
    "Malformed request: a body sent with Transfer-Encoding cannot come with Upgrade; send it without"
)
HOST_MISSING = "Malformed request: HTTP/1.1 requires exactly one Host header"
HOST_REPEATED = "Malformed request: a request takes exactly one Host header, not several"
HOST_INVALID = "Malformed request: the Host header is not a valid host[:port]"
# RFC 9112 §3.2's `uri-host [ ":" port ]` (RFC 3986): a reg-name (an IPv4 address is one too) or a
# bracketed IP literal, leniently (any IPv6 or IPvFuture characters, a zone ID), and a numeric port.
VALID_HOST = re.compile(
    rb"(?:\[[0-9A-Za-z._~%!$&'()*+,;=:-]+\]|(?:[0-9A-Za-z._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)
_BLANK = frozenset(b"\r\n")  # the bytes of the blank lines a parser skips before a request
# `_host` after a second Host line: no valid Host equals it (a NUL), so no cached one passes it.
_SEVERAL = b"\x00several"
# A held head and a body up to this size are joined into one buffer; a larger body is handed
# over with the head as two buffers, in one call (uvloop writes them with one `writev`).
JOIN_LIMIT = 64 * 1024


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the request head bounded in size and in time, and each
    response with a `Content-Length` written whole.

    Size: bytes are counted per chunk from the chunk after the one a head began in, so the
    count never exceeds the head's real size (no false 431), and the parser is stopped with at
    most two reads (256 KiB each under uvloop) past the limit. A head that completes is measured
    exactly only when its chunks could have held more than the limit, which ordinary requests
    never reach. Writes: every response's cycle writes through the connection's `ResponseWriter`.
    Time: `awaiting_head_since` and `idle_since`, read by `DrainingServer.sweep`:
    the head timeout, the same timeout for a body that stops arriving (`awaits_body`), and
    uvicorn's keep-alive timeout without uvicorn's timer per response
    (`call_later` and its `cancel` on the next request cost uvloop about 1 µs a request; the
    sweep looks at every connection twice a second instead). A refused request's access line
    counts its duration from `awaiting_head_since` too.
    """

    # Set by refuse() alone (or, `_valid_host`, by a connection's first Host), so class defaults
    # rather than one more assignment per connection.
    _refused_since = 0.0  # monotonic: where a refused request's access line counts its duration from
    _body_left = 0  # bytes of a not-upgraded request's body still to come, read here (`_not_upgraded`)
    _refusal_message = ""  # a refusal's own message, else the status's (`errors.MESSAGES`)
    # The Host value this connection last had accepted: a keep-alive client sends the same one
    # each time, checked by one comparison rather than by the pattern. The default is no valid Host.
    _valid_host = b"\x00"
    # For the exact measure of a head that may be over the limit (`_head_size`): the chunk being
    # parsed, whether a head beginning now would begin its chunk, whether the head being parsed
    # did, and the last bytes of the head's chunks before this one.
    _data = b""
    _head_starts_chunk = True
    _head_whole_chunk = False
    _tail = b""
    # While the writes are paused (`unread_since`): since when nothing was read, and what was waiting.
    _unread_since: float | None = None
    _unread_bytes = 0
    _unread_seen = False  # whether a sweep saw this stall: False again once the writes resume
    _serving: RequestResponseCycle | None = None  # the request being answered

    def __init__(self, config: EdgeConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.max_head_bytes = config.max_head_bytes
        self.awaiting_head_since: float | None = None  # monotonic; None while a request is served
        # monotonic; set after a response, or by the sweep when it sees the app wait for body bytes;
        # None once bytes arrive
        self.idle_since: float | None = None
        self._head_bytes: int | None = None  # counted bytes of the head being parsed, None outside one
        self._head_slack = 0  # length of the chunk the head began in (an upper bound of its share)
        self._chunk = 0
        self._refused = 0  # the status a refused request gets (400, 431) once those before it are answered
        self._host: bytes | None = None  # the head's Host value, `_SEVERAL` after a second line, None without

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.writer = ResponseWriter(transport)
        self.awaiting_head_since = time.monotonic()

    def data_received(self, data: bytes) -> None:
        # uvicorn's own, with the head limit around the parser.
        if self._refused:  # only the answer to what came before is still to be sent
            return
        self.idle_since = None  # (uvicorn cancels its keep-alive timer here; there is none)
        while data := self._feed(data):  # what follows a not-upgraded request's body: the requests after it
            pass

    def _feed(self, data: bytes) -> bytes:
        """Parse `data`; returns what follows a body read here (`_not_upgraded`), still to be parsed."""
        if self._body_left:
            data = self._read_body(data)
            if not data:
                return b""
        self._chunk = len(data)
        if self._head_bytes is not None:
            self._head_bytes += self._chunk
        else:  # between requests unless a body is still arriving: a head beginning here begins the chunk
            self._head_starts_chunk = self.cycle is None or not self.cycle.more_body
        self._data = data  # for the exact measure of a head that may be over the limit (`_head_size`)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self._refused:  # else the head was refused inside a callback, and is answered
                self.send_400_response("Invalid HTTP request received.")
            return b""
        except httptools.HttpParserUpgrade as upgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
                return b""
            return self._not_upgraded(data[upgrade.args[0] :])
        finally:
            self._data = b""
        if self._head_bytes is not None:  # a head still arriving: its blank line may begin in this chunk
            self._tail = (self._tail + data[-3:])[-3:]
            if self._head_bytes > self.max_head_bytes:
                self.refuse(431)
        return b""

    # The methods below run for every request (`on_header` for every header line): they call
    # uvicorn's own directly rather than through `super()`, which builds a proxy object each time,
    # or, `on_header`, repeat it, which spares a call per header line.
    def on_message_begin(self) -> None:
        _on_message_begin(self)
        self._head_bytes = 0
        self._head_slack = self._chunk
        self._head_whole_chunk = whole = self._head_starts_chunk  # from the chunk's start: measurable exactly
        if whole and self._data[0] in _BLANK:  # blank lines before the request line, which the parser skips
            self._head_slack -= len(self._data) - len(self._data.lstrip(b"\r\n"))
        self._head_starts_chunk = False  # a second head in the same chunk begins after other bytes
        self._tail = b""
        self._host = None

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn's own, plus the Host lines counted: one comparison per header, checked once per head.
        name = name.lower()
        if name == b"host":
            self._host = value if self._host is None else _SEVERAL
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        counted = self._head_bytes or 0
        self._head_bytes = None
        if counted + self._head_slack > self.max_head_bytes and self._head_size(counted) > self.max_head_bytes:
            self.refuse(431)
            raise _HeadRefused  # stops the parser; data_received knows it was answered
        host = self._host
        if host != self._valid_host and (problem := self._host_problem(host)):
            self.refuse(400, problem)
            raise _HeadRefused
        self.awaiting_head_since = None  # after the check: a refusal's access line counts from it
        _on_headers_complete(self)
        # The request's `scope["headers"]` keeps this list; uvicorn appends any trailer fields that
        # follow a chunked body to `self.headers`, which from here on is a copy nobody serves.
        self.headers = self.headers.copy()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # Responses on a connection are written one after the other: one writer serves them all.
        cycle.transport = self.writer
        self.writer.cycle = self._serving = cycle
        _start_asgi_task(self, cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        # uvicorn tells only the newest request its client left. The one being answered, when others
        # were pipelined behind it, went on writing to the closed connection: a RuntimeError from
        # uvloop, logged as the handler's failure with a traceback.
        serving = self._serving
        if serving is not None and not serving.response_complete:
            serving.disconnected = True
            serving.message_event.set()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self.writer.flush()  # a head still held: a response without body bytes (HEAD, 204)
        # uvicorn's own, without arming a keep-alive timer: the server's sweep closes idle connections.
        self.server_state.total_requests += 1
        if self._refused and not self.pipeline:  # the refused request came after this response
            # This one: its app answered it; or this response closed the connection, and the refused
            # request, never answered, gets no line of a 400 nobody was sent.
            if self.cycle is not None and (UNREADABLE_BODY in self.cycle.scope or not self.cycle.keep_alive):
                self.transport.close()
            else:
                self._send_refusal()
            return
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:  # unblock the next pipelined request
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:  # idle, waiting for the next request's head
            self.awaiting_head_since = self.idle_since = time.monotonic()

    def _not_upgraded(self, rest: bytes) -> bytes:
        """Serve a request asking for a protocol the server does not speak (`Upgrade: h2c`, which
        `curl --http2` sends) as plain HTTP/1.1, as RFC 9110 allows; returns what follows its body.

        httptools takes whatever follows any upgrade request's head for the new protocol's bytes:
        uvicorn lost the body (a 400 "not valid JSON") and parsed it as the next request, so a body
        holding a request was served as one. A `Content-Length` body is read here instead; one sent
        with `Transfer-Encoding`, which only the parser could read, is the 400 envelope for a handler
        that reads it, and the connection is closed after the answer.
        """
        cycle = self.cycle
        if cycle is None:  # no request was made of that head
            return b""
        framing = [value for name, value in self.headers if name in (b"content-length", b"transfer-encoding")]
        if not framing:
            return rest
        if not framing[0].strip().isdigit():  # a Transfer-Encoding
            cycle.more_body = True  # for `refuse`: the request's own body is what cannot be read
            cycle.scope[UNREADABLE_BODY] = TRANSFER_ENCODING_UPGRADE  # type: ignore[literal-required]  # our own key
            self.refuse(400)
            return b""
        cycle.more_body = True  # the parser ended the request at its head: its body is still to come
        cycle.message_event.clear()
        self._body_left = int(framing[0])
        return self._read_body(rest)

    def _read_body(self, data: bytes) -> bytes:
        """Hand the next `_body_left` bytes of `data` to the request as its body; returns the rest."""
        body = data[: self._body_left]
        self._body_left -= len(body)
        if body:
            self.on_body(body)
        if not self._body_left:
            self.on_message_complete()
        return data[len(body) :]

    def unread_since(self, now: float) -> float:
        """Since when the client has read none of what waits for it, told `now` by each sweep that
        finds the writes paused: a sweep that finds less waiting than the last counts as progress."""
        waiting = self.transport.get_write_buffer_size()
        if self._unread_since is None or waiting < self._unread_bytes or not self._unread_seen:
            self._unread_since = now
        self._unread_bytes = waiting
        self._unread_seen = True
        return self._unread_since

    def resume_writing(self) -> None:
        self._unread_seen = False  # the client read down to the low-water mark: a stall starts afresh
        _resume_writing(self)

    def awaits_body(self) -> bool:
        """Whether the app waits for request body bytes that only the client can send now.

        Not while the client waits for `100 Continue` (the app has not asked for the body yet),
        nor while reading is paused (the app is behind, or the request waits behind another).
        """
        cycle = self.cycle
        return (
            cycle is not None
            and cycle.more_body
            and not cycle.response_complete
            and not cycle.message_event.is_set()
            and not cycle.waiting_for_100_continue
            and not self.flow.read_paused
        )

    def _host_problem(self, host: bytes | None) -> str:
        """Why the head's Host breaks RFC 9112 §3.2 (a message for the 400), or "" when it is valid.

        Without Host only HTTP/1.1 is refused: HTTP/1.0 has no Host requirement. An empty value is
        valid (what a client sends for a target without an authority). The value's trailing
        whitespace is not part of it (the parser leaves it on).
        """
        if host is None:
            return HOST_MISSING if self.parser.get_http_version() == "1.1" else ""
        if host is _SEVERAL:
            return HOST_REPEATED
        if VALID_HOST.fullmatch(host.rstrip(b" \t")) is None:
            return HOST_INVALID
        self._valid_host = host
        return ""

    def _head_size(self, counted: int) -> int:
        """The head's size as sent, for one whose chunks could hold more than the limit (`counted`:
        the bytes of its chunks after the first).

        Exact for a head that began its chunk (with the parser, in `on_headers_complete`, the end of
        the head is the first blank line from there). A head that came in the same read as bytes
        before it (pipelined after another request) is measured from what the parser kept: its
        optional whitespace around field values, which the parser drops, is not counted.
        """
        data = self._data
        if self._head_whole_chunk:
            if not counted:  # begun and ended in this chunk; the parser skips blank lines before a request
                start = len(data) - len(data.lstrip(b"\r\n"))
                end = data.find(b"\r\n\r\n", start)
                if end >= 0:
                    return end + 4 - start
            else:  # begun at the start of an earlier chunk: its end may straddle the two
                end = (self._tail + data).find(b"\r\n\r\n")
                if end >= 0:
                    return self._head_slack + counted - len(data) + end + 4 - len(self._tail)
        request_line = len(self.parser.get_method()) + len(self.url) + len(b"  HTTP/1.1\r\n")
        return request_line + sum(len(name) + len(value) + 4 for name, value in self.headers) + 2

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a request its parser refuses writes plain text at once, over any
        # response still being written; this one is the envelope, and waits for those.
        self.refuse(400)

    def refuse(self, status: int, message: str = "") -> None:
        """Answer `status` (400, 431) with the error envelope (`message`, else the status's) and close;
        nothing more is read or parsed.

        Requests before the refused one on the connection (pipelined) get their responses first.
        """
        self._refused = status
        self._refusal_message = message
        since = self.awaiting_head_since  # None when it came while a request before it was served
        self._refused_since = time.monotonic() if since is None else since
        self._head_bytes = None
        self.awaiting_head_since = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self.flow.pause_reading()
            if cycle.more_body:  # in its own body: its app may be reading it, and is told at its next read
                cycle.scope.setdefault(UNREADABLE_BODY, MALFORMED_BODY)  # type: ignore[misc]  # our own key
                cycle.keep_alive = False
                cycle.message_event.set()
            return
        self._send_refusal()

    def _send_refusal(self) -> None:
        # The refused request's own headers, as far as they were read: its caller's ID is kept, as the app keeps it.
        status, request_id = self._refused, incoming_request_id(self.headers or []) or new_request_id()
        method = self.parser.get_method() if self.url else b""  # a method is parsed before the target
        seconds = time.monotonic() - self._refused_since
        log_refusal(method, self.url, status, seconds, self.client, request_id)
        metrics: Metrics | None = self.app_state.get("metrics")  # the app's, when built by app.create_app
        if metrics is not None:  # no route answered it: counted under `<unmatched>`
            metrics.record({"method": method.decode("latin-1")}, status, seconds)
        if self.transport.is_closing():  # the client has gone: its line is written all the same
            return
        body = ENCODER.encode(
            ErrorBody(CODES[status], self._refusal_message or MESSAGES[status], utc_timestamp(), request_id)
        )
        head = [
            STATUS_LINE[status],
            *(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: %s\r\n" % request_id.encode(),  # every response names its request (the contract)
            b"x-content-type-options: nosniff\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + (b"" if method == b"HEAD" else body))
        self.transport.close()


class ResponseWriter(asyncio.Transport):
    """The connection's transport as its responses see it: a head waits for its body's first bytes.

    uvicorn writes a response's head when the app starts the response and its body when the app
    sends it: two system calls and, with Nagle's algorithm off, two TCP segments for every
    response. Here the head of a response that declares its `Content-Length` is held and
    written with the first body bytes, or alone when the response completes without any (HEAD,
    204), so such a response costs one write. The head of a chunked (streaming) response goes
    out at once, as before: its first chunk may be long in coming. Every other write (`100
    Continue`, body bytes after the first) passes straight through.
    """

    __slots__ = ("cycle", "head", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self.transport = transport
        self.cycle: RequestResponseCycle | None = None  # the response whose head is still to come
        self.head: bytes | None = None  # a head held for its body

    def write(self, data: bytes | bytearray | memoryview) -> None:
        head = self.head
        if head is not None:
            self.head = None
            if len(data) <= JOIN_LIMIT:
                self.transport.write(head + data)
            else:
                self.transport.writelines((head, data))
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started:  # uvicorn writes the head first, and alone
            self.cycle = None
            if cycle.chunked_encoding is not True:  # a Content-Length, or no body at all
                self.head = bytes(data)
                return
        self.transport.write(data)

    def flush(self) -> None:
        """Write a held head now (unless the client is gone: uvloop refuses writes to a closed transport)."""
        head = self.head
        if head is not None:
            self.head = None
            if not self.transport.is_closing():
                self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)


_start_asgi_task = HttpToolsProtocol._start_asgi_task
_resume_writing = HttpToolsProtocol.resume_writing
_on_message_begin = HttpToolsProtocol.on_message_begin
_on_headers_complete = HttpToolsProtocol.on_headers_complete


class _HeadRefused(Exception):
    """Raised inside a parser callback: the head was refused and answered."""
