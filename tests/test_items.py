"""The reference resource (examples/items.py): every bullet of the contract's "Building on it"."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
import pytest
from cluster import Cluster
from openapi_spec_validator import validate
from service import make_settings, running_uvicorn, serve

from api import Context, Endpoints
from app import create_app
from examples.items import MIGRATIONS, create_items_app, items
from migrate import MIGRATIONS_DIR

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
APP_NAME = "items-test"


class Slept(msgspec.Struct):
    slept: bool


slow = Endpoints(tag="test")


@slow.get("/slow", summary="Test only: holds a pooled connection in a 10 s query")
async def sleep_in_database(ctx: Context) -> Slept:
    async with ctx.connection() as conn:
        await conn.execute("SELECT pg_sleep(10)")
    return Slept(True)


@asynccontextmanager
async def items_client(url: str, **env: str) -> AsyncIterator[httpx.AsyncClient]:
    """The example app in process, with the test-only `/slow` route beside it."""
    settings = make_settings(DATABASE_URL=url, APP_NAME=APP_NAME, **env)
    app = create_app(settings, endpoints=[items, slow], migrations=[MIGRATIONS_DIR, MIGRATIONS])
    async with serve(app) as client:
        yield client


async def backend_pids(url: str) -> set[int]:
    """The server processes holding the app's connections (pg_stat_activity by application_name)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", APP_NAME)
    finally:
        await conn.close()
    return {row["pid"] for row in rows}


@pytest.mark.anyio
async def test_create_returns_201_location_and_a_database_made_uuidv7(migrated_url: str) -> None:
    """POST /items: 201, Location of the new item, its UUIDv7 id from the database, a Z timestamp."""
    async with items_client(migrated_url) as client:
        response = await client.post("/items", json={"name": "first", "tags": ["a", "b"]})
    body = response.json()
    assert response.status_code == 201
    assert response.headers["location"] == f"/items/{body['id']}"
    assert (body["name"], body["tags"]) == ("first", ["a", "b"])
    assert uuid.UUID(body["id"]).version == 7
    assert RFC3339_UTC.match(body["created_at"])
    made = datetime.fromisoformat(body["created_at"])
    assert abs((made - datetime.now(UTC)).total_seconds()) < 60


@pytest.mark.anyio
async def test_tags_are_optional(migrated_url: str) -> None:
    async with items_client(migrated_url) as client:
        response = await client.post("/items", json={"name": "untagged"})
    assert (response.status_code, response.json()["tags"]) == (201, [])


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b"\xff\xfe",
        b'{"colour": "red", oops',  # a wrong shape first, then not JSON at all
        b"[" * 1000,  # nested past what msgspec decodes: a RecursionError, once a 500
        b'{"name": "x", "tags": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
    ids=["not-json", "empty", "not-utf8", "wrong-shape-then-not-json", "deep-unclosed", "deep-balanced"],
)
async def test_a_body_that_is_not_json_is_400(migrated_url: str, content: bytes) -> None:
    """Whatever the bytes, a body that cannot be read as JSON is a 400, never a 500."""
    async with items_client(migrated_url) as client:
        response = await client.post("/items", content=content, headers={"content-type": "application/json"})
    body = response.json()
    assert response.status_code == 400
    assert body["error"] == "VALIDATION_ERROR"
    assert body["request_id"] == response.headers["x-request-id"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        # what a cross-site form may send without a CORS preflight
        ({"content-type": "text/plain"}, 415, "send the body as application/json"),
        ({"content-type": "application/x-www-form-urlencoded"}, 415, "send the body as application/json"),
        ({"content-type": "multipart/form-data; boundary=x"}, 415, "send the body as application/json"),
        ({"content-type": "application/jsonp"}, 415, "send the body as application/json"),
        ({"content-type": "application/json; charset=UTF-16"}, 415, "send the body in UTF-8, not 'UTF-16'"),
        ({"content-encoding": "gzip"}, 415, "send the body uncompressed, not 'gzip'"),
        ({"content-type": "application/json; charset=utf-8"}, 201, ""),
        ({"content-type": 'application/json;charset="UTF8"'}, 201, ""),
        ({"content-type": "application/json; charset=US-ASCII"}, 201, ""),
        ({"content-type": "Application/JSON", "content-encoding": "identity"}, 201, ""),
        ({"content-type": "application/merge-patch+json"}, 201, ""),
    ],
)
async def test_a_body_must_be_declared_as_json_when_its_type_is_declared(
    migrated_url: str, headers: dict[str, str], status: int, message: str
) -> None:
    """JSON sent as text/plain is refused (415) and nothing is stored: a browser sends such bodies across sites.
    So is one in another charset or compressed: read as it is, it would be "not JSON"."""
    async with items_client(migrated_url) as client:
        response = await client.post("/items", content=b'{"name": "typed"}', headers=headers)
        stored = (await client.get("/items")).json()["items"]
    assert response.status_code == status
    if status == 415:
        assert response.json()["error"] == "UNSUPPORTED_MEDIA_TYPE"
        assert response.json()["message"] == f"Unsupported media type: {message}"
        assert stored == []
    else:
        assert [item["name"] for item in stored] == ["typed"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("sent", "fields"),
    [
        ({"name": 1, "tags": "x"}, ["name", "tags"]),  # every wrong field named, not just the first
        ({}, ["name"]),
        ({"name": ""}, ["name"]),
        ({"name": "x" * 201}, ["name"]),
        ({"name": "ok", "tags": ["a", 2]}, ["tags[1]"]),
        ({"name": "ok", "colour": "red"}, ["colour"]),  # unknown fields are refused
        ([1, 2], [""]),
    ],
)
async def test_wrong_shape_is_422_naming_each_field(migrated_url: str, sent: object, fields: list[str]) -> None:
    async with items_client(migrated_url) as client:
        response = await client.post("/items", json=sent)
        listed = (await client.get("/items")).json()["items"]
    body = response.json()
    assert response.status_code == 422
    assert body["error"] == "VALIDATION_ERROR"
    assert [e["field"] for e in body["validation_errors"]] == fields
    assert all(e["message"] for e in body["validation_errors"])
    assert listed == []  # nothing was stored


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "shown"),
    [
        (b"5", 5),
        (b'"' + b"x" * 201 + b'"', "x" * 201),  # too long for the field, short enough to echo
        (b'"' + b"x" * 300 + b'"', None),  # not echoed past 256 characters
        (b"[" * 50 + b"]" * 50, None),  # echoed nested ~970 deep, its envelope could not be encoded
        (b'{"a": [1, 2]}', None),
    ],
    ids=["int", "string", "long-string", "nested-list", "object"],
)
async def test_a_422_echoes_only_a_readable_scalar_as_the_value(migrated_url: str, name: bytes, shown: object) -> None:
    async with items_client(migrated_url) as client:
        response = await client.post("/items", content=b'{"name": ' + name + b"}")
    assert response.status_code == 422
    [error] = response.json()["validation_errors"]
    assert (error["field"], error["value"]) == ("name", shown)


