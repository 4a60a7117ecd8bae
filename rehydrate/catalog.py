"""rehydrate's control tables and read-model DDL: generations, lane checkpoints, catch-up and the swap.

Readers query a projection by its plain table name, which is a view over the active generation's table
(`<table>__g<N>`). The swap replaces that view in one short transaction, so a reader sees the old generation
or the new one, whole. A view (not a rename of tables) keeps the reader's name stable for grants and for
views of the user's own, and leaves the old generation's table untouched for an instant rollback.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from rehydrate.apply import apply_events
from rehydrate.errors import UserError
from rehydrate.identifiers import qualified, quote
from rehydrate.models import SwapResult
from rehydrate.projections import Projection
from rehydrate.store import EventStore

# Serialises the final catch-up + swap with anything else that writes the active generation (the tail).
_TAIL_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('rehydrate.tail:' || $1, 0))"
_VIEW_CHANGE_FAILED = (asyncpg.InvalidTableDefinitionError, asyncpg.FeatureNotSupportedError)


def physical_table_name(projection: Projection, generation: int) -> str:
    return projection.table.physical_name(generation)


async def building_generation(conn: asyncpg.Connection, schema: str, projection: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"""SELECT generation, workflow_id, physical_table, target_xmin::text::bigint AS target_xmin,
                   lanes, chunk_size
            FROM {quote(schema)}.generations WHERE projection = $1 AND state = 'building'""",
        projection,
    )


async def create_generation(
    conn: asyncpg.Connection,
    *,
    schema: str,
    read_schema: str,
    projection: Projection,
    mark: int,
    lanes: int,
    chunk_size: int,
    workflow_id: str,
    run_id: str,
    boundaries: list[str] | None = None,
) -> asyncpg.Record:
    """Register a new building generation, create its table (no secondary indexes) and lane checkpoints.

    With `boundaries` (`lanes - 1` stream ids, ascending), lane i holds the streams from boundary i-1 up to
    boundary i; without, lanes split the keys by hash."""
    s = quote(schema)
    async with conn.transaction():
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(read_schema)}")
        number = await conn.fetchval(
            f"SELECT coalesce(max(generation), 0) + 1 FROM {s}.generations WHERE projection = $1",
            projection.name,
        )
        physical = physical_table_name(projection, number)
        try:
            await conn.execute(
                f"""INSERT INTO {s}.generations (projection, generation, version, fingerprint, state,
                        physical_table, target_xmin, checkpoint_xmin, lanes, chunk_size, workflow_id, run_id)
                    VALUES ($1, $2, $3, $4, 'building', $5, $6::text::xid8, $6::text::xid8, $7, $8, $9, $10)""",
                projection.name,
                number,
                projection.version,
                projection.fingerprint,
                physical,
                str(mark),
                lanes,
                chunk_size,
                workflow_id,
                run_id,
            )
        except asyncpg.UniqueViolationError:
            raise UserError(
                f"projection {projection.name!r} is already being rebuilt",
                fix="wait for that replay, or cancel it with `rehydrate replay cancel`",
            ) from None
        await conn.execute(f"DROP TABLE IF EXISTS {qualified(read_schema, physical)}")
        await conn.execute(projection.table.create_table_sql(read_schema, number))
        if boundaries is None:
            await conn.execute(
                f"""INSERT INTO {s}.lane_checkpoints (projection, generation, lane, position)
                    SELECT $1, $2, lane, 0 FROM generate_series(0, $3 - 1) AS lane""",
                projection.name,
                number,
                lanes,
            )
        else:
            bounds: list[str | None] = [None, *boundaries, None]
            await conn.executemany(
                f"""INSERT INTO {s}.lane_checkpoints
                        (projection, generation, lane, position, by_stream, low_stream, high_stream)
                    VALUES ($1, $2, $3, 0, true, $4, $5)""",
                [(projection.name, number, lane, bounds[lane], bounds[lane + 1]) for lane in range(lanes)],
            )
    row = await building_generation(conn, schema, projection.name)
    assert row is not None
    return row


async def set_total(conn: asyncpg.Connection, schema: str, projection: str, generation: int, total: int) -> None:
    await conn.execute(
        f"UPDATE {quote(schema)}.generations SET events_total = $3 WHERE projection = $1 AND generation = $2",
        projection,
        generation,
        total,
    )


async def lane_bounds(
    conn: asyncpg.Connection, schema: str, projection: str, generation: int
) -> list[tuple[str | None, str | None]] | None:
    """The stream ranges of a generation's lanes, or None when its lanes split by hash."""
    rows = await conn.fetch(
        f"""SELECT by_stream, low_stream, high_stream FROM {quote(schema)}.lane_checkpoints
            WHERE projection = $1 AND generation = $2 ORDER BY lane""",
        projection,
        generation,
    )
    if not rows or not rows[0][0]:
        return None
    return [(row[1], row[2]) for row in rows]


