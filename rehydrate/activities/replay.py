"""The replay's activities: plan, apply one chunk of a lane, finish the tables, catch up, swap, drop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from rehydrate import catalog, logs, metrics, search_attributes, tracing
from rehydrate.apply import Folding, Parking
from rehydrate.errors import UserError
from rehydrate.models import (
    CatchUpInput,
    CatchUpResult,
    ChunkInput,
    ChunkResult,
    GenerationRef,
    LaneState,
    Plan,
    PlanInput,
    SwapResult,
)
from rehydrate.projections import Projection, Registry
from rehydrate.settings import Settings, lanes_for
from rehydrate.store import Cutoff, EventStore, is_held

log = logging.getLogger("rehydrate.activities")
T = TypeVar("T")


async def _user_errors_fail_the_replay(work: Callable[[], Awaitable[T]]) -> T:
    """Run `work`; a UserError (bad projection, bad event) or a missing privilege fails the replay instead of
    retrying forever."""
    try:
        return await work()
    except UserError as error:
        raise ApplicationError(str(error), type=type(error).__name__, non_retryable=True) from None
    except asyncpg.InsufficientPrivilegeError as error:
        message = str(
            UserError(
                f"the worker's database role lacks a privilege: {error}",
                fix="grant what `rehydrate db grants ROLE` prints (README: A least-privilege role), then start again",
            )
        )
        raise ApplicationError(message, type="InsufficientPrivilege", non_retryable=True) from None


async def _search_attributes_registered() -> bool:
    """Whether the replay may upsert its search attributes; False when it cannot tell (no client, no permission)."""
    try:
        return await search_attributes.registered(activity.client())
    except (RuntimeError, RPCError) as error:  # RuntimeError: an ActivityEnvironment without a client
        log.warning("search attributes not set on this replay: cannot list them (%s)", error)
        return False


def _cutoff(to_position: int | None, as_of: str | datetime | None) -> Cutoff | None:
    """A point-in-time build's cut-off (None: the whole history below the mark). A naive `as_of` is UTC."""
    if to_position is None and as_of is None:
        return None
    when = parse_as_of(as_of) if isinstance(as_of, str) else as_of
    return Cutoff(to_position, when)


