"""`/metrics`: request counts and durations by route template, pool gauges, process metrics."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from cluster import Cluster
from prometheus_client.parser import text_string_to_metric_families
from service import make_settings
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from app import create_app
from errors import AuthenticationError, error_response
from logstream import dropped_log_lines
from metrics import FLUSH_INTERVAL, UNMATCHED, Metrics, MetricsEndpoint
from middleware import RequestContext
from settings import SettingsError, load_settings


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample, keyed by name and labels; parsing also checks the text format."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


async def _client(environ: Mapping[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(load_settings(environ))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async for http in _client({}):
        yield http


@pytest.mark.anyio
async def test_metrics_count_requests_by_route_and_status(client: httpx.AsyncClient) -> None:
    """Each answered request adds one to its method/route/status series and one duration sample."""
    for _ in range(3):
        assert (await client.get("/health")).status_code == 200
    assert (await client.post("/health")).status_code == 405
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert value(text, "http_requests_total", method="GET", route="/health", status="200") == 3
    assert value(text, "http_requests_total", method="POST", route="/health", status="405") == 1
    assert value(text, "http_request_duration_seconds_count", method="GET", route="/health") == 3
    assert (value(text, "http_request_duration_seconds_sum", method="GET", route="/health") or 0) > 0


@pytest.mark.anyio
async def test_unmatched_paths_share_one_label(client: httpx.AsyncClient) -> None:
    """Unknown paths never become labels of their own, so clients cannot grow the series count."""
    for path in ("/a", "/b/1", "/c?x=1", "/wp-admin.php"):
        assert (await client.get(path)).status_code == 404
    text = (await client.get("/metrics")).text
    assert value(text, "http_requests_total", method="GET", route=UNMATCHED, status="404") == 4
    assert "wp-admin" not in text
    assert "/b/1" not in text


@pytest.mark.anyio
async def test_routes_are_labelled_by_template_not_path() -> None:
    """A path parameter does not reach the label: /items/1 and /items/2 are one series."""

    async def item(request: Request) -> Response:
        return PlainTextResponse(request.path_params["item_id"])

    metrics = Metrics()
    app = Starlette(routes=[Route("/items/{item_id}", item), Route("/metrics", MetricsEndpoint(metrics))])
    wrapped = RequestContext(app, observe=metrics.record)
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        await http.get("/items/1")
        await http.get("/items/2")
        text = (await http.get("/metrics")).text
    assert value(text, "http_requests_total", method="GET", route="/items/{item_id}", status="200") == 2
    assert "/items/1" not in text


class Bearer:
    """A team's auth layer: no `Authorization` is a 401, raised on `/health/db`, answered itself elsewhere."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/metrics" and not Headers(scope=scope).get("authorization"):
            if scope["path"] == "/health/db":
                raise AuthenticationError("no token")
            await error_response(401, "AUTHENTICATION_ERROR", "no token")(scope, receive, send)
            return
        await self.app(scope, receive, send)


@pytest.mark.anyio
async def test_a_request_answered_before_routing_is_counted_by_the_route_it_was_for() -> None:
    """The user's middleware refusing, raising or answering, and a CORS preflight, never reach the router:
    still labelled by the route's template (a 401 on `/health/db` is not scanner noise), not the unmatched label."""
    app = create_app(load_settings({"CORS_ORIGINS": "http://app.example"}))
    app.add_middleware(Bearer)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            statuses = [(await http.get(path)).status_code for path in ("/health", "/health/db", "/nowhere")]
            asking = {"Origin": "http://app.example", "Access-Control-Request-Method": "GET"}
            preflight = await http.options("/", headers=asking)  # CORS answers it, outside the user's middleware
            text = (await http.get("/metrics")).text
    assert (statuses, preflight.status_code) == ([401, 401, 401], 200)
    assert value(text, "http_requests_total", method="GET", route="/health", status="401") == 1
    assert value(text, "http_requests_total", method="GET", route="/health/db", status="401") == 1
    assert value(text, "http_requests_total", method="GET", route=UNMATCHED, status="401") == 1
    assert value(text, "http_requests_total", method="OPTIONS", route="/", status="200") == 1


@pytest.mark.anyio
async def test_metrics_include_process_metrics_and_answer_head(client: httpx.AsyncClient) -> None:
    """In one process the registry carries prometheus-client's process collector; HEAD has no body."""
    text = (await client.get("/metrics")).text
    assert (value(text, "process_resident_memory_bytes") or 0) > 0
    assert value(text, "db_pool_connections_max") == 0  # no DATABASE_URL: no pool
    head = await client.head("/metrics")
    assert head.status_code == 200
    assert head.content == b""


