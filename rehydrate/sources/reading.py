"""Every read of an events table: the high-water mark, what a mark holds back, a replay's lanes and chunks, a tail's
delta, a key's events, a stream's events. One class serves rehydrate's own store and any mapped table or view (see
`mapping`): the statements are written once, over the mapping's columns.

Why a high-water mark, and why some events are *held back*
---------------------------------------------------------
A position comes from a sequence when a row is inserted, not when its transaction commits. A reader that follows
`position > checkpoint` skips an event whose transaction commits after a later-numbered one (the bug every Postgres
event store has shipped once). So readers only take events below a *mark*: on a transaction-ordered table, the
oldest transaction still running (`pg_snapshot_xmin(pg_current_snapshot())`): every transaction below it has ended,
so the set of events below it is final and the mark is a complete checkpoint. On a gap-free table, the highest
position visible, plus one; on a settle-window table, the first position younger than the window.

Transaction-id order is not stream order, though. Transaction A can take its id early (by writing something
else), wait, and append version 2 of a stream after transaction B, with a *higher* id, appended and committed
version 1. Once A commits, while a transaction with an id between theirs still runs, A's event is below the
mark and B's is not: applying A's event then would apply version 2 before version 1. Such an event is *held
back*: an event below the mark whose stream has an earlier version at or above the mark. It is
delivered with the first mark that also covers its predecessor. Because a version can only be appended after
the one before it committed, the held-back set of a mark never changes once computed, so it need not be stored:
the checkpoint stays one number.

The gap audit of a settle-window table
--------------------------------------
On a table with neither a transaction column nor serialized writers, a position is taken as final once it is older
than the window: an event whose transaction stays open longer commits below a checkpoint that has passed it. Every
run of empty positions a checkpoint passes is therefore recorded (`gaps`), and each later catch-up looks in the
recorded runs (`read_ranges`): an event found there committed late. Its key is rebuilt from its whole history,
so it lands in stream order, and it is reported; a run is forgotten once the table's gap horizon has passed
(positions of rolled-back inserts stay empty for ever).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from rehydrate.core.errors import UserError
from rehydrate.models.names import OWN_SOURCE
from rehydrate.sources.events import Cutoff, Event, HeldBack, KeySpec, UndecodablePayload, is_held
from rehydrate.sources.mapping import EventTable, sql_of

# -- the statements, over the mapping's parts ({events}: the table; {pos}, {stream}, {version}, {type}: its columns as
# SQL; {tx} and {cast}: what a mark bounds and how a mark (passed as text) is cast to it; {columns}: the select list;
# {bulk_columns}: the same with recorded_at as ISO text, for the reads of many events on rehydrate's own sessions)

_TYPES = "($2::text[] IS NULL OR {type} = ANY($2::text[]))"  # the event types a projection reads (NULL: all)

_TRANSACTION_MARK = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
_GAP_FREE_MARK = "SELECT coalesce(max({pos}), 0) + 1 FROM {events}"
_SETTLED_MARK = """SELECT coalesce(
        (SELECT min({pos}) FROM {events} WHERE {at} > now() - make_interval(secs => $1)),
        (SELECT coalesce(max({pos}), 0) + 1 FROM {events}))"""
_OLDER_THAN = "SELECT coalesce(max({pos}), 0) + 1 FROM {events} WHERE {at} <= now() - make_interval(secs => $1)"
_BOUNDED_MARK = """SELECT {tx}::text::bigint FROM {events}
    WHERE {tx} >= $1{cast} AND {tx} < $2{cast} ORDER BY {tx}, {pos} OFFSET $3 LIMIT 1"""
_HELD_BACK = "SELECT {stream}, min({version}) FROM {events} WHERE {tx} >= $1{cast} GROUP BY 1"
_READ_LANE = """SELECT {bulk_columns} FROM {events}
    WHERE {pos} > $1 AND {tx} < $2{cast} AND {kept}{cutoff}
    ORDER BY {pos} LIMIT $4"""
_LANE_TYPES = _TYPES.replace("$2", "$3")  # the lane read passes the types third
# A hash lane: the key's hash modulo the lanes ($lanes, $lane), 9223372036854775807 clearing the sign bit; its
# events' types are tested only in the lane. As two conditions, Postgres tests the type of every row first (comparing
# it with each type the projection reads costs more than the hash: 140 ms against 100 over 1,000,000 rows of 8
# types), and takes a lane to keep 0.5% of the rows (an expression it has no statistics for), so it expects every
# chunk to read the rest of the table and plans the first half of a lane's chunks as a scan of the whole table and a
# sort of the lane's rows. In a CASE the lane is tested first, and the planner's estimate for a condition it cannot
# read (a half) has it read each chunk in position order through the index, stopping at the chunk's last event.
_HASH_LANE = (
    "CASE WHEN (hashtextextended({key}, 0) & 9223372036854775807) % ${lanes} = ${lane} THEN {types} ELSE false END"
)
_READ_STREAMS = """SELECT {bulk_columns} FROM {events} WHERE {where}{cutoff}
    ORDER BY {stream}, {version} LIMIT $3"""
# Range lanes are used while the events fit in the cache (see `lane_split`), where a random page costs about what a
# sequential one does; at the default cost (4) the planner took a chunk whose range held more events than the limit
# to a bitmap scan and an external sort of the whole range (2-3x the index scan's time, and nothing streams until
# the sort is done), as it plans each statement's first executions.
_CACHED_PAGES = "SET LOCAL random_page_cost = 1.1"
_FITS_IN_CACHE = "SELECT pg_table_size($1::regclass) <= pg_size_bytes(current_setting('effective_cache_size'))"
_ROW_ESTIMATE = "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = $1::regclass"
_BOUNDARIES = (
    """SELECT percentile_disc($3::float8[]) WITHIN GROUP (ORDER BY {stream}){thinned}, count(*)
    FROM {events} {sample} WHERE {tx} < $1{cast} AND """
    + _TYPES
    + "{cutoff}"
)
_COUNT_RANGES = (
    """SELECT (SELECT count(*) FROM unnest($3::text[]) AS b WHERE b <= s.rh_stream) AS lane, sum(s.n)
    FROM (SELECT {stream} AS rh_stream, count(*) AS n FROM {events} {sample}
          WHERE {tx} < $1{cast} AND """
    + _TYPES
    + """{cutoff} GROUP BY 1) AS s
    GROUP BY 1"""
)
_COUNT_LANES = (
    """SELECT (hashtextextended({key}, 0) & 9223372036854775807) % $3 AS lane, count(*)
    FROM {events} {sample} WHERE {tx} < $1{cast} AND """
    + _TYPES
    + "{cutoff} GROUP BY 1"
)
# Every event below $2 and not held back by it, that was either at or above $1 or held back by it. (The rh_ names
# keep the held sets' columns apart from the table's, which the mapping's expressions name unqualified.)
_READ_DELTA = """WITH held_from AS (
        SELECT {stream} AS rh_stream, min({version}) AS rh_version FROM {events}
        WHERE {tx} >= $1{cast} GROUP BY 1),
    held_to AS (
        SELECT {stream} AS rh_stream, min({version}) AS rh_version FROM {events}
        WHERE {tx} >= $2{cast} GROUP BY 1),
    delta AS (
        SELECT * FROM {events}
        WHERE {tx} >= $1{cast} AND {tx} < $2{cast}
        UNION ALL
        SELECT e.* FROM held_from h JOIN {events} e ON {stream} = h.rh_stream AND {version} > h.rh_version
        WHERE {tx} < $1{cast})
    SELECT {bulk_columns} FROM delta
    WHERE ($3::text[] IS NULL OR {type} = ANY($3::text[]))
      AND NOT EXISTS (SELECT 1 FROM held_to h WHERE h.rh_stream = {stream} AND {version} > h.rh_version)
    ORDER BY {pos}"""
_READ_KEYS = (
    """SELECT {bulk_columns} FROM {events}
    WHERE {tx} < $1{cast} AND """
    + _TYPES
    + """ AND {key} = ANY($3::text[]{key_casts})
    ORDER BY {pos}"""
)
# The events a read model at checkpoint $1 does not have: those at or above it, and those below it held back behind
# an earlier version of their stream at or above it (found through the stream's key, not by a scan below $1).
_LAG = (
    """WITH rh_above AS (
        SELECT {stream} AS rh_s, min({version}) AS rh_v FROM {events} WHERE {tx} >= $1{cast} GROUP BY 1),
    rh_lagging AS (
        SELECT {at} AS rh_at FROM {events} WHERE {tx} >= $1{cast} AND """
    + _TYPES
    + """
        UNION ALL
        SELECT {at} FROM {events} JOIN rh_above ON rh_above.rh_s = {stream} AND {version} > rh_above.rh_v
        WHERE {tx} < $1{cast} AND """
    + _TYPES
    + """)
    SELECT count(*), coalesce(extract(epoch FROM now() - min(rh_at)), 0)::float8 FROM rh_lagging"""
)
_HEAD = "SELECT coalesce(max({pos}), 0) FROM {events}"
# Runs of positions in [$1, $2) that hold no event, as (first, last); the row $2 closes the last run.
_GAPS = """SELECT rh_prev + 1, rh_pos - 1 FROM (
        SELECT rh_pos, lag(rh_pos, 1, $1 - 1) OVER (ORDER BY rh_pos) AS rh_prev FROM (
            SELECT {pos} AS rh_pos FROM {events} WHERE {pos} >= $1 AND {pos} < $2
            UNION ALL SELECT $2) AS p) AS g
    WHERE rh_pos - rh_prev > 1"""
_READ_RANGES = """SELECT {bulk_columns} FROM {events} JOIN unnest($1::bigint[], $2::bigint[]) AS g(rh_low, rh_high)
    ON {pos} BETWEEN g.rh_low AND g.rh_high
    ORDER BY {pos}"""
_LATEST = "SELECT * FROM (SELECT {columns} FROM {events} ORDER BY {pos} DESC LIMIT $1) AS latest ORDER BY 1"
_READ_STREAM = """SELECT {columns} FROM {events}
    WHERE {stream_column} = $1{stream_cast} AND {version} > $2 AND ($3::bigint IS NULL OR {version} <= $3)
    ORDER BY {version}"""
_READ_STREAMS_BY_ID = """SELECT {columns} FROM {events} WHERE {stream_column} = ANY($1::text[]{stream_casts})
    ORDER BY {stream}, {version}"""
_VERSION_AS_OF = """SELECT CASE WHEN $2::timestamptz IS NULL THEN coalesce(max({version}), 0)
        ELSE coalesce(min({version}) FILTER (WHERE {at} > $2) - 1, max({version}), 0) END
    FROM {events} WHERE {stream_column} = $1{stream_cast}"""
# A stream's first event (version 1) stands for the stream: the (stream, version) index finds them.
_STREAMS_AFTER = """SELECT {stream} FROM {events}
    WHERE {version} = 1 AND ($1::text IS NULL OR {stream} > $1) AND starts_with({stream}, $2)
      AND (hashtextextended({stream}, 0) & 9223372036854775807) % $4 = $5
    ORDER BY 1 LIMIT $3"""
_COUNT_STREAMS = "SELECT count(*) FROM {events} WHERE {version} = 1 AND starts_with({stream}, $1)"
_TYPE_VERSIONS = """SELECT {type}, {sv}, count(*) FROM {events} GROUP BY 1, 2 ORDER BY 1, 2"""
# What the mapping's columns are (views included): the stream id's type decides whether it is cast to text; the
# transaction column's, how a mark is cast.
_COLUMN_TYPES = """SELECT a.attname, format_type(a.atttypid, a.atttypmod), c.relkind, a.attnotnull
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped"""

# Of a sample's events, those whose stream ids are sorted to cut lanes by stream range (see stream_boundaries).
BOUNDARY_THINNING = 8

# Rows a lane read takes from its cursor at a time. Measured on 1M events (2 cores): 5,000 → 50,000 took one lane
# from 170-180k to 247k events/s and four from 253k to 287-292k: Postgres produces a batch while asyncpg parses
# what has arrived, and every batch boundary stalls both. A chunk holds at most this many rows at once.
FETCH_SIZE = 50_000

# Events a read hands out at a time, of the rows fetched at once: a chunk holds 5,000 Events at a time instead of
# 50,000 (each worker's peak RSS in the benchmark 240-258 -> 202-208 MB), and the worker's event loop, which also
# runs its workflow tasks, heartbeats and cancellations, gets a turn every 5,000 events (a workflow task that
# waited 100-200 ms behind a chunk's fold now mostly takes 5-30 ms). Throughput: no change beyond the noise (six
# alternating pairs of 8-lane replays of 1M events, each against the ceiling timed beside it: median 40.2% -> 41.5%).
SLICE = 5_000

_TEXT_TYPES = ("text", "character varying", "character", "name")
_AWARE_TIME, _NAIVE_TIME = "timestamp with time zone", "timestamp without time zone"
_INTEGER_TYPES = ("bigint", "integer", "smallint")
_TIME_TYPES = (_AWARE_TIME, _NAIVE_TIME)
# The types a mapped column may have, by its role (a stream id of another type is read as text).
_USABLE_TYPES: dict[str, tuple[str, ...]] = {
    "position": _INTEGER_TYPES,
    "stream_version": _INTEGER_TYPES,
    "schema_version": _INTEGER_TYPES,
    "event_type": _TEXT_TYPES,
    "recorded_at": _TIME_TYPES,
    "transaction": ("xid8", "bigint"),
}
_FORMAT_TYPES: dict[str, tuple[str, ...]] = {
    "jsonb": ("jsonb",),
    "json": ("json",),
    "text": _TEXT_TYPES,
    "bytea": ("bytea",),
}


def _cutoff_sql(args: list[Any], cutoff: Cutoff | None, pos: str, at: str) -> str:
    """Append the cut-off's values to `args` and return its condition (empty without a cut-off)."""
    if cutoff is None or (cutoff.position is None and cutoff.as_of is None):
        return ""
    args += [cutoff.position, cutoff.as_of]
    n = len(args)
    return f" AND (${n - 1}::bigint IS NULL OR {pos} <= ${n - 1})" + (
        f" AND (${n}::timestamptz IS NULL OR {at} <= ${n})"
    )


