"""`/openapi.json` and the docs pages: a valid description of every route, served without a CDN."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urljoin

import httpx
import msgspec
import pytest
from openapi_schema_validator import validate as validate_instance
from openapi_spec_validator import validate as validate_spec
from service import serve
from starlette.routing import Route

from app import create_app
from docs import STATIC_DIR
from settings import load_settings


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with serve(create_app(load_settings({}))) as http:
        yield http


async def _spec(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    spec: dict[str, Any] = msgspec.json.decode(response.content)
    return spec


def _check(instance: Any, ref: str, spec: dict[str, Any]) -> None:
    validate_instance(instance, {"$ref": ref, "components": spec["components"]})


@pytest.mark.anyio
async def test_openapi_document_is_valid_openapi(client: httpx.AsyncClient) -> None:
    """The served document passes openapi-spec-validator."""
    validate_spec(await _spec(client))


@pytest.mark.anyio
async def test_openapi_documents_every_route_and_method(client: httpx.AsyncClient) -> None:
    """Each route's methods (HEAD aside) are operations, and nothing else is."""
    spec = await _spec(client)
    app = create_app(load_settings({}))
    expected = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD"}
    }
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert documented == expected
    assert {"/", "/health", "/health/db", "/openapi.json", "/docs", "/redoc"} <= set(spec["paths"])


@pytest.mark.anyio
async def test_the_server_is_where_the_document_is_served(client: httpx.AsyncClient) -> None:
    """A relative server URL: behind a proxy's `/api` prefix, the operations are under `/api` too."""
    servers = (await _spec(client))["servers"]
    assert [server["url"] for server in servers] == ["."]
    assert urljoin("http://host/api/openapi.json", servers[0]["url"]) == "http://host/api/"


