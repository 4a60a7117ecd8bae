"""Operating a projection safely: rollback, stale detection, verify against a sandbox rebuild, and the plan."""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg
from temporalio.client import Client

from rehydrate import catalog
from rehydrate.apply import Folding
from rehydrate.errors import UserError
from rehydrate.identifiers import qualified, quote
from rehydrate.models import Drift, VerifyInput, VerifyResult
from rehydrate.projections import Projection, Registry
from rehydrate.settings import Settings, lanes_for
from rehydrate.store import EventStore


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

    The catch-up runs here in bounded batches, each under the tail lock like a tail batch, so it is correct with
    or without a running tail (which would do the same from its next batch)."""
    store = EventStore(pool, settings.schema_name)
    async with pool.acquire() as conn:
        before, after = await catalog.rollback(conn, settings.schema_name, settings.read_model_schema, projection, to)
        fingerprint = (await catalog.generation_row(conn, settings.schema_name, projection.name, after))["fingerprint"]
        caught = 0
        while True:
            batch = await catalog.tail_batch(conn, store, settings.read_model_schema, projection, catch_up_batch)
            if batch is None or batch[1] == 0:
                break
            caught += batch[1]
    return Rollback(projection.name, before, after, caught, fingerprint != projection.fingerprint)


async def stale_projections(conn: asyncpg.Connection, settings: Settings, registry: Registry) -> list[str]:
    """Registered projections whose active generation was built from another fingerprint than the code's."""
    known = await catalog.projection_rows(conn, settings.schema_name)
    return [
        name
        for name in registry.names()
        if (row := known.get(name)) is not None
        and row.get("active_generation") is not None
        and row.get("fingerprint") != registry.get(name).fingerprint
    ]


# -- verify -----------------------------------------------------------------------------------------------------


# A verify runs as the `Verify` workflow (rehydrate/workflows/verify.py), so that a schedule can start it too; its
# activities call `compare_with_live` below. These names stay here for callers of the function API.
Verification = VerifyResult


async def verify(
    client: Client,
    settings: Settings,
    projection: str,
    *,
    keep: bool = False,
    show: int = 5,
    registry: Registry | None = None,
) -> VerifyResult:
    """Rebuild `projection` into a sandbox at the live generation's checkpoint and compare the two, key by key: the
    `Verify` workflow, started under its fixed id and waited for. Drift is a result here (`differing`), not an
    error; a failed verify is a UserError."""
    from rehydrate.starter import start_verify, wait_for_verify

    handle = await start_verify(client, settings, VerifyInput(projection, keep=keep, show=show), registry=registry)
    return await wait_for_verify(handle)


