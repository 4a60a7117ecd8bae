"""rehydrate's control tables and read-model DDL: generations, lane checkpoints, catch-up and the swap.

Readers query a projection by its plain table name, which is a view over the active generation's table
(`<table>__g<N>`). The swap replaces that view in one short transaction, so a reader sees the old generation
or the new one, whole. A view (not a rename of tables) keeps the reader's name stable for grants and for
views of the user's own, and leaves the old generation's table untouched for an instant rollback.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import asyncpg

from rehydrate.apply import Parking, apply_events
from rehydrate.errors import UserError
from rehydrate.identifiers import check_identifier, qualified, quote
from rehydrate.models import SwapResult
from rehydrate.projections import Projection
from rehydrate.store import Cutoff, EventStore

# Serialises the final catch-up + swap with anything else that writes the active generation (the tail).
TAIL_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('rehydrate.tail:' || $1, 0))"
_VIEW_CHANGE_FAILED = (asyncpg.InvalidTableDefinitionError, asyncpg.FeatureNotSupportedError)


def physical_table_name(projection: Projection, generation: int) -> str:
    return projection.table.physical_name(generation)


SANDBOX_PREFIX = "rehydrate_sandbox_"


def sandbox_schema(label: str) -> str:
    """The schema a sandbox build lives in: `rehydrate_sandbox_<label>`, for a plain-identifier label."""
    check_identifier(label, "sandbox label")
    if len(SANDBOX_PREFIX + label) > 63:
        raise UserError(
            f"sandbox label {label!r} is too long", fix=f"use at most {63 - len(SANDBOX_PREFIX)} characters"
        )
    return SANDBOX_PREFIX + label


async def building_generation(
    conn: asyncpg.Connection, schema: str, projection: str, sandbox: str = ""
) -> asyncpg.Record | None:
    """The generation being built for the live read model (sandbox ''), or in the sandbox `sandbox`."""
    return await conn.fetchrow(
        f"""SELECT generation, workflow_id, physical_table, target_xmin::text::bigint AS target_xmin,
                   lanes, chunk_size, to_position, as_of
            FROM {quote(schema)}.generations WHERE projection = $1 AND state = 'building' AND sandbox = $2""",
        projection,
        sandbox,
    )


async def generation_row(conn: asyncpg.Connection, schema: str, projection: str, generation: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""SELECT *, checkpoint_xmin::text::bigint AS checkpoint, target_xmin::text::bigint AS target
            FROM {quote(schema)}.generations WHERE projection = $1 AND generation = $2""",
        projection,
        generation,
    )
    if row is None:
        raise UserError(f"projection {projection!r} has no generation {generation}", fix="check the number")
    return row


