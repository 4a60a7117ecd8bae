"""rehydrate's control tables: projections, generations, lane checkpoints, dead letters, the gaps of settle-window
sources and snapshot rebuilds.

Every statement on them is one of the constants below ({schema}: rehydrate's schema, quoted), run by `Catalog`,
which holds a connection and the schema. A catalog does not begin transactions of its own: the caller's
transaction decides what commits together (a lane's rows and its checkpoint, a swap's view and its generation rows).

The module is long because it is the one owner of these six tables: a reader of their statements has them all here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from rehydrate.core.errors import UserError
from rehydrate.core.identifiers import quote
from rehydrate.engine.projections import physical_name

# -- locks: transaction-level advisory locks, released at commit -----------------------------------------------

# Serialises whatever writes a projection's active generation: the tail's batches, the final catch-up and swap, a
# rollback, a retry of dead letters, a verify's comparison.
_LOCK_PROJECTION = "SELECT pg_advisory_xact_lock(hashtextextended('rehydrate.tail:' || $1, 0))"
# A live replay and sandbox builds of one projection may plan at once: they take generation numbers in turn.
_LOCK_NUMBERING = "SELECT pg_advisory_xact_lock(hashtextextended('rehydrate.generation:' || $1, 0))"

# -- generations -------------------------------------------------------------------------------------------------

_NEXT_GENERATION = "SELECT coalesce(max(generation), 0) + 1 FROM {schema}.generations WHERE projection = $1"
_INSERT_GENERATION = """INSERT INTO {schema}.generations (projection, generation, version, fingerprint, state,
        physical_table, target_xmin, checkpoint_xmin, lanes, chunk_size, workflow_id, run_id, sandbox, to_position,
        as_of, child_tables)
    VALUES ($1, $2, $3, $4, 'building', $5, $6::text::xid8, $6::text::xid8, $7, $8, $9, $10, $11, $12, $13, $14)"""
_BUILDING = """SELECT generation, workflow_id, physical_table, target_xmin::text::bigint AS target_xmin,
        lanes, chunk_size, to_position, as_of
    FROM {schema}.generations WHERE projection = $1 AND state = 'building' AND sandbox = $2"""
_GENERATION = """SELECT *, checkpoint_xmin::text::bigint AS checkpoint, target_xmin::text::bigint AS target
    FROM {schema}.generations WHERE projection = $1 AND generation = $2"""
_LOCK_GENERATION = """SELECT state, physical_table, checkpoint_xmin::text::bigint AS checkpoint, sandbox, rows_count,
        fingerprint, child_tables, replaced_generation, swap_delta
    FROM {schema}.generations WHERE projection = $1 AND generation = $2 FOR UPDATE"""
_SET_TOTAL = "UPDATE {schema}.generations SET events_total = $3 WHERE projection = $1 AND generation = $2"
# The plan's events_total was an estimate; once built, it is what the lanes applied.
_MARK_BUILT = """UPDATE {schema}.generations
    SET built_at = coalesce(built_at, now()), rows_count = $3,
        events_applied = (SELECT coalesce(sum(events_applied), 0) FROM {schema}.lane_checkpoints
                          WHERE projection = $1 AND generation = $2),
        events_total = (SELECT coalesce(sum(events_applied), 0) FROM {schema}.lane_checkpoints
                        WHERE projection = $1 AND generation = $2)
    WHERE projection = $1 AND generation = $2"""
_MOVE_CHECKPOINT = """UPDATE {schema}.generations
    SET checkpoint_xmin = $3::text::xid8, events_applied = events_applied + $4
    WHERE projection = $1 AND generation = $2"""
_RETIRE_ACTIVE = """UPDATE {schema}.generations SET state = 'retired', ended_at = now()
    WHERE projection = $1 AND state = 'active'"""
# ended_at: when a replay swapped it in; NULL for a generation a rollback made active again (live once more).
_ACTIVATE = """UPDATE {schema}.generations SET state = 'active', activated_at = now(),
        ended_at = CASE WHEN $4 THEN now() END, rows_count = coalesce($3, rows_count),
        replaced_generation = $5, swap_delta = $6
    WHERE projection = $1 AND generation = $2"""
_RETAINED = """SELECT generation, physical_table, version, fingerprint, child_tables FROM {schema}.generations
    WHERE projection = $1 AND sandbox = '' AND state = 'retired' ORDER BY generation DESC"""
_RETIRED_BEYOND = """SELECT generation, physical_table, child_tables FROM {schema}.generations
    WHERE projection = $1 AND state = 'retired' ORDER BY generation DESC OFFSET $2"""
_MARK_DROPPED = "UPDATE {schema}.generations SET state = 'dropped' WHERE projection = $1 AND generation = $2"
_DROP_GAPS = "DELETE FROM {schema}.source_gaps WHERE projection = $1 AND generation = $2"
# A building generation that failed or was cancelled keeps the events its lanes applied (shown by `generations`).
_END_BUILDING = """UPDATE {schema}.generations SET state = $3, error = nullif($4, 'cancelled'), ended_at = now(),
        events_applied = (SELECT coalesce(sum(events_applied), 0) FROM {schema}.lane_checkpoints
                          WHERE projection = $1 AND generation = $2)
    WHERE projection = $1 AND generation = $2 AND state = 'building'
    RETURNING physical_table, sandbox, child_tables"""
_SANDBOX_OF = "SELECT sandbox FROM {schema}.generations WHERE projection = $1 AND generation = $2"
_LIST_GENERATIONS = """SELECT g.generation, g.state, g.version, g.fingerprint, g.physical_table, g.lanes, g.chunk_size,
        g.events_total, g.events_applied, g.rows_count, g.workflow_id, g.run_id, g.error,
        g.target_xmin::text::bigint AS target_mark, g.checkpoint_xmin::text::bigint AS checkpoint,
        g.started_at, g.built_at, g.activated_at, g.ended_at, g.partial_history, g.child_tables,
        extract(epoch FROM g.built_at - g.started_at)::float8 AS build_seconds,
        (SELECT count(*) FROM {schema}.dead_letters d
         WHERE d.projection = g.projection AND d.generation = g.generation) AS dead_letters
    FROM {schema}.generations g WHERE g.projection = $1 AND g.sandbox = ''
    ORDER BY g.generation DESC"""

# -- lane checkpoints --------------------------------------------------------------------------------------------

_INSERT_HASH_LANES = """INSERT INTO {schema}.lane_checkpoints (projection, generation, lane, position)
    SELECT $1, $2, lane, 0 FROM generate_series(0, $3 - 1) AS lane"""
_INSERT_RANGE_LANE = """INSERT INTO {schema}.lane_checkpoints
        (projection, generation, lane, position, by_stream, low_stream, high_stream)
    VALUES ($1, $2, $3, 0, true, $4, $5)"""
_INSERT_LOG_LANE = """INSERT INTO {schema}.lane_checkpoints
        (projection, generation, lane, position, target, partition_name, parent_lanes)
    VALUES ($1, $2, $3, $4, $5, $6, $7)"""
_LOG_LANES = """SELECT lane, position, target, events_applied, done, log_cursor, partition_name, parent_lanes
    FROM {schema}.lane_checkpoints WHERE projection = $1 AND generation = $2 ORDER BY lane"""
_MARK_PARTIAL = "UPDATE {schema}.generations SET partial_history = true WHERE projection = $1 AND generation = $2"
_LANE_BOUNDS = """SELECT by_stream, low_stream, high_stream FROM {schema}.lane_checkpoints
    WHERE projection = $1 AND generation = $2 ORDER BY lane"""
_LANES = """SELECT lane, position, events_applied, done FROM {schema}.lane_checkpoints
    WHERE projection = $1 AND generation = $2 ORDER BY lane"""
# The row lock makes a retried chunk wait for a zombie attempt of the same lane (a worker that lost its heartbeat
# but still runs); the retry then starts from whatever that attempt committed.
_LOCK_LANE = """SELECT c.position, c.events_applied, c.done, g.state, c.by_stream, c.low_stream, c.high_stream,
        c.after_stream, c.after_version, c.target, c.log_cursor, c.partition_name, g.sandbox, g.to_position, g.as_of,
        g.fingerprint, g.started_at
    FROM {schema}.lane_checkpoints c JOIN {schema}.generations g USING (projection, generation)
    WHERE c.projection = $1 AND c.generation = $2 AND c.lane = $3
    FOR UPDATE OF c"""
_SAVE_LANE = """UPDATE {schema}.lane_checkpoints SET position = $4, events_applied = $5, done = $6,
        after_stream = coalesce($7, after_stream), after_version = coalesce($8, after_version), log_cursor = $9
    WHERE projection = $1 AND generation = $2 AND lane = $3"""

# -- projections -------------------------------------------------------------------------------------------------

_ACTIVE_GENERATION = "SELECT active_generation FROM {schema}.projections WHERE name = $1"
_SET_ACTIVE = """INSERT INTO {schema}.projections (name, active_generation, version, fingerprint)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (name) DO UPDATE SET active_generation = excluded.active_generation, version = excluded.version,
        fingerprint = excluded.fingerprint, tail_error = NULL, updated_at = now()"""
_SET_TAIL = """UPDATE {schema}.projections SET tail_enabled = $2, tail_error = NULL, updated_at = now()
    WHERE name = $1 RETURNING true"""
_SET_TAIL_ERROR = "UPDATE {schema}.projections SET tail_error = $2, updated_at = now() WHERE name = $1"
_SET_TAIL_CODE = """UPDATE {schema}.projections SET tail_fingerprint = $2, updated_at = now()
    WHERE name = $1 AND tail_fingerprint IS DISTINCT FROM $2"""
_TAILS_TO_RUN = """SELECT name FROM {schema}.projections
    WHERE active_generation IS NOT NULL AND tail_enabled ORDER BY name"""
# Per projection ever built: its active generation, checkpoint and tail state, and its latest generation of any state.
_PROJECTIONS = """SELECT n.name, p.active_generation, p.version, a.fingerprint, p.tail_enabled, p.tail_error,
        p.tail_fingerprint, a.physical_table,
        a.rows_count, a.activated_at, a.checkpoint_xmin::text::bigint AS checkpoint,
        l.generation AS last_generation, l.state AS last_state, l.started_at AS last_started,
        l.ended_at AS last_ended, l.events_applied AS last_events, l.error AS last_error,
        l.workflow_id AS last_workflow_id, l.run_id AS last_run_id
    FROM (SELECT DISTINCT projection AS name FROM {schema}.generations WHERE sandbox = '') n
    LEFT JOIN {schema}.projections p USING (name)
    LEFT JOIN {schema}.generations a ON a.projection = n.name AND a.generation = p.active_generation
    LEFT JOIN LATERAL (SELECT * FROM {schema}.generations g WHERE g.projection = n.name AND g.sandbox = ''
                       ORDER BY g.generation DESC LIMIT 1) l ON true"""

# -- dead letters ------------------------------------------------------------------------------------------------

_COUNT_DEAD_LETTERS = "SELECT count(*) FROM {schema}.dead_letters WHERE projection = $1 AND generation = $2"
_COUNT_PARKED_KEYS = "SELECT count(DISTINCT key) FROM {schema}.dead_letters WHERE projection = $1 AND generation = $2"
_LIST_DEAD_LETTERS = """SELECT generation, global_position, stream_id, stream_version, event_type, key, error, parked_at
    FROM {schema}.dead_letters WHERE projection = $1 AND generation = $2 ORDER BY global_position LIMIT $3"""
_PARKED_KEYS = """SELECT DISTINCT key FROM {schema}.dead_letters
    WHERE projection = $1 AND generation = $2 AND key = ANY($3::text[])"""
_TAKE_PARKED_KEYS = "DELETE FROM {schema}.dead_letters WHERE projection = $1 AND generation = $2 RETURNING key"
_FORGET_DEAD_LETTERS = """DELETE FROM {schema}.dead_letters
    WHERE projection = $1 AND generation = $2 AND key = ANY($3::text[])"""
_PARK = """INSERT INTO {schema}.dead_letters (projection, generation, global_position, stream_id, stream_version,
        event_type, key, error)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING"""
_LATEST_WITH_DEAD_LETTERS = """SELECT max(generation) FROM {schema}.dead_letters WHERE projection = $1"""

# -- gaps of settle-window sources: runs of empty positions below a checkpoint, where a late commit may still land

_ADD_GAPS = """INSERT INTO {schema}.source_gaps (projection, generation, low, high, seen_at)
    SELECT $1, $2, g.low, g.high, coalesce($5, now()) FROM unnest($3::bigint[], $4::bigint[]) AS g(low, high)
    ON CONFLICT DO NOTHING"""
_FORGET_GAPS = """DELETE FROM {schema}.source_gaps
    WHERE projection = $1 AND generation = $2 AND seen_at < now() - make_interval(secs => $3)"""
_GAPS = """SELECT low, high, seen_at FROM {schema}.source_gaps WHERE projection = $1 AND generation = $2
    ORDER BY low"""
_FILL_GAPS = "DELETE FROM {schema}.source_gaps WHERE projection = $1 AND generation = $2 AND low = ANY($3::bigint[])"

# -- sandboxes ---------------------------------------------------------------------------------------------------

_DROP_OLDER_SANDBOX_BUILDS = """UPDATE {schema}.generations SET state = 'dropped', ended_at = now()
    WHERE projection = $1 AND sandbox = $2 AND state = 'sandbox' AND generation <> $3
    RETURNING generation, physical_table, child_tables"""
_MARK_SANDBOX = """UPDATE {schema}.generations SET state = 'sandbox', ended_at = now()
    WHERE projection = $1 AND generation = $2"""
_SANDBOXES = """SELECT sandbox AS label, projection, generation, state, to_position, as_of,
        target_xmin::text::bigint AS target_mark, rows_count, events_applied, started_at, ended_at
    FROM {schema}.generations WHERE sandbox <> '' AND state IN ('building', 'sandbox')
    ORDER BY sandbox, projection"""
_BUILDING_IN_SANDBOX = """SELECT projection FROM {schema}.generations
    WHERE sandbox = $1 AND state = 'building' LIMIT 1"""
_FORGET_SANDBOX = """WITH d AS (DELETE FROM {schema}.generations WHERE sandbox = $1 RETURNING projection, generation),
         l AS (DELETE FROM {schema}.dead_letters x USING d
               WHERE x.projection = d.projection AND x.generation = d.generation)
    SELECT count(*) FROM d"""

# -- snapshot rebuilds -------------------------------------------------------------------------------------------

_INSERT_PARTITIONS = """INSERT INTO {schema}.snapshot_rebuilds (rebuild_id, aggregate_type, partition)
    SELECT $1, $2, p FROM generate_series(0, $3 - 1) AS p
    ON CONFLICT (rebuild_id, partition) DO NOTHING"""
# When a rebuild starts, the cursors of the type's earlier rebuilds go: the finished ones, and those untouched for a
# week (failed or terminated). A rebuild still running beside it (started under another workflow id) keeps its own.
_FORGET_OLD_REBUILDS = """DELETE FROM {schema}.snapshot_rebuilds WHERE aggregate_type = $2 AND rebuild_id IN (
        SELECT rebuild_id FROM {schema}.snapshot_rebuilds WHERE aggregate_type = $2 AND rebuild_id <> $1
        GROUP BY rebuild_id HAVING bool_and(done) OR max(updated_at) < now() - interval '7 days')"""
_PARTITIONS = """SELECT partition, after_stream, streams_done, done FROM {schema}.snapshot_rebuilds
    WHERE rebuild_id = $1 ORDER BY partition"""
# The row lock makes a retried chunk wait for a zombie attempt of the same partition.
_LOCK_PARTITION = """SELECT after_stream, streams_done, done FROM {schema}.snapshot_rebuilds
    WHERE rebuild_id = $1 AND partition = $2 FOR UPDATE"""
_SAVE_PARTITION = """UPDATE {schema}.snapshot_rebuilds SET after_stream = $3, streams_done = $4, done = $5,
        updated_at = now()
    WHERE rebuild_id = $1 AND partition = $2"""

# (generation, position, stream id, stream version, event type, key, error): the columns of _PARK after the projection
DeadLetter = tuple[int, int, str, int, str, str, str]


class Catalog:
    """The control tables, on one connection, in rehydrate's schema `schema`."""

    def __init__(self, conn: asyncpg.Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema
        self._quoted = quote(schema)

    def _sql(self, statement: str) -> str:
        return statement.format(schema=self._quoted)

    # -- locks ---------------------------------------------------------------------------------------------

    async def lock_projection(self, projection: str) -> None:
        """Hold the projection's lock to the end of the transaction (see _LOCK_PROJECTION)."""
        await self.conn.execute(_LOCK_PROJECTION, projection)

    # -- generations ---------------------------------------------------------------------------------------

    async def insert_generation(
        self,
        *,
        projection: str,
        version: int,
        fingerprint: str,
        physical_table: Any,
        mark: int,
        lanes: int,
        chunk_size: int,
        workflow_id: str,
        run_id: str,
        sandbox: str,
        to_position: int | None,
        as_of: datetime | None,
        child_tables: Sequence[str] = (),
    ) -> int:
        """Number and record a new building generation; `physical_table(number)` names its table. Refused (a
        UserError) while another generation of the projection is building for the same target."""
        await self.conn.execute(_LOCK_NUMBERING, projection)
        number = int(await self.conn.fetchval(self._sql(_NEXT_GENERATION), projection))
        try:
            await self.conn.execute(
                self._sql(_INSERT_GENERATION),
                projection,
                number,
                version,
                fingerprint,
                physical_table(number),
                str(mark),
                lanes,
                chunk_size,
                workflow_id,
                run_id,
                sandbox,
                to_position,
                as_of,
                list(child_tables),
            )
        except asyncpg.UniqueViolationError:
            where = f" in sandbox {sandbox!r}" if sandbox else ""
            raise UserError(
                f"projection {projection!r} is already being rebuilt{where}",
                fix="wait for that replay, or cancel it with `rehydrate replay cancel`",
            ) from None
        return number

    async def building_generation(self, projection: str, sandbox: str = "") -> asyncpg.Record | None:
        """The generation being built for the live read model (sandbox ''), or in the sandbox `sandbox`."""
        return await self.conn.fetchrow(self._sql(_BUILDING), projection, sandbox)

    async def generation(self, projection: str, generation: int) -> asyncpg.Record:
        """A generation's row, with its checkpoint and target as numbers."""
        row = await self.conn.fetchrow(self._sql(_GENERATION), projection, generation)
        if row is None:
            raise UserError(f"projection {projection!r} has no generation {generation}", fix="check the number")
        return row

    async def lock_generation(self, projection: str, generation: int) -> asyncpg.Record:
        """A generation's state, table, checkpoint, sandbox and rows, locked to the end of the transaction."""
        row = await self.conn.fetchrow(self._sql(_LOCK_GENERATION), projection, generation)
        if row is None:
            raise UserError(f"projection {projection!r} has no generation {generation}", fix="start a new replay")
        return row

    async def set_total(self, projection: str, generation: int, total: int) -> None:
        await self.conn.execute(self._sql(_SET_TOTAL), projection, generation, total)

    async def mark_built(self, projection: str, generation: int, rows: int) -> None:
        await self.conn.execute(self._sql(_MARK_BUILT), projection, generation, rows)

    async def move_checkpoint(self, projection: str, generation: int, mark: int, applied: int) -> None:
        await self.conn.execute(self._sql(_MOVE_CHECKPOINT), projection, generation, str(mark), applied)

    async def activate(
        self,
        projection: str,
        generation: int,
        *,
        version: int,
        fingerprint: str,
        rows: int | None,
        swapped: bool,
        replaced: int | None = None,
        delta: int | None = None,
    ) -> None:
        """Retire the active generation and make `generation` the active one: `swapped` in by its replay (with its
        row count, the generation it `replaced` and the events its swap's `delta` applied), or made active again by a
        rollback."""
        await self.conn.execute(self._sql(_RETIRE_ACTIVE), projection)
        await self.conn.execute(self._sql(_ACTIVATE), projection, generation, rows, swapped, replaced, delta)
        await self.conn.execute(self._sql(_SET_ACTIVE), projection, generation, version, fingerprint)

    async def retained(self, projection: str) -> list[asyncpg.Record]:
        """Retired generations whose tables may still exist, newest first."""
        return list(await self.conn.fetch(self._sql(_RETAINED), projection))

    async def retired_beyond(self, projection: str, keep: int) -> list[asyncpg.Record]:
        """Retired generations beyond the newest `keep`: (generation, physical_table, child_tables)."""
        return list(await self.conn.fetch(self._sql(_RETIRED_BEYOND), projection, keep))

    async def mark_dropped(self, projection: str, generation: int) -> None:
        await self.conn.execute(self._sql(_MARK_DROPPED), projection, generation)
        await self.conn.execute(self._sql(_DROP_GAPS), projection, generation)

    async def end_building(self, projection: str, generation: int, reason: str) -> asyncpg.Record | None:
        """Mark a building generation cancelled (`reason` "cancelled") or failed (the error); its (physical_table,
        sandbox, child_tables), or None when it was not building."""
        state = "cancelled" if reason == "cancelled" else "failed"
        await self.conn.execute(self._sql(_DROP_GAPS), projection, generation)
        return await self.conn.fetchrow(self._sql(_END_BUILDING), projection, generation, state, reason)

    async def sandbox_of(self, projection: str, generation: int) -> str:
        """The sandbox label of a generation ('' for a live one, or one that no longer exists)."""
        return str(await self.conn.fetchval(self._sql(_SANDBOX_OF), projection, generation) or "")

    async def generations(self, projection: str) -> list[dict[str, Any]]:
        """A projection's live generations, newest first, with what `rehydrate generations` shows (`tables`: each
        one's tables, its child tables' after its own)."""
        found = [dict(row) for row in await self.conn.fetch(self._sql(_LIST_GENERATIONS), projection)]
        for row in found:
            children = [physical_name(child, row["generation"]) for child in row.pop("child_tables") or ()]
            row["tables"] = [row["physical_table"], *children]
        return found

    # -- lane checkpoints ----------------------------------------------------------------------------------

    async def insert_lanes(
        self, projection: str, generation: int, lanes: int, boundaries: Sequence[str] | None
    ) -> None:
        """One checkpoint per lane. With `boundaries` (`lanes - 1` stream ids, ascending), lane i holds the streams
        from boundary i-1 up to boundary i; without, lanes split the keys by hash."""
        if boundaries is None:
            await self.conn.execute(self._sql(_INSERT_HASH_LANES), projection, generation, lanes)
            return
        bounds: list[str | None] = [None, *boundaries, None]
        await self.conn.executemany(
            self._sql(_INSERT_RANGE_LANE),
            [(projection, generation, lane, bounds[lane], bounds[lane + 1]) for lane in range(lanes)],
        )

    async def insert_log_lanes(
        self,
        projection: str,
        generation: int,
        starts: Sequence[int],
        targets: Sequence[int | None],
        partial: bool,
        names: Sequence[str | None] | None = None,
        parents: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """One lane per partition of a log: from its `starts` offset to its `targets` offset (None: a partition whose
        end is not known at plan time, read up to the plan's time); `names`, the partitions' ids in the log when their
        numbers are not; `parents`, the lanes each waits for. `partial`: the log no longer held its whole history, and
        whoever started the build accepted that."""
        await self.conn.executemany(
            self._sql(_INSERT_LOG_LANE),
            [
                (
                    projection,
                    generation,
                    lane,
                    start,
                    target,
                    None if names is None else names[lane],
                    [] if parents is None else list(parents[lane]),
                )
                for lane, (start, target) in enumerate(zip(starts, targets, strict=True))
            ],
        )
        if partial:
            await self.conn.execute(self._sql(_MARK_PARTIAL), projection, generation)

    async def log_lanes(self, projection: str, generation: int) -> list[asyncpg.Record]:
        """(lane, position, target, events_applied, done, log_cursor, partition_name, parent_lanes) of each lane of a
        log's generation, in partition order."""
        return list(await self.conn.fetch(self._sql(_LOG_LANES), projection, generation))

    async def lane_bounds(self, projection: str, generation: int) -> list[tuple[str | None, str | None]] | None:
        """The stream ranges of a generation's lanes, or None when its lanes split by hash."""
        rows = await self.conn.fetch(self._sql(_LANE_BOUNDS), projection, generation)
        if not rows or not rows[0][0]:
            return None
        return [(row[1], row[2]) for row in rows]

    async def lanes(self, projection: str, generation: int) -> list[tuple[int, int, int, bool]]:
        """(lane, position, events applied, done) of each lane."""
        rows = await self.conn.fetch(self._sql(_LANES), projection, generation)
        return [(row[0], row[1], row[2], row[3]) for row in rows]

    async def lock_lane(self, projection: str, generation: int, lane: int) -> asyncpg.Record | None:
        """A lane's checkpoint and its generation's state, cut-off and fingerprint; the lane locked (_LOCK_LANE)."""
        return await self.conn.fetchrow(self._sql(_LOCK_LANE), projection, generation, lane)

    async def save_lane(
        self,
        projection: str,
        generation: int,
        lane: int,
        position: int,
        applied: int,
        done: bool,
        after: tuple[str, int] | None = None,
        cursor: str | None = None,
    ) -> None:
        """Move a lane's checkpoint: `position` for a hash lane, `after` (stream id, version) for a stream lane;
        `position` and the log's `cursor` for a log's lane."""
        await self.conn.execute(
            self._sql(_SAVE_LANE),
            projection,
            generation,
            lane,
            position,
            applied,
            done,
            None if after is None else after[0],
            None if after is None else after[1],
            cursor,
        )

    # -- projections ---------------------------------------------------------------------------------------

    async def active_generation_or_none(self, projection: str) -> int | None:
        found = await self.conn.fetchval(self._sql(_ACTIVE_GENERATION), projection)
        return None if found is None else int(found)

    async def active_generation(self, projection: str) -> int:
        """The projection's active generation; a UserError saying how to build one when it has none."""
        generation = await self.active_generation_or_none(projection)
        if generation is None:
            raise UserError(
                f"projection {projection!r} has no active generation",
                fix=f"build one: `rehydrate replay start {projection}`",
            )
        return generation

    async def set_tail(self, projection: str, *, enabled: bool) -> bool:
        """Record whether the projection's tail should run; False when the projection was never built."""
        return bool(await self.conn.fetchval(self._sql(_SET_TAIL), projection, enabled))

    async def set_tail_error(self, projection: str, error: str | None) -> None:
        await self.conn.execute(self._sql(_SET_TAIL_ERROR), projection, error)

    async def set_tail_code(self, projection: str, fingerprint: str) -> None:
        """Record the fingerprint of the code the projection's tail applies new events with."""
        await self.conn.execute(self._sql(_SET_TAIL_CODE), projection, fingerprint)

    async def tails_to_run(self) -> list[str]:
        """Projections with an active generation whose tail should run."""
        return [row[0] for row in await self.conn.fetch(self._sql(_TAILS_TO_RUN))]

    async def projections(self) -> dict[str, dict[str, Any]]:
        """Per projection ever built: its active generation, checkpoint and tail state, and its latest generation."""
        return {row["name"]: dict(row) for row in await self.conn.fetch(self._sql(_PROJECTIONS))}

    # -- dead letters --------------------------------------------------------------------------------------

    async def dead_letter_count(self, projection: str, generation: int) -> int:
        return int(await self.conn.fetchval(self._sql(_COUNT_DEAD_LETTERS), projection, generation))

    async def parked_key_count(self, projection: str, generation: int) -> int:
        return int(await self.conn.fetchval(self._sql(_COUNT_PARKED_KEYS), projection, generation))

    async def dead_letters(self, projection: str, generation: int, limit: int = 1000) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(self._sql(_LIST_DEAD_LETTERS), projection, generation, limit)
        return [dict(row) for row in rows]

    async def latest_generation_with_dead_letters(self, projection: str) -> int | None:
        found = await self.conn.fetchval(self._sql(_LATEST_WITH_DEAD_LETTERS), projection)
        return None if found is None else int(found)

    async def parked_keys(self, projection: str, generation: int, keys: Sequence[str]) -> list[str]:
        """Of `keys` (as text), those with dead letters in the generation."""
        rows = await self.conn.fetch(self._sql(_PARKED_KEYS), projection, generation, list(keys))
        return [row[0] for row in rows]

    async def take_parked_keys(self, projection: str, generation: int) -> list[str]:
        """Delete the generation's dead letters and return their keys (sorted, each once)."""
        rows = await self.conn.fetch(self._sql(_TAKE_PARKED_KEYS), projection, generation)
        return sorted({row[0] for row in rows})

    async def forget_dead_letters(self, projection: str, generation: int, keys: Sequence[str]) -> None:
        """Delete the dead letters of `keys` (as text) in a generation: their rows are being rebuilt."""
        await self.conn.execute(self._sql(_FORGET_DEAD_LETTERS), projection, generation, list(keys))

    async def park(self, projection: str, dead_letters: Sequence[DeadLetter]) -> None:
        """Store dead letters: (generation, position, stream id, stream version, type, key, error) each."""
        if dead_letters:
            await self.conn.executemany(self._sql(_PARK), [(projection, *letter) for letter in dead_letters])

    # -- gaps of settle-window sources ---------------------------------------------------------------------

    async def add_gaps(
        self, projection: str, generation: int, gaps: Sequence[tuple[int, int]], seen_at: datetime | None = None
    ) -> None:
        """Record runs (low, high) of empty positions the generation's checkpoint passed (seen now, or `seen_at`)."""
        if gaps:
            lows, highs = zip(*gaps, strict=True)
            await self.conn.execute(self._sql(_ADD_GAPS), projection, generation, list(lows), list(highs), seen_at)

    async def gaps(self, projection: str, generation: int) -> list[asyncpg.Record]:
        """The generation's recorded gaps, (low, high, seen_at) in order."""
        return list(await self.conn.fetch(self._sql(_GAPS), projection, generation))

    async def forget_gaps(self, projection: str, generation: int, horizon_seconds: float) -> None:
        """Forget the gaps seen longer ago than the horizon (once they were looked in a last time)."""
        await self.conn.execute(self._sql(_FORGET_GAPS), projection, generation, horizon_seconds)

    async def fill_gaps(self, projection: str, generation: int, lows: Sequence[int]) -> None:
        """Forget the gaps starting at `lows` (the caller records what is still empty of them)."""
        await self.conn.execute(self._sql(_FILL_GAPS), projection, generation, list(lows))

    async def drop_older_sandbox_builds(self, projection: str, sandbox: str, generation: int) -> list[asyncpg.Record]:
        """Mark the label's other finished builds of the projection dropped; returns them (generation, physical_table,
        child_tables)."""
        return list(await self.conn.fetch(self._sql(_DROP_OLDER_SANDBOX_BUILDS), projection, sandbox, generation))

    async def mark_sandbox(self, projection: str, generation: int) -> None:
        await self.conn.execute(self._sql(_MARK_SANDBOX), projection, generation)

    async def sandboxes(self) -> list[dict[str, Any]]:
        return [dict(row) for row in await self.conn.fetch(self._sql(_SANDBOXES))]

    async def building_in_sandbox(self, label: str) -> str | None:
        """A projection still building in sandbox `label`, if any."""
        found = await self.conn.fetchval(self._sql(_BUILDING_IN_SANDBOX), label)
        return None if found is None else str(found)

    async def forget_sandbox(self, label: str) -> int:
        """Delete the sandbox's generations and their dead letters; returns how many generations."""
        return int(await self.conn.fetchval(self._sql(_FORGET_SANDBOX), label))

    # -- snapshot rebuilds ---------------------------------------------------------------------------------

    async def start_partitions(self, rebuild_id: str, aggregate_type: str, partitions: int) -> list[asyncpg.Record]:
        """Create a rebuild's partition cursors (kept when they exist: a retried plan) and return them all; forget
        the cursors of the type's finished (or abandoned) rebuilds."""
        await self.conn.execute(self._sql(_FORGET_OLD_REBUILDS), rebuild_id, aggregate_type)
        await self.conn.execute(self._sql(_INSERT_PARTITIONS), rebuild_id, aggregate_type, partitions)
        return list(await self.conn.fetch(self._sql(_PARTITIONS), rebuild_id))

    async def lock_partition(self, rebuild_id: str, partition: int) -> asyncpg.Record | None:
        return await self.conn.fetchrow(self._sql(_LOCK_PARTITION), rebuild_id, partition)

    async def save_partition(
        self, rebuild_id: str, partition: int, *, after_stream: str | None, streams_done: int, done: bool
    ) -> None:
        await self.conn.execute(self._sql(_SAVE_PARTITION), rebuild_id, partition, after_stream, streams_done, done)
