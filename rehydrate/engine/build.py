"""A replay's build: plan a generation (its target mark, lanes cut by stream range or by hash, their sizes), then
apply one chunk of a lane at a time, the chunk's rows and the lane's checkpoint in one transaction.

A chunk applied twice changes nothing: it starts from the lane's committed checkpoint, which its own transaction
moves. The lane's row lock makes a retried chunk wait for a zombie attempt of the same lane (a worker that lost its
heartbeat but still runs), and the retry then starts from whatever that attempt committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg

from rehydrate.core.errors import UserError
from rehydrate.core.limits import MAX_LANES, MAX_PARALLEL, check_range
from rehydrate.core.settings import Settings, lanes_for, sized_lanes
from rehydrate.engine.apply import Folding, Parking
from rehydrate.engine.generations import Generations, other_code
from rehydrate.engine.projections import Projection
from rehydrate.models import ChunkInput, ChunkResult, LaneState, Plan, PlanInput
from rehydrate.sources.events import Cutoff, Event, is_held
from rehydrate.sources.log import LogSource, check_lanes
from rehydrate.sources.pools import Sources
from rehydrate.sources.reading import FETCH_SIZE, SLICE, EventSource
from rehydrate.sources.store import EventStore


@dataclass(frozen=True, slots=True)
class LaneCut:
    """How a plan splits a projection's events into lanes."""

    split: str  # "range" (by stream id) or "hash" (by the key's hash)
    lanes: int
    boundaries: list[str]  # between range lanes (fewer than lanes - 1: too few events to cut; empty for hash)
    estimated: int  # events below the mark, as the sample counted them (range lanes only)


async def cut_lanes(
    source: EventSource,
    reading: asyncpg.Connection,
    projection: Projection,
    settings: Settings,
    *,
    lanes: int | None,
    mark: int,
    cutoff: Cutoff | None = None,
) -> LaneCut:
    """Split by range or by hash as the source and REHYDRATE_LANE_SPLIT decide, into `lanes` lanes, or (None) the
    setting's; range lanes not asked for are fewer on a small store (`sized_lanes`). A replay's plan and the dry-run
    plan both cut here, so that the dry run shows the lanes the replay gets."""
    split = await source.lane_split(reading, projection.key, settings.lane_split)
    count = lanes_for(settings, split) if lanes is None else lanes
    if split != "range":
        return LaneCut(split, count, [], 0)
    found, estimated = await source.stream_boundaries(
        reading, mark=mark, types=projection.event_types, lanes=count, cutoff=cutoff
    )
    if lanes is None:
        found, count = sized_lanes(settings, found, count, estimated)
    return LaneCut(split, count, found, estimated)


