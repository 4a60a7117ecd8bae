"""What operators ask of projections, answered from Postgres: their status and lag, which are stale, a plan of a
replay, and a rollback brought up to date."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from rehydrate.core.errors import SourceUnavailable, UserError
from rehydrate.core.limits import MAX_LANES, MAX_PARALLEL, check_range
from rehydrate.core.settings import Settings
from rehydrate.engine.apply import Folding
from rehydrate.engine.build import cut_lanes
from rehydrate.engine.catalog import Catalog
from rehydrate.engine.generations import Generations
from rehydrate.engine.projections import Projection, Registry
from rehydrate.engine.readmodels import ReadModels
from rehydrate.models.names import OWN_SOURCE
from rehydrate.sources.log import LogSource
from rehydrate.sources.pools import Sources
from rehydrate.sources.reading import EventSource
from rehydrate.sources.store import EventStore

# -- status ---------------------------------------------------------------------------------------------------------


@dataclass
class LastReplay:
    generation: int
    state: str
    started_at: datetime
    ended_at: datetime | None
    error: str | None
    events_applied: int
    workflow_id: str | None


@dataclass
class ProjectionStatus:
    """One projection as `rehydrate projections` shows it: registered in this process, built, stale, current."""

    name: str
    registered: bool
    version: int | None
    fingerprint: str | None  # of the code in this process (None: not registered here)
    active_generation: int | None
    stale: bool  # the read model holds what other code made (see stale_reason)
    rows: int | None  # rows of the active generation now (rows_exact: counted; else the planner's estimate)
    checkpoint: int | None
    tail_enabled: bool | None
    tail_error: str | None
    lag_events: int | None  # events the active generation does not have yet (held-back ones included)
    lag_seconds: float | None  # the age of the oldest of them
    last_replay: LastReplay | None = None
    rows_exact: bool = True
    source: str = OWN_SOURCE  # the event source it reads (as this process has it)
    stale_reason: str | None = None  # why it is stale: built from other code, or the tail applies other code
    source_error: str | None = None  # why its lag is unknown: its source could not be read


def _stale_reason(projection: Projection | None, row: dict[str, Any]) -> str | None:
    built = row.get("fingerprint")
    if row.get("active_generation") is None or built is None:
        return None
    if projection is not None and built != projection.fingerprint:
        return "built from other projection code than this process has"
    tail = row.get("tail_fingerprint")
    if tail is not None and tail != built:
        return "the tail applies new events with other projection code than the generation was built with"
    return None


async def projection_statuses(
    conn: asyncpg.Connection, store: EventStore | Sources, registry: Registry, read_model_schema: str
) -> list[ProjectionStatus]:
    """Every projection that is registered or was ever built, by name, with its lag when this process knows it."""
    sources = store if isinstance(store, Sources) else Sources(store)
    known = await Catalog(conn, sources.own.schema).projections()
    read_models = ReadModels(conn, read_model_schema)
    statuses = []
    for name in sorted(set(registry.names()) | set(known)):
        row = known.get(name, {})
        projection = registry.get(name) if name in registry.names() else None
        lag: tuple[int, float] | None = None
        unread: str | None = None
        if projection is not None and row.get("checkpoint") is not None:
            try:  # one source out of reach leaves the others' lag shown
                source = await sources.any(projection.event_source)
                if isinstance(source, LogSource):
                    generations = Generations(conn, sources, read_model_schema)
                    behind = await generations.log_lag(projection, row["active_generation"], source)
                    lag = None if behind is None else (behind, 0.0)
                else:
                    async with source.reading(conn) as reading:
                        lag = await source.lag(reading, row["checkpoint"], projection.event_types)
            except UserError as error:
                unread = error.message
            except SourceUnavailable as error:
                unread = str(error)
        rows, exact = (None, True)
        if row.get("physical_table") is not None:
            rows, exact = await read_models.live_rows(row["physical_table"])
        last = None
        if row.get("last_generation") is not None:
            last = LastReplay(
                row["last_generation"],
                row["last_state"],
                row["last_started"],
                row["last_ended"],
                row["last_error"],
                row["last_events"],
                row["last_workflow_id"],
            )
        statuses.append(
            ProjectionStatus(
                name=name,
                registered=projection is not None,
                version=projection.version if projection is not None else row.get("version"),
                fingerprint=projection.fingerprint if projection is not None else None,
                active_generation=row.get("active_generation"),
                source=OWN_SOURCE
                if projection is None or projection.event_source is None
                else projection.event_source.name,
                stale=_stale_reason(projection, row) is not None,
                stale_reason=_stale_reason(projection, row),
                rows=rows,
                rows_exact=exact,
                checkpoint=row.get("checkpoint"),
                tail_enabled=row.get("tail_enabled"),
                tail_error=row.get("tail_error"),
                lag_events=None if lag is None else lag[0],
                lag_seconds=None if lag is None else round(lag[1], 3),
                last_replay=last,
                source_error=unread,
            )
        )
    return statuses


async def stale_projections(
    conn: asyncpg.Connection, store: EventStore | Sources, registry: Registry, read_model_schema: str
) -> list[str]:
    """Registered projections whose read model holds what other code made (see ProjectionStatus.stale_reason)."""
    statuses = await projection_statuses(conn, store, registry, read_model_schema)
    return [status.name for status in statuses if status.stale and status.registered]


# -- rollback -------------------------------------------------------------------------------------------------------


@dataclass
class Rollback:
    projection: str
    from_generation: int
    to_generation: int
    caught_up: int
    fingerprint_differs: bool


async def rollback(
    pool: asyncpg.Pool, settings: Settings, projection: Projection, to: int | None = None, catch_up_batch: int = 10_000
) -> Rollback:
    """Swap a retained generation back in at once, then bring it up to date from its own checkpoint.

    The catch-up runs here in bounded batches, each under the projection's lock like a tail batch, so it is correct
    with or without a running tail (which would do the same from its next batch)."""
    sources = Sources(EventStore(pool, settings.schema_name))
    try:
        async with pool.acquire() as conn:
            generations = Generations(conn, sources, settings.read_model_schema)
            before, after = await generations.rollback(projection, to)
            fingerprint = (await generations.catalog.generation(projection.name, after))["fingerprint"]
            caught = 0
            while True:
                batch = await generations.tail_batch(projection, catch_up_batch)
                if batch is None or batch[1] == 0:
                    break
                caught += batch[1]
    finally:
        await sources.close()
    return Rollback(projection.name, before, after, caught, fingerprint != projection.fingerprint)


# -- plan -----------------------------------------------------------------------------------------------------------


@dataclass
class LanePlan:
    lane: int
    events: int
    chunks: int


@dataclass
class ReplayPlan:
    projection: str
    mark: int
    events: int
    lanes: list[LanePlan]
    chunk_size: int
    max_parallel: int
    sample_events: int
    sample_seconds: float
    events_per_second: float  # of the sample chunk, in this process
    estimated_seconds: float | None
    # The projection's latest build: its rate over the whole build (every lane and worker it had), and which one.
    measured_events_per_second: float | None = None
    measured_generation: int | None = None
    workers: int | None = None  # worker processes polling the task queue (None: not asked)
    estimated_from: str = "sample"  # "measured": the latest build's rate; "sample": the sample chunk's
    source: str = OWN_SOURCE  # the event source read


def _measured(generations: list[dict[str, Any]]) -> tuple[float, int] | None:
    """The rate of the latest build that applied events, and its generation."""
    for g in generations:
        if g["build_seconds"] and g["events_applied"] and g["build_seconds"] > 0:
            return g["events_applied"] / g["build_seconds"], g["generation"]
    return None


def estimate(plan: ReplayPlan, workers: int | None) -> ReplayPlan:
    """The plan's duration: at the latest build's measured rate when there is one (it ran with every worker and
    lane that build had), else at the sample chunk's rate times the chunks that can run at once, which is at most
    the lanes, max_parallel and the worker processes polling (one process is one core)."""
    plan.workers = workers
    parallel = min(len(plan.lanes), plan.max_parallel, workers or len(plan.lanes))
    if plan.measured_events_per_second:
        plan.estimated_from = "measured"
        plan.estimated_seconds = plan.events / plan.measured_events_per_second
    elif plan.events_per_second:
        plan.estimated_from = "sample"
        plan.estimated_seconds = plan.events / plan.events_per_second / max(parallel, 1)
    else:
        plan.estimated_seconds = None
    return plan


class _Discard(Exception):
    """Rolls the sample's transaction back."""


