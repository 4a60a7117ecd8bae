"""rehydrate's own event store in Postgres: append with optimistic concurrency and bulk loads. Every statement that
writes the events table is here; its reads, as any source's, are `reading.EventSource`'s (where the high-water mark
and held-back events are explained).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence

import asyncpg
import orjson

from rehydrate.core.errors import ConcurrencyError, UserError
from rehydrate.core.identifiers import check_identifier, quote
from rehydrate.models.names import OWN_SOURCE
from rehydrate.sources.events import ANY_VERSION, Event, NewEvent, check_new_event
from rehydrate.sources.mapping import own_table
from rehydrate.sources.reading import EventSource, events_of

# -- the statements that write ({events}: the schema-qualified events table) ----------------------------------------

_STREAM_VERSION = "SELECT coalesce(max(stream_version), 0) FROM {events} WHERE stream_id = $1"
# Returns the events as stored, in EventSource's select list (as every later read gives them): their positions, the
# database's recorded_at, and payload and metadata as jsonb normalised them.
_APPEND = """INSERT INTO {events}
        (stream_id, stream_version, event_type, schema_version, payload, metadata, recorded_at)
    SELECT $1, v, t, s, p::jsonb, m::jsonb, coalesce(r, now())
    FROM unnest($2::bigint[], $3::text[], $4::int[], $5::text[], $6::text[], $7::timestamptz[])
        AS u(v, t, s, p, m, r)
    RETURNING {columns}"""
# Delivered at commit: wakes the tails at once instead of at their next poll.
_NOTIFY = "SELECT pg_notify($1, '')"
_IS_EMPTY = "SELECT NOT EXISTS (SELECT 1 FROM {events})"
_VERSIONS = "SELECT stream_id, max(stream_version) FROM {events} WHERE stream_id = ANY($1::text[]) GROUP BY stream_id"
_LOCK_FOR_LOAD = "LOCK TABLE {events} IN ACCESS EXCLUSIVE MODE"
_INDEX_DEFINITIONS = "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1 AND indexname = ANY($2::text[])"
_DROP_INDEX = "DROP INDEX {schema}.{index}"
_CONSTRAINT_DEFINITION = """SELECT pg_get_constraintdef(oid) FROM pg_constraint
    WHERE conrelid = $1::regclass AND conname = $2 AND contype = 'u'"""
_DROP_CONSTRAINT = "ALTER TABLE {events} DROP CONSTRAINT {constraint}"
_ADD_CONSTRAINT = "ALTER TABLE {events} ADD CONSTRAINT {constraint} {definition}"
_LOAD_MEMORY = "SET LOCAL maintenance_work_mem = '256MB'"

# The columns a bulk load copies, in this order.
COPY_COLUMNS = ("stream_id", "stream_version", "event_type", "schema_version", "payload", "metadata", "recorded_at")
# Indexes only readers use. Into an empty store a bulk load drops them and builds them after the load, in its
# transaction (a sort is several times cheaper than an insertion per event).
DEFERRABLE_INDEXES = ("events_tx_position_idx", "events_type_position_idx")
# The unique (stream, version) is deferred too, as long as the load holds the table's exclusive lock: nobody else can
# append meanwhile, and building it after the load checks the load's own numbering as inserting would have. Its
# insertions, in stream order into a table filled in position order, were half of Postgres' time during the COPY
# (1M events: 1.8 s of CPU without them, 3.0 s with). The primary key stays: its insertions are in order.
UNIQUE_VERSION = "events_stream_version_key"


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel on which appends announce new events."""
    return f"{schema}_events"