async def plan_generation(
    conn: asyncpg.Connection,
    store: EventStore | Sources,
    settings: Settings,
    projection: Projection,
    input: PlanInput,
) -> Plan:
    """Take the high-water mark as the target, create the generation's table and its lane checkpoints, and estimate
    each lane's events. A plan run again (a retried activity, a replay after continue-as-new) finds the generation it
    made and returns it with the lanes' progress."""
    # `is None`, not `or`: a 0 from a hand-written input (the Web UI) is refused, not replaced.
    lanes = None if input.lanes is None else check_range("lanes", input.lanes, 1, MAX_LANES)
    chunk_size = check_range("chunk_size", settings.chunk_size if input.chunk_size is None else input.chunk_size, 1)
    max_parallel = check_range(
        "max_parallel", settings.max_parallel if input.max_parallel is None else input.max_parallel, 1, MAX_PARALLEL
    )
    sandbox = input.sandbox or ""
    generations = Generations(conn, store, settings.read_model_schema)
    catalog = generations.catalog
    opened = await generations.sources.any(projection.event_source)
    building = await catalog.building_generation(projection.name, sandbox)
    if building is not None and building["workflow_id"] != input.workflow_id:
        if input.skip_if_running:
            return Plan(0, "", 0, [], 0, 0, 0, running_elsewhere=building["workflow_id"])
        raise UserError(
            f"projection {projection.name!r} is already being rebuilt by workflow "
            f"{building['workflow_id']!r} (generation {building['generation']})",
            fix="wait for it, or cancel it with `rehydrate replay cancel`",
        )
    if isinstance(opened, LogSource):
        return await _plan_log(generations, opened, projection, input, building, lanes, chunk_size, max_parallel)
    source = opened
    counts: list[int] | None = None  # each lane's events, estimated
    if building is None:
        cutoff = Cutoff.of(input.to_position, input.as_of)
        gaps: list[tuple[int, int]] = []
        async with source.reading(conn) as reading:
            mark = await source.high_water_mark(reading)
            if source.audits_gaps and not sandbox:  # the gap audit runs in the catch-ups and the tail
                # Only gaps within the horizon: an older one could only be filled by a transaction open for longer.
                recent = await source.above_older(source.mapping.gap_horizon_seconds, reading)
                top = mark if input.mark is None else min(mark, input.mark)
                gaps = await source.gaps(reading, recent, top) if recent < top else []
            cut = await cut_lanes(
                source,
                reading,
                projection,
                settings,
                lanes=lanes,
                mark=mark if input.mark is None else input.mark,
                cutoff=cutoff,
            )
        lanes = cut.lanes
        if input.mark is not None:
            if input.mark > mark:
                raise UserError(
                    f"target mark {input.mark} is above the high-water mark {mark}",
                    fix="use a mark at or below the current high-water mark",
                )
            mark = input.mark
        boundaries = None
        if cut.split == "range" and len(cut.boundaries) == lanes - 1:  # else too few events to split
            boundaries = cut.boundaries
            # The boundaries cut the sample into equal parts: the lanes' sizes need no second look.
            counts = [cut.estimated // lanes + (lane < cut.estimated % lanes) for lane in range(lanes)]
        building = await generations.create(
            projection,
            mark=mark,
            lanes=lanes,
            chunk_size=chunk_size,
            workflow_id=input.workflow_id,
            run_id=input.run_id,
            boundaries=boundaries,
            sandbox=sandbox,
            cutoff=cutoff,
            gaps=gaps,
        )
    generation = building["generation"]
    if counts is None:  # a resumed generation, or lanes by hash
        ranges = await catalog.lane_bounds(projection.name, generation)
        async with source.reading(conn) as reading:
            counts = await _lane_sizes(reading, source, projection, building, ranges)
    total = sum(counts)
    await catalog.set_total(projection.name, generation, total)
    checkpoints = await catalog.lanes(projection.name, generation)
    return Plan(
        generation=generation,
        physical_table=building["physical_table"],
        mark=building["target_xmin"],
        lanes=[
            LaneState(lane=lane, position=pos, applied=applied, total=counts[lane], done=done)
            for lane, pos, applied, done in checkpoints
        ],
        chunk_size=building["chunk_size"],
        max_parallel=max_parallel,
        events_total=total,
        source=source.name,
        tables=_tables(projection, generation, building["physical_table"]),
    )


async def _plan_log(
    generations: Generations,
    log: LogSource,
    projection: Projection,
    input: PlanInput,
    building: asyncpg.Record | None,
    lanes: int | None,
    chunk_size: int,
    max_parallel: int,
) -> Plan:
    """Plan a build from a log: a lane per partition, each from the partition's first offset to its end now (or, for
    a verify's rebuild, to where the live generation's lane is). A partition whose end is not known without reading
    it (an open Kinesis shard) is read up to the plan's time; a lane waits for its partition's parents' lanes."""
    catalog = generations.catalog
    sandbox = input.sandbox or ""
    if building is None:
        if input.to_position is not None or input.as_of is not None:
            raise UserError(
                f"projection {projection.name!r} reads the {log.noun} of source {log.name!r}: a build cut at a "
                f"position or a time (--to-position, --as-of) is not available for a {log.noun}",
                fix=f"build the whole {log.noun}",
            )
        partial = False
        if input.mark is not None:  # a verify's rebuild: to the live generation's offsets, read at the start
            live = await catalog.active_generation(projection.name)
            live_lanes = await catalog.log_lanes(projection.name, live)
            partial = bool((await catalog.generation(projection.name, live))["partial_history"])
            ranges, _ = await log.check_history(accept_partial=partial)
            check_lanes(log.name, ranges, live_lanes)
            if len(ranges) != len(live_lanes):  # a closed shard gone since (retention): its records are too
                raise UserError(
                    f"source {log.name!r}: the {log.noun} no longer holds every partition the live generation read",
                    fix="its history is gone in part: a rebuild cannot be compared with the live generation",
                )
            bounds: list[tuple[int, int | None]] = [
                (r.earliest, lane["position"]) for r, lane in zip(ranges, live_lanes, strict=True)
            ]
        else:
            ranges, problems = await log.check_history(accept_partial=input.accept_partial_history)
            partial = bool(problems)
            bounds = [(r.earliest, r.end) for r in ranges]
        if lanes is not None and lanes != len(ranges):
            raise UserError(
                f"projection {projection.name!r} reads the {log.noun} of source {log.name!r}, whose lanes are its "
                f"{len(ranges)} {'shard' if ranges and ranges[0].name else 'partition'}(s), not {lanes}",
                fix="leave --lanes out",
            )
        building = await generations.create(
            projection,
            mark=sum(end or 0 for _, end in bounds),
            lanes=len(bounds),
            chunk_size=chunk_size,
            workflow_id=input.workflow_id,
            run_id=input.run_id,
            sandbox=sandbox,
            partitions=bounds,
            partial_history=partial,
            partition_names=[r.name for r in ranges],
            parent_lanes=[r.parents for r in ranges],
        )
    generation = building["generation"]
    states = [
        LaneState(
            lane=row["lane"],
            position=row["position"],
            applied=row["events_applied"],
            total=row["events_applied"] + max(0, (row["target"] or 0) - row["position"]),
            done=row["done"],
            after=list(row["parent_lanes"]),
        )
        for row in await catalog.log_lanes(projection.name, generation)
    ]
    total = sum(lane.total for lane in states)
    await catalog.set_total(projection.name, generation, total)
    return Plan(
        generation=generation,
        physical_table=building["physical_table"],
        mark=building["target_xmin"],
        lanes=states,
        chunk_size=building["chunk_size"],
        max_parallel=max_parallel,
        events_total=total,
        source=log.name,
        tables=_tables(projection, generation, building["physical_table"]),
    )


def _tables(projection: Projection, generation: int, main: str) -> list[str]:
    """The generation's tables, as progress shows them: the main one, then the child tables."""
    return [main, *(shape.physical_name(generation) for shape in projection.children)]


async def _lane_sizes(
    conn: asyncpg.Connection,
    store: EventSource,
    projection: Projection,
    building: asyncpg.Record,
    ranges: list[tuple[str | None, str | None]] | None,
) -> list[int]:
    """Each lane's events below the generation's target, estimated from a sample."""
    cutoff = Cutoff.of(building["to_position"], building["as_of"])
    if ranges is None:
        return await store.count_lanes(
            conn,
            mark=building["target_xmin"],
            types=projection.event_types,
            key=projection.key,
            lanes=building["lanes"],
            cutoff=cutoff,
            estimate=True,
        )
    return await store.count_ranges(
        conn,
        mark=building["target_xmin"],
        types=projection.event_types,
        boundaries=[high for _, high in ranges[:-1] if high is not None],
        cutoff=cutoff,
        estimate=True,
    )


@dataclass
class ChunkProgress:
    """What a running chunk tells its caller: the lane's checkpoint it started from, and how to say it lives."""

    heartbeat: Callable[[int], None]  # called with the lane's position after each slice once `quiet_until` passed
    quiet_until: float  # loop time before which no heartbeat is sent
    from_position: int = 0


# Under a rate, a chunk fetches about this many seconds of events at a time: its load on the database comes in
# small, even steps (a fetch of FETCH_SIZE rows is itself a burst of the server's work).
_PACED_FETCH_SECONDS = 0.01


def fetch_size(max_rate: float | None) -> int:
    """Rows a chunk fetches at a time: FETCH_SIZE at full speed; under `max_rate`, about 10 ms of events."""
    if not max_rate:
        return FETCH_SIZE
    return max(100, min(SLICE, int(max_rate * _PACED_FETCH_SECONDS)))


class Pace:
    """Spreads a chunk's slices over its time under a rate: after `n` events, wait until `n / rate` seconds have
    passed since the chunk began reading. A throttled chunk then loads the database a slice at a time, evenly,
    instead of in one burst at full speed followed by a pause (the bursts are what live readers wait behind)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rate: float | None) -> None:
        self.loop = loop
        self.rate = rate
        self.began = loop.time()

    async def after(self, events: int) -> None:
        wait = events / self.rate - (self.loop.time() - self.began) if self.rate else 0.0
        await asyncio.sleep(max(0.0, wait))


async def apply_chunk(
    conn: asyncpg.Connection,
    store: EventStore | Sources,
    read_schema: str,
    projection: Projection,
    input: ChunkInput,
    progress: ChunkProgress,
) -> ChunkResult:
    """Apply the next `input.chunk_size` events of one lane below the generation's target, with the lane's new
    checkpoint, in one transaction."""
    async with conn.transaction():
        generations = Generations(conn, store, read_schema)
        catalog = generations.catalog
        checkpoint = await catalog.lock_lane(input.projection, input.generation, input.lane)
        if checkpoint is None or checkpoint["state"] != "building":
            raise UserError(
                f"generation {input.generation} of {input.projection!r} is no longer being built",
                fix="it was cancelled or failed; start a new replay",
            )
        if checkpoint["done"]:
            return ChunkResult(checkpoint["position"], checkpoint["events_applied"], 0, True)
        if checkpoint["fingerprint"] != projection.fingerprint:
            # Workers of two releases on one task queue (a rolling deploy): this one has other code for the
            # projection than the generation was planned with. One generation is built by one code, never two.
            raise other_code(projection, input.generation, checkpoint["fingerprint"])
        opened = await generations.sources.any(projection.event_source)
        if isinstance(opened, LogSource):
            return await _apply_log_chunk(generations, opened, projection, input, checkpoint, progress)
        source = opened
        # The events may be in another database: read there, in a transaction of its own, while this transaction
        # writes the rows and the checkpoint (everything below the mark is final, so both see the same events).
        async with source.reading(conn) as reading:
            held = await source.held_back(reading, input.mark)
            table = generations.read_models(checkpoint["sandbox"]).tables(projection, input.generation)
            cutoff = Cutoff.of(checkpoint["to_position"], checkpoint["as_of"])
            position = progress.from_position = checkpoint["position"]
            after: tuple[str, int] | None = None
            stored_keys: list[str] | None = None  # None: any key may have a row already
            batches: AsyncIterator[list[Event]]
            if checkpoint["by_stream"]:
                if checkpoint["after_stream"] is not None:
                    after = (checkpoint["after_stream"], checkpoint["after_version"])
                if projection.key.field is None:
                    # Whole streams in id order: of the streams this chunk reads, only the one the last chunk stopped in
                    # can have a row (or dead letters) already.
                    stored_keys = [] if after is None else [after[0]]
                batches = source.read_streams(
                    reading,
                    low=checkpoint["low_stream"],
                    high=checkpoint["high_stream"],
                    after=after,
                    mark=input.mark,
                    types=projection.event_types,
                    limit=input.chunk_size,
                    fetch_size=fetch_size(input.max_rate),
                    cutoff=cutoff,
                )
            else:
                if position == 0:
                    # A hash lane's first chunk: each key is one lane's, and nothing of this lane is written yet.
                    stored_keys = []
                batches = source.read_lane(
                    reading,
                    after_position=position,
                    mark=input.mark,
                    types=projection.event_types,
                    key=projection.key,
                    lane=input.lane,
                    lanes=input.lanes,
                    limit=input.chunk_size,
                    fetch_size=fetch_size(input.max_rate),
                    cutoff=cutoff,
                )
            folding = Folding(projection, table, Parking(catalog, input.generation), stored_keys)
            loop = asyncio.get_running_loop()
            pace = Pace(loop, input.max_rate)
            fetched = 0
            async for batch in batches:
                fetched += len(batch)
                last = batch[-1]
                position, after = last.global_position, (last.stream_id, last.stream_version)
                if held:
                    batch = [e for e in batch if not is_held(held, e.stream_id, e.stream_version)]
                await folding.add(batch)
                # The worker's workflow tasks and other chunks get a turn (see reading.SLICE); under a rate, the
                # slices are spread over the chunk's time.
                await pace.after(fetched)
                if loop.time() >= progress.quiet_until:
                    progress.heartbeat(position)
            applied = await folding.write()
        done = fetched < input.chunk_size
        total_applied = checkpoint["events_applied"] + applied.events
        await catalog.save_lane(
            input.projection,
            input.generation,
            input.lane,
            position,
            total_applied,
            done,
            after if checkpoint["by_stream"] else None,
        )
    return ChunkResult(position=position, applied=total_applied, chunk_events=applied.events, done=done)


async def _apply_log_chunk(
    generations: Generations,
    log: LogSource,
    projection: Projection,
    input: ChunkInput,
    checkpoint: asyncpg.Record,
    progress: ChunkProgress,
) -> ChunkResult:
    """Apply the next events of one partition, from the lane's position towards its target, with the lane's new
    position and cursor (in the caller's transaction). The chunk ends when the read's position reaches the target,
    never by counting records: offsets of transaction markers and aborted records hold no event. A partition whose end
    was not known at plan time (an open Kinesis shard) is done at its tip, or at the first record that arrived after
    the plan (the generation's start): the catch-up applies the rest."""
    catalog = generations.catalog
    table = generations.read_models(checkpoint["sandbox"]).tables(projection, input.generation)
    start = position = progress.from_position = checkpoint["position"]
    cursor = checkpoint["log_cursor"]
    target = checkpoint["target"]
    # Keys interleave in a partition: any key may have a row from an earlier chunk.
    folding = Folding(projection, table, Parking(catalog, input.generation), None)
    loop = asyncio.get_running_loop()
    pace = Pace(loop, input.max_rate)
    fetched = 0
    done = target is not None and start >= target
    if not done:
        async with log.reader() as reader:
            async for read in log.batches(
                reader,
                input.lane,
                start,
                target,
                input.chunk_size,
                min(SLICE, fetch_size(input.max_rate)),
                cursor=cursor,
                name=checkpoint["partition_name"],
                until=checkpoint["started_at"],
            ):
                await folding.add(read.events)
                position, cursor, done = read.position, read.cursor, read.ended
                fetched += len(read.events)
                await pace.after(fetched)
                if loop.time() >= progress.quiet_until:
                    progress.heartbeat(position)
    applied = await folding.write()
    total_applied = checkpoint["events_applied"] + applied.events
    await catalog.save_lane(
        input.projection, input.generation, input.lane, position, total_applied, done, cursor=cursor
    )
    return ChunkResult(position=position, applied=total_applied, chunk_events=applied.events, done=done)