async def _sample(
    conn: asyncpg.Connection,
    source: EventSource,
    settings: Settings,
    projection: Projection,
    lanes: int | None,
    chunk_size: int,
) -> tuple[list[int], int, int, float]:
    """The plan's look at the events: each lane's events below the high-water mark, and one sample chunk read, folded
    and written in a transaction rolled back: (counts, mark, events sampled, seconds)."""
    types = projection.event_types
    async with source.reading(conn) as reading:
        mark = await source.high_water_mark(reading)
        cut = await cut_lanes(source, reading, projection, settings, lanes=lanes, mark=mark)
        lanes, boundaries = cut.lanes, cut.boundaries
        if len(boundaries) == lanes - 1 and lanes > 1:
            counts = await source.count_ranges(reading, mark=mark, types=types, boundaries=boundaries)
        else:
            counts = await source.count_lanes(reading, mark=mark, types=types, key=projection.key, lanes=lanes)
    sample = min(chunk_size, 20_000)
    fetched, seconds = 0, 0.0
    tables = ReadModels(conn, settings.read_model_schema)
    try:
        async with conn.transaction():
            await tables.ensure_schema()
            await tables.create_tables(projection, 0)
            started = time.perf_counter()
            folding = Folding(projection, tables.tables(projection, 0))
            async with source.reading(conn) as reading:
                async for batch in source.read_lane(
                    reading, after_position=0, mark=mark, types=types, key=projection.key, lane=0, lanes=1, limit=sample
                ):
                    fetched += len(batch)
                    await folding.add(batch)
            await folding.write()
            seconds = time.perf_counter() - started
            raise _Discard
    except _Discard:
        pass
    return counts, mark, fetched, seconds


