"""The extension point (api.py): handlers are checked at start-up and get their input decoded."""

from __future__ import annotations

import asyncio
import datetime
import enum
import functools
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
import pytest
from openapi_spec_validator import validate as validate_spec
from service import ROOT, make_settings, serve
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

import db
from api import Context, Created, Endpoints, WithHeaders, database_of
from app import create_app
from db import Connection
from errors import AuthenticationError, AuthorizationError
from guard import Guard
from settings import CONFIGURATION_ERROR


class Pet(msgspec.Struct):
    id: int
    name: str


class NewPet(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]


class Filter(msgspec.Struct):
    age: Annotated[int, msgspec.Meta(ge=0)] = 0
    kind: str = "any"


pets = Endpoints(tag="pets")


@pets.get("/pets/{pet_id}", summary="One pet")
async def get_pet(pet_id: int, query: Filter) -> Pet:
    return Pet(pet_id, f"{query.kind}-{query.age}")


@pets.post("/pets", summary="A new pet")
async def add_pet(body: NewPet) -> Created[Pet]:
    return Created(Pet(1, body.name), location="/pets/1")


@pets.delete("/pets/{pet_id}", summary="Remove a pet")
async def remove_pet(pet_id: uuid.UUID) -> None:
    return None


class PetChanges(msgspec.Struct, forbid_unknown_fields=True):
    name: str | msgspec.UnsetType = msgspec.UNSET
    nickname: str | msgspec.UnsetType | None = msgspec.UNSET


class Changed(msgspec.Struct):
    given: list[str]  # the fields the client sent, each with its value
    nickname: str | None = None


@pets.patch("/pets/{pet_id}", summary="Change some of a pet's fields")
async def change_pet(pet_id: int, body: PetChanges) -> Changed:
    given = [
        f"{name}={value!r}" for name in body.__struct_fields__ if (value := getattr(body, name)) is not msgspec.UNSET
    ]
    return Changed(given)


class Tagged(msgspec.Struct):
    tag: list[str] = []
    ids: Annotated[list[int], msgspec.Meta(max_length=3)] | None = None
    kind: str = "any"


@pets.get("/pets-tagged", summary="Several values of one query parameter")
async def tagged_pets(query: Tagged) -> Tagged:
    return query


@pets.post("/pets/named/{name}", summary="A location made of a path segment")
async def name_pet(name: str) -> Created[Pet]:
    return Created(Pet(2, name), location=f"/pets/named/{name}")


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class ByColor(msgspec.Struct):
    color: Color = Color.RED
    ratio: float = 1.0
    indoor: bool | None = None


@pets.get("/pets/by-color/{shade}", summary="Enum parameters, in the path and in the query")
async def pets_by_color(shade: Color, query: ByColor) -> Pet:
    return Pet(0, f"{shade.value}-{query.color.value}")


class Weights(msgspec.Struct):
    extra: list[float] = []


@pets.get("/pets/weighing/{grams}", summary="Floats, in the path and in a list of the query")
async def weigh_pet(grams: float, query: Weights) -> Pet:
    return Pet(0, f"{grams} {query.extra}")


class Since(msgspec.Struct):
    after: datetime.datetime | None = None
    within: datetime.timedelta | None = None
    page: int | None = None


@pets.get("/pets-since", summary="Dates, durations and integers in the query")
async def pets_since(query: Since) -> Pet:
    return Pet(query.page or 0, f"{query.after and query.after.isoformat()} {query.within}")


@pets.get("/files/{rest:path}", summary="A path parameter that takes slashes")
async def pet_file(rest: str) -> Pet:
    return Pet(0, rest)


@pets.get("/pets-db", summary="Needs the database")
async def count_pets(ctx: Context) -> Pet:
    async with ctx.connection() as conn:
        return Pet(await conn.fetchval("SELECT 1"), ctx.settings.app_name)


class Row(msgspec.Struct):
    parent: int
    note: str = ""


rows = Endpoints(tag="rows")


@rows.post("/rows", summary="A child row: its parent must exist; its note goes to a text column")
async def add_row(ctx: Context, body: Row) -> Row:
    async with ctx.connection() as conn:
        await conn.execute("INSERT INTO children (parent, note) VALUES ($1, $2)", body.parent, body.note)
    return body


@rows.get("/rows/mistake", summary="A handler's own bug: two queries at once on one connection")
async def query_twice_at_once(ctx: Context) -> Row:
    async with ctx.connection() as conn:
        await asyncio.gather(conn.execute("SELECT pg_sleep(0.1)"), conn.execute("SELECT 1"))
    raise AssertionError("asyncpg refuses the second query")


# Statements a handler runs with a body's values: each shows one way a database refusal is, or is not,
# the client's fault (the handler's own mistakes among them).
ROW_STATEMENTS: dict[str, tuple[str, Callable[[Row], tuple[Any, ...]]]] = {
    "without-note": ("INSERT INTO children (parent, note) VALUES ($1, NULL)", lambda row: (row.parent,)),
    "enum-note": ("INSERT INTO children (parent, note) VALUES ($1, $2)", lambda row: (row.parent, Color.RED)),
    "audited": ("INSERT INTO audited (parent) VALUES ($1)", lambda row: (row.parent,)),  # its trigger fails
    "audited-once": ("INSERT INTO audited_once (parent) VALUES ($1)", lambda row: (row.parent,)),
    "dated": ("SELECT $1::date", lambda row: (row.note,)),  # a str where a date goes
    "divided": ("SELECT 1 / ($1::int - $1::int)", lambda row: (row.parent,)),  # the handler's arithmetic
}


@rows.post("/rows/run/{statement}", summary="One of ROW_STATEMENTS, with the body's values")
async def run_row_statement(ctx: Context, statement: str, body: Row) -> Row:
    sql, arguments = ROW_STATEMENTS[statement]
    async with ctx.connection() as conn:
        await conn.execute(sql, *arguments(body))
    return body