@pytest.mark.anyio
async def test_get_returns_the_same_body_and_404_when_absent(migrated_url: str) -> None:
    async with items_client(migrated_url) as client:
        created = (await client.post("/items", json={"name": "kept", "tags": ["t"]})).json()
        found = await client.get(f"/items/{created['id']}")
        absent = await client.get(f"/items/{uuid.uuid4()}")
    assert (found.status_code, found.json()) == (200, created)
    assert absent.status_code == 404
    assert absent.json()["error"] == "NOT_FOUND_ERROR"


@pytest.mark.anyio
async def test_an_item_comes_with_its_etag_and_a_client_holding_it_gets_304(migrated_url: str) -> None:
    """`If-None-Match` naming the item's ETag (weak or strong, in a list, or `*`): 304, no body;
    another tag: the item again. An absent item is still a 404, whatever the client holds."""
    async with items_client(migrated_url) as client:
        created = (await client.post("/items", json={"name": "cached"})).json()
        path = f"/items/{created['id']}"
        found = await client.get(path)
        etag = found.headers["etag"]
        held = [await client.get(path, headers={"If-None-Match": value}) for value in
                (etag, f"W/{etag}", f'"other", {etag}', "*")]  # fmt: skip
        head = await client.head(path, headers={"If-None-Match": etag})
        stale = await client.get(path, headers={"If-None-Match": '"other"'})
        absent = await client.get(f"/items/{uuid.uuid4()}", headers={"If-None-Match": "*"})
    assert etag == f'"{created["id"]}"'
    for response in (*held, head):
        assert (response.status_code, response.content, response.headers["etag"]) == (304, b"", etag)
        assert "content-length" not in response.headers
        assert "content-type" not in response.headers
        assert response.headers["x-request-id"]
    assert (stale.status_code, stale.json()) == (200, created)
    assert absent.status_code == 404


@pytest.mark.parametrize("command", ["uvicorn", "python -m app"])
def test_a_304_leaves_the_connection_ready_for_the_next_request(migrated_url: str, command: str) -> None:
    """Through a real server: the 304 has no body and no length, and the same connection serves on."""
    env = {"DATABASE_URL": migrated_url}
    with running_uvicorn(env, "examples.items:app", command=command) as server, httpx.Client(timeout=5) as client:
        created = client.post(f"{server.url}/items", json={"name": "over the wire"}).json()
        path = f"{server.url}/items/{created['id']}"
        etag = client.get(path).headers["etag"]
        unchanged = client.get(path, headers={"If-None-Match": etag})
        again = client.get(path)
    assert (unchanged.status_code, unchanged.content, unchanged.headers["etag"]) == (304, b"", etag)
    assert "content-length" not in unchanged.headers
    assert (again.status_code, again.json()) == (200, created)


