"""rehydrate's own event store in Postgres: append with optimistic concurrency, bulk loads, the high-water mark, and
every read a replay, a tail, an aggregate or an operator makes. Every statement on the events table is here.

Why a high-water mark by transaction id, and why some events are *held back*
---------------------------------------------------------------------------
`global_position` comes from a sequence when a row is inserted, not when its transaction commits. A reader
that follows `global_position > checkpoint` skips an event whose transaction commits after a later-numbered
one (the bug every Postgres event store has shipped once). So readers only take events whose `tx_id` is below
`pg_snapshot_xmin(pg_current_snapshot())`, the oldest transaction still running: every such transaction has
ended, so that set of events is final and the mark is a complete checkpoint.

Transaction-id order is not stream order, though. Transaction A can take its id early (by writing something
else), wait, and append version 2 of a stream after transaction B, with a *higher* id, appended and committed
version 1. Once A commits, while a transaction with an id between theirs still runs, A's event is below the
mark and B's is not: applying A's event then would apply version 2 before version 1. Such an event is *held
back*: an event below the mark whose stream has an earlier version at or above the mark. It is
delivered with the first mark that also covers its predecessor. Because a version can only be appended after
the one before it committed, the held-back set of a mark never changes once computed, so it need not be stored:
the checkpoint stays one number.

The module is long because it is the one owner of the events table: its SQL (the constants below) and the Python
that runs it stay together, so a reader of the table's statements has them in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from rehydrate.core.errors import ConcurrencyError, UserError
from rehydrate.core.identifiers import check_identifier, quote
from rehydrate.sources.events import (
    ANY_VERSION,
    Cutoff,
    Event,
    HeldBack,
    KeySpec,
    NewEvent,
    check_new_event,
    is_held,
)

# -- the statements ({events}: the schema-qualified events table) ------------------------------------------------

# JSON comes as text and is parsed by orjson straight from the record (a codec would add a Python call and a copy
# per value). Empty metadata (the usual case) comes as NULL: nothing to parse, a sixth of a read's time.
_COLUMNS = (
    "global_position, stream_id, stream_version, event_type, schema_version, payload::text, "
    "nullif(metadata, '{}'::jsonb)::text AS metadata, recorded_at"
)  # substituted as {columns}: its braces are not read as placeholders
_TYPES = "($2::text[] IS NULL OR event_type = ANY($2::text[]))"  # the event types a projection reads (NULL: all)

_STREAM_VERSION = "SELECT coalesce(max(stream_version), 0) FROM {events} WHERE stream_id = $1"
# Returns the events as stored (as every later read gives them): their positions, the database's recorded_at, and
# payload and metadata as jsonb normalised them.
_APPEND = """INSERT INTO {events}
        (stream_id, stream_version, event_type, schema_version, payload, metadata, recorded_at)
    SELECT $1, v, t, s, p::jsonb, m::jsonb, coalesce(r, now())
    FROM unnest($2::bigint[], $3::text[], $4::int[], $5::text[], $6::text[], $7::timestamptz[])
        AS u(v, t, s, p, m, r)
    RETURNING {columns}"""
# Delivered at commit: wakes the tails at once instead of at their next poll.
_NOTIFY = "SELECT pg_notify($1, '')"
_HIGH_WATER_MARK = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
_BOUNDED_MARK = """SELECT tx_id::text::bigint FROM {events}
    WHERE tx_id >= $1::text::xid8 AND tx_id < $2::text::xid8 ORDER BY tx_id, global_position OFFSET $3 LIMIT 1"""
_HELD_BACK = "SELECT stream_id, min(stream_version) FROM {events} WHERE tx_id >= $1::text::xid8 GROUP BY stream_id"
_READ_LANE = """SELECT {columns} FROM {events}
    WHERE global_position > $1 AND tx_id < $2::text::xid8 AND ($3::text[] IS NULL OR event_type = ANY($3::text[]))
    {lane}{cutoff}
    ORDER BY global_position LIMIT $4"""
# A hash lane: the key's hash modulo the lanes ($lanes, $lane). 9223372036854775807 clears the sign bit.
_HASH_LANE = "AND (hashtextextended({key}, 0) & 9223372036854775807) % ${lanes} = ${lane}"
_READ_STREAMS = """SELECT {columns} FROM {events} WHERE {where}{cutoff}
    ORDER BY stream_id, stream_version LIMIT $3"""
# Range lanes are used while the events fit in the cache (see `lane_split`), where a random page costs about what a
# sequential one does; at the default cost (4) the planner took a chunk whose range held more events than the limit
# to a bitmap scan and an external sort of the whole range (2-3x the index scan's time, and nothing streams until
# the sort is done), as it plans each statement's first executions.
_CACHED_PAGES = "SET LOCAL random_page_cost = 1.1"
_FITS_IN_CACHE = "SELECT pg_table_size($1::regclass) <= pg_size_bytes(current_setting('effective_cache_size'))"
_ROW_ESTIMATE = "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = $1::regclass"
_BOUNDARIES = (
    """SELECT percentile_disc($3::float8[]) WITHIN GROUP (ORDER BY stream_id){thinned}, count(*)
    FROM {events} {sample} WHERE tx_id < $1::text::xid8 AND """
    + _TYPES
    + "{cutoff}"
)
_COUNT_RANGES = (
    """SELECT (SELECT count(*) FROM unnest($3::text[]) AS b WHERE b <= s.stream_id) AS lane, sum(s.n)
    FROM (SELECT stream_id, count(*) AS n FROM {events} {sample}
          WHERE tx_id < $1::text::xid8 AND """
    + _TYPES
    + """{cutoff} GROUP BY stream_id) AS s
    GROUP BY 1"""
)
_COUNT_LANES = (
    """SELECT (hashtextextended({key}, 0) & 9223372036854775807) % $3 AS lane, count(*)
    FROM {events} {sample} WHERE tx_id < $1::text::xid8 AND """
    + _TYPES
    + "{cutoff} GROUP BY 1"
)
# Every event below $2 and not held back by it, that was either at or above $1 or held back by it.
_READ_DELTA = """WITH held_from AS (
        SELECT stream_id, min(stream_version) AS version FROM {events}
        WHERE tx_id >= $1::text::xid8 GROUP BY stream_id),
    held_to AS (
        SELECT stream_id, min(stream_version) AS version FROM {events}
        WHERE tx_id >= $2::text::xid8 GROUP BY stream_id),
    delta AS (
        SELECT e.* FROM {events} e
        WHERE e.tx_id >= $1::text::xid8 AND e.tx_id < $2::text::xid8
        UNION ALL
        SELECT e.* FROM held_from h JOIN {events} e ON e.stream_id = h.stream_id AND e.stream_version > h.version
        WHERE e.tx_id < $1::text::xid8)
    SELECT {columns} FROM delta d
    WHERE ($3::text[] IS NULL OR d.event_type = ANY($3::text[]))
      AND NOT EXISTS (SELECT 1 FROM held_to h WHERE h.stream_id = d.stream_id AND d.stream_version > h.version)
    ORDER BY d.global_position"""
_READ_KEYS = (
    """SELECT {columns} FROM {events}
    WHERE tx_id < $1::text::xid8 AND """
    + _TYPES
    + """ AND {key} = ANY($3::text[])
    ORDER BY global_position"""
)
_LAG = (
    """SELECT count(*), coalesce(extract(epoch FROM now() - min(recorded_at)), 0)::float8 FROM {events}
    WHERE tx_id >= $1::text::xid8 AND """
    + _TYPES
)
_HEAD = "SELECT coalesce(max(global_position), 0) FROM {events}"
_IS_EMPTY = "SELECT NOT EXISTS (SELECT 1 FROM {events})"
_READ_STREAM = """SELECT {columns} FROM {events}
    WHERE stream_id = $1 AND stream_version > $2 AND ($3::bigint IS NULL OR stream_version <= $3)
    ORDER BY stream_version"""
_READ_STREAMS_BY_ID = """SELECT {columns} FROM {events} WHERE stream_id = ANY($1::text[])
    ORDER BY stream_id, stream_version"""
_VERSION_AS_OF = """SELECT CASE WHEN $2::timestamptz IS NULL THEN coalesce(max(stream_version), 0)
        ELSE coalesce(min(stream_version) FILTER (WHERE recorded_at > $2) - 1, max(stream_version), 0) END
    FROM {events} WHERE stream_id = $1"""
_VERSIONS = "SELECT stream_id, max(stream_version) FROM {events} WHERE stream_id = ANY($1::text[]) GROUP BY stream_id"
_STREAMS_AFTER = """SELECT stream_id FROM {events}
    WHERE stream_version = 1 AND ($1::text IS NULL OR stream_id > $1) AND starts_with(stream_id, $2)
      AND (hashtextextended(stream_id, 0) & 9223372036854775807) % $4 = $5
    ORDER BY stream_id LIMIT $3"""
_COUNT_STREAMS = "SELECT count(*) FROM {events} WHERE stream_version = 1 AND starts_with(stream_id, $1)"
_TYPE_VERSIONS = """SELECT event_type, schema_version, count(*) FROM {events}
    GROUP BY event_type, schema_version ORDER BY event_type, schema_version"""
_LOCK_FOR_LOAD = "LOCK TABLE {events} IN ACCESS EXCLUSIVE MODE"
_INDEX_DEFINITIONS = "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1 AND indexname = ANY($2::text[])"
_DROP_INDEX = "DROP INDEX {schema}.{index}"
_LOAD_MEMORY = "SET LOCAL maintenance_work_mem = '256MB'"

# The columns a bulk load copies, in this order.
COPY_COLUMNS = ("stream_id", "stream_version", "event_type", "schema_version", "payload", "metadata", "recorded_at")
# Indexes only readers use. Into an empty store a bulk load drops them and builds them after the load, in its
# transaction (a sort is several times cheaper than an insertion per event); the unique (stream, version) and the
# primary key stay, as appends and the load's own numbering need them.
DEFERRABLE_INDEXES = ("events_tx_position_idx", "events_type_position_idx")

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


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel on which appends announce new events."""
    return f"{schema}_events"


