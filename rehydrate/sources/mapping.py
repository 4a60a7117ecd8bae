"""How an events table or view maps onto rehydrate's event: which column is the position, the stream, the version,
the type, the payload; and how the table is *gap-safe*, that is how a reader knows that no event below a mark can
still commit.

Three ways, from strongest to weakest:

- `order="transaction"`: a column holds each row's transaction id (`xid8`, or a `bigint` as Sequent writes it, both
  `DEFAULT pg_current_xact_id()`); a mark is the oldest transaction still running, and every event below it is final.
  rehydrate's own store works so; `rehydrate sources prepare` adds such a column to a table that lacks one.
- `order="gap_free"`: positions are given in commit order by construction (writers serialize, as py-eventsourcing's
  recorder does by locking the table): every position up to the highest one visible is final.
- `order="settle"`: a position is taken as final once it is `settle_seconds` old (by its recorded-at column).
  Weaker: an event that commits later than that below a checkpoint would be missed; the gap audit finds it.

A mapping is declared in code (beside the projections) or in settings; its names are checked as identifiers, and
only a preset written in code may give an SQL expression instead of a column (`Expression`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rehydrate.core.errors import UserError
from rehydrate.core.identifiers import check_identifier, derived_name, quote

Order = Literal["transaction", "gap_free", "settle"]
PayloadFormat = Literal["jsonb", "json", "text", "bytea"]
_FORMATS = ("jsonb", "json", "text", "bytea")

# A payload decoder: the raw payload (bytes for bytea, str otherwise) and the event's raw type → the JSON object
# handlers see. Raising marks the event undecodable (parked as a dead letter where the projection parks).
Decoder = Callable[[Any, str], dict[str, Any]]


@dataclass(frozen=True)
class Expression:
    """SQL in place of a column, for presets written in code (never from settings): e.g. the class name in a
    py-eventsourcing topic, `split_part(topic, ':', 2)`."""

    sql: str


Column = str | Expression


@dataclass(frozen=True)
class EventTable:
    """An events table or view, and how rehydrate reads it. Only `table` and `position` are required when the other
    columns have rehydrate's names.

    `stream_version` may be None (an outbox): the position then orders a stream. `schema_version` None: every
    event is version 1 (for upcasters). `recorded_at` None: no `--as-of` builds and no settle window.
    """

    table: str  # "schema.table" or "table" (schema public)
    position: Column = "global_position"
    stream_id: Column = "stream_id"
    stream_version: Column | None = "stream_version"
    event_type: Column = "event_type"
    schema_version: Column | None = None
    payload: Column = "payload"
    payload_format: PayloadFormat = "jsonb"
    metadata: Column | None = None
    metadata_format: PayloadFormat = "jsonb"
    recorded_at: Column | None = None
    order: Order = "transaction"
    transaction: Column | None = "tx_id"  # with order="transaction": an xid8 or bigint transaction-id column
    settle_seconds: float = 5.0
    gap_horizon_seconds: float = 3600.0  # with order="settle": how long the gap audit looks for late commits
    decode: Decoder | None = field(default=None, compare=False)  # the payload's decoder (default: JSON)
    notify_channel: str | None = None  # a LISTEN channel its writers notify (None: tails poll)

    def __post_init__(self) -> None:
        schema, _, name = self.table.rpartition(".")
        check_identifier(name, "events table")
        if schema:
            check_identifier(schema, "events table's schema")
        if self.notify_channel is not None:
            check_identifier(self.notify_channel, "notify_channel")
        for label, column in self.roles().items():
            if isinstance(column, str):
                check_identifier(column, f"column {label}")
        if self.order not in ("transaction", "gap_free", "settle"):
            raise UserError(f"order {self.order!r} is not one of transaction, gap_free, settle", fix="use one of them")
        for label, format in (("payload_format", self.payload_format), ("metadata_format", self.metadata_format)):
            if format not in _FORMATS:
                raise UserError(
                    f"events table {self.table!r}: {label} {format!r} is not one of {', '.join(_FORMATS)}",
                    fix="use the column's type (bytea with a decoder)",
                )
        if self.metadata is not None and self.metadata_format == "bytea":
            raise UserError(
                f"events table {self.table!r}: metadata in bytea cannot be read (the decoder is the payload's)",
                fix="map a jsonb, json or text metadata column, or none",
            )
        if self.order == "transaction" and self.transaction is None:
            raise UserError(
                f"events table {self.table!r}: order='transaction' needs a transaction column",
                fix="name it (transaction=...), add one with `rehydrate sources prepare`, or use gap_free or settle",
            )
        if self.order == "settle" and self.recorded_at is None:
            raise UserError(
                f"events table {self.table!r}: order='settle' needs a recorded_at column",
                fix="name it (recorded_at=...), or add a transaction column with `rehydrate sources prepare` and use "
                "order='transaction'",
            )
        if not self.settle_seconds > 0:
            raise UserError(f"settle_seconds={self.settle_seconds!r} is not positive", fix="use e.g. 5")
        if not self.gap_horizon_seconds >= self.settle_seconds:
            raise UserError(
                f"gap_horizon_seconds={self.gap_horizon_seconds!r} is shorter than the settle window",
                fix="use e.g. 3600",
            )

    def roles(self) -> dict[str, Column | None]:
        """Each role (position, stream_id, …) and the column or expression that plays it."""
        return {
            "position": self.position,
            "stream_id": self.stream_id,
            "stream_version": self.stream_version,
            "event_type": self.event_type,
            "schema_version": self.schema_version,
            "payload": self.payload,
            "metadata": self.metadata,
            "recorded_at": self.recorded_at,
            "transaction": self.transaction if self.order == "transaction" else None,  # else not read
        }

    @property
    def schema(self) -> str:
        schema, _, _ = self.table.rpartition(".")
        return schema or "public"

    @property
    def name(self) -> str:
        return self.table.rpartition(".")[2]

    @property
    def relation(self) -> str:
        """The table, quoted and schema-qualified."""
        return f"{quote(self.schema)}.{quote(self.name)}"

    @property
    def channel(self) -> str:
        """The channel `rehydrate sources prepare --notify` makes inserts notify: `notify_channel`, else one named
        after the table."""
        return self.notify_channel or derived_name(f"{self.schema}_{self.name}", "")

    def columns(self) -> list[str]:
        """The plain columns it names (expressions left out)."""
        return [c for c in self.roles().values() if isinstance(c, str)]


@dataclass(frozen=True)
class KafkaTopic:
    """A Kafka topic, and how each of its messages reads as an event: the key is the stream id, the value the payload
    (JSON, or `decode`), the timestamp the recorded-at; the event type comes from a header or a payload field, the
    stream version from a header when the producer writes one (else the offset orders a stream)."""

    topic: str
    type_header: str | None = "event_type"
    type_field: str | None = None  # read when the message has no type header
    version_header: str | None = None
    decode: Decoder | None = field(default=None, compare=False)  # the value's decoder (default: JSON)

    def __post_init__(self) -> None:
        if not self.topic:
            raise UserError("a Kafka source names no topic", fix="give topic=")
        if self.type_header is None and self.type_field is None:
            raise UserError(
                f"topic {self.topic!r}: no way to read an event's type", fix="give type_header= or type_field="
            )


@dataclass(frozen=True)
class KinesisStream:
    """A Kinesis data stream, and how each of its records reads as an event: the partition key is the stream id, the
    data the payload (JSON, or `decode`), the approximate arrival timestamp the recorded-at; the event type comes from
    a field of the payload (a record has no headers), the stream version from another when producers write one (else
    the record's ordinal in its shard orders a stream)."""

    stream: str
    type_field: str = "type"
    version_field: str | None = None
    decode: Decoder | None = field(default=None, compare=False)  # the data's decoder (default: JSON)

    def __post_init__(self) -> None:
        if not self.stream:
            raise UserError("a Kinesis source names no stream", fix="give stream=")
        if not self.type_field:
            raise UserError(f"stream {self.stream!r}: no way to read an event's type", fix="give type_field=")


def sql_of(column: Column) -> str:
    """A column, quoted, or an expression as written."""
    return column.sql if isinstance(column, Expression) else quote(column)


def own_table(schema: str) -> EventTable:
    """rehydrate's own events table: transaction-ordered by its `tx_id` column."""
    return EventTable(
        table=f"{schema}.events",
        schema_version="schema_version",
        metadata="metadata",
        recorded_at="recorded_at",
        notify_channel=f"{schema}_events",
    )