@pytest.mark.anyio
async def test_pool_gauges_follow_the_real_pool(database_url: str) -> None:
    """After a readiness probe the pool holds a connection, none is in use, and max is the pool size."""
    async for http in _client({"DATABASE_URL": database_url, "DATABASE_POOL_SIZE": "7"}):
        text = (await http.get("/metrics")).text
        assert value(text, "db_pool_connections_open") == 0  # lazy pool: nothing opened yet
        assert (await http.get("/health/db")).status_code in (200, 503)
        text = (await http.get("/metrics")).text
        assert value(text, "db_pool_connections_open") == 1
        assert value(text, "db_pool_connections_in_use") == 0
        assert value(text, "db_pool_connections_max") == 7


@pytest.mark.anyio
async def test_enable_metrics_false_removes_the_endpoint() -> None:
    """With ENABLE_METRICS=false, /metrics is the usual 404 envelope and nothing is counted."""
    settings = load_settings({"ENABLE_METRICS": "false"})
    assert settings.enable_metrics is False
    async for http in _client({"ENABLE_METRICS": "false"}):
        response = await http.get("/metrics")
        assert response.status_code == 404
        assert response.json()["error"] == "NOT_FOUND_ERROR"


def test_enable_metrics_must_be_a_boolean() -> None:
    """A typo in ENABLE_METRICS stops start-up with the rule, rather than silently picking a side."""
    with pytest.raises(SettingsError, match=r"ENABLE_METRICS='maybe': must be a boolean"):
        load_settings({"ENABLE_METRICS": "maybe"})


def test_durations_land_in_the_first_bucket_whose_bound_holds_them() -> None:
    """Bounds are inclusive (`le`), buckets cumulative, and what exceeds the last lands in +Inf only."""
    metrics = Metrics()
    scope = {"method": "GET", "route": Route("/x", PlainTextResponse("x"))}
    for seconds in (0.0005, 0.003, 0.003, 20.0):
        metrics.record(scope, 200, seconds)
    metrics.record(scope, 500, 0.2)  # another status: same histogram, its own counter
    text = metrics.exposition().decode()
    bucket = {le: value(text, "http_request_duration_seconds_bucket", method="GET", route="/x", le=le)
              for le in ("0.0005", "0.0025", "0.005", "0.25", "10.0", "+Inf")}  # fmt: skip
    assert bucket == {"0.0005": 1, "0.0025": 1, "0.005": 3, "0.25": 4, "10.0": 4, "+Inf": 5}
    assert value(text, "http_request_duration_seconds_count", method="GET", route="/x") == 5
    assert value(text, "http_request_duration_seconds_sum", method="GET", route="/x") == pytest.approx(20.2065)
    assert value(text, "http_requests_total", method="GET", route="/x", status="200") == 4
    assert value(text, "http_requests_total", method="GET", route="/x", status="500") == 1
    assert value(text, "log_lines_dropped_total") == dropped_log_lines()  # the process's own count, whatever it is


def test_several_workers_without_a_shared_directory_are_warned_of(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """uvicorn reads WEB_CONCURRENCY as --workers: unmerged, each scrape would count one worker's requests."""
    warning = "WEB_CONCURRENCY=2 without PROMETHEUS_MULTIPROC_DIR"
    create_app(make_settings(WEB_CONCURRENCY="2"))
    assert [r.levelname for r in caplog.records if r.getMessage().startswith(warning)] == ["WARNING"]
    caplog.clear()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # as python -m app gives its workers
    create_app(make_settings(WEB_CONCURRENCY="2"))
    create_app(make_settings())
    assert not [r for r in caplog.records if r.getMessage().startswith(warning)]


@pytest.mark.anyio
async def test_a_metrics_directory_that_goes_away_is_said_once_and_the_stop_still_closes_the_pool(
    database_url: str,
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The refresher died of the first failed write, and the lifespan's end re-raised its error before
    closing the pool or writing the buffered log lines."""
    shared = tmp_path / "metrics"
    shared.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    settings = make_settings(DATABASE_URL=database_url, APP_NAME="metrics-gone")
    app = create_app(settings)
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as http:
            assert (await http.get("/health/db")).status_code == 200
        assert cluster.backend_count("metrics-gone") == 1
        shutil.rmtree(shared)
        await asyncio.sleep(2.5 * FLUSH_INTERVAL)  # two writes fail
    failed = [r for r in caplog.records if r.getMessage().startswith("Cannot write this worker's counts")]
    assert len(failed) == 1
    assert [r.levelname for r in caplog.records if "last counts" in r.getMessage()] == ["WARNING"]
    for _ in range(50):  # a closed session leaves pg_stat_activity a moment later
        if cluster.backend_count("metrics-gone") == 0:
            break
        await asyncio.sleep(0.1)
    assert cluster.backend_count("metrics-gone") == 0


@pytest.mark.parametrize("left", [b"{}", b'{"series": [["GET", "/", 200', b"\xff"])
def test_a_counts_file_left_under_this_pid_that_cannot_be_read_starts_the_counts_afresh(
    left: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A file of an older shape (after an upgrade), or cut short, stopped start-up with a decode error."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    (tmp_path / f"requests_{os.getpid()}.json").write_bytes(left)
    metrics = Metrics()
    assert metrics.series == {}
    metrics.close()