@pytest.mark.anyio
@pytest.mark.parametrize("item_id", ["not-a-uuid", "123", "%00", "0190a3f4-7b1c-7d2e-8f00-123456789abcd"])
async def test_an_item_id_that_is_not_a_uuid_is_422_never_500(migrated_url: str, item_id: str) -> None:
    async with items_client(migrated_url) as client:
        response = await client.get(f"/items/{item_id}")
    assert response.status_code == 422
    assert response.json()["validation_errors"][0]["field"] == "item_id"


@pytest.mark.anyio
async def test_list_is_newest_first_and_limited(migrated_url: str) -> None:
    async with items_client(migrated_url) as client:
        names = [f"item-{n:02d}" for n in range(25)]
        for name in names:
            assert (await client.post("/items", json={"name": name})).status_code == 201
        default = (await client.get("/items")).json()["items"]
        three = (await client.get("/items", params={"limit": 3})).json()["items"]
        everything = (await client.get("/items", params={"limit": 100})).json()["items"]
    assert [i["name"] for i in default] == names[::-1][:20]
    assert [i["name"] for i in three] == names[::-1][:3]
    assert len(everything) == 25


@pytest.mark.anyio
@pytest.mark.parametrize("limit", ["0", "101", "ten", "-1", "2.5", "05", "1e1"])
async def test_limit_out_of_range_is_422(migrated_url: str, limit: str) -> None:
    async with items_client(migrated_url) as client:
        response = await client.get("/items", params={"limit": limit})
    assert response.status_code == 422
    [error] = response.json()["validation_errors"]
    assert error["field"] == "limit"
    if limit in ("05", "1e1"):  # numbers, but not as the schema writes an integer: one spelling per value
        assert error["message"] == "Expected an integer, written in digits"


@pytest.mark.anyio
async def test_a_name_already_taken_is_409_and_the_connection_stays(migrated_url: str) -> None:
    """A unique violation is the handler's own error: 409 CONFLICT_ERROR, the connection kept."""
    async with items_client(migrated_url, DATABASE_POOL_SIZE="1") as client:
        assert (await client.post("/items", json={"name": "twice"})).status_code == 201
        before = await backend_pids(migrated_url)
        conflict = await client.post("/items", json={"name": "twice"})
        after = await backend_pids(migrated_url)
        assert (await client.post("/items", json={"name": "other"})).status_code == 201
    assert conflict.status_code == 409
    assert conflict.json()["error"] == "CONFLICT_ERROR"
    assert "twice" not in conflict.json()["message"]  # the server's detail would echo the value
    assert len(before) == 1
    assert after == before


@pytest.mark.anyio
async def test_a_wrong_method_lists_every_method_the_path_serves(migrated_url: str) -> None:
    """`Allow` names the methods of every route at the path: `GET /items` and `POST /items` are two routes."""
    async with items_client(migrated_url) as client:
        collection = await client.put("/items", json={"name": "x"})
        one = await client.delete(f"/items/{uuid.uuid4()}")
    assert collection.status_code == 405
    assert collection.json()["error"] == "METHOD_NOT_ALLOWED"
    assert collection.headers["allow"] == "GET, HEAD, POST"
    assert one.status_code == 405
    assert one.headers["allow"] == "GET, HEAD"


@pytest.mark.anyio
async def test_404s_and_422s_leave_the_pooled_connections_in_place(migrated_url: str) -> None:
    """Handlers' own errors release their connection healthy: the same backends serve on."""
    async with items_client(migrated_url, DATABASE_POOL_SIZE="2") as client:
        await client.get(f"/items/{uuid.uuid4()}")
        before = await backend_pids(migrated_url)
        statuses = {(await client.get(f"/items/{uuid.uuid4()}")).status_code for _ in range(20)}
        statuses |= {(await client.post("/items", json={"name": 5})).status_code for _ in range(5)}
        after = await backend_pids(migrated_url)
    assert statuses == {404, 422}
    assert before
    assert after == before


@pytest.mark.anyio
async def test_a_read_only_database_is_503_with_retry_after_and_writes_resume_after(migrated_url: str) -> None:
    """A standby, or a primary a failover demoted, refuses writes (25006): the database unavailable, not a 500."""
    database = urlsplit(migrated_url).path.removeprefix("/")
    admin = await asyncpg.connect(migrated_url)
    try:
        await admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        async with items_client(migrated_url) as client:
            refused = await client.post("/items", json={"name": "on a standby"})
            read = await client.get("/items")
            await admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
            # The read's connection, opened read-only, is refused and dropped in its turn; a new one writes.
            written = [(await client.post("/items", json={"name": f"after {n}"})).status_code for n in range(2)]
    finally:
        await admin.close()
    assert (refused.status_code, refused.json()["error"]) == (503, "DATABASE_CONNECTION_ERROR")
    assert refused.json()["message"] == "Database is read-only (a standby, or a failover under way)"
    assert refused.headers["retry-after"] == str(refused.json()["retry_after"])
    assert read.status_code == 200
    assert written == [503, 201]


