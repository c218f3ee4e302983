"""The lean request path keeps every promise: probes ahead of the router, CORS, request IDs, access lines."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import msgspec
import pytest
from service import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from api import Endpoints
from app import create_app
from logs import JsonFormatter, configure_logging
from middleware import RequestContext, new_request_id
from responses import utc_second, utc_timestamp
from routing import HotPaths
from settings import Redactor, Settings

ORIGIN = "http://localhost:3000"
TIMESTAMP_WITH_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def production(**overrides: object) -> Settings:
    values: dict[str, object] = {"environment": "production", "log_json": True, "secret_key": "k" * 48}
    return Settings(**(values | overrides))  # type: ignore[arg-type]


def access_lines(err: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == "service.access"]


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/health", "/health/db"])
async def test_probe_answers_alike_through_the_fast_path_and_the_router(path: str) -> None:
    """The same status, headers and body fields whether or not the router dispatched the probe."""
    app = create_app(production())
    async with serve(app) as client:
        fast = await client.get(path)
        hot_paths = app.middleware_stack.app  # type: ignore[union-attr]  # built by the first request
        assert isinstance(hot_paths, HotPaths)
        hot_paths.probes = {}  # from here on the router dispatches the probes
        routed = await client.get(path)
    assert fast.status_code == routed.status_code
    assert sorted(fast.headers.keys()) == sorted(routed.headers.keys())
    assert fast.json().keys() == routed.json().keys()
    for response in (fast, routed):
        assert response.headers["content-type"] == "application/json"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "vary" not in response.headers  # no-store: no cache keeps it, so nothing to vary on
        assert uuid.UUID(response.headers["x-request-id"]).version == 4


@pytest.mark.anyio
async def test_head_of_a_probe_has_the_headers_and_no_body() -> None:
    """HEAD is answered where GET is, with the GET's length and no body."""
    async with serve(create_app(production())) as client:
        get = await client.get("/health")
        head = await client.head("/health")
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) == len(get.content)
    assert "x-request-id" in head.headers


@pytest.mark.anyio
async def test_other_methods_on_a_probe_path_still_get_405_with_allow() -> None:
    """Only GET and HEAD take the fast path; the router answers the rest with the envelope."""
    async with serve(create_app(production())) as client:
        response = await client.post("/health")
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
    body = response.json()
    assert body["error"] == "METHOD_NOT_ALLOWED"
    assert body["request_id"] == response.headers["x-request-id"]


@pytest.mark.anyio
async def test_cross_origin_probe_gets_cors_headers() -> None:
    """A request with an allowed Origin gets it mirrored back, on the fast path too."""
    async with serve(create_app(production(cors_origins=(ORIGIN,)))) as client:
        response = await client.get("/health", headers={"Origin": ORIGIN})
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "X-Request-ID" in response.headers["access-control-expose-headers"]
    assert "Origin" in response.headers["vary"]


@pytest.mark.anyio
async def test_vary_origin_joins_a_vary_the_app_already_sent() -> None:
    """Without an Origin, an existing Vary gets Origin appended rather than a second header."""

    async def varying(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-length", b"0"), (b"vary", b"Accept-Encoding")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    app = RequestContext(varying)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/")
    assert response.headers.get_list("vary") == ["Accept-Encoding, Origin"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("cache_control", "vary"),
    [(None, ["Origin"]), (b"max-age=60", ["Origin"]), (b"no-store", []), (b"private, No-Store", [])],
)
async def test_vary_origin_is_sent_on_every_response_a_cache_may_store(
    cache_control: bytes | None, vary: list[str]
) -> None:
    """Without an Origin, `Vary: Origin` goes on every response but those no cache may store (`no-store`)."""

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-length", b"0")]
        if cache_control is not None:
            headers.append((b"cache-control", cache_control))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    transport = httpx.ASGITransport(app=RequestContext(answer))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/")
    assert response.headers.get_list("vary") == vary


@pytest.mark.anyio
async def test_the_envelope_and_the_root_vary_on_origin() -> None:
    """The foundation's cacheable answers (the 404 envelope, `/`) carry `Vary: Origin`; its probes do not."""
    async with serve(create_app(production())) as client:
        responses = [await client.get(path) for path in ("/", "/no-such-route", "/health")]
    assert [r.headers.get("vary") for r in responses] == ["Origin", "Origin", None]


