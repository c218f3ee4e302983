"""What answers a path before the router does: probes first, and paths no route can match.

Probes are what orchestrators call most, and unknown paths (scanners, typos) are the commonest
error; both are answered exactly as the router would answer them, for less.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable

from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from errors import not_found


class HotPaths:
    """The two commonest requests skip Starlette's router: probes, and paths nothing serves.

    - `GET`/`HEAD` of the exact probe paths go straight to their endpoints. Orchestrators call
      them more than anything else; the router would try every route before theirs.
    - A path that no route's pattern matches, with or without a trailing slash, is certain to be a
      404: it gets `errors.not_found`, the router's own answer, from one match against all the
      route patterns at once instead of the router's two passes over every route (the second for
      the slash redirect). Scanners and typos make this the commonest error.

    Everything else (other methods, near-misses, a `root_path`) goes on to the router, which
    answers 405s, redirects and the rest as before. Like the router, it leaves the route it
    chose in `scope["route"]` (metrics label by it).
    """

    def __init__(self, app: ASGIApp, *, probes: list[Route]) -> None:
        self.app = app
        self.probes = {route.path: route for route in probes}
        self._routes_seen = -1
        self._any_route: re.Pattern[str] | None = None

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function handing on the chosen app's awaitable: no coroutine of its own.
        if scope["type"] == "http" and not scope.get("root_path"):
            path: str = scope["path"]
            route = self.probes.get(path)
            if route is not None and scope["method"] in ("GET", "HEAD"):
                scope["route"] = route
                return route.app(scope, receive, send)
            if self._unrouted(scope["app"].routes, path):
                return not_found(scope, receive, send)
        return self.app(scope, receive, send)

    def _unrouted(self, routes: list[BaseRoute], path: str) -> bool:
        """True only when the router would certainly answer 404 (no redirect either)."""
        if len(routes) != self._routes_seen:  # read from the live router: a route added late is seen
            self._routes_seen = len(routes)
            self._any_route = _any_of(routes)
        if self._any_route is None:
            return False
        other = path[:-1] if path.endswith("/") else path + "/"
        return self._any_route.match(path) is None and self._any_route.match(other) is None


def _any_of(routes: list[BaseRoute]) -> re.Pattern[str] | None:
    """One pattern matching every path some route matches; None when a route is of another kind."""
    if not all(isinstance(route, Route | Mount) for route in routes):
        return None
    patterns = [route.path_regex.pattern for route in routes]  # type: ignore[attr-defined]
    anonymous = [re.sub(r"\(\?P<\w+>", "(?:", p) for p in patterns]  # a group name may repeat across routes
    return re.compile("|".join(f"(?:{p})" for p in anonymous))