@pytest.mark.anyio
@pytest.mark.slow
async def test_database_stopped_mid_request_is_503_with_retry_after(migrated_url: str, cluster: Cluster) -> None:
    """A connection lost mid-query, and then an unreachable database, are 503s, never 500s."""
    if not cluster.controllable:
        pytest.skip("needs the throwaway cluster: TEST_DATABASE_URL names a server we may not stop")
    async with items_client(migrated_url) as client:
        created = (await client.post("/items", json={"name": "before"})).json()
        in_flight = asyncio.ensure_future(client.get("/slow", timeout=30))
        deadline = asyncio.get_running_loop().time() + 10
        while await _sleeping(migrated_url) == 0:  # until the query is running in the server
            assert asyncio.get_running_loop().time() < deadline, "the slow query never started"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(cluster.stop)
        lost = await in_flight
        unreachable = await client.get(f"/items/{created['id']}")
        await asyncio.to_thread(cluster.start)
        recovered = await client.get(f"/items/{created['id']}")
    for response in (lost, unreachable):
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "DATABASE_CONNECTION_ERROR"
        assert response.headers["retry-after"] == str(response.json()["retry_after"])
    assert recovered.status_code == 200


async def _sleeping(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(10)'")
    finally:
        await conn.close()
    return count


@pytest.mark.anyio
async def test_health_db_counts_both_folders_migrations(database_url: str) -> None:
    """Until the example's own migration is applied, readiness is degraded and names it."""
    from yoyo import get_backend, read_migrations

    from dsn import yoyo_url

    with get_backend(yoyo_url(database_url)) as backend, backend.lock():
        backend.apply_migrations(backend.to_apply(read_migrations(str(MIGRATIONS_DIR))))
    async with items_client(database_url) as client:
        body = (await client.get("/health/db")).json()
    assert (body["status"], body["migration_status"]) == ("degraded", "pending")
    assert body["errors"] == ["1 pending migration(s): 0001.create_items"]


@pytest.mark.anyio
async def test_openapi_documents_the_three_operations(migrated_url: str) -> None:
    """Valid OpenAPI 3.1 with each operation's parameters, request body and responses."""
    async with items_client(migrated_url) as client:
        document = (await client.get("/openapi.json")).json()
    validate(document)
    create = document["paths"]["/items"]["post"]
    one = document["paths"]["/items/{item_id}"]["get"]
    newest = document["paths"]["/items"]["get"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/NewItem"}
    new_item = document["components"]["schemas"]["NewItem"]
    assert new_item["properties"]["name"] == {"type": "string", "minLength": 1, "maxLength": 200}
    assert new_item["required"] == ["name"]
    assert set(create["responses"]) >= {"201", "400", "409", "413", "422", "500", "503", "504"}
    assert "Location" in create["responses"]["201"]["headers"]
    assert one["parameters"] == [
        {"name": "item_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}},
        {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"}},
    ]
    assert set(one["responses"]) >= {"200", "304", "404", "422", "503", "504"}
    assert "content" not in one["responses"]["304"]
    assert (
        set(one["responses"]["304"]["headers"]) == set(one["responses"]["200"]["headers"]) == {"X-Request-ID", "ETag"}
    )
    assert newest["parameters"] == [
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
    ]  # fmt: skip
    assert one["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Item"}


@pytest.mark.anyio
async def test_metrics_label_items_by_route_template(migrated_url: str) -> None:
    async with items_client(migrated_url) as client:
        for _ in range(3):
            await client.get(f"/items/{uuid.uuid4()}")
        text = (await client.get("/metrics")).text
    assert 'route="/items/{item_id}",status="404"} 3.0' in text
    assert not re.search(r'route="/items/[0-9a-f]', text)


def test_the_example_is_one_module_the_foundation_never_imports() -> None:
    """The foundation's modules know nothing of `examples`; the resource is added at construction."""
    from service import ROOT

    for module in ROOT.glob("*.py"):
        assert not re.search(r"^\s*(from|import) examples", module.read_text(), re.M), module.name
    paths = {getattr(route, "path", None) for route in create_items_app(make_settings()).routes}
    assert paths >= {"/items", "/items/{item_id}"}
    assert [d.path for d in items.declarations] == ["/items", "/items/{item_id}", "/items"]