async def run_sql(database_url: str, sql: str) -> None:
    """A test's own tables and triggers, made before the app starts."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


session = Endpoints(tag="session")


class Seen(msgspec.Struct):
    role: str
    temp_tables: int
    backend: int


@session.post("/session/dirty", summary="Leaves a role and a temporary table in its session")
async def leave_session_state(ctx: Context) -> Seen:
    async with ctx.connection() as conn:
        await conn.execute("SET ROLE tenant_a; CREATE TEMP TABLE scratch AS SELECT 'tenant A secret' AS note")
        return await _seen(conn)


@session.get("/session", summary="What the next request's session holds")
async def read_session_state(ctx: Context) -> Seen:
    async with ctx.connection() as conn:
        return await _seen(conn)


async def _seen(conn: Connection) -> Seen:
    row = await conn.fetchrow(
        "SELECT current_user::text AS role, pg_backend_pid() AS backend,"
        " (SELECT count(*) FROM pg_class WHERE relpersistence = 't' AND relkind = 'r')::int AS temp_tables"
    )
    assert row is not None
    return Seen(row["role"], row["temp_tables"], row["backend"])


@session.get("/session/raise/{sqlstate}", summary="The database refuses with a condition")
async def raise_condition(ctx: Context, sqlstate: str) -> Seen:
    async with ctx.connection() as conn:
        await conn.execute(f"DO $$ BEGIN RAISE EXCEPTION 'the server says so' USING ERRCODE = '{sqlstate}'; END $$")
    raise AssertionError("the database refused")


@session.get("/session/own-oserror", summary="A handler's own OSError inside the block")
async def own_oserror(ctx: Context) -> Seen:
    async with ctx.connection() as conn:
        await conn.execute("SELECT 1")
        raise FileNotFoundError(2, "No such file or directory", "/nonexistent/config.json")


@session.post("/session/late-write", summary="A write that waits for a lock longer than the request may")
async def write_too_late(ctx: Context) -> Seen:
    async with ctx.connection() as conn, asyncio.timeout(0.5):
        await conn.execute("UPDATE counters SET value = value + 1")
    raise AssertionError("the row is locked")


@session.post("/session/uncommitted", summary="A write in a transaction the handler never commits")
async def write_uncommitted(ctx: Context) -> Seen:
    async with ctx.connection() as conn:
        await conn.execute("BEGIN; UPDATE counters SET value = value + 1")
        return await _seen(conn)


@pytest.mark.anyio
async def test_a_transaction_the_handler_leaves_open_is_a_500_and_rolled_back(database_url: str) -> None:
    """The reset would roll it back silently after the client was told it succeeded: a 500 saying why instead."""
    await run_sql(database_url, "CREATE TABLE counters (value int NOT NULL); INSERT INTO counters VALUES (0)")
    settings = make_settings(DATABASE_URL=database_url, DATABASE_POOL_SIZE="1", DEBUG="true")
    async with serve(create_app(settings, endpoints=[session])) as client:
        left_open = await client.post("/session/uncommitted")
        after = await client.get("/session")  # the same pooled connection, clean
    assert (left_open.status_code, left_open.json()["error"]) == (500, "INTERNAL_SERVER_ERROR")
    assert "The handler left a transaction open: it was rolled back" in left_open.json()["detail"]["message"]
    assert after.status_code == 200
    admin = await asyncpg.connect(database_url)
    try:
        assert await admin.fetchval("SELECT value FROM counters") == 0
    finally:
        await admin.close()


@pytest.mark.anyio
async def test_a_write_whose_request_timed_out_never_commits_later(database_url: str) -> None:
    """The client is told 504; the query it left behind on the server is ended and rolled back, not
    committed once the lock it waited for is released, and no backend outlives the pool's connection."""
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute("CREATE TABLE counters (value int NOT NULL); INSERT INTO counters VALUES (0)")
        settings = make_settings(DATABASE_URL=database_url, DATABASE_POOL_SIZE="1")
        async with admin.transaction():
            await admin.execute("SELECT * FROM counters FOR UPDATE")  # held while the request waits
            async with serve(create_app(settings, endpoints=[session])) as client:
                response = await client.post("/session/late-write")
                await asyncio.sleep(2.5)  # the server checks its clients every second
                left = await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", settings.app_name
                )
        await asyncio.sleep(0.5)  # the lock is released: a query still waiting would commit now
        value = await admin.fetchval("SELECT value FROM counters")
    finally:
        await admin.close()
    assert (response.status_code, response.json()["error"]) == (504, "TIMEOUT_ERROR")
    assert left == 0
    assert value == 0