def test_forked_workers_generate_request_ids_of_their_own() -> None:
    """A worker forked from the supervisor does not repeat the IDs its parent (or a sibling) makes."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next IDs, then gone without running the parent's cleanup
        os.write(write, " ".join(new_request_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    parents = [new_request_id() for _ in range(3)]
    with os.fdopen(read) as pipe:
        childs = pipe.read().split()
    os.waitpid(pid, 0)
    assert len(childs) == 3
    assert not set(childs) & set(parents)


def test_generated_request_ids_are_random_version_4_uuids() -> None:
    """Each new ID parses as an RFC 9562 version-4 UUID, and they do not repeat."""
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert str(parsed) == value
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


@pytest.mark.anyio
@pytest.mark.parametrize(("sent", "reused"), [("abc-123.x:y_z", True), ("has space", False), ("a" * 129, False)])
async def test_incoming_request_id_is_reused_only_when_valid(sent: str, reused: bool) -> None:
    """A valid X-Request-ID comes back unchanged; anything else is replaced by a new UUID."""
    async with serve(create_app(production())) as client:
        response = await client.get("/health", headers={"X-Request-ID": sent})
    returned = response.headers["x-request-id"]
    assert (returned == sent) is reused
    if not reused:
        assert uuid.UUID(returned).version == 4


def test_uvicorn_access_logger_has_no_handlers_so_uvicorn_skips_its_line() -> None:
    """uvicorn checks `hasHandlers()` once per connection and then builds no access line at all."""
    configure_logging(production())
    assert not logging.getLogger("uvicorn.access").hasHandlers()


@pytest.mark.anyio
async def test_not_found_writes_one_json_access_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The 404 is logged once, with its fields, its request ID and this module as the caller."""
    async with serve(create_app(production())) as client:
        response = await client.get("/no-such-route")
    lines = access_lines(capsys.readouterr().err)
    assert len(lines) == 1
    line = lines[0]
    assert response.status_code == 404
    assert line["request_id"] == response.json()["request_id"] == response.headers["x-request-id"]
    assert (line["method"], line["path"], line["status"]) == ("GET", "/no-such-route", 404)
    assert isinstance(line["duration_ms"], float)
    assert line["client"] == "127.0.0.1:123"
    assert line["level"] == "INFO"
    assert TIMESTAMP_WITH_MS.match(str(line["timestamp"]))


@pytest.mark.anyio
async def test_access_line_in_text_format_names_its_real_source(capsys: pytest.CaptureFixture[str]) -> None:
    """Building the record directly still gives LOG_FORMAT the module and function that logged it."""
    settings = Settings(log_format="%(module)s.%(funcName)s %(message)s")
    async with serve(create_app(settings)) as client:
        await client.get("/no-such-route")
    err = capsys.readouterr().err
    assert "access.write_access_line GET /no-such-route 404" in err


@pytest.mark.anyio
async def test_production_logs_failed_probes_only(capsys: pytest.CaptureFixture[str]) -> None:
    """A 200 from /health writes nothing; a 503 from /health/db (no database) writes its line."""
    async with serve(create_app(production())) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/health/db")).status_code == 503
    lines = access_lines(capsys.readouterr().err)
    assert [(line["path"], line["status"]) for line in lines] == [("/health/db", 503)]


def test_the_clock_shortcut_never_hands_out_another_seconds_text() -> None:
    """`utc_second` reuses its text only within the same second, whatever order seconds come in."""
    start = int(time.time())
    for seconds in (start, start, start + 1, start - 5, start + 1, 0):
        assert utc_second(seconds) == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_timestamp())


def test_json_timestamp_follows_each_record_across_seconds() -> None:
    """The per-second cache never hands a line the previous second's time."""
    formatter = JsonFormatter(Redactor(()))
    start = float(int(time.time()))
    for created in (start + 0.25, start + 0.75, start + 1.5, start + 1.999, start + 3.0):
        record = logging.makeLogRecord({"msg": "x", "created": created, "msecs": (created % 1) * 1000})
        stamp = json.loads(formatter.format(record))["timestamp"]
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(created)))
        assert stamp == f"{expected}.{int((created % 1) * 1000):03d}Z"