def _key_sql(key: KeySpec, param: int) -> str:
    """The key of an event in SQL: the stream id, or the payload field passed as parameter `param`.

    coalesce: an event without the field still lands in a lane, where the fold names it; a NULL here would drop it
    from every lane (and break the per-lane count)."""
    return "stream_id" if key.field is None else f"coalesce(payload ->> ${param}, '')"


def _cutoff_sql(args: list[Any], cutoff: Cutoff | None) -> str:
    """Append the cut-off's values to `args` and return its condition (empty without a cut-off)."""
    if cutoff is None or (cutoff.position is None and cutoff.as_of is None):
        return ""
    args += [cutoff.position, cutoff.as_of]
    n = len(args)
    return f" AND (${n - 1}::bigint IS NULL OR global_position <= ${n - 1})" + (
        f" AND (${n}::timestamptz IS NULL OR recorded_at <= ${n})"
    )


async def _batches(cursor: asyncpg.cursor.Cursor[Any], fetch_size: int) -> AsyncIterator[list[Event]]:
    """The cursor's events, `fetch_size` rows fetched at a time, handed out `SLICE` at a time."""
    while True:
        rows = await cursor.fetch(fetch_size)
        if not rows:
            return
        for start in range(0, len(rows), SLICE):
            yield _events(rows[start : start + SLICE])