class EventStore(EventSource):
    """rehydrate's own events table: append and load, and (as every source) every read below a mark."""

    def __init__(self, pool: asyncpg.Pool, schema: str = "rehydrate") -> None:
        self.schema = check_identifier(schema, "schema name")
        super().__init__(pool, own_table(schema), OWN_SOURCE)
        self.channel = notify_channel(schema)

    def _own(self, statement: str) -> str:
        return statement.format(events=self.table, columns=self._parts["columns"])

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
        current = await conn.fetchval(self._own(_STREAM_VERSION), stream_id)
        if expected is not None and current != expected:
            raise ConcurrencyError(stream_id, expected, current)
        versions = list(range(current + 1, current + 1 + len(events)))
        try:
            async with conn.transaction():  # a savepoint: a conflict leaves the caller's transaction usable
                rows = await conn.fetch(
                    self._own(_APPEND),
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
            actual = await conn.fetchval(self._own(_STREAM_VERSION), stream_id)
            raise ConcurrencyError(stream_id, current if expected is None else expected, actual) from None
        await self.notify(conn)
        return events_of(sorted(rows, key=lambda row: row[0]))

    async def notify(self, conn: asyncpg.Connection) -> None:
        """Announce new events to the tails (delivered when the caller's transaction commits)."""
        await conn.execute(_NOTIFY, self.channel)

    async def is_empty(self, conn: asyncpg.Connection) -> bool:
        return bool(await conn.fetchval(self._own(_IS_EMPTY)))

    async def defer_indexes(self, conn: asyncpg.Connection) -> list[str]:
        """For a first load into an empty store: lock the table and drop the indexes only readers use and the unique
        (stream, version), returning the statements that build them again before the load commits
        (`restore_indexes`). Returns [] (and holds no lock) when the store has events by now, or the role may not
        lock the table or drop them. The unique (stream, version) stays when something depends on it.

        The table stays locked (ACCESS EXCLUSIVE) until the caller commits: nobody reads a store being loaded
        for the first time, and a reader or writer that tries waits instead of seeing a table without its indexes.
        Runs in the caller's transaction; look at `is_empty` before it begins (a read in it would hold a share lock
        to the commit, and two loads would each wait for the other's to take the exclusive one)."""
        try:
            async with conn.transaction():  # a savepoint: without the privileges, the load goes on as usual
                await conn.execute(self._own(_LOCK_FOR_LOAD))
                if not await self.is_empty(conn):
                    raise _HasEvents  # rolls the savepoint back, and its lock with it
                rows = await conn.fetch(_INDEX_DEFINITIONS, self.schema, list(DEFERRABLE_INDEXES))
                for row in rows:
                    await conn.execute(_DROP_INDEX.format(schema=quote(self.schema), index=quote(row["indexname"])))
                deferred = [row["indexdef"] for row in rows]
        except (_HasEvents, asyncpg.InsufficientPrivilegeError):
            return []
        definition = await conn.fetchval(_CONSTRAINT_DEFINITION, self.table, UNIQUE_VERSION)
        if definition is not None:
            constraint = quote(UNIQUE_VERSION)
            with contextlib.suppress(asyncpg.DependentObjectsStillExistError, asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():  # a savepoint: a foreign key on it keeps it, and the load goes on
                    await conn.execute(_DROP_CONSTRAINT.format(events=self.table, constraint=constraint))
                    add = _ADD_CONSTRAINT.format(events=self.table, constraint=constraint, definition=definition)
                    deferred.append(add)
        return deferred

    async def restore_indexes(self, conn: asyncpg.Connection, definitions: Iterable[str]) -> None:
        """Build what `defer_indexes` dropped (the statements it returned)."""
        definitions = list(definitions)
        if definitions:
            await conn.execute(_LOAD_MEMORY)
            for definition in definitions:
                await conn.execute(definition)

    async def versions(self, conn: asyncpg.Connection, stream_ids: Sequence[str]) -> dict[str, int]:
        """The current version of each of `stream_ids` that has events."""
        return {row[0]: row[1] for row in await conn.fetch(self._own(_VERSIONS), list(stream_ids))}

    async def copy(self, conn: asyncpg.Connection, source: AsyncIterator[bytes]) -> None:
        """COPY events in text format (columns `COPY_COLUMNS`); Postgres parses the JSON into jsonb on its own core.
        Raises asyncpg's UniqueViolationError when a (stream, version) is taken."""
        await conn.copy_to_table("events", schema_name=self.schema, columns=list(COPY_COLUMNS), source=source)


class _HasEvents(Exception):
    """The store a first load found empty has events once the load holds its lock."""
