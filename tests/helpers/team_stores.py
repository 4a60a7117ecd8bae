"""Event tables other systems write, written the way their writers write them, for the presets' tests:

- message-db's `message_store.messages` (its columns; its writers' rule: under a lock per *category*, a stream's next
  `position`, counted from 0; `time` in UTC without a time zone; `data` may be NULL). message-db installs from git,
  not from a package registry, so the table and the writes are made here after its published schema.
- a transactional outbox with Debezium's outbox-router columns, its rows kept and ordered by an identity column.

Both are given the transaction column `rehydrate sources prepare` adds. `accounts(kind, url)` is `domain.accounts`
over either; `events(kind, conn)` gives the events as rehydrate must read them (for the oracle)."""

from __future__ import annotations

import os
from typing import Any, Literal

import asyncpg
import orjson

from rehydrate import NewEvent
from rehydrate.engine.projections import Projection
from rehydrate.sources.declaration import Source
from rehydrate.sources.events import Event
from rehydrate.sources.inspection import prepare, prepare_sql
from rehydrate.sources.mapping import EventTable
from rehydrate.sources.presets import message_db_table, outbox_table
from tests.helpers import domain

Kind = Literal["message-db", "outbox"]
KINDS: tuple[Kind, ...] = ("message-db", "outbox")

_MESSAGE_DB = [
    "CREATE SCHEMA IF NOT EXISTS message_store",
    """CREATE TABLE IF NOT EXISTS message_store.messages (
        global_position bigserial PRIMARY KEY,
        position bigint NOT NULL,
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        time timestamp without time zone NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
        stream_name text NOT NULL,
        type text NOT NULL,
        data jsonb,
        metadata jsonb)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS messages_stream ON message_store.messages (stream_name, position)",
]
_OUTBOX = [
    """CREATE TABLE IF NOT EXISTS outbox (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        aggregatetype text NOT NULL,
        aggregateid text NOT NULL,
        type text NOT NULL,
        payload jsonb NOT NULL,
        created timestamptz NOT NULL DEFAULT now(),
        seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE)""",
    "CREATE INDEX IF NOT EXISTS outbox_aggregate ON outbox (aggregateid, seq)",
]


def table(kind: Kind) -> EventTable:
    if kind == "message-db":
        return message_db_table()
    return outbox_table("public.outbox", position="seq", recorded_at="created", order="transaction")


def source(kind: Kind, url: str | None = None) -> Source:
    return Source(kind.replace("-", "_"), table(kind), url)


def accounts(kind: Kind, url: str | None = None) -> Projection:
    """`domain.accounts`, reading the kind's table."""
    projection = Projection("accounts", version=1, table=domain.Account, key="stream", source=source(kind, url))
    for event_type, handler in domain.accounts.handlers.items():
        projection.on(event_type)(handler)
    return projection


async def create(conn: asyncpg.Connection, kind: Kind) -> None:
    for statement in _MESSAGE_DB if kind == "message-db" else _OUTBOX:
        await conn.execute(statement)
    await prepare(conn, prepare_sql(table(kind)))


async def write(conn: asyncpg.Connection, kind: Kind, history: list[tuple[str, NewEvent]]) -> None:
    """One transaction, as the kind's writers write: message-db locks each category and numbers each stream on from
    its last position; the outbox inserts its rows beside (here: instead of) the business change."""
    async with conn.transaction():
        if kind == "outbox":
            await conn.executemany(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('account', $1, $2, $3)",
                [(stream, event.type, orjson.dumps(event.data).decode()) for stream, event in history],
            )
            return
        streams = sorted({stream for stream, _ in history})
        for category in sorted({stream.split("-")[0] for stream in streams}):
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", category)
        last = dict(
            await conn.fetch(
                "SELECT stream_name, max(position) FROM message_store.messages WHERE stream_name = ANY($1) GROUP BY 1",
                streams,
            )
        )
        rows = []
        for stream, event in history:
            last[stream] = last.get(stream, -1) + 1
            rows.append((stream, last[stream], event.type, orjson.dumps(event.data).decode()))
        await conn.executemany(
            "INSERT INTO message_store.messages (stream_name, position, type, data) VALUES ($1, $2, $3, $4)", rows
        )


async def write_empty_messages(conn: asyncpg.Connection, count: int) -> None:
    """Messages without data (message-db allows them), of a type no projection handles."""
    await conn.executemany(
        "INSERT INTO message_store.messages (stream_name, position, type, data) VALUES ($1, 0, 'Pinged', NULL)",
        [(f"ping-{n}",) for n in range(count)],
    )


async def events(conn: asyncpg.Connection, kind: Kind) -> list[Event]:
    """The kind's events as rehydrate must read them: versions from 1, times in UTC."""
    if kind == "message-db":
        rows = await conn.fetch(
            """SELECT global_position, stream_name, position + 1, type, coalesce(data, '{}'), time AT TIME ZONE 'utc'
            FROM message_store.messages ORDER BY global_position"""
        )
    else:
        rows = await conn.fetch("SELECT seq, aggregateid, seq, type, payload, created FROM outbox ORDER BY seq")
    out: list[Event] = []
    for row in rows:
        data: dict[str, Any] = row[4] if isinstance(row[4], dict) else orjson.loads(row[4])
        out.append(Event(row[0], row[1], row[2], row[3], 1, data, {}, row[5]))
    return out


def from_environment() -> Kind | None:
    """The kind a fault test's worker processes read (REHYDRATE_TEST_TEAM_STORE)."""
    kind = os.environ.get("REHYDRATE_TEST_TEAM_STORE")
    return kind if kind in KINDS else None  # type: ignore[return-value]
