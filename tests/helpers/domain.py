"""Projections, random histories and the oracle fold that tests compare replays against."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import asyncpg
from sqlmodel import Field, SQLModel

from rehydrate import Event, EventStore, NewEvent
from rehydrate.engine.importer import import_events
from rehydrate.engine.projections import Projection, Registry, Row


class Account(SQLModel, table=True):
    __tablename__ = "account"
    account_id: str = Field(primary_key=True)
    owner: str = Field(index=True)
    balance: int = 0
    changes: int = 0
    history: str = ""


class GroupTotal(SQLModel, table=True):
    __tablename__ = "group_total"
    group_id: str = Field(primary_key=True)
    members: int = 0
    amount: int = 0
    last_stream: str | None = None


# Keyed by stream: creates, order-sensitive updates (history), renames and deletes.
accounts = Projection("accounts", version=1, table=Account, key="stream")
# Keyed by a payload field, across streams.
group_totals = Projection("group_totals", version=1, table=GroupTotal, key="group")


@accounts.on("Opened")
def opened(row: Row | None, event: Event) -> Row:
    return {"owner": event.data["owner"], "balance": 0, "history": "o"}


@accounts.on("Deposited", "Withdrawn")
def moved(row: Row | None, event: Event) -> Row | None:
    if row is None:
        return None
    sign = 1 if event.type == "Deposited" else -1
    row["balance"] += sign * event.data["amount"]
    row["changes"] += 1
    # Order-sensitive: any reordering within a stream changes this column.
    row["history"] = (row["history"] + event.type[0])[-40:]
    return row


@accounts.on("Renamed")
def renamed(row: Row | None, event: Event) -> Row | None:
    if row is None:
        return None
    row["owner"] = event.data["owner"]
    return row


@accounts.on("Closed")
def closed(row: Row | None, event: Event) -> None:
    return None


@group_totals.on("Opened")
def joined(row: Row | None, event: Event) -> Row:
    row = row or {}
    return {"members": row.get("members", 0) + 1, "amount": row.get("amount", 0), "last_stream": event.stream_id}


@group_totals.on("Deposited", "Withdrawn")
def group_moved(row: Row | None, event: Event) -> Row:
    row = row or {"members": 0, "amount": 0}
    sign = 1 if event.type == "Deposited" else -1
    row["amount"] = row["amount"] * 3 % 1_000_003 + sign * event.data["amount"]  # order-sensitive
    row["last_stream"] = event.stream_id
    return row


def registry() -> Registry:
    return Registry([accounts, group_totals])


def random_history(seed: int, streams: int = 40, events: int = 600) -> list[tuple[str, NewEvent]]:
    """Interleaved account streams: opened, money moved, renamed, some closed (and some reopened)."""
    rng = random.Random(seed)
    groups = [f"g{n}" for n in range(7)]
    state: dict[str, str] = {}  # stream -> "open" | "closed"
    group_of: dict[str, str] = {}
    out: list[tuple[str, NewEvent]] = []
    while len(out) < events:
        stream = f"acct-{rng.randrange(streams)}"
        group = group_of.setdefault(stream, rng.choice(groups))
        status = state.get(stream)
        if status != "open":
            event = NewEvent("Opened", {"owner": f"o{rng.randrange(100)}", "group": group})
            state[stream] = "open"
        else:
            roll = rng.random()
            if roll < 0.6:
                kind = rng.choice(["Deposited", "Withdrawn"])
                event = NewEvent(kind, {"amount": rng.randrange(1, 500), "group": group})
            elif roll < 0.75:
                event = NewEvent("Renamed", {"owner": f"o{rng.randrange(100)}", "group": group})
            elif roll < 0.82:
                event = NewEvent("Closed", {"group": group})
                state[stream] = "closed"
            else:
                event = NewEvent("Audited", {"note": "ignored by both projections", "group": group})
        out.append((stream, event))
    return out


async def append_all(store: EventStore, history: Iterable[tuple[str, NewEvent]]) -> None:
    for stream, event in history:
        await store.append(stream, [event])


async def import_all(store: EventStore, history: Iterable[tuple[str, NewEvent]]) -> None:
    """The same events as `append_all`, in one import (a COPY): for a history of thousands of events whose test needs
    no transaction of its own per event (appended one by one, 8,000 take ~5 s here)."""
    lines = ({"stream_id": stream, "type": event.type, "data": event.data} for stream, event in history)
    await import_events(store, enumerate(lines, start=1), source="test history")


def oracle(projection: Projection, events: Iterable[Event]) -> dict[Any, Row]:
    """The plain single-threaded fold: every event in position order through the projection's handlers."""
    shape = projection.table
    rows: dict[Any, Row | None] = {}
    for event in sorted(events, key=lambda e: e.global_position):
        handler = projection.handlers.get(event.type)
        if handler is None:
            continue
        key = event.stream_id if projection.key.field is None else event.data[projection.key.field]
        current = rows.get(key)
        new = handler(None if current is None else dict(current), event)
        if new is not None:
            new = {**shape.blank_row, shape.key_column: key, **new}
        rows[key] = new
    return {key: row for key, row in rows.items() if row is not None}


async def all_events(store: EventStore) -> list[Event]:
    rows = await store.pool.fetch(
        "SELECT global_position, stream_id, stream_version, event_type, schema_version, payload, metadata, "
        "recorded_at FROM rehydrate.events ORDER BY global_position"
    )
    return [Event(*row) for row in rows]


async def rows_of(conn: asyncpg.Connection | asyncpg.Pool, schema: str, table: str, key: str) -> dict[Any, Row]:
    """The rows of `schema.table` (a sandbox's, say), by `key`."""
    return {row[key]: dict(row) for row in await conn.fetch(f'SELECT * FROM "{schema}"."{table}"')}


async def read_model(conn: asyncpg.Connection | asyncpg.Pool, projection: Projection) -> dict[Any, Row]:
    """The rows readers see under the projection's plain table name."""
    rows = await conn.fetch(f'SELECT * FROM public."{projection.table.name}"')
    return {row[projection.table.key_column]: dict(row) for row in rows}
