"""JSON responses: one msgspec encoder for the whole service and the UTC clock they stamp."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import msgspec
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Scope, Send

# One encoder, built once and reused: msgspec reuses its internal buffer between calls.
ENCODER = msgspec.json.Encoder()

JSON_HEADERS = ((b"content-type", b"application/json"),)

_last_second = -1
_last_stamp = ""


def utc_timestamp() -> str:
    """The current time as RFC 3339 UTC with a `Z` suffix, whole seconds.

    Formatted at most once per second: under load most calls return the cached string.
    """
    global _last_second, _last_stamp
    now = int(time.time())
    if now != _last_second:
        _last_stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        _last_second = now
    return _last_stamp


class StructResponse(Response):
    """A Response whose content is a msgspec Struct (or any msgspec-encodable value)."""

    media_type = "application/json"

    def __init__(
        self,
        content: Any,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        super().__init__(content, status_code, headers, self.media_type, background)

    def render(self, content: Any) -> bytes:
        return ENCODER.encode(content)


async def send_bytes(
    scope: Scope, send: Send, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = JSON_HEADERS
) -> None:
    """A complete response from ready bytes (JSON unless `headers` say otherwise), for pure ASGI endpoints.

    A HEAD request gets the same headers and no body.
    """
    start = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
