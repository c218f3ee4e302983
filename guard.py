"""Who may call a group of endpoints: a `Guard`, its OpenAPI security scheme and its 401 challenge."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from errors import AuthenticationError

# OpenAPI 3.1's security scheme types, with the fields each requires.
_SCHEME_NEEDS = {"apiKey": ("name", "in"), "http": ("scheme",), "mutualTLS": (), "oauth2": ("flows",),
                 "openIdConnect": ("openIdConnectUrl",)}  # fmt: skip
_SCHEME_NAME = re.compile(r"[A-Za-z0-9._-]+")  # a `components` key


@dataclass(frozen=True, slots=True)
class Guard:
    """What every caller of a group must show: `Endpoints(tag="notes", guard=Guard(...))`.

    `check(request)` runs before the handler's input is read: a refused caller learns nothing of
    the input's rules, and its body is never read. It returns the caller (a user, a tenant), which
    the handler takes as its `user` parameter or `ctx.user` (Starlette's `request.user` too), or
    raises `errors.AuthenticationError` (401, with `WWW-Authenticate` naming an HTTP `scheme`'s
    scheme unless it gives its own) or `AuthorizationError` (403). A check that returns None (a
    token found in no table) is a 401 too: a guard lets no one in by omission. `scheme` is the
    OpenAPI security scheme (`{"type": "http", "scheme": "bearer"}`), documented as `name` on
    each of the group's operations, with their 401 and 403: Swagger UI's "Authorize" sends it.
    """

    name: str
    scheme: Mapping[str, Any]
    check: Callable[[Request], Awaitable[Any]]

    def __post_init__(self) -> None:
        """A scheme OpenAPI would refuse, or that names no HTTP scheme, stops start-up, not a request."""
        kind = self.scheme.get("type")
        if not _SCHEME_NAME.fullmatch(self.name):
            raise ValueError(f"Guard {self.name!r}: a security scheme's name is letters, digits, '.', '_' and '-'")
        if kind not in _SCHEME_NEEDS:
            raise ValueError(f"Guard {self.name!r}: scheme type {kind!r} is none of {', '.join(_SCHEME_NEEDS)}")
        if missing := [key for key in _SCHEME_NEEDS[kind] if not self.scheme.get(key)]:
            raise ValueError(f"Guard {self.name!r}: a {kind!r} scheme needs {', '.join(missing)}")

    async def caller(self, request: Request) -> Any:
        try:
            found = await self.check(request)
            if found is None:
                raise AuthenticationError()
            return found
        except AuthenticationError as exc:
            if exc.headers is None and (challenge := _challenge(self.scheme)):  # RFC 9110: a 401 sends a challenge
                exc.headers = {"WWW-Authenticate": challenge}
            raise


def _challenge(scheme: Mapping[str, Any]) -> str | None:
    """The `WWW-Authenticate` challenge of a 401 under `scheme`: RFC 9110 requires one on every 401.

    An `http` scheme names itself (`Bearer`, `Basic`); OAuth 2.0 and OpenID Connect tokens are
    bearer tokens (RFC 6750). An API key has no registered scheme: `ApiKey` with where the key
    goes, as the OpenAPI scheme says (`in="header", name="X-API-Key"`). Mutual TLS is asked for
    by TLS, not by a header: none.
    """
    match scheme.get("type"):
        case "http":
            return str(scheme["scheme"]).capitalize()
        case "oauth2" | "openIdConnect":
            return "Bearer"
        case "apiKey":
            return f"ApiKey in={_quoted(str(scheme['in']))}, name={_quoted(str(scheme['name']))}"
    return None


def _quoted(text: str) -> str:
    """An RFC 9110 quoted-string of `text`, its characters outside visible ASCII left out (a header is ASCII)."""
    visible = "".join(c for c in text if " " <= c <= "~")
    return '"' + visible.replace("\\", "\\\\").replace('"', '\\"') + '"'