async def compare_with_live(
    pool: asyncpg.Pool,
    store: EventStore,
    read_schema: str,
    projection: Projection,
    label: str,
    sandbox_generation: int,
    show: int,
) -> VerifyResult:
    """Compare the sandbox build `sandbox_generation` (built at the live checkpoint C read earlier) with the live
    generation, at one point.

    The live generation moves with the tail, so under the projection's tail lock (the tail waits) the sandbox is
    caught up from C to the live checkpoint of that moment with exactly the delta the tail applied, and both tables
    are hashed in the same transaction. Everything happens in that transaction: a retry starts over cleanly."""
    schema = store.schema
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(catalog.TAIL_LOCK, projection.name)
        live = await catalog.active_generation(conn, schema, projection.name)
        live_row = await catalog.generation_row(conn, schema, projection.name, live)
        sandbox_row = await catalog.generation_row(conn, schema, projection.name, sandbox_generation)
        if live_row["checkpoint"] < sandbox_row["checkpoint"]:
            # A rollback during the rebuild put back a generation that is behind the mark the sandbox was built at:
            # comparing them would report the events in between as drift.
            raise UserError(
                f"the live generation of {projection.name!r} (g{live}, checkpoint {live_row['checkpoint']}) is behind "
                f"the rebuild's mark {sandbox_row['checkpoint']} (a rollback while verifying?)",
                fix="run the verify again",
            )
        if live_row["checkpoint"] > sandbox_row["checkpoint"]:
            await catalog.catch_up(
                conn, store, read_schema, projection, sandbox_generation, to_mark=live_row["checkpoint"]
            )
        count, first, live_rows, rebuilt_rows = await compare_tables(
            conn,
            projection,
            qualified(read_schema, live_row["physical_table"]),
            qualified(catalog.sandbox_schema(label), sandbox_row["physical_table"]),
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


async def compare_tables(
    conn: asyncpg.Connection, projection: Projection, live: str, rebuilt: str, show: int
) -> tuple[int, list[Drift], int, int]:
    """Keys whose rows differ (an md5 of each row's columns, full outer join on the key): (count, the first
    `show` in key order, live rows, rebuilt rows)."""
    shape = projection.table
    key = quote(shape.key_column)
    columns = ", ".join(f"t.{quote(c)}" for c in shape.columns)
    rows = await conn.fetch(
        f"""WITH l AS (SELECT t.{key}::text AS k, md5(ROW({columns})::text) AS h FROM {live} t),
                 r AS (SELECT t.{key}::text AS k, md5(ROW({columns})::text) AS h FROM {rebuilt} t),
                 d AS (SELECT coalesce(l.k, r.k) AS k, l.h IS NULL AS no_live, r.h IS NULL AS no_rebuilt
                       FROM l FULL OUTER JOIN r ON l.k = r.k WHERE l.h IS DISTINCT FROM r.h)
            SELECT k, no_live, no_rebuilt, count(*) OVER () AS n,
                   (SELECT count(*) FROM l) AS live_rows, (SELECT count(*) FROM r) AS rebuilt_rows
            FROM d ORDER BY k LIMIT $1""",
        max(show, 1),  # at least one row, which carries the count (`show` 0 must still find the drift)
    )
    if not rows:
        live_rows = int(await conn.fetchval(f"SELECT count(*) FROM {live}"))
        rebuilt_rows = int(await conn.fetchval(f"SELECT count(*) FROM {rebuilt}"))
        return 0, [], live_rows, rebuilt_rows
    first = [
        Drift(r["k"], "missing in live" if r["no_live"] else "missing in rebuild" if r["no_rebuilt"] else "differs")
        for r in rows[:show]
    ]
    return int(rows[0]["n"]), first, int(rows[0]["live_rows"]), int(rows[0]["rebuilt_rows"])


# -- plan ---------------------------------------------------------------------------------------------------------


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
    events_per_second: float
    estimated_seconds: float | None


class _Discard(Exception):
    """Rolls the sample's transaction back."""


async def plan(
    pool: asyncpg.Pool,
    settings: Settings,
    projection: Projection,
    *,
    lanes: int | None = None,
    chunk_size: int | None = None,
    max_parallel: int | None = None,
) -> ReplayPlan:
    """What a replay would do, changing nothing: events to read below the current high-water mark, per lane and
    in chunks, and a duration estimated from one timed sample chunk (read, fold and COPY into a table created in
    a transaction that is rolled back)."""
    chunk_size = settings.chunk_size if chunk_size is None else chunk_size
    max_parallel = settings.max_parallel if max_parallel is None else max_parallel
    if (lanes is not None and not 1 <= lanes <= 256) or chunk_size < 1 or max_parallel < 1:
        raise UserError("lanes, chunk size and max_parallel must be positive (lanes at most 256)", fix="fix them")
    store = EventStore(pool, settings.schema_name)
    types = projection.event_types
    async with pool.acquire() as conn:
        mark = await store.high_water_mark(conn)
        boundaries: list[str] = []
        split = await store.lane_split(conn, projection.key, settings.lane_split)  # as the replay's plan decides
        lanes = lanes_for(settings, split) if lanes is None else lanes
        if split == "range":
            boundaries, _ = await store.stream_boundaries(conn, mark=mark, types=types, lanes=lanes)
        if len(boundaries) == lanes - 1 and lanes > 1:
            counts = await store.count_ranges(conn, mark=mark, types=types, boundaries=boundaries)
        else:
            counts = await store.count_lanes(conn, mark=mark, types=types, key=projection.key, lanes=lanes)
        sample = min(chunk_size, 20_000)
        fetched, seconds = 0, 0.0
        try:
            async with conn.transaction():
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(settings.read_model_schema)}")
                await conn.execute(projection.table.create_table_sql(settings.read_model_schema, 0))
                started = time.perf_counter()
                folding = Folding(conn, projection, settings.read_model_schema, projection.table.physical_name(0))
                async for batch in store.read_lane(
                    conn, after_position=0, mark=mark, types=types, key=projection.key, lane=0, lanes=1, limit=sample
                ):
                    fetched += len(batch)
                    await folding.add(batch)
                await folding.write()
                seconds = time.perf_counter() - started
                raise _Discard
        except _Discard:
            pass
    total = sum(counts)
    rate = fetched / seconds if seconds > 0 and fetched else 0.0
    parallel = min(lanes, max_parallel)
    return ReplayPlan(
        projection=projection.name,
        mark=mark,
        events=total,
        lanes=[LanePlan(lane, count, count // chunk_size + 1) for lane, count in enumerate(counts)],
        chunk_size=chunk_size,
        max_parallel=max_parallel,
        sample_events=fetched,
        sample_seconds=seconds,
        events_per_second=rate,
        estimated_seconds=total / rate / parallel if rate else None,
    )