def parse_as_of(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(
            f"--as-of {text!r} is not an ISO 8601 timestamp", fix="write it like 2024-05-01T12:00:00+00:00"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _quiet_start() -> float:
    """Seconds a chunk runs before its first heartbeat. The SDK sends the first one at once (later ones at most
    every 0.8 heartbeat timeouts): a round trip and a server write per chunk that, for the usual chunk of well
    under a second, tell the server nothing its completion does not. A worker that dies mid-chunk is found as
    soon as before (the server's heartbeat clock starts with the attempt); a cancel reaches a chunk at its first
    heartbeat, so at most this much later: a quarter of the heartbeat timeout, at most one second."""
    timeout = activity.info().heartbeat_timeout
    return min(1.0, timeout.total_seconds() / 4) if timeout else 1.0


def _chunk() -> str:
    """A chunk's name in logs: its activity id, unique within the replay's run."""
    return activity.info().activity_id


class ReplayActivities:
    """Holds the worker's database pool and projections; each method is one activity."""

    def __init__(self, pool: asyncpg.Pool, registry: Registry, settings: Settings) -> None:
        self.pool = pool
        self.registry = registry
        self.settings = settings
        self.schema = settings.schema_name
        self.read_schema = settings.read_model_schema
        self.store = EventStore(pool, self.schema)

    # -- plan ----------------------------------------------------------------------------------------

    @activity.defn(name="rehydrate.plan_replay")
    async def plan_replay(self, input: PlanInput) -> Plan:
        """Take the high-water mark as the target, create the generation's table and its lane checkpoints."""
        return await _user_errors_fail_the_replay(lambda: self._plan(input))

    async def _plan(self, input: PlanInput) -> Plan:
        projection = self.registry.get(input.projection)
        # `is None`, not `or`: a 0 from a hand-written input (the Web UI) is refused below, not replaced.
        lanes = input.lanes  # None: by how the lanes split, once that is known
        chunk_size = self.settings.chunk_size if input.chunk_size is None else input.chunk_size
        max_parallel = self.settings.max_parallel if input.max_parallel is None else input.max_parallel
        if lanes is not None and not 1 <= lanes <= 256:
            raise UserError(f"lanes={lanes} is out of range", fix="use 1 to 256 lanes")
        if chunk_size < 1:
            raise UserError(f"chunk size {chunk_size} is not positive", fix="use a chunk size of at least 1")
        if max_parallel < 1:
            raise UserError(f"max_parallel={max_parallel} is not positive", fix="use at least 1")
        sandbox = input.sandbox or ""
        read_schema = catalog.table_schema(self.read_schema, sandbox)
        cutoff = _cutoff(input.to_position, input.as_of)
        async with self.pool.acquire() as conn:
            building = await catalog.building_generation(conn, self.schema, projection.name, sandbox)
            if building is not None and building["workflow_id"] != input.workflow_id and input.skip_if_running:
                return Plan(0, "", 0, [], 0, 0, 0, running_elsewhere=building["workflow_id"])
            if building is not None and building["workflow_id"] != input.workflow_id:
                raise UserError(
                    f"projection {projection.name!r} is already being rebuilt by workflow "
                    f"{building['workflow_id']!r} (generation {building['generation']})",
                    fix="wait for it, or cancel it with `rehydrate replay cancel`",
                )
            counts: list[int] | None = None  # each lane's events, estimated
            if building is None:
                mark = await self.store.high_water_mark(conn)
                if input.mark is not None:
                    if input.mark > mark:
                        raise UserError(
                            f"target mark {input.mark} is above the high-water mark {mark}",
                            fix="use a mark at or below the current high-water mark",
                        )
                    mark = input.mark
                boundaries = None
                split = await self.store.lane_split(conn, projection.key, self.settings.lane_split)
                lanes = lanes_for(self.settings, split) if lanes is None else lanes
                if split == "range":
                    found, estimated = await self.store.stream_boundaries(
                        conn, mark=mark, types=projection.event_types, lanes=lanes, cutoff=cutoff
                    )
                    if len(found) == lanes - 1:  # else too few events to split
                        boundaries = found
                        # The boundaries cut the sample into equal parts: the lanes' sizes need no second look.
                        counts = [estimated // lanes + (lane < estimated % lanes) for lane in range(lanes)]
                building = await catalog.create_generation(
                    conn,
                    schema=self.schema,
                    read_schema=read_schema,
                    projection=projection,
                    mark=mark,
                    lanes=lanes,
                    chunk_size=chunk_size,
                    workflow_id=input.workflow_id,
                    run_id=input.run_id,
                    boundaries=boundaries,
                    sandbox=sandbox,
                    cutoff=cutoff,
                )
            cutoff = _cutoff(building["to_position"], building["as_of"])
            ranges = await catalog.lane_bounds(conn, self.schema, projection.name, building["generation"])
            if counts is None:  # a resumed generation, or lanes by hash
                if ranges is None:
                    counts = await self.store.count_lanes(
                        conn,
                        mark=building["target_xmin"],
                        types=projection.event_types,
                        key=projection.key,
                        lanes=building["lanes"],
                        cutoff=cutoff,
                        estimate=True,
                    )
                else:
                    counts = await self.store.count_ranges(
                        conn,
                        mark=building["target_xmin"],
                        types=projection.event_types,
                        boundaries=[high for _, high in ranges[:-1] if high is not None],
                        cutoff=cutoff,
                        estimate=True,
                    )
            total = sum(counts)
            await catalog.set_total(conn, self.schema, projection.name, building["generation"], total)
            checkpoints = await catalog.lane_checkpoints(conn, self.schema, projection.name, building["generation"])
        return Plan(
            generation=building["generation"],
            physical_table=building["physical_table"],
            mark=building["target_xmin"],
            lanes=[
                LaneState(lane=lane, position=pos, applied=applied, total=counts[lane], done=done)
                for lane, pos, applied, done in checkpoints
            ],
            chunk_size=building["chunk_size"],
            max_parallel=max_parallel,
            events_total=total,
            search_attributes=await _search_attributes_registered(),
        )

    # -- build ---------------------------------------------------------------------------------------

    @activity.defn(name="rehydrate.apply_chunk")
    async def apply_chunk(self, input: ChunkInput) -> ChunkResult:
        """Apply the next `chunk_size` events of one lane, with its checkpoint, in one transaction."""
        started = time.monotonic()
        with (
            logs.context(projection=input.projection, generation=input.generation, lane=input.lane, chunk=_chunk()),
            tracing.span(
                "chunk",
                projection=input.projection,
                generation=input.generation,
                lane=input.lane,
                chunk=_chunk(),
                chunk_size=input.chunk_size,
                mark=input.mark,
            ),
        ):
            result = await _user_errors_fail_the_replay(lambda: self._apply_chunk(input))
            tracing.annotate(to_position=result.position, events_applied=result.chunk_events, lane_done=result.done)
            seconds = time.monotonic() - started
            metrics.events_applied(input.projection, result.chunk_events)
            metrics.chunk_duration(input.projection, seconds)
            log.info(
                "chunk applied: %d events, lane at position %d, %.3f s", result.chunk_events, result.position, seconds
            )
        return result

    async def _apply_chunk(self, input: ChunkInput) -> ChunkResult:
        projection = self.registry.get(input.projection)
        async with self.pool.acquire() as conn, conn.transaction():
            # The row lock makes a retry wait for a zombie attempt of the same lane (a worker that lost its
            # heartbeat but still runs); the retry then starts from whatever that attempt committed.
            checkpoint = await catalog.lock_lane(conn, self.schema, input.projection, input.generation, input.lane)
            if checkpoint is None or checkpoint["state"] != "building":
                raise UserError(
                    f"generation {input.generation} of {input.projection!r} is no longer being built",
                    fix="it was cancelled or failed; start a new replay",
                )
            if checkpoint["done"]:
                return ChunkResult(checkpoint["position"], checkpoint["events_applied"], 0, True)
            held = await self.store.held_back(conn, input.mark)
            physical = catalog.physical_table_name(projection, input.generation)
            where = catalog.table_schema(self.read_schema, checkpoint["sandbox"])
            cutoff = _cutoff(checkpoint["to_position"], checkpoint["as_of"])
            parking = Parking(self.schema, input.generation)
            fetched = 0
            position = checkpoint["position"]
            tracing.annotate(from_position=position)
            after: tuple[str, int] | None = None
            stored_keys: list[str] | None = None  # None: any key may have a row already
            if checkpoint["by_stream"]:
                if checkpoint["after_stream"] is not None:
                    after = (checkpoint["after_stream"], checkpoint["after_version"])
                if projection.key.field is None:
                    # Whole streams in id order: of the streams this chunk reads, only the one the last chunk
                    # stopped in can have a row (or dead letters) already.
                    stored_keys = [] if after is None else [after[0]]
            folding = Folding(conn, projection, where, physical, parking, stored_keys)
            if checkpoint["by_stream"]:
                batches = self.store.read_streams(
                    conn,
                    low=checkpoint["low_stream"],
                    high=checkpoint["high_stream"],
                    after=after,
                    mark=input.mark,
                    types=projection.event_types,
                    limit=input.chunk_size,
                    cutoff=cutoff,
                )
            else:
                batches = self.store.read_lane(
                    conn,
                    after_position=position,
                    mark=input.mark,
                    types=projection.event_types,
                    key=projection.key,
                    lane=input.lane,
                    lanes=input.lanes,
                    limit=input.chunk_size,
                    cutoff=cutoff,
                )
            beat_from = time.monotonic() + _quiet_start()
            async for batch in batches:
                fetched += len(batch)
                last = batch[-1]
                position, after = last.global_position, (last.stream_id, last.stream_version)
                if held:
                    batch = [e for e in batch if not is_held(held, e.stream_id, e.stream_version)]
                await folding.add(batch)
                await asyncio.sleep(0)  # the worker's workflow tasks and other chunks get a turn (see store.SLICE)
                if time.monotonic() >= beat_from:
                    activity.heartbeat(position)
            applied = await folding.write()
            done = fetched < input.chunk_size
            total_applied = checkpoint["events_applied"] + applied.events
            await catalog.save_lane(
                conn,
                self.schema,
                input.projection,
                input.generation,
                input.lane,
                position,
                total_applied,
                done,
                after if checkpoint["by_stream"] else None,
            )
        return ChunkResult(position=position, applied=total_applied, chunk_events=applied.events, done=done)

    # -- finish, catch up, swap ----------------------------------------------------------------------

    async def _on_table(
        self, input: GenerationRef, step: Callable[[asyncpg.Connection, Projection, asyncpg.Record, str], Awaitable[T]]
    ) -> T:
        """Run `step(conn, projection, generation row, schema of its table)` on a generation's table."""

        async def work() -> T:
            projection = self.registry.get(input.projection)
            async with self.pool.acquire() as conn:
                row = await catalog.generation_row(conn, self.schema, projection.name, input.generation)
                return await step(conn, projection, row, catalog.table_schema(self.read_schema, row["sandbox"]))

        return await _user_errors_fail_the_replay(work)

    @activity.defn(name="rehydrate.finish_tables")
    async def finish_tables(self, input: GenerationRef) -> int:
        """Create the secondary indexes and ANALYZE; returns the row count. (Sandbox builds, and replays started
        before `index_tables` and `analyze_table` split it so that ANALYZE runs beside the catch-up and swap.)"""
        return await self._on_table(
            input, lambda conn, p, _, where: catalog.finish_generation(conn, self.schema, where, p, input.generation)
        )

    @activity.defn(name="rehydrate.index_tables")
    async def index_tables(self, input: GenerationRef) -> int:
        """Create the secondary indexes; returns the row count. (ANALYZE is `analyze_table`, beside the swap.)"""
        return await self._on_table(
            input, lambda conn, p, _, where: catalog.index_generation(conn, self.schema, where, p, input.generation)
        )

    @activity.defn(name="rehydrate.analyze_table")
    async def analyze_table(self, input: GenerationRef) -> None:
        """ANALYZE the generation's table (nothing if a cancel dropped it meanwhile)."""

        async def analyze(conn: asyncpg.Connection, projection: Projection, row: asyncpg.Record, where: str) -> None:
            if row["state"] in ("building", "sandbox", "active"):
                await catalog.analyze_generation(conn, where, projection, input.generation)

        await self._on_table(input, analyze)

    @activity.defn(name="rehydrate.catch_up")
    async def catch_up(self, input: CatchUpInput) -> CatchUpResult:
        """Apply the events that became visible since the generation's checkpoint, up to the current mark."""

        async def work() -> CatchUpResult:
            projection = self.registry.get(input.projection)
            async with self.pool.acquire() as conn, conn.transaction():
                applied, mark = await catalog.catch_up(conn, self.store, self.read_schema, projection, input.generation)
            metrics.events_applied(input.projection, applied)
            tracing.annotate(events_applied=applied, mark=mark)
            return CatchUpResult(applied=applied, mark=mark)

        with tracing.span("catch_up", projection=input.projection, generation=input.generation):
            return await _user_errors_fail_the_replay(work)

    @activity.defn(name="rehydrate.swap")
    async def swap(self, input: GenerationRef) -> SwapResult:
        """Apply the last delta and switch readers to the new generation, in one short transaction."""

        async def work() -> SwapResult:
            projection = self.registry.get(input.projection)
            attempt = 0
            while True:
                attempt += 1
                try:
                    async with self.pool.acquire() as conn:
                        result = await catalog.swap(
                            conn,
                            self.store,
                            self.read_schema,
                            projection,
                            input.generation,
                            allow_dead_letters=input.allow_dead_letters,
                        )
                        metrics.events_applied(input.projection, result.final_delta)
                        result.dropped_generations = await catalog.retire_old(
                            conn, self.schema, self.read_schema, projection, self.settings.retain_generations
                        )
                        tracing.annotate(
                            previous_generation=result.previous_generation or 0,
                            final_delta=result.final_delta,
                            lock_ms=result.lock_ms,
                            rows=result.rows,
                            attempts=attempt,
                        )
                        if self.settings.tails and projection.name in await catalog.tails_to_run(conn, self.schema):
                            # The tail goes on from the new generation's checkpoint (it reads it afresh).
                            from rehydrate.starter import ensure_tail

                            await ensure_tail(activity.client(), projection.name, activity.info().task_queue)
                        return result
                except asyncpg.LockNotAvailableError:
                    # A long reader holds the view; we gave up the lock quickly so readers were not queued
                    # behind us. Try again shortly.
                    activity.heartbeat(f"swap lock busy, attempt {attempt}")
                    tracing.event("swap lock busy", attempt=attempt)
                    await asyncio.sleep(min(0.2 * attempt, 2.0))

        with tracing.span("swap", projection=input.projection, generation=input.generation):
            return await _user_errors_fail_the_replay(work)

    @activity.defn(name="rehydrate.drop_generation")
    async def drop_generation(self, input: GenerationRef) -> None:
        """Drop a cancelled or failed generation's table; the active generation is never touched."""
        async with self.pool.acquire() as conn:
            sandbox = await catalog.generation_sandbox(conn, self.schema, input.projection, input.generation)
            await catalog.drop_generation(
                conn,
                self.schema,
                catalog.table_schema(self.read_schema, sandbox),
                input.projection,
                input.generation,
                input.reason,
            )

    @activity.defn(name="rehydrate.publish_sandbox")
    async def publish_sandbox(self, input: GenerationRef) -> int:
        """Finish a sandbox build: its own view in the sandbox schema, the label's older build dropped. Returns
        the events the build parked (on_error="park")."""

        async def work() -> int:
            projection = self.registry.get(input.projection)
            async with self.pool.acquire() as conn:
                return await catalog.publish_sandbox(conn, self.schema, projection, input.generation)

        return await _user_errors_fail_the_replay(work)

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.plan_replay,
            self.apply_chunk,
            self.finish_tables,
            self.index_tables,
            self.analyze_table,
            self.catch_up,
            self.swap,
            self.drop_generation,
            self.publish_sandbox,
        ]
