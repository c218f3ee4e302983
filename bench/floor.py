"""The floor: the least any app can do per `/health` and still keep the contract, with no framework.

One bare ASGI callable, doing on every request only what the contract and the README promise
of a probe, with the service's own pieces: the caller's valid `X-Request-ID` or a new UUID
(`middleware.new_request_id`), set for the request's log lines (`logs.REQUEST`); the liveness
body (`health.Liveness`, the one encoder, the one clock); the headers the service sends
(`Content-Type`, `Cache-Control: no-store`, `X-Request-ID`, `X-Content-Type-Options`); and the
request counted in the metrics (`metrics.Metrics.record`). No routing, no CORS, no body limit,
no error boundary: what a framework adds on top is the distance from this to the service.

    uv run python bench/server_cpu.py /health 5 \\
        --also "python -m uvicorn --no-access-log --app-dir bench floor:app --port {port}" \\
        --also "python -m uvicorn --no-access-log --app-dir bench baseline:app --port {port}"

It answers `/health` only (any other path gets the same answer): it is a measure, not a service.
"""

from __future__ import annotations

import time
from typing import Any

from baseline import Message, Receive, Scope, Send
from starlette.routing import Route

from health import Liveness
from logs import REQUEST
from metrics import Metrics
from middleware import _NOSNIFF, REQUEST_ID_HEADER, VALID_REQUEST_ID, new_request_id
from responses import ENCODER, utc_timestamp

METRICS = Metrics()
STARTED = time.monotonic()
_HEADERS = ((b"content-type", b"application/json"), (b"cache-control", b"no-store"), _NOSNIFF)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    started = time.perf_counter()
    incoming = None
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER and VALID_REQUEST_ID.fullmatch(value):
            incoming = value
    request_id = incoming.decode() if incoming else new_request_id()
    token = REQUEST.set((request_id, None))
    body = ENCODER.encode(Liveness("healthy", utc_timestamp(), "0.1.0", int(time.monotonic() - STARTED)))
    length = (b"content-length", str(len(body)).encode())
    headers = [*_HEADERS, length, (REQUEST_ID_HEADER, incoming or request_id.encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    scope["route"] = ROUTE
    METRICS.record(scope, 200, time.perf_counter() - started)
    REQUEST.reset(token)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message: Message = await receive()
        reply: dict[str, Any] = {"type": message["type"] + ".complete"}
        await send(reply)
        if message["type"] == "lifespan.shutdown":
            return


ROUTE = Route("/health", app)  # the label the service's metrics give its probe