def _types(types: Sequence[str] | None) -> list[str] | None:
    """The event types to read; None reads every type (a strict projection)."""
    return None if types is None else list(types)


def _events(rows: Sequence[Sequence[Any]]) -> list[Event]:
    """Events from rows of `_COLUMNS` (one loop, no call per row but the Event's own and orjson's)."""
    loads = orjson.loads
    return [
        Event(position, stream_id, version, event_type, schema_version, loads(data), loads(meta) if meta else {}, at)
        for position, stream_id, version, event_type, schema_version, data, meta, at in rows
    ]


class EventStore:
    """The one interface to the events table: append and load, the high-water mark, and every read below a mark."""

    # Events a plan reads to cut lanes and estimate their sizes (a replay's plan does not count the store).
    sample_rows = 100_000

    def __init__(self, pool: asyncpg.Pool, schema: str = "rehydrate") -> None:
        self.pool = pool
        self.schema = check_identifier(schema, "schema name")
        self.table = f"{quote(schema)}.events"
        self.channel = notify_channel(schema)

    def _sql(self, statement: str, **parts: str) -> str:
        return statement.format(events=self.table, columns=_COLUMNS, **parts)

    # -- writing -------------------------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = ANY_VERSION,
        connection: asyncpg.Connection | None = None,
    ) -> int:
        """Append `events` to a stream and return its new version.

        `expected_version` is the version the caller last saw (`NO_STREAM` = 0 for a new stream); when the
        stream is elsewhere, nothing is written and `ConcurrencyError` is raised. Pass `connection` to
        append inside a transaction of your own.
        """
        stored = await self.append_returning(
            stream_id, events, expected_version=expected_version, connection=connection
        )
        return stored[-1].stream_version

    async def append_returning(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = ANY_VERSION,
        connection: asyncpg.Connection | None = None,
    ) -> list[Event]:
        """`append`, returning the events as stored: with their positions, the recorded_at the database gave them,
        and payload and metadata as every later read returns them."""
        if not events:
            raise UserError(f"nothing to append to stream {stream_id!r}", fix="pass at least one event")
        if not isinstance(stream_id, str) or not stream_id or "\x00" in stream_id:
            raise UserError(f"stream id {stream_id!r} is not valid", fix="use a non-empty string without NUL")
        for event in events:
            check_new_event(event, where=f"stream {stream_id!r}")
        if connection is None:
            async with self.pool.acquire() as conn, conn.transaction():
                return await self._append(conn, stream_id, events, expected_version)
        async with connection.transaction():
            return await self._append(connection, stream_id, events, expected_version)

    async def _append(
        self, conn: asyncpg.Connection, stream_id: str, events: Sequence[NewEvent], expected: int | None
    ) -> list[Event]:
        current = await conn.fetchval(self._sql(_STREAM_VERSION), stream_id)
        if expected is not None and current != expected:
            raise ConcurrencyError(stream_id, expected, current)
        versions = list(range(current + 1, current + 1 + len(events)))
        try:
            async with conn.transaction():  # a savepoint: a conflict leaves the caller's transaction usable
                rows = await conn.fetch(
                    self._sql(_APPEND),
                    stream_id,
                    versions,
                    [e.type for e in events],
                    [e.schema_version for e in events],
                    # JSON goes as text so that a caller's own connection needs no codec.
                    [orjson.dumps(e.data).decode() for e in events],
                    [orjson.dumps(e.metadata).decode() for e in events],
                    [e.recorded_at for e in events],
                )
        except asyncpg.UniqueViolationError:
            actual = await conn.fetchval(self._sql(_STREAM_VERSION), stream_id)
            raise ConcurrencyError(stream_id, current if expected is None else expected, actual) from None
        await self.notify(conn)
        return _events(sorted(rows, key=lambda row: row[0]))

    async def notify(self, conn: asyncpg.Connection) -> None:
        """Announce new events to the tails (delivered when the caller's transaction commits)."""
        await conn.execute(_NOTIFY, self.channel)

    async def is_empty(self, conn: asyncpg.Connection) -> bool:
        return bool(await conn.fetchval(self._sql(_IS_EMPTY)))

    async def defer_reader_indexes(self, conn: asyncpg.Connection) -> list[str]:
        """For a first load into an empty store: lock the table and drop the indexes only readers use, returning
        their definitions to create again before the load commits (`restore_indexes`). Returns [] (and holds no
        lock) when the store has events by now, or the role may not lock the table or drop them.

        The table stays locked (ACCESS EXCLUSIVE) until the caller commits: nobody reads a store being loaded
        for the first time, and a reader that tries waits instead of seeing a table without its indexes. Runs in
        the caller's transaction; look at `is_empty` before it begins (a read in it would hold a share lock to the
        commit, and two loads would each wait for the other's to take the exclusive one)."""
        try:
            async with conn.transaction():  # a savepoint: without the privileges, the load goes on as usual
                await conn.execute(self._sql(_LOCK_FOR_LOAD))
                if not await self.is_empty(conn):
                    raise _HasEvents  # rolls the savepoint back, and its lock with it
                rows = await conn.fetch(_INDEX_DEFINITIONS, self.schema, list(DEFERRABLE_INDEXES))
                for row in rows:
                    await conn.execute(_DROP_INDEX.format(schema=quote(self.schema), index=quote(row["indexname"])))
                return [row["indexdef"] for row in rows]
        except (_HasEvents, asyncpg.InsufficientPrivilegeError):
            return []

    async def restore_indexes(self, conn: asyncpg.Connection, definitions: Iterable[str]) -> None:
        """Build the indexes `defer_reader_indexes` dropped (their definitions as Postgres printed them)."""
        definitions = list(definitions)
        if definitions:
            await conn.execute(_LOAD_MEMORY)
            for definition in definitions:
                await conn.execute(definition)

    async def versions(self, conn: asyncpg.Connection, stream_ids: Sequence[str]) -> dict[str, int]:
        """The current version of each of `stream_ids` that has events."""
        return {row[0]: row[1] for row in await conn.fetch(self._sql(_VERSIONS), list(stream_ids))}

    async def copy(self, conn: asyncpg.Connection, source: AsyncIterator[bytes]) -> None:
        """COPY events in text format (columns `COPY_COLUMNS`); Postgres parses the JSON into jsonb on its own core.
        Raises asyncpg's UniqueViolationError when a (stream, version) is taken."""
        await conn.copy_to_table("events", schema_name=self.schema, columns=list(COPY_COLUMNS), source=source)

    # -- marks -----------------------------------------------------------------------------------------

    async def high_water_mark(self, conn: asyncpg.Connection | None = None) -> int:
        """The transaction id below which no transaction can still commit an event."""
        return int(await (conn or self.pool).fetchval(_HIGH_WATER_MARK))

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
        lane_filter = ""
        if lanes > 1:
            args += [lanes, lane]
            lane_filter = _HASH_LANE.format(key=_key_sql(key, 7), lanes=5, lane=6)
            if key.field is not None:
                args.append(key.field)
        until = _cutoff_sql(args, cutoff)
        cursor = await conn.cursor(self._sql(_READ_LANE, lane=lane_filter, cutoff=until), *args)
        async for batch in _batches(cursor, fetch_size):
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

        The (stream_id, stream_version) index serves it, so a lane reads only its own events, and each stream's
        events arrive together. Held-back events are not filtered (see `read_lane`). Inside a transaction.
        """
        args: list[Any] = [str(mark), _types(types), limit]
        where = ["tx_id < $1::text::xid8", _TYPES]
        if after is not None:
            args += list(after)
            where.append(f"(stream_id, stream_version) > (${len(args) - 1}, ${len(args)})")
        if low is not None:
            args.append(low)
            where.append(f"stream_id >= ${len(args)}")
        if high is not None:
            args.append(high)
            where.append(f"stream_id < ${len(args)}")
        until = _cutoff_sql(args, cutoff)
        await conn.execute(_CACHED_PAGES)
        cursor = await conn.cursor(self._sql(_READ_STREAMS, where=" AND ".join(where), cutoff=until), *args)
        async for batch in _batches(cursor, fetch_size):
            yield batch

    async def read_delta(
        self, conn: asyncpg.Connection, *, from_mark: int, to_mark: int, types: Sequence[str] | None
    ) -> list[Event]:
        """Events delivered by moving a checkpoint from `from_mark` to `to_mark`, in position order.

        That is every event below `to_mark` and not held back by it, that was either at or above
        `from_mark` or held back by it.
        """
        rows = await conn.fetch(self._sql(_READ_DELTA), str(from_mark), str(to_mark), _types(types))
        return _events(rows)

    async def read_keys(
        self, conn: asyncpg.Connection, *, key: KeySpec, keys: Sequence[str], mark: int, types: Sequence[str] | None
    ) -> list[Event]:
        """Every event of the given keys (as text) below `mark` and not held back by it, in position order: the
        events of those keys in a generation whose checkpoint is `mark`."""
        args: list[Any] = [str(mark), _types(types), list(keys)]
        if key.field is not None:
            args.append(key.field)
        rows = await conn.fetch(self._sql(_READ_KEYS, key=_key_sql(key, 4)), *args)
        held = await self.held_back(conn, mark)
        return [e for e in _events(rows) if not is_held(held, e.stream_id, e.stream_version)]

    # -- a replay's plan -------------------------------------------------------------------------------

    async def fits_in_cache(self, conn: asyncpg.Connection) -> bool:
        """Whether the events table is no bigger than the cache Postgres assumes (effective_cache_size): then
        reading a lane through the stream index, in random heap order, costs no disk seeks."""
        return bool(await conn.fetchval(_FITS_IN_CACHE, self.table))

    async def lane_split(self, conn: asyncpg.Connection, key: KeySpec, setting: str) -> str:
        """How a replay's lanes divide the events: "range" (of stream ids) or "hash" (of the key). `setting` is
        Settings.lane_split; a payload-keyed projection always splits by hash."""
        if key.field is not None:
            return "hash"
        if setting == "auto":
            return "range" if await self.fits_in_cache(conn) else "hash"
        return setting

    async def _sample(self, conn: asyncpg.Connection) -> tuple[str, float]:
        """A TABLESAMPLE clause that reads about `sample_rows` events (by the planner's row estimate), and the
        factor that scales a count over the sample to the whole table. ("", 1.0): small table, read it whole."""
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
        until = _cutoff_sql(args, cutoff)
        # The sampled pages set how good the boundaries are (a page holds the events of the streams that were
        # open when it was written, so they come in clumps); sorting the sample's stream ids is most of the
        # cost. Every 8th event of the sampled pages is sorted, all are counted: the same boundaries to within
        # a percent of a lane, at a third of the time (46 -> 14 ms at 1M events).
        thinned = f" FILTER (WHERE global_position % {BOUNDARY_THINNING} = 0)" if sample else ""
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
        until = _cutoff_sql(args, cutoff)
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
        until = _cutoff_sql(args, cutoff)
        rows = await conn.fetch(self._sql(_COUNT_LANES, key=_key_sql(key, 4), sample=sample, cutoff=until), *args)
        found = {int(row[0]): round(int(row[1]) * scale) for row in rows}
        return [found.get(lane, 0) for lane in range(lanes)]

    # -- streams: aggregates, snapshot rebuilds, the events check ----------------------------------------

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
        return _events(rows)

    async def read_streams_by_id(self, conn: asyncpg.Connection, stream_ids: Sequence[str]) -> list[Event]:
        """Every event of the given streams, ordered by stream id and version (bulk rehydration)."""
        return _events(await conn.fetch(self._sql(_READ_STREAMS_BY_ID), list(stream_ids)))

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


class _HasEvents(Exception):
    """The store a first load found empty has events once the load holds its lock."""