def _base_type(sql_type: str) -> str:
    """A column's type without its modifier: character varying(64) → character varying, timestamp(3) with time zone
    → timestamp with time zone."""
    return re.sub(r"\(\d+(,\d+)?\)", "", sql_type)


def _types(types: Sequence[str] | None) -> list[str] | None:
    """The event types to read; None reads every type (a strict projection)."""
    return None if types is None else list(types)


def events_of(rows: Sequence[Sequence[Any]]) -> list[Event]:
    """Events from rows of JSON text payloads (one loop, no call per row but the Event's own and orjson's)."""
    loads = orjson.loads
    return [
        Event(position, stream_id, version, event_type, schema_version, loads(data), loads(meta) if meta else {}, at)
        for position, stream_id, version, event_type, schema_version, data, meta, at in rows
    ]


def events_of_iso(rows: Sequence[Sequence[Any]]) -> list[Event]:
    """`events_of` for rows whose recorded_at is ISO 8601 text in UTC (the bulk reads' select list). Raises
    ValueError or TypeError at a value it cannot read: a NULL, an infinity, another DateStyle (see `_instant`)."""
    loads, instant = orjson.loads, datetime.fromisoformat
    return [
        Event(
            position,
            stream_id,
            version,
            event_type,
            schema_version,
            loads(data),
            loads(meta) if meta else {},
            instant(at),
        )
        for position, stream_id, version, event_type, schema_version, data, meta, at in rows
    ]