async def plan(
    pool: asyncpg.Pool,
    settings: Settings,
    projection: Projection,
    *,
    lanes: int | None = None,
    chunk_size: int | None = None,
    max_parallel: int | None = None,
    workers: int | None = None,
    accept_partial_history: bool = False,
) -> ReplayPlan:
    """What a replay would do, changing nothing: events to read below the current high-water mark, per lane and
    in chunks, and its duration (see `estimate`; `workers`: the worker processes polling, when known), from the
    latest build's rate or one timed sample chunk (read, fold and COPY into a table created in a transaction that
    is rolled back)."""
    chunk_size = check_range("chunk_size", settings.chunk_size if chunk_size is None else chunk_size, 1)
    max_parallel = check_range(
        "max_parallel", settings.max_parallel if max_parallel is None else max_parallel, 1, MAX_PARALLEL
    )
    if lanes is not None:
        check_range("lanes", lanes, 1, MAX_LANES)
    sources = Sources(EventStore(pool, settings.schema_name))
    try:
        source = await sources.any(projection.event_source)
        async with pool.acquire() as conn:
            if isinstance(source, LogSource):  # a lane per partition, its offsets below its end; no sample read
                ranges, _ = await source.check_history(accept_partial=accept_partial_history)
                # A partition whose end is not known without reading it (an open Kinesis shard) counts as 0.
                counts, mark, fetched, seconds = (
                    [(r.end or r.earliest) - r.earliest for r in ranges],
                    sum(r.end or 0 for r in ranges),
                    0,
                    0.0,
                )
            else:
                counts, mark, fetched, seconds = await _sample(conn, source, settings, projection, lanes, chunk_size)
            measured = _measured(await Catalog(conn, settings.schema_name).generations(projection.name))
    finally:
        await sources.close()
    total = sum(counts)
    rate = fetched / seconds if seconds > 0 and fetched else 0.0
    made = ReplayPlan(
        projection=projection.name,
        mark=mark,
        events=total,
        lanes=[LanePlan(lane, count, count // chunk_size + 1) for lane, count in enumerate(counts)],
        chunk_size=chunk_size,
        max_parallel=max_parallel,
        sample_events=fetched,
        sample_seconds=seconds,
        events_per_second=rate,
        estimated_seconds=None,
        measured_events_per_second=measured[0] if measured else None,
        measured_generation=measured[1] if measured else None,
        source=source.name,
    )
    return estimate(made, workers)