async def lane_checkpoints(
    conn: asyncpg.Connection, schema: str, projection: str, generation: int
) -> list[tuple[int, int, int, bool]]:
    rows = await conn.fetch(
        f"""SELECT lane, position, events_applied, done FROM {quote(schema)}.lane_checkpoints
            WHERE projection = $1 AND generation = $2 ORDER BY lane""",
        projection,
        generation,
    )
    return [(row[0], row[1], row[2], row[3]) for row in rows]


async def lock_lane(
    conn: asyncpg.Connection, schema: str, projection: str, generation: int, lane: int
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"""SELECT c.position, c.events_applied, c.done, g.state, c.by_stream, c.low_stream, c.high_stream,
                   c.after_stream, c.after_version
            FROM {quote(schema)}.lane_checkpoints c
            JOIN {quote(schema)}.generations g USING (projection, generation)
            WHERE c.projection = $1 AND c.generation = $2 AND c.lane = $3
            FOR UPDATE OF c""",
        projection,
        generation,
        lane,
    )


async def save_lane(
    conn: asyncpg.Connection,
    schema: str,
    projection: str,
    generation: int,
    lane: int,
    position: int,
    applied: int,
    done: bool,
    after: tuple[str, int] | None = None,
) -> None:
    """Move a lane's checkpoint: `position` for a hash lane, `after` (stream id, version) for a stream lane."""
    await conn.execute(
        f"""UPDATE {quote(schema)}.lane_checkpoints SET position = $4, events_applied = $5, done = $6,
                   after_stream = coalesce($7, after_stream), after_version = coalesce($8, after_version)
            WHERE projection = $1 AND generation = $2 AND lane = $3""",
        projection,
        generation,
        lane,
        position,
        applied,
        done,
        None if after is None else after[0],
        None if after is None else after[1],
    )


async def finish_generation(
    conn: asyncpg.Connection, schema: str, read_schema: str, projection: Projection, generation: int
) -> int:
    """Build the secondary indexes after the load (faster than maintaining them row by row) and ANALYZE."""
    physical = physical_table_name(projection, generation)
    for statement in projection.table.create_index_sql(read_schema, generation):
        await conn.execute(statement)
    await conn.execute(f"ANALYZE {qualified(read_schema, physical)}")
    rows = int(await conn.fetchval(f"SELECT count(*) FROM {qualified(read_schema, physical)}"))
    await conn.execute(
        f"""UPDATE {quote(schema)}.generations
            SET built_at = coalesce(built_at, now()), rows_count = $3,
                events_applied = (SELECT coalesce(sum(events_applied), 0) FROM {quote(schema)}.lane_checkpoints
                                  WHERE projection = $1 AND generation = $2)
            WHERE projection = $1 AND generation = $2""",
        projection.name,
        generation,
        rows,
    )
    return rows


async def _lock_generation(conn: asyncpg.Connection, schema: str, projection: str, generation: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""SELECT state, physical_table, checkpoint_xmin::text::bigint AS checkpoint
            FROM {quote(schema)}.generations WHERE projection = $1 AND generation = $2 FOR UPDATE""",
        projection,
        generation,
    )
    if row is None:
        raise UserError(f"projection {projection!r} has no generation {generation}", fix="start a new replay")
    return row


async def catch_up(
    conn: asyncpg.Connection,
    store: EventStore,
    read_schema: str,
    projection: Projection,
    generation: int,
    *,
    max_events: int | None = None,
) -> tuple[int, int]:
    """Move a generation's checkpoint to the current high-water mark (or, with `max_events`, to an earlier mark
    that bounds the batch), applying the delta. Runs in the caller's transaction."""
    row = await _lock_generation(conn, store.schema, projection.name, generation)
    if row["state"] not in ("building", "active"):
        raise UserError(f"generation {generation} of {projection.name!r} is {row['state']}", fix="start a new replay")
    checkpoint = row["checkpoint"]
    mark = await store.high_water_mark(conn)
    if mark <= checkpoint:
        return 0, checkpoint
    if max_events is not None:
        mark = await store.bounded_mark(conn, from_mark=checkpoint, to_mark=mark, max_events=max_events)
    events = await store.read_delta(conn, from_mark=checkpoint, to_mark=mark, types=projection.event_types)
    applied = await apply_events(conn, projection, read_schema, row["physical_table"], events)
    await conn.execute(
        f"""UPDATE {quote(store.schema)}.generations
            SET checkpoint_xmin = $3::text::xid8, events_applied = events_applied + $4
            WHERE projection = $1 AND generation = $2""",
        projection.name,
        generation,
        str(mark),
        applied.events,
    )
    return applied.events, mark