def table_schema(read_schema: str, sandbox: str) -> str:
    """Where a generation's table lives: the read-model schema, or its sandbox's schema."""
    return sandbox_schema(sandbox) if sandbox else read_schema


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
    sandbox: str = "",
    cutoff: Cutoff | None = None,
) -> asyncpg.Record:
    """Register a new building generation, create its table (no secondary indexes) and lane checkpoints.

    With `boundaries` (`lanes - 1` stream ids, ascending), lane i holds the streams from boundary i-1 up to
    boundary i; without, lanes split the keys by hash."""
    s = quote(schema)
    async with conn.transaction():
        if await conn.fetchval("SELECT to_regnamespace($1)", read_schema) is None:
            # Only when missing: CREATE SCHEMA checks the CREATE privilege on the database even when the schema
            # exists, and a least-privilege worker has none.
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(read_schema)}")
        # A live replay and sandbox builds of one projection may plan at once: they take numbers in turn.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('rehydrate.generation:' || $1, 0))", projection.name
        )
        number = await conn.fetchval(
            f"SELECT coalesce(max(generation), 0) + 1 FROM {s}.generations WHERE projection = $1",
            projection.name,
        )
        physical = physical_table_name(projection, number)
        try:
            await conn.execute(
                f"""INSERT INTO {s}.generations (projection, generation, version, fingerprint, state,
                        physical_table, target_xmin, checkpoint_xmin, lanes, chunk_size, workflow_id, run_id,
                        sandbox, to_position, as_of)
                    VALUES ($1, $2, $3, $4, 'building', $5, $6::text::xid8, $6::text::xid8, $7, $8, $9, $10,
                        $11, $12, $13)""",
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
                sandbox,
                None if cutoff is None else cutoff.position,
                None if cutoff is None else cutoff.as_of,
            )
        except asyncpg.UniqueViolationError:
            where = f" in sandbox {sandbox!r}" if sandbox else ""
            raise UserError(
                f"projection {projection.name!r} is already being rebuilt{where}",
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
    row = await building_generation(conn, schema, projection.name, sandbox)
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
                   c.after_stream, c.after_version, g.sandbox, g.to_position, g.as_of
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
    """Build the secondary indexes after the load and ANALYZE; returns the row count."""
    rows = await index_generation(conn, schema, read_schema, projection, generation)
    await analyze_generation(conn, read_schema, projection, generation)
    return rows


async def analyze_generation(
    conn: asyncpg.Connection, read_schema: str, projection: Projection, generation: int
) -> None:
    """Gather the planner's statistics of a generation's table. ANALYZE blocks neither readers nor writers, so it
    may run beside the catch-up and the swap; a table dropped meanwhile (a cancelled replay) is left alone."""
    with contextlib.suppress(asyncpg.UndefinedTableError):
        await conn.execute(f"ANALYZE {qualified(read_schema, physical_table_name(projection, generation))}")


async def index_generation(
    conn: asyncpg.Connection, schema: str, read_schema: str, projection: Projection, generation: int
) -> int:
    """Build the secondary indexes after the load (faster than maintaining them row by row); returns the row
    count. The plan's events_total was an estimate; from here it is what the build applied."""
    physical = physical_table_name(projection, generation)
    for statement in projection.table.create_index_sql(read_schema, generation):
        await conn.execute(statement)
    rows = int(await conn.fetchval(f"SELECT count(*) FROM {qualified(read_schema, physical)}"))
    await conn.execute(
        f"""UPDATE {quote(schema)}.generations
            SET built_at = coalesce(built_at, now()), rows_count = $3,
                events_applied = (SELECT coalesce(sum(events_applied), 0) FROM {quote(schema)}.lane_checkpoints
                                  WHERE projection = $1 AND generation = $2),
                events_total = (SELECT coalesce(sum(events_applied), 0) FROM {quote(schema)}.lane_checkpoints
                                WHERE projection = $1 AND generation = $2)
            WHERE projection = $1 AND generation = $2""",
        projection.name,
        generation,
        rows,
    )
    return rows


async def _lock_generation(conn: asyncpg.Connection, schema: str, projection: str, generation: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""SELECT state, physical_table, checkpoint_xmin::text::bigint AS checkpoint, sandbox
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
    to_mark: int | None = None,
) -> tuple[int, int]:
    """Move a generation's checkpoint to the current high-water mark (or `to_mark`, or, with `max_events`, to an
    earlier mark that bounds the batch), applying the delta. Runs in the caller's transaction."""
    row = await _lock_generation(conn, store.schema, projection.name, generation)
    if row["state"] not in ("building", "active", "sandbox"):
        raise UserError(f"generation {generation} of {projection.name!r} is {row['state']}", fix="start a new replay")
    checkpoint = row["checkpoint"]
    mark = await store.high_water_mark(conn) if to_mark is None else to_mark
    if mark <= checkpoint:
        return 0, checkpoint
    if max_events is not None:
        mark = await store.bounded_mark(conn, from_mark=checkpoint, to_mark=mark, max_events=max_events)
    events = await store.read_delta(conn, from_mark=checkpoint, to_mark=mark, types=projection.event_types)
    where = table_schema(read_schema, row["sandbox"])
    applied = await apply_events(
        conn, projection, where, row["physical_table"], events, parking=Parking(store.schema, generation)
    )
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
    conn: asyncpg.Connection,
    store: EventStore,
    read_schema: str,
    projection: Projection,
    generation: int,
    *,
    allow_dead_letters: bool = False,
) -> SwapResult:
    """Apply the last delta and make `generation` the active one, atomically. Idempotent on retry.

    A generation that parked events (on_error="park") is refused unless `allow_dead_letters`."""
    s = quote(store.schema)
    async with conn.transaction():
        await conn.execute(TAIL_LOCK, projection.name)
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
        parked = await dead_letter_count(conn, store.schema, projection.name, generation)
        if parked and not allow_dead_letters:
            raise UserError(
                f"generation {generation} of {projection.name!r} parked {parked} event(s) and was not swapped in",
                fix=f"see them with `rehydrate dead-letters {projection.name} --generation {generation}`; fix the "
                f"handler and replay again, or replay with --allow-dead-letters and then `rehydrate dead-letters "
                f"retry {projection.name}` after the fix",
            )
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
        f"""SELECT n.name, p.active_generation, p.version, a.fingerprint, p.tail_enabled, p.tail_error,
                   a.rows_count, a.activated_at, a.checkpoint_xmin::text::bigint AS checkpoint,
                   l.generation AS last_generation, l.state AS last_state, l.started_at AS last_started,
                   l.ended_at AS last_ended, l.events_applied AS last_events, l.error AS last_error
            FROM (SELECT DISTINCT projection AS name FROM {quote(schema)}.generations WHERE sandbox = '') n
            LEFT JOIN {quote(schema)}.projections p USING (name)
            LEFT JOIN {quote(schema)}.generations a
              ON a.projection = n.name AND a.generation = p.active_generation
            LEFT JOIN LATERAL (SELECT * FROM {quote(schema)}.generations g
                               WHERE g.projection = n.name AND g.sandbox = ''
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
        await conn.execute(TAIL_LOCK, projection.name)
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


# -- dead letters -------------------------------------------------------------------------------------------------


async def dead_letter_count(conn: asyncpg.Connection, schema: str, projection: str, generation: int) -> int:
    return int(
        await conn.fetchval(
            f"SELECT count(*) FROM {quote(schema)}.dead_letters WHERE projection = $1 AND generation = $2",
            projection,
            generation,
        )
    )


async def dead_letters(
    conn: asyncpg.Connection, schema: str, projection: str, generation: int, limit: int = 1000
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"""SELECT generation, global_position, stream_id, stream_version, event_type, key, error, parked_at
            FROM {quote(schema)}.dead_letters WHERE projection = $1 AND generation = $2
            ORDER BY global_position LIMIT $3""",
        projection,
        generation,
        limit,
    )
    return [dict(row) for row in rows]


async def active_generation(conn: asyncpg.Connection, schema: str, projection: str) -> int:
    generation = await conn.fetchval(
        f"SELECT active_generation FROM {quote(schema)}.projections WHERE name = $1", projection
    )
    if generation is None:
        raise UserError(
            f"projection {projection!r} has no active generation",
            fix=f"build one: `rehydrate replay start {projection}`",
        )
    return int(generation)


async def retry_dead_letters(
    conn: asyncpg.Connection, store: EventStore, read_schema: str, projection: Projection
) -> tuple[int, int]:
    """Rebuild every parked key of the active generation from its whole history, with the current handlers.

    Under the projection's tail lock, in one transaction: the keys' dead letters and rows are deleted, their
    events up to the generation's checkpoint (the same set a clean build at that checkpoint reads) are folded
    from nothing, and the rows written. A key that fails again is parked again. Returns (keys retried, keys
    still parked)."""
    s = quote(store.schema)
    async with conn.transaction():
        await conn.execute(TAIL_LOCK, projection.name)
        generation = await active_generation(conn, store.schema, projection.name)
        row = await _lock_generation(conn, store.schema, projection.name, generation)
        keys = [
            r[0]
            for r in await conn.fetch(
                f"DELETE FROM {s}.dead_letters WHERE projection = $1 AND generation = $2 RETURNING key",
                projection.name,
                generation,
            )
        ]
        keys = sorted(set(keys))
        if not keys:
            return 0, 0
        shape = projection.table
        target = qualified(read_schema, row["physical_table"])
        await conn.execute(f"DELETE FROM {target} WHERE {quote(shape.key_column)}::text = ANY($1::text[])", keys)
        events = await store.read_keys(
            conn, key=projection.key, keys=keys, mark=row["checkpoint"], types=projection.event_types
        )
        await apply_events(
            conn, projection, read_schema, row["physical_table"], events, Parking(store.schema, generation)
        )
        still = await conn.fetchval(
            f"SELECT count(DISTINCT key) FROM {s}.dead_letters WHERE projection = $1 AND generation = $2",
            projection.name,
            generation,
        )
    return len(keys), int(still)


# -- generations and rollback ------------------------------------------------------------------------------------


async def generations(conn: asyncpg.Connection, schema: str, projection: str) -> list[dict[str, Any]]:
    """The live generations of a projection, newest first, with what `rehydrate generations` shows."""
    rows = await conn.fetch(
        f"""SELECT g.generation, g.state, g.version, g.fingerprint, g.physical_table, g.lanes, g.chunk_size,
                   g.events_total, g.events_applied, g.rows_count, g.workflow_id, g.run_id, g.error,
                   g.target_xmin::text::bigint AS target_mark, g.checkpoint_xmin::text::bigint AS checkpoint,
                   g.started_at, g.built_at, g.activated_at, g.ended_at,
                   extract(epoch FROM g.built_at - g.started_at)::float8 AS build_seconds,
                   (SELECT count(*) FROM {quote(schema)}.dead_letters d
                    WHERE d.projection = g.projection AND d.generation = g.generation) AS dead_letters
            FROM {quote(schema)}.generations g WHERE g.projection = $1 AND g.sandbox = ''
            ORDER BY g.generation DESC""",
        projection,
    )
    return [dict(row) for row in rows]


async def rollback(
    conn: asyncpg.Connection, schema: str, read_schema: str, projection: Projection, to: int | None = None
) -> tuple[int, int]:
    """Make a retained (retired, table kept) generation active again, at once; returns (from, to).

    The same view swap as `swap`, under the same lock. The rolled-back generation is not caught up here: it
    goes on from its own checkpoint, caught up by the tail (or by `catch_up`) like any active generation."""
    s = quote(schema)
    async with conn.transaction():
        await conn.execute(TAIL_LOCK, projection.name)
        current = await active_generation(conn, schema, projection.name)
        retained = await conn.fetch(
            f"""SELECT generation, physical_table, version, fingerprint FROM {s}.generations
                WHERE projection = $1 AND sandbox = '' AND state = 'retired' ORDER BY generation DESC""",
            projection.name,
        )
        if not retained:
            raise UserError(
                f"projection {projection.name!r} has no retained generation to roll back to (active: g{current})",
                fix="old generations are kept only up to REHYDRATE_RETAIN_GENERATIONS (default 1); raise it "
                "before the next replay to be able to roll back",
            )
        if to is None:
            chosen = next((r for r in retained if r["generation"] < current), retained[0])
        else:
            found = [r for r in retained if r["generation"] == to]
            if not found:
                raise UserError(
                    f"generation {to} of {projection.name!r} is not retained (retained: "
                    f"{', '.join(f'g{r[0]}' for r in retained)})",
                    fix="choose one of the retained generations (see `rehydrate generations`)",
                )
            chosen = found[0]
        exists = await conn.fetchval("SELECT to_regclass($1)", qualified(read_schema, chosen["physical_table"]))
        if exists is None:
            raise UserError(
                f"the table of generation {chosen['generation']} of {projection.name!r} is gone",
                fix="it was dropped by hand; start a new replay instead",
            )
        await conn.execute("SET LOCAL lock_timeout = '5s'")
        await _point_view(conn, read_schema, projection, chosen["physical_table"])
        await conn.execute(
            f"""UPDATE {s}.generations SET state = 'retired', ended_at = now()
                WHERE projection = $1 AND generation = $2""",
            projection.name,
            current,
        )
        await conn.execute(
            f"""UPDATE {s}.generations SET state = 'active', activated_at = now(), ended_at = NULL
                WHERE projection = $1 AND generation = $2""",
            projection.name,
            chosen["generation"],
        )
        await conn.execute(
            f"""UPDATE {s}.projections SET active_generation = $2, version = $3, fingerprint = $4, tail_error = NULL,
                    updated_at = now() WHERE name = $1""",
            projection.name,
            chosen["generation"],
            chosen["version"],
            chosen["fingerprint"],
        )
    return current, int(chosen["generation"])


# -- sandboxes ----------------------------------------------------------------------------------------------------


async def publish_sandbox(conn: asyncpg.Connection, schema: str, projection: Projection, generation: int) -> int:
    """Point the sandbox's own view at a finished sandbox build and drop the label's older build of the
    projection. Returns the events the build parked."""
    s = quote(schema)
    async with conn.transaction():
        row = await _lock_generation(conn, schema, projection.name, generation)
        where = sandbox_schema(row["sandbox"])
        older = await conn.fetch(
            f"""UPDATE {s}.generations SET state = 'dropped', ended_at = now()
                WHERE projection = $1 AND sandbox = $2 AND state = 'sandbox' AND generation <> $3
                RETURNING physical_table""",
            projection.name,
            row["sandbox"],
            generation,
        )
        await _point_view(conn, where, projection, row["physical_table"])
        for old in older:
            await conn.execute(f"DROP TABLE IF EXISTS {qualified(where, old[0])}")
        await conn.execute(
            f"UPDATE {s}.generations SET state = 'sandbox', ended_at = now() WHERE projection = $1 AND generation = $2",
            projection.name,
            generation,
        )
        return await dead_letter_count(conn, schema, projection.name, generation)


async def sandboxes(conn: asyncpg.Connection, schema: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"""SELECT sandbox AS label, projection, generation, state, to_position, as_of,
                   target_xmin::text::bigint AS target_mark, rows_count, events_applied, started_at, ended_at
            FROM {quote(schema)}.generations WHERE sandbox <> '' AND state IN ('building', 'sandbox')
            ORDER BY sandbox, projection"""
    )
    return [dict(row) for row in rows]


async def drop_sandbox(conn: asyncpg.Connection, schema: str, label: str, *, missing_ok: bool = False) -> int:
    """Drop a sandbox's schema and forget its builds; refused while one of them is still building, and (unless
    `missing_ok`) when there is no such sandbox."""
    where = sandbox_schema(label)
    async with conn.transaction():
        building = await conn.fetchval(
            f"SELECT projection FROM {quote(schema)}.generations WHERE sandbox = $1 AND state = 'building' LIMIT 1",
            label,
        )
        if building is not None:
            raise UserError(
                f"sandbox {label!r} is still building {building!r}",
                fix=f"wait for it, or cancel it with `rehydrate replay cancel {building} --sandbox {label}`",
            )
        exists = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", where)
        gone = await conn.fetchval(
            f"""WITH d AS (DELETE FROM {quote(schema)}.generations WHERE sandbox = $1 RETURNING projection, generation),
                     l AS (DELETE FROM {quote(schema)}.dead_letters x USING d
                           WHERE x.projection = d.projection AND x.generation = d.generation)
                SELECT count(*) FROM d""",
            label,
        )
        if not exists and not gone and not missing_ok:
            raise UserError(f"there is no sandbox {label!r}", fix="see them with `rehydrate sandboxes`")
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote(where)} CASCADE")
    return int(gone)


async def generation_sandbox(conn: asyncpg.Connection, schema: str, projection: str, generation: int) -> str:
    """The sandbox label of a generation ('' for a live one, or one that no longer exists)."""
    found = await conn.fetchval(
        f"SELECT sandbox FROM {quote(schema)}.generations WHERE projection = $1 AND generation = $2",
        projection,
        generation,
    )
    return str(found or "")
