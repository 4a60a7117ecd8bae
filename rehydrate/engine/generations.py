"""A projection's generations, from first table to last drop: create one, apply its catch-up, swap it in, keep it
current (the tail's batches), roll back to a retained one, rebuild parked keys, publish and drop sandboxes.

Each step is one transaction on one connection, across the control tables (`Catalog`), the read models
(`ReadModels`) and the events (`EventStore`); the steps that write the active generation hold the projection's lock,
so the tail, a swap, a rollback and a verify's comparison never interleave.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import asyncpg

from rehydrate.core.errors import UserError, WrongWorker
from rehydrate.engine.apply import Parking, apply_events
from rehydrate.engine.catalog import Catalog
from rehydrate.engine.projections import Projection, physical_name
from rehydrate.engine.readmodels import GenerationTables, ReadModels, sandbox_schema, table_schema
from rehydrate.models import SwapResult, VerifyResult
from rehydrate.sources.events import Cutoff, Event
from rehydrate.sources.log import LogSource, check_lanes, check_partitions
from rehydrate.sources.pools import Sources
from rehydrate.sources.reading import SLICE, EventSource
from rehydrate.sources.store import EventStore

log = logging.getLogger("rehydrate.generations")

# A swap (or rollback) waiting for readers gives up this soon, and tries again. Below Postgres's deadlock_timeout
# (1 s by default): a reader that locks a projection's views in another order than the swap (a join of its tables)
# waits for the swap to give up, instead of being the deadlock detector's victim.
SWAP_LOCK_TIMEOUT_MS = 500
# Once a swap (or rollback) holds the views' locks, readers queue behind it until it commits: a few short statements
# later, milliseconds when all is well. If the worker goes silent in between (frozen, or cut off from the server with
# no FIN or RST arriving), Postgres ends its session after this long idle, so readers wait at most about this much
# and the swap's retry finds the locks free. Long enough that a worker whose event loop is held up for a moment (a
# heavy fold of another activity on a loaded machine) is not cut; a cut swap is retried, it is never half done.
SWAP_IDLE_TIMEOUT_MS = 5_000
ROLLBACK_PATIENCE_SECONDS = 10.0


def other_code(projection: Projection, generation: int, planned_with: str) -> WrongWorker:
    """This worker's code for `projection` is not what a building generation is built with: another worker's task."""
    return WrongWorker(
        f"its code for projection {projection.name!r} (fingerprint {projection.fingerprint}) is not the code "
        f"generation {generation} is built with (fingerprint {planned_with})"
    )


def check_tables(projection: Projection, generation: int, row: asyncpg.Record) -> None:
    """Refuse to write a generation built with other child tables than the code has (a UserError saying to replay)."""
    children = [shape.name for shape in projection.children]
    if list(row["child_tables"]) != children:
        raise UserError(
            f"generation {generation} of {projection.name!r} was built with the child tables "
            f"{list(row['child_tables']) or 'none'}; the code has {children or 'none'}",
            fix=f"replay it with this code: `rehydrate replay start {projection.name}`",
        )


class Generations:
    """The generations of every projection, on one connection: the events in `store`, read models in `read_schema`."""

    def __init__(self, conn: asyncpg.Connection, store: EventStore | Sources, read_schema: str) -> None:
        self.conn = conn
        self.sources = store if isinstance(store, Sources) else Sources(store)
        self.store = self.sources.own
        self.read_schema = read_schema
        self.catalog = Catalog(conn, self.store.schema)

    def read_models(self, sandbox: str = "") -> ReadModels:
        """The read models of the live schema, or of a sandbox."""
        return ReadModels(self.conn, table_schema(self.read_schema, sandbox))

    # -- building --------------------------------------------------------------------------------------

    async def create(
        self,
        projection: Projection,
        *,
        mark: int,
        lanes: int,
        chunk_size: int,
        workflow_id: str,
        run_id: str,
        boundaries: Sequence[str] | None = None,
        sandbox: str = "",
        cutoff: Cutoff | None = None,
        gaps: Sequence[tuple[int, int]] = (),
        partitions: Sequence[tuple[int, int | None]] | None = None,
        partial_history: bool = False,
        partition_names: Sequence[str | None] | None = None,
        parent_lanes: Sequence[Sequence[int]] | None = None,
    ) -> asyncpg.Record:
        """Register a new building generation, create its tables (no secondary indexes) and its lane checkpoints, and
        record the `gaps` below its mark (a settle-window source's); returns its row as
        `Catalog.building_generation` reads it. A log's generation has a lane per partition, each read from its
        first offset to its end at plan time: `partitions`, (first, end) in partition order (end None: not known at
        plan time, read up to the plan's time), with their ids in the log (`partition_names`) and the lanes each waits
        for (`parent_lanes`) when the log has them."""
        tables = self.read_models(sandbox)
        async with self.conn.transaction():
            await tables.ensure_schema()
            number = await self.catalog.insert_generation(
                projection=projection.name,
                version=projection.version,
                fingerprint=projection.fingerprint,
                physical_table=projection.table.physical_name,
                mark=mark,
                lanes=lanes,
                chunk_size=chunk_size,
                workflow_id=workflow_id,
                run_id=run_id,
                sandbox=sandbox,
                to_position=None if cutoff is None else cutoff.position,
                as_of=None if cutoff is None else cutoff.as_of,
                child_tables=[shape.name for shape in projection.children],
            )
            await tables.create_tables(projection, number)
            if partitions is not None:
                starts, ends = [p[0] for p in partitions], [p[1] for p in partitions]
                await self.catalog.insert_log_lanes(
                    projection.name, number, starts, ends, partial_history, partition_names, parent_lanes
                )
            else:
                await self.catalog.insert_lanes(projection.name, number, lanes, boundaries)
            await self.catalog.add_gaps(projection.name, number, gaps)
        row = await self.catalog.building_generation(projection.name, sandbox)
        assert row is not None
        return row

    async def index(self, projection: Projection, generation: int) -> int:
        """Build the secondary indexes after the load (faster than keeping them row by row) and record the build's
        counts; returns the row count."""
        row = await self.catalog.generation(projection.name, generation)
        if row["fingerprint"] != projection.fingerprint:
            raise other_code(projection, generation, row["fingerprint"])
        tables = self.read_models(row["sandbox"])
        await tables.create_all_indexes(projection, generation)
        rows = await tables.count_rows(row["physical_table"])
        await self.catalog.mark_built(projection.name, generation, rows)
        return rows

    async def analyze(self, projection: str, generation: int) -> None:
        """ANALYZE the generation's tables, unless a cancel or failure dropped them meanwhile (any worker may: it needs
        neither the projection's code nor its tables' shapes)."""
        row = await self.catalog.generation(projection, generation)
        if row["state"] in ("building", "sandbox", "active"):
            tables = self.read_models(row["sandbox"])
            await tables.analyze(row["physical_table"])
            for name in row["child_tables"]:
                await tables.analyze(physical_name(name, generation))

    async def end(self, projection: str, generation: int, reason: str) -> None:
        """Mark a building generation cancelled ("cancelled") or failed (the error) and drop its tables. Never touches
        an active one."""
        async with self.conn.transaction():
            ended = await self.catalog.end_building(projection, generation, reason)
            if ended is not None:
                await self.read_models(ended["sandbox"]).drop_tables(
                    ended["physical_table"], ended["child_tables"], generation
                )

    # -- catching up, swapping, keeping current ----------------------------------------------------------

    async def catch_up(
        self,
        projection: Projection,
        generation: int,
        *,
        max_events: int | None = None,
        to_mark: int | None = None,
        upto: Sequence[int] | None = None,
    ) -> tuple[int, int]:
        """Move a generation's checkpoint to the current high-water mark (or `to_mark`, or, with `max_events`, to an
        earlier mark that bounds the batch), applying the delta: (events applied, the new checkpoint). Runs in the
        caller's transaction. A log's generation moves each lane to its partition's end (or to `upto`'s offset)."""
        row = await self.catalog.lock_generation(projection.name, generation)
        if row["state"] not in ("building", "active", "sandbox"):
            raise UserError(
                f"generation {generation} of {projection.name!r} is {row['state']}", fix="start a new replay"
            )
        if row["state"] == "building" and row["fingerprint"] != projection.fingerprint:
            raise other_code(projection, generation, row["fingerprint"])
        check_tables(projection, generation, row)
        checkpoint = row["checkpoint"]
        opened = await self.sources.any(projection.event_source)
        table = self.read_models(row["sandbox"]).tables(projection, generation, row["physical_table"])
        if isinstance(opened, LogSource):
            return await self._catch_up_log(projection, generation, checkpoint, table, opened, max_events, upto)
        source = opened
        late: list[Event] = []
        refold: list[str] = []
        keys_events: list[Event] = []
        async with source.reading(self.conn) as reading:
            mark = await source.high_water_mark(reading) if to_mark is None else to_mark
            if mark <= checkpoint and not source.audits_gaps:
                return 0, checkpoint
            events: list[Event] = []
            passed: list[tuple[int, int]] = []
            if mark > checkpoint:
                if max_events is not None:
                    mark = await source.bounded_mark(reading, from_mark=checkpoint, to_mark=mark, max_events=max_events)
                if source.audits_gaps:
                    # Before the delta is read: an event that commits in between is then both read and in a
                    # recorded gap (its key is rebuilt once more, harmlessly), never in neither.
                    passed = await source.gaps(reading, checkpoint, mark)
                events = await source.read_delta(
                    reading, from_mark=checkpoint, to_mark=mark, types=projection.event_types
                )
            if source.audits_gaps:
                late = await self._audit_gaps(projection, generation, source, reading, passed)
                refold = await self._keys_of(projection, generation, late)
                keys_events = (
                    await source.read_keys(
                        reading,
                        key=projection.key,
                        keys=refold,
                        mark=max(mark, checkpoint),
                        types=projection.event_types,
                    )
                    if refold
                    else []
                )
        applied = await apply_events(projection, table, events, Parking(self.catalog, generation))
        if mark > checkpoint:
            await self.catalog.move_checkpoint(projection.name, generation, mark, applied.events)
        if late:
            # After the delta: the keys' rows are rebuilt from every event below the new checkpoint, the late ones
            # in their places among them.
            if refold:
                await table.delete_as_text(refold)
                await apply_events(projection, table, keys_events, Parking(self.catalog, generation))
            log.warning(
                "projection %s, generation %s: %d event(s) of source %s committed after the settle window, below the "
                "checkpoint (positions %s); found by the gap audit, their %d key(s) rebuilt",
                projection.name,
                generation,
                len(late),
                source.name,
                ", ".join(str(e.global_position) for e in late[:20]),
                len(refold),
            )
        return applied.events, max(mark, checkpoint)

    async def _catch_up_log(
        self,
        projection: Projection,
        generation: int,
        checkpoint: int,
        table: GenerationTables,
        log: LogSource,
        max_events: int | None,
        upto: Sequence[int] | None,
    ) -> tuple[int, int]:
        """Read each partition from its lane's position to its end now (or to `upto`), apply, and move the lanes with
        their cursors; at most `max_events`, starting from a partition that turns with the checkpoint, so that a busy
        partition does not starve the others. The checkpoint is the sum of the lanes' positions.

        A partition's parents need no turn before it here: the build started a lane only once its parents' lanes had
        read them to their end, and a reshard since then is refused (`check_lanes`)."""
        lanes = await self.catalog.log_lanes(projection.name, generation)
        ends: dict[int, int | None] = (
            check_lanes(log.name, await log.ranges(), lanes) if upto is None else dict(enumerate(upto))
        )
        budget = max_events if max_events is not None else 1 << 62
        applied = 0
        positions = [lane["position"] for lane in lanes]
        first = checkpoint % len(lanes) if lanes else 0
        parking = Parking(self.catalog, generation)
        async with log.reader() as reader:
            for lane in [*lanes[first:], *lanes[:first]]:
                number, start = lane["lane"], lane["position"]
                if number not in ends or budget <= 0:
                    continue
                end = ends[number]
                if end is not None and start >= end:
                    continue
                moved, position, cursor = 0, start, lane["log_cursor"]
                async for read in log.batches(
                    reader, number, start, end, budget, SLICE, cursor=cursor, name=lane["partition_name"]
                ):
                    moved += (await apply_events(projection, table, read.events, parking)).events
                    budget -= len(read.events)
                    position, cursor = read.position, read.cursor
                await self.catalog.save_lane(
                    projection.name, generation, number, position, lane["events_applied"] + moved, True, cursor=cursor
                )
                positions[number] = position
                applied += moved
        mark = sum(positions)
        if mark != checkpoint:
            await self.catalog.move_checkpoint(projection.name, generation, mark, applied)
        return applied, mark

    async def log_lag(self, projection: Projection, generation: int, log: LogSource) -> int | None:
        """The events (offsets) a log's generation has still to read, over its partitions; None when the log cannot
        tell without reading them (Kinesis)."""
        return await log.lag(await self.catalog.log_lanes(projection.name, generation))

    async def _audit_gaps(
        self,
        projection: Projection,
        generation: int,
        source: EventSource,
        reading: asyncpg.Connection,
        passed: Sequence[tuple[int, int]],
    ) -> list[Event]:
        """Return the events that committed since into the gaps recorded before (their gaps narrowed to what is
        still empty), forget the gaps older than the source's horizon once looked in, and record the gaps the
        checkpoint `passed` now."""
        recorded = await self.catalog.gaps(projection.name, generation)
        late = await source.read_ranges(reading, [(gap["low"], gap["high"]) for gap in recorded]) if recorded else []
        if late:
            filled = {event.global_position for event in late}
            touched = [gap for gap in recorded if any(gap["low"] <= p <= gap["high"] for p in filled)]
            await self.catalog.fill_gaps(projection.name, generation, [gap["low"] for gap in touched])
            for gap in touched:
                inside = sorted(p for p in filled if gap["low"] <= p <= gap["high"])
                await self.catalog.add_gaps(
                    projection.name, generation, _unfilled(gap["low"], gap["high"], inside), gap["seen_at"]
                )
        if recorded:
            await self.catalog.forget_gaps(projection.name, generation, source.mapping.gap_horizon_seconds)
        await self.catalog.add_gaps(projection.name, generation, passed)
        return late

    async def _keys_of(self, projection: Projection, generation: int, late: Sequence[Event]) -> list[str]:
        """The keys (as text) of the late events the projection handles, but for keys parked already (their
        retry rebuilds them from their whole history anyway)."""
        keys: set[str] = set()
        for event in late:
            if event.type not in projection.handlers:
                continue
            key = event.stream_id if projection.key.field is None else event.data.get(projection.key.field)
            if key is not None:
                keys.add(str(key))
        if not keys:
            return []
        parked = set(await self.catalog.parked_keys(projection.name, generation, sorted(keys)))
        return sorted(keys - parked)

    async def swap(self, projection: Projection, generation: int, *, allow_dead_letters: bool = False) -> SwapResult:
        """Apply the last delta and make `generation` the active one, atomically. Idempotent on retry; gives up
        with asyncpg's LockNotAvailableError when readers hold the view longer than SWAP_LOCK_TIMEOUT_MS.

        A generation that parked events (on_error="park") is refused unless `allow_dead_letters`."""
        async with self.conn.transaction():
            await self.catalog.lock_projection(projection.name)
            row = await self.catalog.lock_generation(projection.name, generation)
            if row["state"] == "active":
                # This swap committed in an earlier attempt whose result was lost: report what that attempt did.
                return SwapResult(
                    generation,
                    row["replaced_generation"],
                    row["swap_delta"] or 0,
                    0.0,
                    row["rows_count"] or 0,
                    committed_before=True,
                )
            previous = await self.catalog.active_generation_or_none(projection.name)
            final_delta, _ = await self.catch_up(projection, generation)
            parked = await self.catalog.dead_letter_count(projection.name, generation)
            if parked and not allow_dead_letters:
                raise UserError(
                    f"generation {generation} of {projection.name!r} parked {parked} event(s) and was not swapped in",
                    fix=f"see them with `rehydrate dead-letters list {projection.name} --generation {generation}`; "
                    f"fix the handler and replay again, or replay with --allow-dead-letters and then "
                    f"`rehydrate dead-letters retry {projection.name}` after the fix",
                )
            tables = self.read_models()
            rows = await tables.count_rows(row["physical_table"])
            started = time.perf_counter()
            await tables.point_views(
                projection,
                generation,
                row["physical_table"],
                lock_timeout_ms=SWAP_LOCK_TIMEOUT_MS,
                idle_timeout_ms=SWAP_IDLE_TIMEOUT_MS,
            )
            await self.catalog.activate(
                projection.name,
                generation,
                version=projection.version,
                fingerprint=projection.fingerprint,
                rows=rows,
                swapped=True,
                replaced=previous,
                delta=final_delta,
            )
        lock_ms = (time.perf_counter() - started) * 1000
        return SwapResult(generation, previous, final_delta, lock_ms, rows)

    async def retire_old(self, projection: Projection, keep: int) -> list[int]:
        """Drop the tables of retired generations beyond the newest `keep`; returns their numbers."""
        tables = self.read_models()
        rows = await self.catalog.retired_beyond(projection.name, keep)
        for row in rows:
            async with self.conn.transaction():
                await tables.drop_tables(row["physical_table"], row["child_tables"], row["generation"])
                await self.catalog.mark_dropped(projection.name, row["generation"])
        return [row["generation"] for row in rows]

    async def tail_batch(self, projection: Projection, max_events: int) -> tuple[int, int, int] | None:
        """Apply the next batch of new events to the active generation: (generation, events applied, checkpoint).

        Holds the projection's lock for the batch, so a swap waits for it and the next batch reads the active
        generation afresh: after a swap the tail goes on from exactly where the new generation ends. None when the
        projection has no active generation.
        """
        async with self.conn.transaction():
            await self.catalog.lock_projection(projection.name)
            generation = await self.catalog.active_generation_or_none(projection.name)
            if generation is None:
                return None
            applied, mark = await self.catch_up(projection, generation, max_events=max_events)
        return generation, applied, mark

    # -- operating -------------------------------------------------------------------------------------

    async def rollback(self, projection: Projection, to: int | None = None) -> tuple[int, int]:
        """Make a retained (retired, tables kept) generation active again, at once; returns (from, to).

        The same view swap as `swap`, under the same lock, tried again while readers hold the views (up to
        ROLLBACK_PATIENCE_SECONDS). The rolled-back generation is not caught up here: it goes on from its own
        checkpoint, caught up by the tail (or by `catch_up`) like any active generation."""
        deadline = time.monotonic() + ROLLBACK_PATIENCE_SECONDS
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._rollback_once(projection, to)
            except asyncpg.LockNotAvailableError:
                if time.monotonic() > deadline:
                    raise UserError(
                        f"readers held the views of {projection.name!r} for {ROLLBACK_PATIENCE_SECONDS:.0f} s; the "
                        "rollback did not happen",
                        fix="run it again; look for long transactions on the read model (pg_stat_activity)",
                    ) from None
                await asyncio.sleep(min(0.1 * attempt, 1.0))

    async def _rollback_once(self, projection: Projection, to: int | None) -> tuple[int, int]:
        async with self.conn.transaction():
            await self.catalog.lock_projection(projection.name)
            current = await self.catalog.active_generation(projection.name)
            retained = await self.catalog.retained(projection.name)
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
            tables = self.read_models()
            number = int(chosen["generation"])
            children = [shape.name for shape in projection.children]
            if list(chosen["child_tables"]) != children:
                raise UserError(
                    f"generation {number} of {projection.name!r} has the child tables "
                    f"{list(chosen['child_tables']) or 'none'}, the projection now has {children or 'none'}: a "
                    "rollback would leave readers a mix of generations",
                    fix="deploy the code that generation was built with and replay, or replay with the current code",
                )
            for physical in [chosen["physical_table"], *(physical_name(name, number) for name in children)]:
                if not await tables.table_exists(physical):
                    raise UserError(
                        f"table {physical} of generation {number} of {projection.name!r} is gone",
                        fix="it was dropped by hand; start a new replay instead",
                    )
            await tables.point_views(
                projection,
                number,
                chosen["physical_table"],
                lock_timeout_ms=SWAP_LOCK_TIMEOUT_MS,
                idle_timeout_ms=SWAP_IDLE_TIMEOUT_MS,
            )
            await self.catalog.activate(
                projection.name,
                chosen["generation"],
                version=chosen["version"],
                fingerprint=chosen["fingerprint"],
                rows=None,
                swapped=False,
            )
        return current, int(chosen["generation"])

    async def retry_dead_letters(self, projection: Projection) -> tuple[int, int]:
        """Rebuild every parked key of the active generation from its whole history, with the current handlers.

        Under the projection's lock, in one transaction: the keys' dead letters and rows are deleted, their events up
        to the generation's checkpoint (the same set a clean build at that checkpoint reads) are folded from nothing,
        and the rows written. A key that fails again is parked again. Returns (keys retried, keys still parked)."""
        async with self.conn.transaction():
            await self.catalog.lock_projection(projection.name)
            generation = await self.catalog.active_generation(projection.name)
            row = await self.catalog.lock_generation(projection.name, generation)
            keys = await self.catalog.take_parked_keys(projection.name, generation)
            if not keys:
                return 0, 0
            table = self.read_models().tables(projection, generation, row["physical_table"])
            await table.delete_as_text(keys)
            opened = await self.sources.any(projection.event_source)
            if isinstance(opened, LogSource):
                events = await opened.read_keys(keys, await self.catalog.log_lanes(projection.name, generation))
            else:
                async with opened.reading(self.conn) as reading:
                    events = await opened.read_keys(
                        reading, key=projection.key, keys=keys, mark=row["checkpoint"], types=projection.event_types
                    )
            await apply_events(projection, table, events, Parking(self.catalog, generation))
            still = await self.catalog.parked_key_count(projection.name, generation)
        return len(keys), still

    async def compare_with_live(
        self, projection: Projection, label: str, sandbox_generation: int, show: int
    ) -> VerifyResult:
        """Compare the sandbox build `sandbox_generation` (built at the live checkpoint C read earlier) with the live
        generation, at one point.

        The live generation moves with the tail, so under the projection's lock (the tail waits) the sandbox is
        caught up from C to the live checkpoint of that moment with exactly the delta the tail applied, and both
        tables are hashed in the same transaction. Everything happens in that transaction: a retry starts over."""
        async with self.conn.transaction():
            await self.catalog.lock_projection(projection.name)
            live = await self.catalog.active_generation(projection.name)
            live_row = await self.catalog.generation(projection.name, live)
            check_tables(projection, live, live_row)
            sandbox_row = await self.catalog.generation(projection.name, sandbox_generation)
            if live_row["checkpoint"] < sandbox_row["checkpoint"]:
                # A rollback during the rebuild put back a generation that is behind the mark the sandbox was built
                # at: comparing them would report the events in between as drift.
                raise UserError(
                    f"the live generation of {projection.name!r} (g{live}, checkpoint {live_row['checkpoint']}) is "
                    f"behind the rebuild's mark {sandbox_row['checkpoint']} (a rollback while verifying?)",
                    fix="run the verify again",
                )
            opened = await self.sources.any(projection.event_source)
            if isinstance(opened, LogSource):
                live_lanes = await self.catalog.log_lanes(projection.name, live)
                rebuilt_lanes = await self.catalog.log_lanes(projection.name, sandbox_generation)
                check_partitions(opened.name, len(live_lanes), len(rebuilt_lanes))
                if [lane["partition_name"] for lane in live_lanes] != [
                    lane["partition_name"] for lane in rebuilt_lanes
                ]:
                    raise UserError(
                        f"the live generation of {projection.name!r} (g{live}) and the rebuild read other partitions",
                        fix="run the verify again",
                    )
                if any(a["position"] < b["position"] for a, b in zip(live_lanes, rebuilt_lanes, strict=True)):
                    raise UserError(
                        f"the live generation of {projection.name!r} (g{live}) is behind the rebuild's offsets (a "
                        "rollback while verifying?)",
                        fix="run the verify again",
                    )
                await self.catch_up(projection, sandbox_generation, upto=[lane["position"] for lane in live_lanes])
            elif live_row["checkpoint"] > sandbox_row["checkpoint"]:
                await self.catch_up(projection, sandbox_generation, to_mark=live_row["checkpoint"])
            count, first, live_rows, rebuilt_rows = await self.read_models().compare(
                projection,
                self.read_models().tables(projection, live, live_row["physical_table"]),
                self.read_models(label).tables(projection, sandbox_generation, sandbox_row["physical_table"]),
                show,
            )
        return VerifyResult(
            projection.name,
            live,
            sandbox_generation,
            int(live_row["checkpoint"]),
            live_rows,
            rebuilt_rows,
            count,
            first,
            stale=live_row["fingerprint"] != projection.fingerprint,
        )

    # -- sandboxes -------------------------------------------------------------------------------------

    async def publish_sandbox(self, projection: Projection, generation: int) -> int:
        """Point the sandbox's own view at a finished sandbox build and drop the label's older build of the
        projection. Returns the events the build parked."""
        async with self.conn.transaction():
            row = await self.catalog.lock_generation(projection.name, generation)
            if row["fingerprint"] != projection.fingerprint:
                raise other_code(projection, generation, row["fingerprint"])
            tables = self.read_models(row["sandbox"])
            older = await self.catalog.drop_older_sandbox_builds(projection.name, row["sandbox"], generation)
            await tables.point_views(projection, generation, row["physical_table"])
            for build in older:
                await tables.drop_tables(build["physical_table"], build["child_tables"], build["generation"])
            await self.catalog.mark_sandbox(projection.name, generation)
            return await self.catalog.dead_letter_count(projection.name, generation)

    async def drop_sandbox(self, label: str, *, missing_ok: bool = False) -> int:
        """Drop a sandbox's schema and forget its builds; refused while one of them is still building, and (unless
        `missing_ok`) when there is no such sandbox. Returns how many builds it forgot."""
        tables = ReadModels(self.conn, sandbox_schema(label))
        async with self.conn.transaction():
            building = await self.catalog.building_in_sandbox(label)
            if building is not None:
                raise UserError(
                    f"sandbox {label!r} is still building {building!r}",
                    fix=f"wait for it, or cancel it with `rehydrate replay cancel {building} --sandbox {label}`",
                )
            exists = await tables.schema_exists()
            gone = await self.catalog.forget_sandbox(label)
            if not exists and not gone and not missing_ok:
                raise UserError(f"there is no sandbox {label!r}", fix="see them with `rehydrate sandbox list`")
            await tables.drop_schema()
        return gone


def _unfilled(low: int, high: int, filled: Sequence[int]) -> list[tuple[int, int]]:
    """The runs of [low, high] left empty once the sorted positions `filled` hold events."""
    runs: list[tuple[int, int]] = []
    for position in filled:
        if position > low:
            runs.append((low, position - 1))
        low = position + 1
    if low <= high:
        runs.append((low, high))
    return runs