async def _point_view(conn: asyncpg.Connection, read_schema: str, projection: Projection, physical: str) -> None:
    view = qualified(read_schema, projection.table.name)
    kind = await conn.fetchval(
        """SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = $1 AND c.relname = $2""",
        read_schema,
        projection.table.name,
    )
    if kind is not None and kind != b"v" and kind != "v":
        raise UserError(
            f"{read_schema}.{projection.table.name} exists and is not a view managed by rehydrate",
            fix="rename or drop that table; rehydrate serves the read model under this name as a view",
        )
    columns = ", ".join(quote(c) for c in projection.table.columns)
    select = f"SELECT {columns} FROM {qualified(read_schema, physical)}"
    try:
        async with conn.transaction():
            await conn.execute(f"CREATE OR REPLACE VIEW {view} AS {select}")
    except _VIEW_CHANGE_FAILED:
        # The columns changed shape (a new projection version): the view must be recreated, still inside
        # the swap's transaction, so readers never find it missing.
        try:
            await conn.execute(f"DROP VIEW {view}")
        except asyncpg.DependentObjectsStillExistError as error:
            raise UserError(
                f"the columns of {read_schema}.{projection.table.name} changed and other objects depend on it: {error}",
                fix="drop or adapt the dependent views, then start the replay again",
            ) from None
        await conn.execute(f"CREATE VIEW {view} AS {select}")


async def swap(
    conn: asyncpg.Connection, store: EventStore, read_schema: str, projection: Projection, generation: int
) -> SwapResult:
    """Apply the last delta and make `generation` the active one, atomically. Idempotent on retry."""
    s = quote(store.schema)
    async with conn.transaction():
        await conn.execute(_TAIL_LOCK, projection.name)
        row = await _lock_generation(conn, store.schema, projection.name, generation)
        previous = await conn.fetchval(
            f"SELECT active_generation FROM {s}.projections WHERE name = $1", projection.name
        )
        if row["state"] == "active":
            rows = await conn.fetchval(
                f"SELECT rows_count FROM {s}.generations WHERE projection = $1 AND generation = $2",
                projection.name,
                generation,
            )
            return SwapResult(generation, None, 0, 0.0, rows or 0)
        final_delta, _ = await catch_up(conn, store, read_schema, projection, generation)
        rows = int(await conn.fetchval(f"SELECT count(*) FROM {qualified(read_schema, row['physical_table'])}"))
        # Readers queue behind the view's lock while we wait for it: give up quickly and let the caller retry.
        await conn.execute("SET LOCAL lock_timeout = '500ms'")
        started = time.perf_counter()
        await _point_view(conn, read_schema, projection, row["physical_table"])
        await conn.execute(
            f"""UPDATE {s}.generations SET state = 'retired', ended_at = now()
                WHERE projection = $1 AND state = 'active'""",
            projection.name,
        )
        await conn.execute(
            f"""UPDATE {s}.generations SET state = 'active', activated_at = now(), ended_at = now(),
                    rows_count = $3
                WHERE projection = $1 AND generation = $2""",
            projection.name,
            generation,
            rows,
        )
        await conn.execute(
            f"""INSERT INTO {s}.projections (name, active_generation, version, fingerprint)
                VALUES ($1, $2, $3, $4)
                ON CONFLICT (name) DO UPDATE SET active_generation = excluded.active_generation,
                    version = excluded.version, fingerprint = excluded.fingerprint, tail_error = NULL,
                    updated_at = now()""",
            projection.name,
            generation,
            projection.version,
            projection.fingerprint,
        )
    lock_ms = (time.perf_counter() - started) * 1000
    return SwapResult(generation, previous, final_delta, lock_ms, rows)


async def retire_old(
    conn: asyncpg.Connection, schema: str, read_schema: str, projection: Projection, keep: int
) -> list[int]:
    """Drop the tables of retired generations beyond the newest `keep`."""
    rows = await conn.fetch(
        f"""SELECT generation, physical_table FROM {quote(schema)}.generations
            WHERE projection = $1 AND state = 'retired' ORDER BY generation DESC OFFSET $2""",
        projection.name,
        keep,
    )
    for row in rows:
        async with conn.transaction():
            await conn.execute(f"DROP TABLE IF EXISTS {qualified(read_schema, row['physical_table'])}")
            await conn.execute(
                f"UPDATE {quote(schema)}.generations SET state = 'dropped' WHERE projection = $1 AND generation = $2",
                projection.name,
                row["generation"],
            )
    return [row["generation"] for row in rows]