@pytest.mark.anyio
@pytest.mark.parametrize("debug", [False, True])
async def test_unknown_path_gets_the_same_envelope_as_a_raised_404(debug: bool) -> None:
    """The router's direct 404 matches what `HTTPException(404)` through the handlers gives."""
    async with serve(create_app(Settings(debug=debug))) as client:
        response = await client.get("/no-such-route")
    body = response.json()
    assert response.status_code == 404
    assert (body["error"], body["message"]) == ("NOT_FOUND_ERROR", "Resource not found")
    assert body["request_id"] == response.headers["x-request-id"]
    if debug:
        assert body["detail"] == {"type": "HTTPException", "message": "404: Not Found"}
    else:
        assert "detail" not in body


@asynccontextmanager
async def counting_router_404s(
    app: Starlette, root_path: str = ""
) -> AsyncIterator[tuple[httpx.AsyncClient, list[str]]]:
    """A client, and the paths the router itself answered with its 404 (the shortcut skips it)."""
    seen: list[str] = []
    router_default = app.router.default

    async def default(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["path"])
        await router_default(scope, receive, send)

    app.router.default = default
    async with serve(app, root_path=root_path) as client:
        yield client, seen


@pytest.mark.anyio
@pytest.mark.parametrize("debug", [False, True])
async def test_certain_404_skips_the_router_with_the_same_envelope(debug: bool) -> None:
    """With only fixed routes, an unknown path is answered without the router, identically."""
    async with counting_router_404s(create_app(production(debug=debug, enable_docs=False))) as (client, seen):
        response = await client.get("/wp-admin/setup.php")
    body = response.json()
    assert seen == []
    assert response.status_code == 404
    assert (body["error"], body["message"]) == ("NOT_FOUND_ERROR", "Resource not found")
    assert body["request_id"] == response.headers["x-request-id"]
    assert ("detail" in body) is debug


@pytest.mark.anyio
async def test_trailing_slash_near_miss_redirects_to_a_path_never_to_the_host_header() -> None:
    """`/health/` is 307 to `/health` (query kept) as the router answers, but with a relative `Location`:
    the router's absolute one named whatever host the request's `Host` header named."""
    app = create_app(production(enable_docs=False), endpoints=[things])
    async with counting_router_404s(app) as (client, seen):
        response = await client.get("/health/?verbose=1", headers={"Host": "evil.example"}, follow_redirects=False)
        added = await client.get("/things/caf%C3%A9/", follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (307, "/health?verbose=1")
    assert response.headers["x-request-id"]
    assert (added.status_code, added.headers["location"]) == (307, "/things/caf%C3%A9")
    assert seen == []


@pytest.mark.anyio
async def test_under_a_root_path_probes_404s_and_redirects_take_the_same_shortcuts() -> None:
    """Behind a proxy's prefix paths are read as the router reads them; a redirect keeps the prefix."""
    app = create_app(production(enable_docs=False))
    async with counting_router_404s(app, root_path="/api") as (client, seen):
        probe = await client.get("/api/health")
        missing = await client.get("/api/nope")
        redirect = await client.get("/api/health/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert probe.status_code == 200
    assert missing.json()["error"] == "NOT_FOUND_ERROR"
    assert (redirect.status_code, redirect.headers["location"]) == (307, "/api/health")
    assert seen == []


@pytest.mark.anyio
async def test_route_added_after_create_app_is_served() -> None:
    """The shortcut reads the live router, so a route appended later is not mistaken for a 404."""
    app = create_app(production(enable_docs=False))

    async def late(request: Request) -> Response:
        return Response(status_code=204)

    async with serve(app) as client:
        assert (await client.get("/late")).status_code == 404
        app.router.routes.append(Route("/late", late))
        assert (await client.get("/late")).status_code == 204


class Thing(msgspec.Struct):
    id: int


things = Endpoints(tag="things")


@things.get("/things/{thing_id}", summary="One thing")
async def get_thing(thing_id: int) -> Thing:
    return Thing(thing_id)


@pytest.mark.anyio
async def test_shortcut_holds_with_parameterised_routes_and_docs_mounted() -> None:
    """Path parameters and the docs' mount still leave certain 404s to the shortcut, the rest to the router."""
    app = create_app(production(enable_docs=True), endpoints=[things])
    async with counting_router_404s(app) as (client, seen):
        assert (await client.get("/things/7")).json() == {"id": 7}
        assert (await client.get("/nope")).status_code == 404
        assert (await client.get("/things/7/more")).status_code == 404
        assert (await client.get("/things/7/", follow_redirects=False)).status_code == 307
        assert (await client.get("/static", follow_redirects=False)).status_code == 307
        assert (await client.get("/static/swagger-ui.css")).status_code == 200
    assert seen == []
