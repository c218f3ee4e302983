"""The reference resource: items, kept out of the foundation's app to show how to build on it.

`uvicorn examples.items:app` serves the foundation plus:

    POST /items                 {"name", "tags"?} -> 201, Location: /items/<id>
    GET  /items/{item_id}       the item with its ETag, or 404; 304 when If-None-Match names it
    GET  /items?limit=N         the newest N (1..100, default 20)

The whole resource is this module, its migration (`examples/migrations/`, applied with
`python -m db migrate --source examples/migrations`) and its tests (`tests/test_items.py`); no
module of the foundation knows about it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated

import msgspec
from starlette.applications import Starlette

from api import Context, Created, Endpoints, WithHeaders
from app import create_app
from errors import NotFoundError
from migrate import MIGRATIONS_DIR
from settings import Settings

MIGRATIONS = Path(__file__).parent / "migrations"


# Unknown fields are refused (422), so a misspelt optional field is an error, not silently dropped.
class NewItem(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    tags: list[str] = []


class Item(msgspec.Struct):
    id: uuid.UUID
    name: str
    tags: list[str]
    created_at: Annotated[datetime, msgspec.Meta(tz=True)]  # documented as `date-time`: always with its offset


class ItemList(msgspec.Struct):
    items: list[Item]


class Page(msgspec.Struct):
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20


INSERT = "INSERT INTO items (name, tags) VALUES ($1, $2) RETURNING id, name, tags, created_at"
SELECT_ONE = "SELECT id, name, tags, created_at FROM items WHERE id = $1"
# UUIDv7 keys grow with creation time: the primary key's index gives the newest first.
SELECT_NEWEST = "SELECT id, name, tags, created_at FROM items ORDER BY id DESC LIMIT $1"

items = Endpoints(tag="items")


@items.post("/items", summary="Create an item", errors=(409,))
async def create_item(ctx: Context, body: NewItem) -> Created[Item]:
    """A new item; its `id` is a UUIDv7 the database makes. A name already taken is a 409."""
    async with ctx.connection() as conn:
        row = await conn.fetchrow(INSERT, body.name, body.tags)
    assert row is not None  # INSERT ... RETURNING always returns the row
    item = Item(**row)
    return Created(item, location=f"/items/{item.id}")


@items.get("/items/{item_id}", summary="One item", errors=(404,), response_headers=("ETag",))
async def get_item(ctx: Context, item_id: uuid.UUID) -> WithHeaders[Item]:
    """The item with this id, and its `ETag`: a client that sends it back in `If-None-Match` gets
    304 and no body. An item never changes once made, so its id names its only version; a
    resource that changes would take its ETag from a version column."""
    async with ctx.connection(stateless=True) as conn:
        row = await conn.fetchrow(SELECT_ONE, item_id)
        if row is None:  # raised inside the block: the connection still goes back to the pool healthy
            raise NotFoundError(f"No item with id {item_id}")
    return WithHeaders(Item(**row), {"ETag": f'"{item_id}"'})


@items.get("/items", summary="The newest items")
async def list_items(ctx: Context, query: Page) -> ItemList:
    """Newest first, at most `limit` of them."""
    async with ctx.connection(stateless=True) as conn:
        rows = await conn.fetch(SELECT_NEWEST, query.limit)
    return ItemList([Item(**row) for row in rows])


def create_items_app(settings: Settings | None = None) -> Starlette:
    """The foundation serving items; `/health/db` expects both folders' migrations applied."""
    return create_app(settings, endpoints=[items], migrations=[MIGRATIONS_DIR, MIGRATIONS])


def __getattr__(name: str) -> Starlette:
    """`app` for `uvicorn examples.items:app`, built when first asked for (as in app.py)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    built = globals()["app"] = create_items_app()
    return built