async def drop_generation(
    conn: asyncpg.Connection, schema: str, read_schema: str, projection: str, generation: int, reason: str
) -> None:
    """Mark a building generation cancelled or failed and drop its table. Never touches an active one."""
    state = "cancelled" if reason == "cancelled" else "failed"
    async with conn.transaction():
        physical = await conn.fetchval(
            f"""UPDATE {quote(schema)}.generations SET state = $3, error = nullif($4, 'cancelled'), ended_at = now()
                WHERE projection = $1 AND generation = $2 AND state = 'building'
                RETURNING physical_table""",
            projection,
            generation,
            state,
            reason,
        )
        if physical is not None:
            await conn.execute(f"DROP TABLE IF EXISTS {qualified(read_schema, physical)}")


async def projection_rows(conn: asyncpg.Connection, schema: str) -> dict[str, dict[str, Any]]:
    """Per projection: its active generation, its checkpoint and tail state, and its latest generation of any
    state, for `rehydrate projections`."""
    rows = await conn.fetch(
        f"""SELECT n.name, p.active_generation, p.version, p.fingerprint, p.tail_enabled, p.tail_error,
                   a.rows_count, a.activated_at, a.checkpoint_xmin::text::bigint AS checkpoint,
                   l.generation AS last_generation, l.state AS last_state, l.started_at AS last_started,
                   l.ended_at AS last_ended, l.events_applied AS last_events, l.error AS last_error
            FROM (SELECT DISTINCT projection AS name FROM {quote(schema)}.generations) n
            LEFT JOIN {quote(schema)}.projections p USING (name)
            LEFT JOIN {quote(schema)}.generations a
              ON a.projection = n.name AND a.generation = p.active_generation
            LEFT JOIN LATERAL (SELECT * FROM {quote(schema)}.generations g WHERE g.projection = n.name
                               ORDER BY g.generation DESC LIMIT 1) l ON true""",
    )
    return {row["name"]: dict(row) for row in rows}


async def tail_batch(
    conn: asyncpg.Connection, store: EventStore, read_schema: str, projection: Projection, max_events: int
) -> tuple[int, int, int] | None:
    """Apply the next batch of new events to the active generation: (generation, events applied, checkpoint).

    Holds the projection's tail lock for the batch, so a swap waits for it and the next batch reads the
    active generation afresh: after a swap the tail goes on from exactly where the new generation ends.
    None when the projection has no active generation.
    """
    async with conn.transaction():
        await conn.execute(_TAIL_LOCK, projection.name)
        generation = await conn.fetchval(
            f"SELECT active_generation FROM {quote(store.schema)}.projections WHERE name = $1", projection.name
        )
        if generation is None:
            return None
        applied, mark = await catch_up(conn, store, read_schema, projection, generation, max_events=max_events)
    return generation, applied, mark


async def lag(
    conn: asyncpg.Connection, store: EventStore, projection: Projection, checkpoint: int
) -> tuple[int, float]:
    """Events the read model does not have yet (of the types it handles), and how old the oldest one is."""
    row = await conn.fetchrow(
        f"""SELECT count(*), coalesce(extract(epoch FROM now() - min(recorded_at)), 0)::float8
            FROM {store.table}
            WHERE tx_id >= $1::text::xid8 AND ($2::text[] IS NULL OR event_type = ANY($2::text[]))""",
        str(checkpoint),
        projection.event_types,
    )
    return int(row[0]), float(row[1])


async def set_tail(conn: asyncpg.Connection, schema: str, projection: str, *, enabled: bool) -> bool:
    """Record whether the projection's tail should run; False when the projection was never built."""
    done = await conn.fetchval(
        f"""UPDATE {quote(schema)}.projections SET tail_enabled = $2, tail_error = NULL, updated_at = now()
            WHERE name = $1 RETURNING true""",
        projection,
        enabled,
    )
    return bool(done)


async def set_tail_error(conn: asyncpg.Connection, schema: str, projection: str, error: str) -> None:
    await conn.execute(
        f"UPDATE {quote(schema)}.projections SET tail_error = $2, updated_at = now() WHERE name = $1",
        projection,
        error,
    )


async def tails_to_run(conn: asyncpg.Connection, schema: str) -> list[str]:
    """Projections with an active generation whose tail should run."""
    rows = await conn.fetch(
        f"""SELECT name FROM {quote(schema)}.projections
            WHERE active_generation IS NOT NULL AND tail_enabled ORDER BY name"""
    )
    return [row[0] for row in rows]
