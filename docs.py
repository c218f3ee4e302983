"""The API's documentation as served: `/openapi.json`, and the `/docs` and `/redoc` pages that render it.

The pages load Swagger UI and ReDoc from `static/` (vendored by `.ci/refresh-docs-assets`), never
from a CDN, and use relative URLs so they also work behind a path prefix. Everything is rendered
once, when the app is built.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Mapping
from pathlib import Path

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from openapi import Operation, build_openapi
from responses import ENCODER, send_bytes
from settings import Settings

STATIC_DIR = Path(__file__).parent / "static"


class StaticBody:
    """A fixed body, rendered once: the schema and the pages never change while the app runs."""

    def __init__(self, body: bytes, media_type: str, extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.body = body
        self.headers = ((b"content-type", media_type.encode()), *extra_headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(scope, send, 200, self.body, self.headers)


class WholeFiles(StaticFiles):
    """Starlette's StaticFiles, serving whole files only: a `Range` is ignored, as RFC 9110 allows.

    Starlette answers a range it cannot serve (`bytes=abc`, `items=0-1`, `bytes=5-1`, past the
    end) itself, in plain text: not the envelope every error of the service is, and for an
    unknown unit not what RFC 9110 asks (ignore it). The docs' assets are small and fetched whole.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(name, value) for name, value in scope["headers"] if name not in (b"range", b"if-range")]
        await super().__call__({**scope, "headers": headers}, receive, send)


def _page(title: str, head: str, body: str, inline_script: str = "") -> StaticBody:
    """An HTML page whose Content-Security-Policy lets it reach no host but this one."""
    script = f"<script>{inline_script}</script>\n" if inline_script else ""
    page = (
        f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n{head}</head>\n'
        f"<body>\n{body}{script}</body>\n</html>\n"
    )
    allowed = f"'sha256-{base64.b64encode(hashlib.sha256(inline_script.encode()).digest()).decode()}'"
    csp = DOCS_CSP.format(inline_script=allowed if inline_script else "")
    return StaticBody(page.encode(), "text/html; charset=utf-8", ((b"content-security-policy", csp.encode()),))


# The vendored bundles name other hosts (ReDoc's sidebar loads its logo from a CDN): the policy
# makes the browser refuse every such request, so the pages never leave this service. Inline
# styles are how both UIs render; ReDoc runs its search index in a blob: worker.
DOCS_CSP = (
    "default-src 'none'; script-src 'self' {inline_script}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)
SWAGGER_UI_BODY = """<div id="swagger-ui"></div>
<script src="static/swagger-ui-bundle.js"></script>
"""
# validatorUrl: null keeps Swagger UI from sending the schema to an online validator.
SWAGGER_UI_INIT = (
    'window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", validatorUrl: null, deepLinking: true});'
)
REDOC_BODY = """<redoc spec-url="openapi.json"></redoc>
<script src="static/redoc.standalone.js"></script>
"""


def docs_routes(settings: Settings, routes: list[BaseRoute], operations: Mapping[str, Operation]) -> list[BaseRoute]:
    """`/openapi.json`, `/docs`, `/redoc` and their assets, describing `routes` and themselves."""
    title = settings.app_name
    stylesheet = '<link rel="stylesheet" href="static/swagger-ui.css">\n'
    swagger = _page(f"{title} - Swagger UI", stylesheet, SWAGGER_UI_BODY, SWAGGER_UI_INIT)
    docs: list[BaseRoute] = [
        Route("/docs", swagger, methods=["GET"], name="docs"),
        Route("/redoc", _page(f"{title} - ReDoc", "", REDOC_BODY), methods=["GET"], name="redoc"),
        Mount("/static", WholeFiles(directory=STATIC_DIR), name="static"),
    ]
    schema = ENCODER.encode(build_openapi(settings, [*routes, _OPENAPI_ROUTE, *docs], operations))
    return [Route("/openapi.json", StaticBody(schema, "application/json"), methods=["GET"], name="openapi"), *docs]


# Only its path, name and methods matter to `build_openapi`; the served route carries the body.
_OPENAPI_ROUTE = Route("/openapi.json", StaticBody(b"", "application/json"), methods=["GET"], name="openapi")