@pytest.mark.anyio
async def test_a_server_that_refuses_the_client_check_still_serves(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Windows servers refuse `client_connection_check_interval`: one warning, and requests go on without it."""
    monkeypatch.setattr(db, "CLIENT_CHECK", "SET client_connection_check_interval = -1;")  # refused the same way
    settings = make_settings(DATABASE_URL=database_url, DATABASE_POOL_SIZE="2")
    async with serve(create_app(settings, endpoints=[session])) as client:
        statuses = [(await client.get("/session")).status_code for _ in range(3)]
        probe = (await client.get("/health/db")).json()
    assert statuses == [200, 200, 200]
    assert probe["database_connected"] is True
    warnings = [r.getMessage() for r in caplog.records if r.name == "service.database"]
    assert warnings == ["The database will not end queries whose request is gone: invalid parameter value"]


@pytest.mark.anyio
async def test_a_requests_role_and_temporary_tables_do_not_reach_the_next_request(database_url: str) -> None:
    """asyncpg's reset leaves `SET ROLE` and temp tables: a tenant's role or rows would reach the next request."""
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute("DROP ROLE IF EXISTS tenant_a; CREATE ROLE tenant_a; GRANT tenant_a TO CURRENT_USER")
        owner = await admin.fetchval("SELECT current_user::text")
    finally:
        await admin.close()
    settings = make_settings(DATABASE_URL=database_url, DATABASE_POOL_SIZE="1")
    async with serve(create_app(settings, endpoints=[session])) as client:
        dirty = (await client.post("/session/dirty")).json()
        after = (await client.get("/session")).json()
    assert (dirty["role"], dirty["temp_tables"]) == ("tenant_a", 1)
    assert after == {"role": owner, "temp_tables": 0, "backend": dirty["backend"]}  # the same connection, clean


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("sqlstate", "status", "message"),
    [
        ("40001", 409, "Conflicts with a concurrent transaction (serialization): try again"),
        ("40P01", 409, "Conflicts with a concurrent transaction (deadlock detected): try again"),
        ("55P03", 409, "Conflicts with a concurrent transaction (lock not available): try again"),
        ("57014", 504, "The operation timed out (database: query canceled)"),
        ("53200", 503, "Database temporarily unavailable (out of memory)"),
    ],
)
async def test_conditions_a_retry_may_clear_are_not_500s(
    database_url: str, sqlstate: str, status: int, message: str
) -> None:
    """A serialization failure, a deadlock, a lock not available, a statement timeout, a server out of memory:
    each is the envelope naming the condition (never the server's message), and the connection stays pooled."""
    settings = make_settings(DATABASE_URL=database_url, DATABASE_POOL_SIZE="1")
    async with serve(create_app(settings, endpoints=[session])) as client:
        before = (await client.get("/session")).json()["backend"]
        response = await client.get(f"/session/raise/{sqlstate}")
        after = (await client.get("/session")).json()["backend"]
    assert (response.status_code, response.json()["message"]) == (status, message)
    assert after == before


@pytest.mark.anyio
async def test_a_handlers_own_oserror_in_the_block_is_a_500_and_keeps_the_connection(database_url: str) -> None:
    """Not a 'connection lost' 503 with a retry: the database did nothing wrong."""
    settings = make_settings(DATABASE_URL=database_url, DATABASE_POOL_SIZE="1")
    async with serve(create_app(settings, endpoints=[session])) as client:
        before = (await client.get("/session")).json()["backend"]
        response = await client.get("/session/own-oserror")
        after = (await client.get("/session")).json()["backend"]
    assert (response.status_code, response.json()["error"]) == (500, "INTERNAL_SERVER_ERROR")
    assert after == before


@pytest.mark.anyio
async def test_backends_terminated_under_load_are_503s_never_500s(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A pooled connection whose server already said goodbye, before asyncpg noticed (its InternalClientError),
    is a lost connection: 503 and replaced, never a 500; the readiness probe retries on a fresh one."""
    settings = make_settings(DATABASE_URL=database_url, DATABASE_POOL_SIZE="4")
    statuses: list[int] = []
    probes: list[str] = []  # the readiness errors seen
    async with serve(create_app(settings, endpoints=[session])) as client:

        async def load() -> None:
            while len(statuses) < 3000:
                statuses.append((await client.get("/session")).status_code)
                if len(statuses) % 50 == 0:
                    probes.extend((await client.get("/health/db")).json().get("errors", []))

        async def terminate() -> None:
            admin = await asyncpg.connect(database_url)
            try:
                while len(statuses) < 3000:
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = $1 AND pid <> pg_backend_pid()",
                        settings.app_name,
                    )
                    await asyncio.sleep(0.05)
            finally:
                await admin.close()

        await asyncio.gather(terminate(), *(load() for _ in range(8)))
    assert 500 not in statuses, [repr(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert set(statuses) <= {200, 503}
    # Twice in a row on a connection just terminated may still fail it, but as a lost connection.
    assert not [error for error in probes if "InternalClientError" in error]
    assert not [r for r in caplog.records if "InternalClientError" in r.getMessage()]  # the log says it too
    assert not [r for r in caplog.records if "(InterfaceError)" in r.getMessage()]  # a closed one: "connection lost"


@pytest.mark.anyio
async def test_the_databases_refusals_of_a_row_are_the_envelope_and_its_own_mistakes_are_500s(
    database_url: str,
) -> None:
    """409 for a missing parent; 400 for a NUL in text, an int4 out of range, a CHECK or NOT NULL refused;
    500 for the handler's misuse of its connection or a parameter of the wrong Python type; none a 503
    (the connection is not lost), and the one pooled connection survives all."""
    await run_sql(
        database_url,
        "CREATE TABLE parents (id int PRIMARY KEY); INSERT INTO parents VALUES (1);"
        "CREATE TABLE children (parent int NOT NULL REFERENCES parents,"
        " note text NOT NULL CONSTRAINT children_note_check CHECK (note <> 'forbidden'))",
    )
    settings = make_settings(DATABASE_URL=database_url, DATABASE_POOL_SIZE="1")
    async with serve(create_app(settings, endpoints=[rows])) as client:
        orphan = await client.post("/rows", json={"parent": 2})
        nul = await client.post("/rows", json={"parent": 1, "note": "a\u0000b"})
        huge = await client.post("/rows", json={"parent": 2**40})
        mistake = await client.get("/rows/mistake")
        checked = await client.post("/rows", json={"parent": 1, "note": "forbidden"})
        nulled = await client.post("/rows/run/without-note", json={"parent": 1})
        wrong_type = await client.post("/rows/run/enum-note", json={"parent": 1})
        divided = await client.post("/rows/run/divided", json={"parent": 1})
        fine = await client.post("/rows", json={"parent": 1, "note": "kept"})
    assert (orphan.status_code, orphan.json()["error"]) == (409, "CONFLICT_ERROR")
    assert orphan.json()["message"] == "Conflicts with other rows (foreign key constraint children_parent_fkey)"
    assert (nul.status_code, nul.json()["error"]) == (400, "VALIDATION_ERROR")
    assert nul.json()["message"] == "A value the database cannot store (character not in repertoire)"
    assert (huge.status_code, huge.json()["message"]) == (400, "A value the database cannot store")
    assert (mistake.status_code, mistake.json()["error"]) == (500, "INTERNAL_SERVER_ERROR")
    assert (checked.status_code, checked.json()["message"]) == (
        400,
        "A value the table refuses (check constraint children_note_check)",
    )
    assert (nulled.status_code, nulled.json()["message"]) == (400, "A value the table refuses (note may not be null)")
    assert (wrong_type.status_code, wrong_type.json()["error"]) == (500, "INTERNAL_SERVER_ERROR")  # not the client's
    assert (divided.status_code, divided.json()["error"]) == (500, "INTERNAL_SERVER_ERROR")  # class 22, not a value
    assert fine.status_code == 200


@pytest.mark.anyio
async def test_with_debug_a_refusal_shows_the_database_error_behind_it(database_url: str) -> None:
    """DEBUG=true: the 400's `detail` names the database's own error, which the message only summarises."""
    await run_sql(
        database_url, "CREATE TABLE parents (id int PRIMARY KEY); CREATE TABLE children (parent int, note text)"
    )
    settings = make_settings(DATABASE_URL=database_url, DEBUG="true")
    async with serve(create_app(settings, endpoints=[rows])) as client:
        nul = await client.post("/rows", json={"parent": 1, "note": "a\u0000b"})
    assert nul.status_code == 400
    assert nul.json()["detail"]["cause"].startswith("CharacterNotInRepertoireError: ")


@pytest.mark.anyio
async def test_what_the_server_side_gets_wrong_is_a_500_not_the_clients_fault(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A trigger breaking a NOT NULL or a unique key of its own, or a str sent for a date: 500s, not a 400 or
    409 blaming a client whose input was fine; and the client's value is not written to the log."""
    await run_sql(
        database_url,
        "CREATE TABLE audit (actor text NOT NULL); CREATE TABLE audited (parent int);"
        "CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN INSERT INTO audit VALUES (NULL); RETURN NEW; END $$;"
        "CREATE TRIGGER audited_row AFTER INSERT ON audited FOR EACH ROW EXECUTE FUNCTION audit_row();"
        "CREATE TABLE audit_once (id int PRIMARY KEY); CREATE TABLE audited_once (parent int);"
        "CREATE FUNCTION audit_once() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN INSERT INTO audit_once VALUES (1); RETURN NEW; END $$;"
        "CREATE TRIGGER audited_once AFTER INSERT ON audited_once FOR EACH ROW EXECUTE FUNCTION audit_once()",
    )
    settings = make_settings(DATABASE_URL=database_url, DATABASE_POOL_SIZE="1")
    async with serve(create_app(settings, endpoints=[rows])) as client:
        audited = await client.post("/rows/run/audited", json={"parent": 1})
        dated = await client.post("/rows/run/dated", json={"parent": 1, "note": "4111-1111-1111-1111"})
        once = [(await client.post("/rows/run/audited-once", json={"parent": 1})).status_code for _ in range(2)]
    assert (audited.status_code, audited.json()["error"]) == (500, "INTERNAL_SERVER_ERROR")
    assert (dated.status_code, dated.json()["error"]) == (500, "INTERNAL_SERVER_ERROR")
    assert once == [200, 500]  # the trigger's own unique key, not a conflict of the client's row (409)
    logged = "\n".join(caplog.text.splitlines())
    assert "query argument $1: 'str' object has no attribute" in logged
    assert "4111-1111-1111-1111" not in logged


@pytest.mark.anyio
async def test_path_and_query_are_converted_to_their_annotations() -> None:
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        response = await client.get("/pets/7", params={"age": "3", "kind": "cat"})
        head = await client.head("/pets/7")
    assert (response.status_code, response.json()) == (200, {"id": 7, "name": "cat-3"})
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == response.headers["content-length"]


@pytest.mark.anyio
async def test_created_answers_201_with_location_and_none_answers_204() -> None:
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        created = await client.post("/pets", json={"name": "Rex"})
        removed = await client.delete(f"/pets/{uuid.uuid4()}")
    assert (created.status_code, created.headers["location"], created.json()) == (
        201,
        "/pets/1",
        {"id": 1, "name": "Rex"},
    )
    assert (removed.status_code, removed.content) == (204, b"")


@pytest.mark.anyio
async def test_a_sequence_query_field_takes_every_value_given() -> None:
    """`?tag=a&tag=b` for `tag: list[str]`, as the OpenAPI document says (an array)."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        many = await client.get("/pets-tagged?tag=a&tag=b&ids=1&ids=2&kind=dog")
        one = await client.get("/pets-tagged?tag=a")
        bad = await client.get("/pets-tagged?ids=1&ids=x")
        too_many = await client.get("/pets-tagged?ids=1&ids=2&ids=3&ids=4")
    assert many.json() == {"tag": ["a", "b"], "ids": [1, 2], "kind": "dog"}
    assert one.json() == {"tag": ["a"], "ids": None, "kind": "any"}
    assert (bad.status_code, [e["field"] for e in bad.json()["validation_errors"]]) == (422, ["ids[1]"])
    assert (too_many.status_code, [e["field"] for e in too_many.json()["validation_errors"]]) == (422, ["ids"])


@pytest.mark.anyio
async def test_a_single_query_field_given_twice_is_refused_naming_it() -> None:
    """`?kind=cat&kind=dog` is a 422: a proxy that checked the first and a handler taking the last
    would act on different requests. A parameter no field reads may repeat (the Struct ignores it)."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        twice = await client.get("/pets-tagged?kind=cat&tag=a&kind=dog&other=1&other=2")
        unread = await client.get("/pets-tagged?kind=cat&other=1&other=2")
    assert twice.status_code == 422
    assert twice.json()["validation_errors"] == [{"field": "kind", "message": "Given more than once", "value": None}]
    assert (unread.status_code, unread.json()["kind"]) == (200, "cat")


@pytest.mark.anyio
async def test_a_location_from_a_path_segment_is_escaped() -> None:
    """A decoded segment may hold CR/LF: unescaped, the server refused the header and the client got nothing."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        created = await client.post("/pets/named/a%0D%0ASet-Cookie:x=1 %C3%A9")
    assert created.status_code == 201
    assert created.headers["location"] == "/pets/named/a%0D%0ASet-Cookie:x=1%20%C3%A9"
    assert "set-cookie" not in created.headers


@pytest.mark.anyio
async def test_location_is_given_the_path_prefix_the_app_is_served_under() -> None:
    """Behind a proxy that serves the app under `/api` (root_path), `/pets/1` is `/api/pets/1` to the client."""
    async with serve(create_app(make_settings(), endpoints=[pets]), root_path="/api") as client:
        created = await client.post("/api/pets", json={"name": "Rex"})
    assert (created.status_code, created.headers["location"]) == (201, "/api/pets/1")


@pytest.mark.anyio
async def test_a_partial_update_tells_a_field_left_out_from_one_sent_as_null() -> None:
    """The README's PATCH: fields defaulting to `msgspec.UNSET` are absent until sent, and none is required."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        left_out = await client.patch("/pets/1", json={"name": "Rex"})
        nulled = await client.patch("/pets/1", json={"nickname": None})
        spec = (await client.get("/openapi.json")).json()
    assert left_out.json()["given"] == ["name='Rex'"]
    assert nulled.json()["given"] == ["nickname=None"]
    assert spec["components"]["schemas"]["PetChanges"].get("required", []) == []


@pytest.mark.anyio
async def test_a_query_or_path_value_that_is_not_a_number_or_boolean_says_what_was_expected() -> None:
    """Every query or path value is text: msgspec's "Expected `float`, got `str`" told the caller nothing."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        query = await client.get("/pets/by-color/red", params={"ratio": "abc", "indoor": "yes"})
        path = await client.get("/pets/weighing/heavy")
        fine = await client.get("/pets/by-color/red", params={"ratio": "0.5", "indoor": "TRUE"})
    assert query.status_code == 422
    assert query.json()["validation_errors"] == [
        {"field": "ratio", "message": "Expected a number", "value": "abc"},
        {"field": "indoor", "message": "Expected true or false (or 1 or 0), or null", "value": "yes"},
    ]
    assert path.json()["validation_errors"] == [{"field": "grams", "message": "Expected a number", "value": "heavy"}]
    assert fine.status_code == 200


@pytest.mark.anyio
async def test_a_204_is_documented_without_a_body() -> None:
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        spec = (await client.get("/openapi.json")).json()
    removed = spec["paths"]["/pets/{pet_id}"]["delete"]["responses"]["204"]
    assert "content" not in removed
    assert removed["headers"] == {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}


@pytest.mark.anyio
async def test_an_operation_with_input_documents_the_400_the_database_may_answer() -> None:
    """A GET with a path parameter may see its value refused by the database (an int past bigint): a 400,
    which the document listed only for operations with a body."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        spec = (await client.get("/openapi.json")).json()
    assert spec["paths"]["/pets/{pet_id}"]["get"]["responses"]["400"] == {
        "$ref": "#/components/responses/MalformedRequest"
    }


@pets.get(
    "/pets/tagged/{pet_id}", summary="A pet with its ETag and cache policy", response_headers=("ETag", "Cache-Control")
)
async def get_tagged_pet(pet_id: int) -> WithHeaders[Pet]:
    return WithHeaders(Pet(pet_id, "Rex"), {"ETag": f'"v{pet_id}"', "Cache-Control": "max-age=60"})


@pets.get("/pets/bad-header/{name}", summary="A handler's own bug: a header it may not send")
async def send_a_bad_header(name: str) -> WithHeaders[Pet]:
    if name == "newline":
        return WithHeaders(Pet(0, name), {"X-Note": "a\r\nSet-Cookie: y=1"})
    if name == "twice":
        return WithHeaders(Pet(0, name), {"ETag": '"a"', "etag": '"b"'})
    if name == "unquoted-etag":  # no client could name it back in If-None-Match
        return WithHeaders(Pet(0, name), {"ETag": "v1"})
    return WithHeaders(Pet(0, name), {name: "x"})


@pytest.mark.anyio
async def test_a_handler_sends_headers_of_its_own() -> None:
    """`WithHeaders[Struct]`: a 200 with `ETag` and `Cache-Control`, documented as the Struct."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        response = await client.get("/pets/tagged/3")
        head = await client.head("/pets/tagged/3")
        spec = (await client.get("/openapi.json")).json()
    assert (response.status_code, response.json()) == (200, {"id": 3, "name": "Rex"})
    assert (response.headers["etag"], response.headers["cache-control"]) == ('"v3"', "max-age=60")
    assert (head.headers["etag"], head.content) == ('"v3"', b"")
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        cross_origin = await client.get("/pets/tagged/3", headers={"Origin": "http://localhost:3000"})
    assert "etag" in cross_origin.headers["access-control-expose-headers"].lower()  # a browser's script may read it
    ok = spec["paths"]["/pets/tagged/{pet_id}"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Pet"}
    assert set(ok["headers"]) == {"X-Request-ID", "ETag", "Cache-Control"}  # its declared `response_headers`
    validate_spec(spec)


@pets.post("/pets/tagged/{pet_id}", summary="A POST answering with an ETag", response_headers=("ETag",))
async def post_tagged_pet(pet_id: int) -> WithHeaders[Pet]:
    return WithHeaders(Pet(pet_id, "Rex"), {"ETag": f'"v{pet_id}"'})


@pytest.mark.anyio
async def test_a_get_whose_if_none_match_names_its_etag_is_304_with_its_own_headers() -> None:
    """Weak comparison (RFC 9110 13.1.2): `W/"v3"` names `"v3"`; the 304 keeps `Cache-Control` and
    has no body; other tags, and another method, get the full answer; the 304 is documented."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        weak = await client.get("/pets/tagged/3", headers={"If-None-Match": 'W/"x", W/"v3"'})
        lines = await client.get("/pets/tagged/3", headers=[("If-None-Match", '"x"'), ("If-None-Match", '"v3"')])
        other = await client.get("/pets/tagged/3", headers={"If-None-Match": '"v4", v3'})
        posted = await client.post("/pets/tagged/3", headers={"If-None-Match": '"v3"'})
        spec = (await client.get("/openapi.json")).json()
    for response in (weak, lines):
        assert (response.status_code, response.content) == (304, b"")
        assert (response.headers["etag"], response.headers["cache-control"]) == ('"v3"', "max-age=60")
    assert (other.status_code, other.json()) == (200, {"id": 3, "name": "Rex"})
    assert (posted.status_code, posted.json()) == (200, {"id": 3, "name": "Rex"})
    documented = spec["paths"]["/pets/tagged/{pet_id}"]
    assert set(documented["get"]["responses"]["304"]["headers"]) == {"X-Request-ID", "ETag", "Cache-Control"}
    assert "304" not in documented["post"]["responses"]
    validate_spec(spec)


def test_a_response_header_no_handler_may_send_is_refused_when_declared() -> None:
    with pytest.raises(ValueError, match="cannot send the header 'Content-Length'"):
        Endpoints(tag="broken").get(
            "/broken-headers", summary="Declares a header", response_headers=("Content-Length",)
        )


def test_response_headers_on_a_handler_that_cannot_send_them_stop_start_up() -> None:
    """Only a `WithHeaders` answer carries headers: documenting them on another would describe what never comes."""
    broken = Endpoints(tag="broken")

    @broken.get("/broken-headers", summary="Declares a header it never sends", response_headers=("ETag",))
    async def plain() -> Pet:
        return Pet(0, "")

    with pytest.raises(TypeError, match="response_headers are for a handler that returns WithHeaders or Created"):
        create_app(make_settings(), endpoints=[broken])


@pytest.mark.anyio
@pytest.mark.parametrize(
    "name",
    ["Content-Type", "x-request-id", "Connection", "Keep-Alive", "Date", "Server", "Content-Encoding",
     "Access-Control-Allow-Origin", "Bad Name", "newline", "twice", "unquoted-etag"],
)  # fmt: skip
async def test_a_header_a_handler_may_not_send_is_its_bug(name: str) -> None:
    """The service's own headers, the connection's, and a name or value that could split the response: a 500."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        response = await client.get(f"/pets/bad-header/{name}")
    assert (response.status_code, response.json()["error"]) == (500, "INTERNAL_SERVER_ERROR")
    assert "set-cookie" not in response.headers


class StrictFilter(msgspec.Struct, forbid_unknown_fields=True):
    status: str = "any"


@pets.get("/pets-strict", summary="A query Struct that refuses unknown parameters")
async def strict_pets(query: StrictFilter) -> StrictFilter:
    return query


@pytest.mark.anyio
async def test_a_query_struct_refusing_unknown_fields_names_a_mistyped_filter() -> None:
    """Ignored, `?stauts=paid` would return everything; declared strict, it is the 422 naming it."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        mistyped = await client.get("/pets-strict?stauts=paid")
        fine = await client.get("/pets-strict?status=paid")
    assert mistyped.status_code == 422
    assert mistyped.json()["validation_errors"] == [{"field": "stauts", "message": "Unknown field", "value": "paid"}]
    assert fine.json() == {"status": "paid"}


@pytest.mark.anyio
async def test_a_number_too_large_for_any_float_in_the_body_is_422_naming_its_field() -> None:
    """`1e400` is valid JSON, not "not valid JSON": the field holding it is named."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        response = await client.post("/pets", content=b'{"name": 1e400}', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["validation_errors"]] == ["name"]


@pytest.mark.anyio
async def test_query_bounds_are_422_naming_the_parameter() -> None:
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        response = await client.get("/pets/7", params={"age": "-1"})
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["validation_errors"]] == ["age"]


@pytest.mark.anyio
async def test_an_endpoint_needing_the_database_is_503_when_none_is_configured() -> None:
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        response = await client.get("/pets-db")
    assert response.status_code == 503
    assert response.json()["error"] == "DATABASE_CONNECTION_ERROR"


@pytest.mark.anyio
async def test_context_gives_the_database_and_the_settings(database_url: str) -> None:
    app = create_app(make_settings(DATABASE_URL=database_url, APP_NAME="pets"), endpoints=[pets])
    async with serve(app) as client:
        response = await client.get("/pets-db")
    assert response.json() == {"id": 1, "name": "pets"}


def test_a_parameter_that_cannot_be_bound_stops_start_up() -> None:
    """An undecodable handler is a start-up error naming it, not a 500 at the first request."""
    broken = Endpoints(tag="broken")

    @broken.get("/broken/{item}", summary="Misspelt path parameter")
    async def misspelt(itme: int) -> Pet:
        return Pet(itme, "")

    with pytest.raises(TypeError, match=r"GET /broken/\{item\} \(misspelt\): cannot bind parameter 'itme'"):
        create_app(make_settings(), endpoints=[broken])


def test_a_path_segment_no_parameter_takes_stops_start_up() -> None:
    """`/broken/{item}` served by a handler without `item` made an OpenAPI document whose path did not resolve."""
    broken = Endpoints(tag="broken")

    @broken.get("/broken/{item}", summary="Ignores its segment")
    async def ignores(ctx: Context) -> Pet:
        return Pet(1, "")

    with pytest.raises(TypeError, match=r"GET /broken/\{item\} \(ignores\): the path segment \{item\} needs"):
        create_app(make_settings(), endpoints=[broken])


def test_a_handler_that_is_not_async_stops_start_up() -> None:
    """A plain `def` handler was served, and every request to it was a 500 (its result awaited)."""
    broken = Endpoints(tag="broken")

    def plain() -> Pet:
        return Pet(1, "")

    broken.get("/sync", summary="Not a coroutine")(plain)  # type: ignore[arg-type]  # mypy catches it; a team without mypy would not

    with pytest.raises(TypeError, match=r"GET /sync \(plain\): a handler is an `async def` function"):
        create_app(make_settings(), endpoints=[broken])


@pytest.mark.anyio
async def test_a_handler_behind_a_decorator_that_wraps_it_is_served() -> None:
    """A plain function returning the coroutine of the `async def` it wraps (`functools.wraps`) is awaited as before."""
    wrapped = Endpoints(tag="wrapped")

    def audited(handler: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(handler)
        def call(*args: Any, **kwargs: Any) -> Any:
            return handler(*args, **kwargs)

        return call

    @wrapped.get("/wrapped/{pet_id}", summary="Behind a decorator")
    @audited
    async def get_wrapped(pet_id: int) -> Pet:
        return Pet(pet_id, "Rex")

    async with serve(create_app(make_settings(), endpoints=[wrapped])) as client:
        assert (await client.get("/wrapped/7")).json() == {"id": 7, "name": "Rex"}


def test_a_return_annotation_that_cannot_be_documented_stops_start_up() -> None:
    broken = Endpoints(tag="broken")

    @broken.get("/untyped", summary="Returns a dict")
    async def untyped() -> dict[str, int]:
        return {}

    message = r"the return annotation must be a msgspec Struct, Created\[Struct\], WithHeaders\[Struct\] or None"
    with pytest.raises(TypeError, match=message):
        create_app(make_settings(), endpoints=[broken])


def test_two_handlers_of_one_name_stop_start_up() -> None:
    """Names are the OpenAPI operation ids: a second `get_pet` is refused."""
    again = Endpoints(tag="again")

    @again.get("/other/{pet_id}", summary="Same name")
    async def get_pet(pet_id: int) -> Pet:
        return Pet(pet_id, "")

    with pytest.raises(ValueError, match="two routes are named 'get_pet'"):
        create_app(make_settings(), endpoints=[pets, again])


@pytest.mark.anyio
async def test_enum_parameters_are_documented_by_a_valid_document() -> None:
    """An Enum's schema is in `components.schemas`, where the parameters' `$ref` points."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        spec = (await client.get("/openapi.json")).json()
        answer = await client.get("/pets/by-color/blue?color=red")
        wrong = await client.get("/pets/by-color/green")
    validate_spec(spec)
    parameters = spec["paths"]["/pets/by-color/{shade}"]["get"]["parameters"]
    assert {p["name"]: p["schema"]["$ref"] for p in parameters if "$ref" in p["schema"]} == {
        "shade": "#/components/schemas/Color",
        "color": "#/components/schemas/Color",
    }
    assert spec["components"]["schemas"]["Color"]["enum"] == ["blue", "red"]
    assert (answer.status_code, answer.json()["name"]) == (200, "blue-red")
    assert (wrong.status_code, wrong.json()["validation_errors"][0]["field"]) == (422, "shade")


@pytest.mark.anyio
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-Infinity"])
async def test_a_number_that_is_not_finite_is_422_in_the_path_and_the_query(text: str) -> None:
    """Text converts to `nan` or `inf`, which a JSON body cannot carry and a response would turn into null."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        in_query = await client.get(f"/pets/by-color/red?ratio={text}")
        in_path = await client.get(f"/pets/weighing/{text}")
        in_list = await client.get(f"/pets/weighing/2?extra=1.5&extra={text}")
        fine = await client.get("/pets/weighing/2.5?extra=1e3")
    for response, field in ((in_query, "ratio"), (in_path, "grams"), (in_list, "extra")):
        assert response.status_code == 422
        assert response.json()["validation_errors"] == [{"field": field, "message": "Expected a finite number",
                                                         "value": None if field == "extra" else text}]  # fmt: skip
    assert (fine.status_code, fine.json()["name"]) == (200, "2.5 [1000.0]")


@pytest.mark.anyio
async def test_numbers_are_not_read_as_dates_durations_or_integers_they_do_not_spell() -> None:
    """msgspec's lax reading takes `20260101` as Unix seconds (August 1970) and `1e1` as the integer 10:
    not what the documented RFC 3339, ISO 8601 and integer schemas say, so each is a 422 naming its field."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        wrong = await client.get("/pets-since?after=20260101&within=30&page=1e1")
        in_path = await client.get("/pets/10.0")
        in_list = await client.get("/pets-tagged?ids=1&ids=2.0")
        fine = await client.get("/pets-since?after=2026-01-01T00:00:00Z&within=PT30S&page=-3")
        optional = await client.get("/pets-since?page=null")
    assert wrong.status_code == 422
    assert wrong.json()["validation_errors"] == [
        {"field": "after", "message": "Expected an RFC 3339 date-time (2025-09-23T10:30:00Z), not a number",
         "value": "20260101"},
        {"field": "within", "message": "Expected an ISO 8601 duration (PT30S), not a number", "value": "30"},
        {"field": "page", "message": "Expected an integer, written in digits", "value": "1e1"},
    ]  # fmt: skip
    assert (in_path.status_code, in_path.json()["validation_errors"][0]["field"]) == (422, "pet_id")
    assert (in_list.status_code, in_list.json()["validation_errors"][0]["value"]) == (422, "2.0")
    assert (fine.status_code, fine.json()) == (200, {"id": -3, "name": "2026-01-01T00:00:00+00:00 0:00:30"})
    assert (optional.status_code, optional.json()["id"]) == (200, 0)


class Mixed(msgspec.Struct):
    limit: int | Literal["all"] = 20
    since: int | datetime.datetime | None = None
    key: int | uuid.UUID | None = None
    flag: bool | int | None = None


@pets.get("/pets-mixed/{ref}", summary="Unions holding an integer and another type")
async def pets_mixed(ref: int | uuid.UUID, query: Mixed) -> Pet:
    return Pet(0, f"{ref!r} {query.limit!r} {query.since!r} {query.key!r} {query.flag!r}")


@pytest.mark.anyio
async def test_a_union_holding_an_integer_takes_its_other_members_values() -> None:
    """Only a plain integer must be written in digits: `int | Literal["all"]` takes `all`, `int | UUID` a UUID."""
    key = "01a22927-b7e3-7799-94c0-ac970239e0b2"
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        response = await client.get(f"/pets-mixed/{key}?limit=all&since=2026-01-01T00:00:00Z&key={key}&flag=true")
        digits = await client.get("/pets-mixed/7?limit=5&since=3&key=9&flag=2")
    assert response.status_code == 200
    assert response.json()["name"] == (
        f"UUID('{key}') 'all' datetime.datetime(2026, 1, 1, 0, 0, tzinfo=datetime.timezone.utc) UUID('{key}') True"
    )
    assert (digits.status_code, digits.json()["name"]) == (200, "7 5 3 9 2")


@pytest.mark.anyio
async def test_a_misread_query_value_is_named_with_every_other_wrong_field() -> None:
    """One 422 lists every wrong field, the misread text and msgspec's own refusals alike."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        response = await client.get("/pets/1?age=2.5&kind=x")
        both = await client.get("/pets-since?page=1.5&after=yesterday")
    assert response.json()["validation_errors"] == [
        {"field": "age", "message": "Expected an integer, written in digits", "value": "2.5"}
    ]
    assert [(e["field"], e["value"]) for e in both.json()["validation_errors"]] == [
        ("page", "1.5"),
        ("after", "yesterday"),
    ]


class Who(msgspec.Struct):
    user: str | None


@pets.get("/whoami", summary="The user a middleware put on the request's state")
async def whoami(ctx: Context) -> Who:
    return Who(getattr(ctx.request.state, "user", None))


class SignedIn:
    """Starlette's usual way: the user on `request.state`, set only when the request names one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (user := Headers(scope=scope).get("x-user")):
            Request(scope).state.user = user
        await self.app(scope, receive, send)


@pytest.mark.anyio
async def test_request_state_set_by_a_middleware_stays_with_its_request() -> None:
    """Each request's state is a copy of the lifespan's, in `serve` as under uvicorn: alice never reaches the next."""
    app = create_app(make_settings(), endpoints=[pets])
    app.add_middleware(SignedIn)
    async with serve(app) as client:
        alice = await client.get("/whoami", headers={"X-User": "alice"})
        anonymous = await client.get("/whoami")
    assert (alice.json(), anonymous.json()) == ({"user": "alice"}, {"user": None})


class TokenLookup:
    """A team's auth layer that reads its sessions from the database, through `api.database_of`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (token := Headers(scope=scope).get("x-token")):
            request = Request(scope)
            async with database_of(request).connection() as conn:
                request.state.user = await conn.fetchval("SELECT 'user of ' || $1::text", token)
        await self.app(scope, receive, send)


@pytest.mark.anyio
async def test_a_middleware_reaches_the_database_through_database_of(database_url: str) -> None:
    """The pool for a middleware; with no `DATABASE_URL`, the 503 envelope as for a handler, never a 500."""
    for url, expected in ((database_url, 200), (None, 503)):
        app = create_app(make_settings(**({"DATABASE_URL": url} if url else {})), endpoints=[pets])
        app.add_middleware(TokenLookup)
        async with serve(app) as client:
            response = await client.get("/whoami", headers={"X-Token": "t1"})
        assert response.status_code == expected
        if url:
            assert response.json() == {"user": "user of t1"}
        else:
            assert response.json()["error"] == "DATABASE_CONNECTION_ERROR"


class Elsewhere:
    """Another module's names, as a team's two resources may have."""

    class Pet(enum.Enum):  # the same name as this module's `Pet` Struct
        CAT = "cat"
        DOG = "dog"


class ByKind(msgspec.Struct):
    kind: Elsewhere.Pet = Elsewhere.Pet.CAT


clash = Endpoints(tag="clash")


@clash.get("/pets-by-kind", summary="Pets of a kind")
async def pets_by_kind(query: ByKind) -> Pet:
    return Pet(0, query.kind.value)


def test_two_types_of_one_name_in_the_document_stop_start_up() -> None:
    """An Enum parameter named like a body Struct would replace its schema: refused, not a wrong document."""
    with pytest.raises(ValueError, match="two types are named 'Pet' in the OpenAPI document: rename one of them"):
        create_app(make_settings(), endpoints=[pets, clash])


@pytest.mark.anyio
async def test_a_path_parameter_taking_slashes_is_documented_by_its_name() -> None:
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        spec = (await client.get("/openapi.json")).json()
        answer = await client.get("/files/a/b.txt")
    assert "/files/{rest}" in spec["paths"]
    assert (answer.status_code, answer.json()["name"]) == (200, "a/b.txt")


@pytest.mark.parametrize("path", ["/pets/{pet_id:int}", "/pets/{pet_id:float}", "/pets/{pet_id:uuid}"])
def test_a_converter_typing_a_path_parameter_is_refused_at_declaration(path: str) -> None:
    """Types come from the annotation, which answers a wrong value with the 422: Starlette's `int`
    converter answers 4,301 digits with a 500."""
    with pytest.raises(ValueError, match="type the path parameter 'pet_id' by the handler's annotation"):
        Endpoints(tag="x").get(path, summary="x")


def test_an_unknown_method_is_refused_at_declaration() -> None:
    with pytest.raises(ValueError, match="the method must be one of GET, POST, PUT, PATCH, DELETE"):
        Endpoints(tag="x").route("TRACE", "/x", summary="x")


def test_an_error_status_that_is_not_one_is_refused_at_declaration() -> None:
    """`errors=` are the statuses the handler answers with the envelope: 4xx and 5xx only."""
    with pytest.raises(ValueError, match=r"errors must be HTTP error statuses \(400..599\), not \[302\]"):
        Endpoints(tag="x").get("/x", summary="x", errors=(404, 302))


@pytest.mark.anyio
async def test_an_error_status_of_the_apps_own_is_documented_with_the_envelope() -> None:
    """A status outside the contract's table (a 402 the app's own handler answers) is still in the document."""
    billing = Endpoints(tag="billing")

    @billing.post("/charges", summary="Charge a card", errors=(402, 409))
    async def charge() -> Pet:
        return Pet(1, "")

    async with serve(create_app(make_settings(), endpoints=[billing])) as client:
        responses = (await client.get("/openapi.json")).json()["paths"]["/charges"]["post"]["responses"]
    assert responses["402"]["description"] == "Payment Required"
    assert responses["402"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert responses["409"] == {"$ref": "#/components/responses/Conflict"}


def test_importing_a_module_builds_no_app_until_app_is_asked_for(tmp_path: Path) -> None:
    """`from app import create_app` reads no environment; `app.app` builds (and checks) it once."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SECRET_KEY")}
    env.update(ENVIRONMENT="production", PYTHONPATH=str(ROOT))  # invalid: no DATABASE_URL, no SECRET_KEY
    run = functools.partial(subprocess.run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    for module in ("app", "examples.items"):
        imported = run([sys.executable, "-c", f"import {module} as m; print('app' in vars(m))"])
        assert (imported.returncode, imported.stdout) == (0, "False\n"), imported.stderr
        asked = run([sys.executable, "-c", f"import {module} as m; m.app"])
        assert asked.returncode == CONFIGURATION_ERROR
        assert asked.stderr.startswith("Invalid settings (2 problem(s)):")


class Caller(msgspec.Struct):
    name: str


async def bearer_check(request: Request) -> Caller:
    """A team's check: `Bearer ok-<name>` lets `<name>` in; `Bearer banned` is known but refused."""
    token = request.headers.get("authorization", "").removeprefix("Bearer ")
    if token == "banned":
        raise AuthorizationError("this caller may not")
    if not token.startswith("ok-"):
        raise AuthenticationError("a valid bearer token is required")
    return Caller(token.removeprefix("ok-"))


BEARER = Guard("bearerAuth", {"type": "http", "scheme": "bearer"}, bearer_check)
guarded = Endpoints(tag="guarded", guard=BEARER)


@guarded.post("/guarded", summary="Who is asking, with a body")
async def who_posts(ctx: Context, body: NewPet) -> Caller:
    return Caller(f"{ctx.user.name} posted {body.name}")


@guarded.post("/guarded/created", summary="A new resource, its creator typed", response_headers=("ETag",))
async def create_as(user: Caller, body: NewPet) -> Created[Caller]:
    return Created(Caller(f"{user.name}'s {body.name}"), location="/guarded/created/1", headers={"ETag": '"v1"'})


@pytest.mark.anyio
async def test_a_guard_lets_in_the_callers_its_check_accepts_before_any_input_is_read() -> None:
    """401 with `WWW-Authenticate`, 403, or the handler with `ctx.user`; a refused caller's body is never read."""
    async with serve(create_app(make_settings(), endpoints=[pets, guarded])) as client:
        anonymous = await client.post("/guarded", json={"wrong": "shape"})
        banned = await client.post("/guarded", json={"name": "x"}, headers={"Authorization": "Bearer banned"})
        invalid = await client.post("/guarded", json={"wrong": "shape"}, headers={"Authorization": "Bearer ok-ann"})
        allowed = await client.post("/guarded", json={"name": "rex"}, headers={"Authorization": "Bearer ok-ann"})
        unguarded = await client.get("/pets/1")
    assert (anonymous.status_code, anonymous.json()["error"]) == (401, "AUTHENTICATION_ERROR")
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert (banned.status_code, banned.json()["error"]) == (403, "AUTHORIZATION_ERROR")
    assert invalid.status_code == 422
    assert (allowed.status_code, allowed.json()) == (200, {"name": "ann posted rex"})
    async with serve(create_app(make_settings(), endpoints=[guarded])) as client:
        created = await client.post("/guarded/created", json={"name": "rex"}, headers={"Authorization": "Bearer ok-bo"})
        spec = (await client.get("/openapi.json")).json()
    assert (created.status_code, created.json(), created.headers["etag"]) == (201, {"name": "bo's rex"}, '"v1"')
    assert set(spec["paths"]["/guarded/created"]["post"]["responses"]["201"]["headers"]) == {
        "X-Request-ID", "Location", "ETag"}  # fmt: skip
    assert unguarded.status_code == 200


@pytest.mark.anyio
async def test_a_guard_is_documented_as_the_operations_security_with_its_401_and_403() -> None:
    async with serve(create_app(make_settings(), endpoints=[pets, guarded])) as client:
        spec = (await client.get("/openapi.json")).json()
    validate_spec(spec)
    assert spec["components"]["securitySchemes"] == {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    operation = spec["paths"]["/guarded"]["post"]
    assert operation["security"] == [{"bearerAuth": []}]
    assert operation["responses"]["401"] == {"$ref": "#/components/responses/Unauthenticated"}  # WWW-Authenticate
    assert operation["responses"]["403"] == {"$ref": "#/components/responses/Forbidden"}
    assert "security" not in spec["paths"]["/pets/{pet_id}"]["get"]
    assert "401" not in spec["paths"]["/pets/{pet_id}"]["get"]["responses"]


def test_two_guards_of_one_name_and_different_schemes_stop_start_up() -> None:
    other = Endpoints(tag="other", guard=Guard("bearerAuth", {"type": "apiKey", "in": "header", "name": "X-Key"},
                                                bearer_check))  # fmt: skip

    @other.get("/other-guarded", summary="Another scheme under the same name")
    async def other_guarded(ctx: Context) -> Caller:
        return Caller("x")

    with pytest.raises(ValueError, match="two security schemes are named 'bearerAuth'"):
        create_app(make_settings(), endpoints=[guarded, other])


class Preconditions(msgspec.Struct, rename="kebab"):
    if_match: str | None = None
    x_retries: Annotated[int, msgspec.Meta(ge=0)] = 0
    x_tag: list[str] = []


@pets.get("/pets-headers", summary="Request headers, declared")
async def pets_headers(headers: Preconditions) -> Preconditions:
    return headers


@pytest.mark.anyio
async def test_request_headers_are_declared_bound_and_documented_like_the_query() -> None:
    """`headers: Struct` reads a header per field, whatever its case; a wrong one is the 422 naming it."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        spec = (await client.get("/openapi.json")).json()
        given = await client.get(
            "/pets-headers", headers=[("If-Match", '"v1"'), ("X-RETRIES", "2"), ("x-tag", "a"), ("x-tag", "b")]
        )
        absent = await client.get("/pets-headers")
        wrong = await client.get("/pets-headers", headers={"X-Retries": "1e1"})
    validate_spec(spec)
    documented = {p["name"]: p["in"] for p in spec["paths"]["/pets-headers"]["get"]["parameters"]}
    assert documented == {"if-match": "header", "x-retries": "header", "x-tag": "header"}
    assert given.json() == {"if-match": '"v1"', "x-retries": 2, "x-tag": ["a", "b"]}
    assert absent.json() == {"if-match": None, "x-retries": 0, "x-tag": []}
    assert wrong.status_code == 422
    assert wrong.json()["validation_errors"] == [
        {"field": "x-retries", "message": "Expected an integer, written in digits", "value": "1e1"}
    ]


@pytest.mark.anyio
async def test_a_guard_whose_check_finds_no_caller_lets_no_one_in() -> None:
    """A check that returns None (a token in no table, as Starlette's auth backends say it) is a 401, not open."""

    async def lookup(request: Request) -> Caller | None:
        return {"t1": Caller("ann")}.get(request.headers.get("authorization", "").removeprefix("Bearer "))

    careless = Endpoints(tag="careless", guard=Guard("bearerAuth", {"type": "http", "scheme": "bearer"}, lookup))

    @careless.get("/careless", summary="Behind a lookup")
    async def behind_lookup(user: Caller) -> Caller:
        return user

    async with serve(create_app(make_settings(), endpoints=[careless])) as client:
        unknown = await client.get("/careless", headers={"Authorization": "Bearer nope"})
        known = await client.get("/careless", headers={"Authorization": "Bearer t1"})
    assert (unknown.status_code, unknown.headers["www-authenticate"]) == (401, "Bearer")
    assert (known.status_code, known.json()) == (200, {"name": "ann"})


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("scheme", "challenge"),
    [
        ({"type": "http", "scheme": "basic"}, "Basic"),
        ({"type": "apiKey", "in": "header", "name": "X-API-Key"}, 'ApiKey in="header", name="X-API-Key"'),
        ({"type": "apiKey", "in": "query", "name": 'k"é\\'}, 'ApiKey in="query", name="k\\"\\\\"'),
        ({"type": "oauth2", "flows": {"clientCredentials": {"tokenUrl": "/token", "scopes": {}}}}, "Bearer"),
        (
            {"type": "openIdConnect", "openIdConnectUrl": "https://id.example/.well-known/openid-configuration"},
            "Bearer",
        ),
        ({"type": "mutualTLS"}, None),
    ],
)
async def test_every_401_of_a_guard_names_how_to_authenticate(scheme: dict[str, Any], challenge: str | None) -> None:
    """RFC 9110 asks a 401 for a challenge: each scheme's own, an API key's saying where the key goes; TLS none."""

    async def nobody(request: Request) -> Caller | None:
        return None

    guarded = Endpoints(tag="guarded", guard=Guard("guard", scheme, nobody))

    @guarded.get("/guarded", summary="Behind a guard")
    async def behind_guard(user: Caller) -> Caller:
        return user

    async with serve(create_app(make_settings(), endpoints=[guarded])) as client:
        refused = await client.get("/guarded")
    assert (refused.status_code, refused.headers.get("www-authenticate")) == (401, challenge)


class Listed(msgspec.Struct, rename="kebab"):
    x_ids: list[int] = []
    if_none_match: list[str] = []
    if_match: str | None = None


@pets.get("/pets-listed", summary="List headers, and one that must come once")
async def pets_listed(headers: Listed) -> Listed:
    return headers


@pytest.mark.anyio
async def test_a_list_header_takes_comma_separated_and_repeated_values_and_a_single_one_comes_once() -> None:
    """`X-Ids: 1,2` as OpenAPI's `simple` style writes it; a second `If-Match` is refused, not taken by one
    reader and not the other (a guard's check reads the first)."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        listed = await client.get(
            "/pets-listed", headers=[("X-Ids", "1, 2"), ("X-Ids", "3"), ("If-None-Match", '"a,b", "c"')]
        )
        twice = await client.get("/pets-listed", headers=[("If-Match", '"a"'), ("If-Match", '"b"')])
    assert listed.json() == {"x-ids": [1, 2, 3], "if-none-match": ['"a,b"', '"c"'], "if-match": None}
    assert twice.status_code == 422
    assert twice.json()["validation_errors"] == [
        {"field": "if-match", "message": "Given more than once", "value": None}
    ]


class Twice(msgspec.Struct):
    a: str | None = msgspec.field(default=None, name="X-A")
    b: str | None = msgspec.field(default=None, name="x-a")


def test_two_header_fields_naming_one_header_stop_start_up() -> None:
    twice = Endpoints(tag="twice")

    @twice.get("/twice", summary="Two fields for one header")
    async def read_twice(headers: Twice) -> Pet:
        return Pet(0, "")

    with pytest.raises(ValueError, match="Twice: two fields name one header"):
        create_app(make_settings(), endpoints=[twice])


@pytest.mark.anyio
async def test_a_union_of_an_integer_and_a_word_still_wants_the_integer_in_digits() -> None:
    """`int | Literal["all"]` takes `all` and `7`, and refuses `1e1` and `10.0`, which msgspec reads as 10."""
    async with serve(create_app(make_settings(), endpoints=[pets])) as client:
        word, digits = await client.get("/pets-mixed/1?limit=all"), await client.get("/pets-mixed/1?limit=7")
        spelt = [await client.get(f"/pets-mixed/1?limit={text}") for text in ("1e1", "10.0")]
    assert (word.status_code, digits.status_code) == (200, 200)
    assert [(r.status_code, r.json()["validation_errors"][0]["value"]) for r in spelt] == [(422, "1e1"), (422, "10.0")]


@pytest.mark.anyio
async def test_created_cannot_send_a_location_of_its_own() -> None:
    """`Created` writes `Location` from its `location`: a second one, from its headers, is the handler's bug."""
    twice = Endpoints(tag="twice")

    @twice.post("/twice-located", summary="A Location twice")
    async def locate_twice() -> Created[Pet]:
        return Created(Pet(1, ""), location="/twice-located/1", headers={"location": "/evil"})

    async with serve(create_app(make_settings(), endpoints=[twice])) as client:
        response = await client.post("/twice-located")
    assert response.status_code == 500

    declared = Endpoints(tag="declared")

    @declared.post("/declared-located", summary="Location declared", response_headers=("Location",))
    async def declare_location() -> Created[Pet]:
        return Created(Pet(1, ""), location="/declared-located/1")

    with pytest.raises(TypeError, match="Created sends Location itself"):
        create_app(make_settings(), endpoints=[declared])
    with pytest.raises(TypeError, match="response_headers must be a sequence of names, not one string"):
        declared.get("/one-string", summary="A string for a tuple", response_headers="ETag")


@pytest.mark.parametrize(
    ("name", "scheme", "problem"),
    [("bearer auth", {"type": "http", "scheme": "bearer"}, "a security scheme's name is letters"),
     ("k", {"type": "bogus"}, "scheme type 'bogus' is none of"),
     ("x", {"type": "http"}, "a 'http' scheme needs scheme"),
     ("key", {"type": "apiKey", "in": "header"}, "a 'apiKey' scheme needs name")],
)  # fmt: skip
def test_a_guard_whose_scheme_openapi_would_refuse_stops_start_up(
    name: str, scheme: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        Guard(name, scheme, bearer_check)


@pytest.mark.anyio
async def test_a_user_parameter_of_another_class_than_the_checks_caller_is_the_handlers_bug() -> None:
    """`user: Pet` where the check returns a `Caller`: a 500 (its logged error names both), not a wrong-typed user."""
    mistyped = Endpoints(tag="mistyped", guard=BEARER)

    @mistyped.get("/mistyped", summary="Expects another caller")
    async def expects_a_pet(user: Pet) -> Pet:
        return user

    async with serve(create_app(make_settings(), endpoints=[mistyped])) as client:
        response = await client.get("/mistyped", headers={"Authorization": "Bearer ok-ann"})
    assert response.status_code == 500
