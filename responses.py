"""JSON responses: one msgspec encoder for the whole service and the UTC clock they stamp."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Scope, Send

# One encoder, built once and reused: msgspec reuses its internal buffer between calls.
ENCODER = msgspec.json.Encoder()

JSON_HEADERS = ((b"content-type", b"application/json"),)
# What `utc_timestamp` makes, as a Struct field: documented as RFC 3339 text (a plain `str` says any text).
Timestamp = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]

# The last second formatted, and its text: one tuple, swapped whole (log lines are also
# formatted off the event loop's thread).
_last: tuple[int, str] = (-1, "")


def utc_second(seconds: int) -> str:
    """`seconds` since the epoch as RFC 3339 UTC to the second, without the zone (`2025-09-23T10:30:00`).

    The service's one clock shortcut: every response timestamp and every JSON log line asks
    for the current second, so it is formatted once per second and reused (its gain, measured,
    is in bench/README.md).
    """
    global _last
    second, text = _last
    if seconds != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last = (seconds, text)
    return text


def utc_timestamp() -> str:
    """The current time as RFC 3339 UTC with a `Z` suffix, whole seconds (the contract's timestamps)."""
    return utc_second(int(time.time())) + "Z"


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