@pytest.mark.anyio
async def test_the_document_describes_its_own_body(client: httpx.AsyncClient) -> None:
    """`GET /openapi.json` answers a JSON body, not nothing as a 204 would."""
    ok = (await _spec(client))["paths"]["/openapi.json"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["application/json"]


@pytest.mark.anyio
async def test_openapi_health_responses_use_the_handlers_structs(client: httpx.AsyncClient) -> None:
    """Health operations answer 200 and 503 with the Liveness/Readiness schemas msgspec generated."""
    spec = await _spec(client)
    live = spec["paths"]["/health"]["get"]["responses"]
    ready = spec["paths"]["/health/db"]["get"]["responses"]
    for responses, name in ((live, "Liveness"), (ready, "Readiness")):
        for status in ("200", "503"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{name}"}
    assert set(spec["components"]["schemas"]["Readiness"]["properties"]) == {
        "status", "timestamp", "database_connected", "response_time_ms", "connection_pool", "migration_status",
        "errors"}  # fmt: skip


@pytest.mark.anyio
async def test_openapi_lists_the_error_envelope_for_every_error_status(client: httpx.AsyncClient) -> None:
    """Every error status is a shared response with the ErrorBody schema; every operation has 500."""
    spec = await _spec(client)
    shared = spec["components"]["responses"]
    envelope = {"$ref": "#/components/schemas/ErrorBody"}
    names = {"MalformedRequest", "Unauthenticated", "Forbidden", "NotFound", "MethodNotAllowed", "Conflict",
             "PayloadTooLarge", "UnsupportedMediaType", "ValidationError", "InternalServerError",
             "ServiceUnavailable", "Timeout"}  # fmt: skip
    assert set(shared) == names
    assert all(shared[name]["content"]["application/json"]["schema"] == envelope for name in names)
    assert "Retry-After" in shared["ServiceUnavailable"]["headers"]
    assert "WWW-Authenticate" in shared["Unauthenticated"]["headers"]
    assert "Allow" in shared["MethodNotAllowed"]["headers"]
    for item in spec["paths"].values():
        for operation in item.values():
            assert operation["responses"]["500"] == {"$ref": "#/components/responses/InternalServerError"}
            assert operation["responses"]["default"]["headers"] == {
                "X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}
            }


@pytest.mark.anyio
async def test_timestamps_are_documented_as_rfc_3339_date_times() -> None:
    """The envelope's and the probes' timestamps, and the reference resource's `created_at`, say `date-time`:
    documented as any text, a client or fuzzer generating from the document sent `""` and got a 422."""
    from examples.items import create_items_app

    async with serve(create_items_app(load_settings({}))) as client:
        schemas = (await _spec(client))["components"]["schemas"]
    stamps = [schemas[name]["properties"]["timestamp"] for name in ("ErrorBody", "Liveness", "Readiness")]
    assert stamps == [{"type": "string", "format": "date-time"}] * 3
    assert schemas["Item"]["properties"]["created_at"] == {"type": "string", "format": "date-time"}


@pytest.mark.anyio
async def test_openapi_examples_match_their_schemas(client: httpx.AsyncClient) -> None:
    """Every example (taken from the contract) validates against the schema it illustrates."""
    spec = await _spec(client)
    responses = list(spec["components"]["responses"].values())
    responses += [r for item in spec["paths"].values() for op in item.values() for r in op["responses"].values()]
    checked = 0
    for response in responses:
        for media in response.get("content", {}).values():
            for example in media.get("examples", {}).values():
                _check(example["value"], media["schema"]["$ref"], spec)
                checked += 1
    assert checked >= 10


@pytest.mark.anyio
async def test_real_responses_match_the_documented_schemas(client: httpx.AsyncClient) -> None:
    """What the service actually answers validates against the document, errors included."""
    spec = await _spec(client)
    cases = [("GET", "/health", 200, "Liveness"), ("GET", "/health/db", 503, "Readiness"),
             ("GET", "/", 200, "RootInfo"), ("GET", "/nowhere", 404, "ErrorBody"),
             ("POST", "/health", 405, "ErrorBody")]  # fmt: skip
    for method, path, status, name in cases:
        response = await client.request(method, path)
        assert response.status_code == status
        _check(response.json(), f"#/components/schemas/{name}", spec)


@pytest.mark.anyio
async def test_the_headers_the_service_routes_send_are_documented(client: httpx.AsyncClient) -> None:
    """Each header a foundation route sends, beyond the ones every response has, is in its documented 200."""
    spec = await _spec(client)
    for path in ("/health", "/health/db", "/metrics", "/docs", "/redoc"):
        response = await client.get(path)
        documented = {
            name.lower() for name in spec["paths"][path]["get"]["responses"][str(response.status_code)]["headers"]
        }
        sent = set(response.headers) - {"content-type", "content-length", "vary", "x-content-type-options"}
        assert sent <= documented, path


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_docs_pages_reference_only_assets_the_service_serves(client: httpx.AsyncClient, path: str) -> None:
    """The pages name no other host, and each asset they load is served here."""
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "://" not in response.text
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "connect-src 'self';" in csp
    assert "img-src 'self' data:;" in csp
    references = re.findall(r'(?:src|href|spec-url)="([^"]+)"|url: "([^"]+)"', response.text)
    assets = [a or b for a, b in references]
    assert "openapi.json" in assets
    assert len(assets) >= 2
    for asset in assets:
        served = await client.get(f"/{asset}")
        assert served.status_code == 200, asset
    assert (await client.head(path)).content == b""


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["bytes=abc", "items=0-1", "bytes=5-1", "bytes=99999999-", "bytes=0-9"])
async def test_a_docs_asset_is_served_whole_whatever_range_is_asked(client: httpx.AsyncClient, value: str) -> None:
    """A `Range` on an asset is ignored (RFC 9110 allows it): never a plain-text 400 or 416."""
    whole = (STATIC_DIR / "swagger-ui.css").read_bytes()
    response = await client.get("/static/swagger-ui.css", headers={"Range": value})
    assert response.status_code == 200
    assert response.content == whole
    assert "content-range" not in response.headers


def test_vendored_assets_match_their_recorded_hashes() -> None:
    """static/ holds exactly what .ci/refresh-docs-assets fetched: no hand edits."""
    lines = (STATIC_DIR / "ASSETS.sha256").read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        digest, name = line.split()
        assert hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.anyio
@pytest.mark.parametrize("environ", [{"ENABLE_DOCS": "false"}, {"ENVIRONMENT": "production"}])
async def test_docs_are_off_when_disabled_and_in_production(environ: dict[str, str]) -> None:
    """With ENABLE_DOCS off (the production default) the schema, pages and assets are 404s."""
    production = {
        "DATABASE_URL": "postgresql://u:p-123456@127.0.0.1:1/db",
        "SECRET_KEY": "docs-" + "Pz4Wc9Ln2Xq7Tv5Rk1Bj" * 2,
    }
    settings = load_settings({**environ, **production} if "ENVIRONMENT" in environ else environ)
    assert settings.enable_docs is False
    async with serve(create_app(settings)) as http:
        for path in ("/openapi.json", "/docs", "/redoc", "/static/swagger-ui.css"):
            response = await http.get(path)
            assert response.status_code == 404
            assert response.json()["error"] == "NOT_FOUND_ERROR"
