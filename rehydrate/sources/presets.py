"""Mappings of event tables other systems write, checked against their own code (see docs/sources.md):

- `eventsourcing_table`: py-eventsourcing's PostgreSQL recorder (`stored_events` by default).
- `message_db_table`: message-db's `message_store.messages`.
- `outbox_table`: a transactional outbox with Debezium's outbox-router columns, when its rows are kept.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from rehydrate.sources.mapping import EventTable, Expression, Order


class _Mapper(Protocol):
    """What rehydrate uses of a py-eventsourcing application's mapper (`app.mapper`)."""

    transcoder: Any
    compressor: Any
    cipher: Any


def eventsourcing_table(
    mapper: _Mapper, *, table: str = "stored_events", schema: str = "public", order: Order = "gap_free"
) -> EventTable:
    """py-eventsourcing's events table, its `state` decoded by the application's own mapper: decrypted (its cipher),
    decompressed (its compressor) and decoded (its transcoder, custom types included), exactly as the library reads
    it. The event type is the event class's qualified name (`Account.Opened`), the stream its `originator_id`.

    Gap-free by construction: the recorder locks the table (`LOCK TABLE … IN EXCLUSIVE MODE`) before it inserts, so
    `notification_id` order is commit order. An application that inserts through its database functions
    (POSTGRES_ENABLE_DB_FUNCTIONS) takes no such lock: give the table a transaction column with
    `rehydrate sources prepare` and pass order="transaction" (`rehydrate sources check` tells which holds).
    """

    def decode(state: bytes, _: str) -> dict[str, Any]:
        if mapper.cipher is not None:
            state = mapper.cipher.decrypt(state)
        if mapper.compressor is not None:
            state = mapper.compressor.decompress(state)
        decoded: dict[str, Any] = mapper.transcoder.decode(state)
        return decoded

    return EventTable(
        table=f"{schema}.{table}",
        position="notification_id",
        stream_id="originator_id",
        stream_version="originator_version",
        event_type=Expression("split_part(topic, ':', 2)"),
        payload="state",
        payload_format="bytea",
        order=order,
        transaction="rehydrate_tx" if order == "transaction" else None,
        notify_channel=table.replace(".", "_"),
        decode=decode,
    )


def message_db_table(*, order: Order = "transaction", transaction: str = "rehydrate_tx") -> EventTable:
    """message-db's `message_store.messages`. Its writers lock per category only, so `global_position` is not commit
    order across categories: give it a transaction column (`rehydrate sources prepare`, the default here) or use
    order="settle". Streams are its stream names (`account-123`); a stream's `position` counts from 0, its version
    from 1, as everywhere in rehydrate. Its `time` (UTC, without time zone) is the recorded-at."""
    return EventTable(
        table="message_store.messages",
        position="global_position",
        stream_id="stream_name",
        stream_version=Expression("position + 1"),
        event_type="type",
        payload="data",
        payload_format="jsonb",
        metadata="metadata",
        recorded_at="time",
        order=order,
        transaction=transaction if order == "transaction" else None,
    )


def outbox_table(
    table: str, *, position: str, recorded_at: str | None = None, order: Order = "settle", settle_seconds: float = 5.0
) -> EventTable:
    """A transactional outbox with Debezium's outbox-router columns (`aggregateid`, `type`, `payload`), ordered by
    `position` (an outbox has no order of its own: its rows must be kept and carry one). Settle-window by default;
    a transaction column (order="transaction") makes it exact."""
    return EventTable(
        table=table,
        position=position,
        stream_id="aggregateid",
        stream_version=None,
        event_type="type",
        payload="payload",
        payload_format="jsonb",
        recorded_at=recorded_at,
        order=order,
        transaction="rehydrate_tx" if order == "transaction" else None,
        settle_seconds=settle_seconds,
    )


def json_bytes(payload: bytes, _: str) -> dict[str, Any]:
    """A decoder for a bytea payload that holds UTF-8 JSON."""
    decoded: dict[str, Any] = orjson.loads(payload)
    return decoded
