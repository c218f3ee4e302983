"""What answers a path before the router does: probes first, and paths no route can match.

Probes are what orchestrators call most, and unknown paths (scanners, typos) are the commonest
error; both are answered exactly as the router would answer them, for less.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from urllib.parse import quote

from starlette._utils import get_route_path  # the router's own reading of a path under a root_path
from starlette.routing import BaseRoute, Match, Mount, Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from errors import not_found
from responses import send_bytes


class HotPaths:
    """The two commonest requests skip Starlette's router: probes, and paths nothing serves.

    - `GET`/`HEAD` of the exact probe paths go straight to their endpoints. Orchestrators call
      them more than anything else; the router would try every route before theirs.
    - A path that no route's pattern matches, with or without a trailing slash, is certain to be a
      404: it gets `errors.not_found`, the router's own answer, from one match against all the
      route patterns at once instead of the router's two passes over every route (the second for
      the slash redirect). Scanners and typos make this the commonest error.
    - A path no route matches but for its trailing slash gets the router's 307 to the other
      spelling, with a relative `Location` where the router's names the `Host` header's host.

    Paths are read as the router reads them, without the app's `root_path`. Everything else
    (other methods, routes of other kinds) goes on to the router, which answers 405s and the
    rest as before. Like the router, it leaves the route it chose in
    `scope["route"]` (metrics label by it), None where no route is; a request without the key
    was answered before routing (by the user's middleware, a refused body, CORS), and the request
    layer labels it by `route_for`.
    """

    def __init__(self, app: ASGIApp, *, probes: list[Route]) -> None:
        self.app = app
        self.probes = {route.path: route for route in probes}
        self._routes_seen = -1
        self._any_route: re.Pattern[str] | None = None

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function handing on the chosen app's awaitable: no coroutine of its own.
        if scope["type"] == "http":
            path: str = get_route_path(scope) if scope.get("root_path") else scope["path"]  # as the router reads it
            route = self.probes.get(path)
            if route is not None and scope["method"] in ("GET", "HEAD"):
                scope["route"] = route
                return route.app(scope, receive, send)
            scope["route"] = None  # routing has run: the router puts the route it matches here
            answer = self._certain_answer(scope["app"].router, path)
            if answer == 404:
                return not_found(scope, receive, send)
            if answer == 307:
                return _redirect(scope, send)
        return self.app(scope, receive, send)

    def _certain_answer(self, router: Router, path: str) -> int | None:
        """For a path no route's pattern matches, what the router would certainly answer: 404, or
        307 to the path with its trailing slash added or removed. None when a route matches, or
        when the router may answer otherwise (a route of another kind). `path` is the route path,
        without the app's `root_path`."""
        routes = router.routes
        # Read from the live router: a route added (or removed) late is seen; one replaced in place,
        # the count unchanged, is not (add routes rather than swapping them).
        if len(routes) != self._routes_seen:
            self._routes_seen = len(routes)
            self._any_route = _any_of(routes)
        if self._any_route is None or self._any_route.match(path) is not None:
            return None
        if self._any_route.match(_other_spelling(path)) is None:
            return 404
        return 307 if router.redirect_slashes and path != "/" else None


def route_for(scope: Scope) -> BaseRoute | None:
    """The route the app's router would hand `scope` to (a full match, else the first partial
    one, which answers 405), without calling it: what a request refused before routing is
    labelled by in the metrics. Under a `Mount`, the route inside it, as the router labels it."""
    router = getattr(scope.get("app"), "router", None)
    return _route_among(router.routes, scope) if isinstance(router, Router) else None


def _route_among(routes: list[BaseRoute], scope: Scope) -> BaseRoute | None:
    partial = None
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            inner = route.routes if isinstance(route, Mount) else []
            return (_route_among(inner, {**scope, **child}) if inner else None) or route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial


def _redirect(scope: Scope, send: Send) -> Awaitable[None]:
    """The router's 307 to the same path without (or with) its trailing slash, with a relative `Location`.

    Starlette's builds an absolute URL from the request's `Host` header, so a client naming any
    host (`Host: evil.example`) was sent there; a path on its own keeps the client where it is.
    The path is the whole one (`root_path` included), as the client must ask for it.
    """
    other = _other_spelling(scope["path"])
    # `//host/...` on its own would name a host; `/.//host/...` is the same path, relative.
    location = quote("/." + other if other.startswith("//") else other, safe="/:@!$&'()*+,;=~").encode()
    if query := scope.get("query_string"):
        location += b"?" + query
    return send_bytes(scope, send, 307, b"", ((b"location", location),))


def _other_spelling(path: str) -> str:
    """`path` without its trailing slash, or with one: what the router's redirect tries."""
    return path[:-1] if path.endswith("/") else path + "/"


def _any_of(routes: list[BaseRoute]) -> re.Pattern[str] | None:
    """One pattern matching every path some route matches; None when a route is of another kind."""
    if not all(isinstance(route, Route | Mount) for route in routes):
        return None
    patterns = [route.path_regex.pattern for route in routes]  # type: ignore[attr-defined]
    anonymous = [re.sub(r"\(\?P<\w+>", "(?:", p) for p in patterns]  # a group name may repeat across routes
    return re.compile("|".join(f"(?:{p})" for p in anonymous))
