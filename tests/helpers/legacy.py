"""A team's own events table, as rehydrate finds it: other column names, a `text` payload, no transaction column until
`rehydrate sources prepare` adds one, possibly in another database than the read models. The projection over it is
the domain's `accounts`, so `domain.oracle` gives the rows it must hold."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from rehydrate import NewEvent
from rehydrate.engine.projections import Projection
from rehydrate.sources.declaration import AnySource, Source
from rehydrate.sources.events import Event
from rehydrate.sources.mapping import EventTable, Order
from tests.helpers import domain

CREATE = """CREATE TABLE IF NOT EXISTS legacy_events (
    id bigserial PRIMARY KEY,
    aggregate text NOT NULL,
    seq int NOT NULL,
    kind text NOT NULL,
    body text NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    UNIQUE (aggregate, seq))"""
INSERT = "INSERT INTO legacy_events (aggregate, seq, kind, body) VALUES ($1, $2, $3, $4)"


# The transaction-ordered mapping as settings declare it ([sources.legacy] in rehydrate.toml, or REHYDRATE_SOURCES).
DECLARED = {
    "table": "public.legacy_events",
    "position": "id",
    "stream_id": "aggregate",
    "stream_version": "seq",
    "event_type": "kind",
    "payload": "body",
    "payload_format": "text",
    "recorded_at": "created",
    "transaction": "rehydrate_tx",
}


def table(order: Order = "transaction") -> EventTable:
    return EventTable(
        table="public.legacy_events",
        position="id",
        stream_id="aggregate",
        stream_version="seq",
        event_type="kind",
        payload="body",
        payload_format="text",
        recorded_at="created",
        order=order,
        transaction="rehydrate_tx" if order == "transaction" else None,
        settle_seconds=1.0,
    )


def source(order: Order = "transaction", url: str | None = None) -> Source:
    return Source("legacy", table(order), url)


def accounts(
    order: Order = "transaction", url: str | None = None, on_error: str = "stop", read: AnySource | None = None
) -> Projection:
    """`domain.accounts`, reading the legacy table (or the source `read`)."""
    projection = Projection(
        "accounts", version=1, table=domain.Account, key="stream", source=read or source(order, url), on_error=on_error
    )
    for event_type, handler in domain.accounts.handlers.items():
        projection.on(event_type)(handler)
    return projection


def numbered(
    history: list[tuple[str, NewEvent]], versions: dict[str, int] | None = None
) -> list[tuple[str, int, str, str]]:
    """The history as rows of the table, versions counted per stream from `versions` (the streams' last versions)."""
    versions = dict(versions or {})
    rows = []
    for stream, event in history:
        versions[stream] = versions.get(stream, 0) + 1
        rows.append((stream, versions[stream], event.type, orjson.dumps(event.data).decode()))
    return rows


async def write(
    conn: asyncpg.Connection | asyncpg.Pool, history: list[tuple[str, NewEvent]], counted_in: str = "legacy_events"
) -> None:
    """The history as the team's application writes it: versions counted on from the streams' committed ones (in
    the table or view `counted_in`)."""
    counted = await conn.fetch(f"SELECT aggregate, max(seq) FROM {counted_in} GROUP BY 1")
    await conn.executemany(INSERT, numbered(history, {row[0]: row[1] for row in counted}))


async def events(conn: asyncpg.Connection | asyncpg.Pool, relation: str = "legacy_events") -> list[Event]:
    """The events of the table (or view `relation`) as rehydrate's Event (for the oracle)."""
    rows = await conn.fetch(f"SELECT id, aggregate, seq, kind, body, created FROM {relation} ORDER BY id")
    out: list[Event] = []
    for row in rows:
        data: dict[str, Any] = orjson.loads(row["body"])
        out.append(Event(row["id"], row["aggregate"], row["seq"], row["kind"], 1, data, {}, row["created"]))
    return out