class EventSource:
    """The events of one table or view, read below marks. `name` is how projections and workflow inputs refer to it;
    `pool` connects to the database that holds it (the read models' own, or another)."""

    # Events a plan reads to cut lanes and estimate their sizes (a replay's plan does not count the store).
    sample_rows = 100_000

    def __init__(
        self, pool: asyncpg.Pool, table: EventTable, name: str = OWN_SOURCE, *, external: bool = False
    ) -> None:
        self.pool = pool
        self.mapping = table
        self.name = name
        # Another database than the read models': reads take a connection of their own (see `reading`).
        self.external = external
        self.table = table.relation
        self._stream_is_text = True
        self._stream_type = "text"
        self._time_type: str | None = _AWARE_TIME  # recorded_at's column type (None: an expression, or none)
        self._payload_nullable = False
        self._transaction_is_xid8 = True
        self._is_table = True
        self._parts = self._build_parts()

    async def inspect(self, conn: asyncpg.Connection | None = None) -> None:
        """Read the mapping's column types off the database (and check that the columns exist); a source not
        inspected takes text stream ids, an xid8 transaction column and a table (as rehydrate's own store)."""
        rows = await (conn or self.pool).fetch(_COLUMN_TYPES, self.table)
        if not rows:
            raise UserError(
                f"source {self.name!r}: table or view {self.mapping.table!r} does not exist",
                fix="check its name in the source's mapping, and the database the source connects to",
            )
        types = {row[0]: row[1] for row in rows}
        not_null = {row[0] for row in rows if row[3]}
        missing = [c for c in self.mapping.columns() if c not in types]
        if missing:
            raise UserError(
                f"source {self.name!r}: {self.mapping.table!r} has no column {', '.join(map(repr, missing))} "
                f"(it has {', '.join(sorted(types))})",
                fix="name the right columns in the source's mapping",
            )
        self._check_types(types)
        stream = self.mapping.stream_id
        self._stream_type = "text" if not isinstance(stream, str) else types[stream]
        self._stream_is_text = _base_type(self._stream_type) in _TEXT_TYPES
        payload = self.mapping.payload
        # A column of a view is never NOT NULL in the catalog: an expression or a view's column may be NULL.
        self._payload_nullable = not isinstance(payload, str) or payload not in not_null
        at = self.mapping.recorded_at
        self._time_type = _base_type(types[at]) if isinstance(at, str) else None
        tx = self.mapping.transaction
        self._transaction_is_xid8 = not isinstance(tx, str) or types.get(tx) == "xid8"
        self._is_table = rows[0][2] in (b"r", "r", b"p", "p")
        self._parts = self._build_parts()

    @property
    def is_table(self) -> bool:
        """A table (not a view): known once inspected."""
        return self._is_table

    def _check_types(self, types: dict[str, str]) -> None:
        """Refuse a mapped column whose type cannot play its role, naming it, its type and what would do."""
        m = self.mapping
        usable = dict(_USABLE_TYPES)
        usable["payload"] = _FORMAT_TYPES[m.payload_format]
        usable["metadata"] = _FORMAT_TYPES[m.metadata_format]
        for role, column in m.roles().items():
            if not isinstance(column, str) or role not in usable:
                continue
            found = _base_type(types[column])
            if found not in usable[role]:
                fix = "name another column, or cast it with an Expression in code"
                if role in ("payload", "metadata"):
                    fix = f"set {role}_format to the column's type (jsonb, json, text or bytea with a decoder)"
                raise UserError(
                    f"source {self.name!r}: column {column!r} ({role}) of {m.table!r} is {types[column]}, "
                    f"not {' or '.join(usable[role])}",
                    fix=fix,
                )

    def _build_parts(self) -> dict[str, str]:
        m = self.mapping
        pos = sql_of(m.position)
        stream = sql_of(m.stream_id) if self._stream_is_text else f"{sql_of(m.stream_id)}::text"
        # A stream id compared with a parameter: the column as it is (so that its index serves), the text cast to its
        # type (a uuid column is found by its uuid, not by its text).
        stream_cast = "" if self._stream_is_text else f"::text::{self._stream_type}"
        stream_casts = "" if self._stream_is_text else f"::{self._stream_type}[]"
        version = pos if m.stream_version is None else sql_of(m.stream_version)
        at = "NULL::timestamptz" if m.recorded_at is None else sql_of(m.recorded_at)
        at_text = self._time_text(at)
        if self._time_type == _NAIVE_TIME:  # a timestamp without time zone holds UTC, whatever the session's time zone
            at = f"({at} AT TIME ZONE 'UTC')"
        payload = sql_of(m.payload)
        if m.order == "transaction":
            assert m.transaction is not None
            tx, cast = sql_of(m.transaction), "::text::xid8" if self._transaction_is_xid8 else "::text::bigint"
        else:
            tx, cast = pos, "::text::bigint"
        # A payload may be NULL (message-db's data is nullable): an event without data, read as {}.
        payload_text = f"{payload}::text" if m.payload_format in ("jsonb", "json") else payload
        if self._payload_nullable and m.payload_format != "bytea":
            payload_text = f"coalesce({payload_text}, '{{}}')"
        if m.metadata is None:
            meta = "NULL::text"
        elif m.metadata_format == "jsonb":
            # Empty metadata (the usual case) comes as NULL: nothing to parse, a sixth of a read's time.
            meta = f"nullif({sql_of(m.metadata)}, '{{}}'::jsonb)::text"
        else:
            meta = f"{sql_of(m.metadata)}::text"
        sv = "1" if m.schema_version is None else sql_of(m.schema_version)
        columns = f"{pos}, {stream}, {version}, {sql_of(m.event_type)}, {sv}, {payload_text}, {meta}"
        return {
            "events": self.table,
            "pos": pos,
            "stream": stream,
            "stream_column": sql_of(m.stream_id),
            "stream_cast": stream_cast,
            "stream_casts": stream_casts,
            "version": version,
            "type": sql_of(m.event_type),
            "sv": sv,
            "at": at,
            "tx": tx,
            "cast": cast,
            # As one argument: its braces (in '{}'::jsonb) must not be read as placeholders.
            "columns": f"{columns}, {at}",
            "bulk_columns": f"{columns}, {at if at_text is None else at_text}",
            "json": payload if m.payload_format in ("jsonb", "json") else f"{payload}::jsonb",
        }

    @property
    def _text_times(self) -> bool:
        """Whether the bulk reads take recorded_at as text: it is a column of a known timestamp type (an expression,
        or no column, is read as a timestamp)."""
        return isinstance(self.mapping.recorded_at, str) and self._time_type in _TIME_TYPES

    def _time_text(self, at: str) -> str | None:
        """recorded_at as the bulk reads select it: ISO 8601 text in UTC (None: read as a timestamp).

        asyncpg builds a timestamptz's datetime in three steps (a timedelta, a naive datetime, then the time zone),
        about 1.1 µs a value; the text costs a fraction of that to parse and Postgres a little to print: by
        `python bench/read_cost.py --against` a checkout that reads the timestamp, the worker spends 0.67 µs less
        per event and the server 0.29 µs more. The text is ISO because every session rehydrate opens sets DateStyle
        (core.database.SESSION), and in UTC whatever the session's TimeZone."""
        if not self._text_times:
            return None
        if self._time_type == _AWARE_TIME:
            return f"({at} AT TIME ZONE INTERVAL '0')::text || '+00'"
        return f"{at}::text || '+00'"

    def _instant(self, text: str, position: int) -> datetime:
        """A recorded_at that `events_of_iso` could not read: an infinity (read as asyncpg reads it), or an error
        that names the event and why."""
        if text in ("infinity+00", "-infinity+00"):
            return datetime.max if text[0] == "i" else datetime.min
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            pass
        if text[:4].isdigit() and text[4:5] == "-":
            problem, fix = "outside the years Python's datetime holds (1 to 9999)", "correct the event's timestamp"
        else:
            problem = "not ISO 8601: the session's DateStyle is not ISO"
            fix = "read through a pool from rehydrate.create_pool, or connect with server_settings={'DateStyle': 'ISO'}"
        raise UserError(
            f"source {self.name!r}: the event at position {position} was recorded at {text!r}, {problem}", fix=fix
        )

    def _sql(self, statement: str, **parts: str) -> str:
        return statement.format(**{**self._parts, **parts})

    def _key_sql(self, key: KeySpec, param: int) -> str:
        """The key of an event in SQL: the stream id, or the payload field passed as parameter `param`.

        coalesce: an event without the field still lands in a lane, where the fold names it; a NULL here would drop
        it from every lane (and break the per-lane count)."""
        if key.field is None:
            return self._parts["stream"]
        if self.mapping.payload_format not in ("jsonb", "json") or self.mapping.decode is not None:
            # Lanes are cut in SQL, where only a JSON column's fields can be read as the handlers will see them.
            raise UserError(
                f"source {self.name!r} stores payloads as {self.mapping.payload_format}"
                f"{' with a decoder' if self.mapping.decode is not None else ''}, so a projection cannot be keyed by "
                f"the payload field {key.field!r}",
                fix="key the projection by stream (or map a jsonb or json payload column without a decoder)",
            )
        return f"coalesce({self._parts['json']} ->> ${param}, '')"

    def _events(self, rows: Sequence[Sequence[Any]], *, bulk: bool = False) -> list[Event]:
        """Events from rows of the select list (`bulk`: of the bulk reads', `bulk_columns`)."""
        decode = self.mapping.decode
        if decode is None and self.mapping.payload_format != "bytea":
            try:
                return events_of_iso(rows) if bulk and self._text_times else events_of(rows)
            except (ValueError, TypeError):  # a payload that is not JSON, or a recorded_at not ISO: per event below
                pass
        return [self._decoded(row, decode) for row in rows]

    def _decoded(self, row: Sequence[Any], decode: Any) -> Event:
        position, stream_id, version, event_type, schema_version, data, meta, at = row
        if isinstance(at, str):
            at = self._instant(at, position)
        payload: dict[str, Any]
        try:
            payload = decode(data, event_type) if decode is not None else orjson.loads(data)
            if not isinstance(payload, dict):
                raise TypeError(f"it decoded to {type(payload).__name__}, not a JSON object")
        except Exception as error:  # a user's decoder: whatever it raises is named, and the event parked or stopped on
            payload = UndecodablePayload(
                f"source {self.name!r} could not decode its payload: {type(error).__name__}: {error}"
            )
        return Event(
            position, stream_id, version, event_type, schema_version, payload, orjson.loads(meta) if meta else {}, at
        )

    async def _batches(self, cursor: asyncpg.cursor.Cursor[Any], fetch_size: int) -> AsyncIterator[list[Event]]:
        """The cursor's events, `fetch_size` rows fetched at a time, handed out `SLICE` at a time."""
        while True:
            rows = await cursor.fetch(fetch_size)
            if not rows:
                return
            for start in range(0, len(rows), SLICE):
                yield self._events(rows[start : start + SLICE], bulk=True)

    @contextlib.asynccontextmanager
    async def reading(self, conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
        """The connection to read with: `conn` (a read-model connection, in its transaction) when the events are in
        the same database; else one of the source's own, in a read-only transaction for as long as the block."""
        if not self.external:
            yield conn
            return
        async with self.pool.acquire() as own:
            transaction = own.transaction(readonly=True, isolation="repeatable_read")
            await transaction.start()
            try:
                yield own
            except asyncio.CancelledError:
                # Cancelled mid-read (the chunk's heartbeats stopped, or it was cancelled): left to asyncpg, the
                # cancellation would send a cancel request over a new connection and a ROLLBACK over this one and
                # wait for both without a bound, which a source database cut off from the worker never answers.
                # Closing the socket frees the chunk at once; the server ends the read-only transaction when it sees
                # the close, or by the session's own timeouts (core.database.worker_session).
                own.terminate()
                raise
            except BaseException:
                await transaction.rollback()
                raise
            else:
                await transaction.commit()

    # -- marks -----------------------------------------------------------------------------------------

    async def high_water_mark(self, conn: asyncpg.Connection | None = None) -> int:
        """The mark below which every event is final (see the module docstring)."""
        order = self.mapping.order
        statement = (
            _TRANSACTION_MARK if order == "transaction" else _GAP_FREE_MARK if order == "gap_free" else _SETTLED_MARK
        )
        args = [float(self.mapping.settle_seconds)] if order == "settle" else []
        return int(await (conn or self.pool).fetchval(self._sql(statement), *args))

    async def above_older(self, seconds: float, conn: asyncpg.Connection | None = None) -> int:
        """One above the last position recorded at least `seconds` ago (1 when none is): an empty position below it
        was taken before an event that old was, by a transaction open at least as long (see the gap audit)."""
        return int(await (conn or self.pool).fetchval(self._sql(_OLDER_THAN), float(seconds)))

    async def bounded_mark(self, conn: asyncpg.Connection, *, from_mark: int, to_mark: int, max_events: int) -> int:
        """A mark between `from_mark` and `to_mark` with at most about `max_events` events between it and
        `from_mark` (more only when one transaction holds more). Any mark below the high-water mark is a
        complete checkpoint, so a long backlog is applied in bounded batches."""
        tx = await conn.fetchval(self._sql(_BOUNDED_MARK), str(from_mark), str(to_mark), max_events)
        if tx is None:
            return to_mark
        return int(tx) if tx > from_mark else int(tx) + 1

    async def held_back(self, conn: asyncpg.Connection, mark: int) -> HeldBack:
        """Streams with an event at or above `mark`, and the lowest such version (see the module docstring)."""
        return {row[0]: row[1] for row in await conn.fetch(self._sql(_HELD_BACK), str(mark))}

    async def lag(self, conn: asyncpg.Connection, checkpoint: int, types: Sequence[str] | None) -> tuple[int, float]:
        """Events at or above `checkpoint` of the given types (held-back ones included: a read model does not have
        them yet), and how old the oldest of them is, in seconds."""
        row = await conn.fetchrow(self._sql(_LAG), str(checkpoint), _types(types))
        return int(row[0]), float(row[1])

    # -- a replay's reads ------------------------------------------------------------------------------

    async def read_lane(
        self,
        conn: asyncpg.Connection,
        *,
        after_position: int,
        mark: int,
        types: Sequence[str] | None,
        key: KeySpec,
        lane: int,
        lanes: int,
        limit: int,
        fetch_size: int = FETCH_SIZE,
        cutoff: Cutoff | None = None,
    ) -> AsyncIterator[list[Event]]:
        """Yield batches of one lane's events after `after_position` and below `mark`, in position order.

        Held-back events are *not* filtered here: the caller drops them with `is_held` (it knows the mark's
        held-back streams once per chunk). Must run inside a transaction (server-side cursor).
        """
        args: list[Any] = [after_position, str(mark), _types(types), limit]
        kept = self._sql(_LANE_TYPES)
        if lanes > 1:
            args += [lanes, lane]
            kept = _HASH_LANE.format(key=self._key_sql(key, 7), lanes=5, lane=6, types=kept)
            if key.field is not None:
                args.append(key.field)
        until = _cutoff_sql(args, cutoff, self._parts["pos"], self._parts["at"])
        cursor = await conn.cursor(self._sql(_READ_LANE, kept=kept, cutoff=until), *args)
        async for batch in self._batches(cursor, fetch_size):
            yield batch

    async def read_streams(
        self,
        conn: asyncpg.Connection,
        *,
        low: str | None,
        high: str | None,
        after: tuple[str, int] | None,
        mark: int,
        types: Sequence[str] | None,
        limit: int,
        fetch_size: int = FETCH_SIZE,
        cutoff: Cutoff | None = None,
    ) -> AsyncIterator[list[Event]]:
        """Yield batches of the events of streams in [`low`, `high`) (None: unbounded) below `mark`, stream by
        stream in version order, after the (stream id, version) `after`.

        The (stream id, version) index serves it, so a lane reads only its own events, and each stream's events
        arrive together. Held-back events are not filtered (see `read_lane`). Inside a transaction.
        """
        p = self._parts
        args: list[Any] = [str(mark), _types(types), limit]
        where = [f"{p['tx']} < $1{p['cast']}", _TYPES.format(type=p["type"])]
        if after is not None:
            args += list(after)
            where.append(f"({p['stream']}, {p['version']}) > (${len(args) - 1}, ${len(args)})")
        if low is not None:
            args.append(low)
            where.append(f"{p['stream']} >= ${len(args)}")
        if high is not None:
            args.append(high)
            where.append(f"{p['stream']} < ${len(args)}")
        until = _cutoff_sql(args, cutoff, p["pos"], p["at"])
        await conn.execute(_CACHED_PAGES)
        cursor = await conn.cursor(self._sql(_READ_STREAMS, where=" AND ".join(where), cutoff=until), *args)
        async for batch in self._batches(cursor, fetch_size):
            yield batch

    async def read_delta(
        self, conn: asyncpg.Connection, *, from_mark: int, to_mark: int, types: Sequence[str] | None
    ) -> list[Event]:
        """Events delivered by moving a checkpoint from `from_mark` to `to_mark`, in position order.

        That is every event below `to_mark` and not held back by it, that was either at or above
        `from_mark` or held back by it.
        """
        rows = await conn.fetch(self._sql(_READ_DELTA), str(from_mark), str(to_mark), _types(types))
        return self._events(rows, bulk=True)

    # -- the gap audit of a settle-window table (see the module docstring) ------------------------------------

    @property
    def audits_gaps(self) -> bool:
        """Whether checkpoints record the empty positions they pass (a settle-window table)."""
        return self.mapping.order == "settle"

    async def gaps(self, conn: asyncpg.Connection, low: int, high: int) -> list[tuple[int, int]]:
        """The runs (first, last) of empty positions in [low, high)."""
        rows = await conn.fetch(self._sql(_GAPS), low, high)
        return [(int(row[0]), int(row[1])) for row in rows]

    async def read_ranges(self, conn: asyncpg.Connection, ranges: Sequence[tuple[int, int]]) -> list[Event]:
        """Every event (of any type) whose position is in one of the runs [first, last], in position order."""
        if not ranges:
            return []
        lows, highs = zip(*ranges, strict=True)
        return self._events(await conn.fetch(self._sql(_READ_RANGES), list(lows), list(highs)), bulk=True)

    async def read_keys(
        self, conn: asyncpg.Connection, *, key: KeySpec, keys: Sequence[str], mark: int, types: Sequence[str] | None
    ) -> list[Event]:
        """Every event of the given keys (as text) below `mark` and not held back by it, in position order: the
        events of those keys in a generation whose checkpoint is `mark`."""
        args: list[Any] = [str(mark), _types(types), list(keys)]
        if key.field is not None:
            args.append(key.field)
        by_stream = key.field is None  # the stream column as it is, the keys cast to its type: its index serves
        statement = self._sql(
            _READ_KEYS,
            key=self._parts["stream_column"] if by_stream else self._key_sql(key, 4),
            key_casts=self._parts["stream_casts"] if by_stream else "",
        )
        rows = await conn.fetch(statement, *args)
        held = await self.held_back(conn, mark)
        return [e for e in self._events(rows, bulk=True) if not is_held(held, e.stream_id, e.stream_version)]

    # -- a replay's plan -------------------------------------------------------------------------------

    async def fits_in_cache(self, conn: asyncpg.Connection) -> bool:
        """Whether the events table is no bigger than the cache Postgres assumes (effective_cache_size): then
        reading a lane through the stream index, in random heap order, costs no disk seeks."""
        return bool(await conn.fetchval(_FITS_IN_CACHE, self.table))

    async def lane_split(self, conn: asyncpg.Connection, key: KeySpec, setting: str) -> str:
        """How a replay's lanes divide the events: "range" (of stream ids) or "hash" (of the key). `setting` is
        Settings.lane_split; a payload-keyed projection always splits by hash, and so does a source whose stream ids
        are not text (a uuid column: a range of its text would not use its index)."""
        if key.field is not None or not self._stream_is_text:
            return "hash"
        if setting == "auto":
            return "range" if await self.fits_in_cache(conn) else "hash"
        return setting

    async def _sample(self, conn: asyncpg.Connection) -> tuple[str, float]:
        """A TABLESAMPLE clause that reads about `sample_rows` events (by the planner's row estimate), and the
        factor that scales a count over the sample to the whole table. ("", 1.0): small table (or a view, which
        cannot be sampled), read it whole."""
        if not self._is_table:
            return "", 1.0
        rows = self.sample_rows
        estimate = await conn.fetchval(_ROW_ESTIMATE, self.table)
        percent = 100.0 * rows / estimate if estimate else 100.0
        if percent >= 100:
            return "", 1.0
        return f"TABLESAMPLE SYSTEM ({percent:.6f}) REPEATABLE (7)", 100.0 / percent

    async def stream_boundaries(
        self,
        conn: asyncpg.Connection,
        *,
        mark: int,
        types: Sequence[str] | None,
        lanes: int,
        cutoff: Cutoff | None = None,
    ) -> tuple[list[str], int]:
        """`lanes - 1` stream ids that split the events below `mark` into ranges of about equal size, and how
        many events there are, both from one sample of about 100,000 events (all of them in a smaller store, where
        the count is exact): lanes need not be exactly equal, and sorting every stream id of a big store would
        cost more than the imbalance.
        """
        sample, scale = await self._sample(conn)
        args: list[Any] = [str(mark), _types(types), [lane / lanes for lane in range(1, lanes)]]
        until = _cutoff_sql(args, cutoff, self._parts["pos"], self._parts["at"])
        # The sampled pages set how good the boundaries are (a page holds the events of the streams that were
        # open when it was written, so they come in clumps); sorting the sample's stream ids is most of the
        # cost. Every 8th event of the sampled pages is sorted, all are counted: the same boundaries to within
        # a percent of a lane, at a third of the time (46 -> 14 ms at 1M events).
        thinned = f" FILTER (WHERE {self._parts['pos']} % {BOUNDARY_THINNING} = 0)" if sample else ""
        found, events = await conn.fetchrow(self._sql(_BOUNDARIES, thinned=thinned, sample=sample, cutoff=until), *args)
        # Equal boundaries (few streams) leave some lanes empty; that is harmless.
        return [b for b in found or [] if b is not None], round(events * scale)

    async def count_ranges(
        self,
        conn: asyncpg.Connection,
        *,
        mark: int,
        types: Sequence[str] | None,
        boundaries: Sequence[str],
        cutoff: Cutoff | None = None,
        estimate: bool = False,
    ) -> list[int]:
        """Per stream range (split at `boundaries`): events below `mark` of the given types. With `estimate`,
        counted on a sample of about 100,000 events and scaled (exact when the store is no bigger)."""
        sample, scale = await self._sample(conn) if estimate else ("", 1.0)
        args: list[Any] = [str(mark), _types(types), list(boundaries)]
        until = _cutoff_sql(args, cutoff, self._parts["pos"], self._parts["at"])
        rows = await conn.fetch(self._sql(_COUNT_RANGES, sample=sample, cutoff=until), *args)
        found = {int(row[0]): round(int(row[1]) * scale) for row in rows}
        return [found.get(lane, 0) for lane in range(len(boundaries) + 1)]

    async def count_lanes(
        self,
        conn: asyncpg.Connection,
        *,
        mark: int,
        types: Sequence[str] | None,
        key: KeySpec,
        lanes: int,
        cutoff: Cutoff | None = None,
        estimate: bool = False,
    ) -> list[int]:
        """Per hash lane: events below `mark` of the given types (with `estimate`, from a sample, scaled)."""
        sample, scale = await self._sample(conn) if estimate else ("", 1.0)
        args: list[Any] = [str(mark), _types(types), lanes]
        if key.field is not None:
            args.append(key.field)
        until = _cutoff_sql(args, cutoff, self._parts["pos"], self._parts["at"])
        rows = await conn.fetch(self._sql(_COUNT_LANES, key=self._key_sql(key, 4), sample=sample, cutoff=until), *args)
        found = {int(row[0]): round(int(row[1]) * scale) for row in rows}
        return [found.get(lane, 0) for lane in range(lanes)]

    # -- streams: aggregates, snapshot rebuilds, the events check ----------------------------------------

    async def latest(self, conn: asyncpg.Connection, limit: int) -> list[Event]:
        """The `limit` events with the highest positions, in position order (committed or not below a mark: for a
        look at the table, not for a read model)."""
        return self._events(await conn.fetch(self._sql(_LATEST), limit))

    async def head(self) -> int:
        """The highest position of any committed event (0 when empty)."""
        return int(await self.pool.fetchval(self._sql(_HEAD)))

    async def read_stream(
        self,
        stream_id: str,
        *,
        after_version: int = 0,
        up_to_version: int | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> list[Event]:
        """One stream's events after `after_version` (and up to `up_to_version`), in version order."""
        rows = await (conn or self.pool).fetch(self._sql(_READ_STREAM), stream_id, after_version, up_to_version)
        return self._events(rows)

    async def read_streams_by_id(self, conn: asyncpg.Connection, stream_ids: Sequence[str]) -> list[Event]:
        """Every event of the given streams, ordered by stream id and version (bulk rehydration)."""
        return self._events(await conn.fetch(self._sql(_READ_STREAMS_BY_ID), list(stream_ids)))

    async def stream_version(
        self, stream_id: str, *, as_of: datetime | None = None, conn: asyncpg.Connection | None = None
    ) -> int:
        """A stream's version (0: no such stream); with `as_of`, the version of its longest prefix of events
        recorded at or before that time."""
        return int(await (conn or self.pool).fetchval(self._sql(_VERSION_AS_OF), stream_id, as_of))

    async def streams_after(
        self, conn: asyncpg.Connection, *, prefix: str, after: str | None, limit: int, partition: int, partitions: int
    ) -> list[str]:
        """Keyset pagination over the ids of streams starting with `prefix`, one hash partition of them."""
        rows = await conn.fetch(self._sql(_STREAMS_AFTER), after, prefix, limit, partitions, partition)
        return [row[0] for row in rows]

    async def count_streams(self, conn: asyncpg.Connection, *, prefix: str) -> int:
        return int(await conn.fetchval(self._sql(_COUNT_STREAMS), prefix))

    async def type_versions(self) -> list[tuple[str, int, int]]:
        """Every (event type, schema version) in the store, with its number of events."""
        return [(row[0], row[1], row[2]) for row in await self.pool.fetch(self._sql(_TYPE_VERSIONS))]
