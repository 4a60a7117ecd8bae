"""A chunk activity is safe to run again: its rows and its lane checkpoint commit together, or not at all.

The activities run outside Temporal here (`ActivityEnvironment`), after a real plan, against a real Postgres:
that is how a retry sees the database — a second delivery of the same `ChunkInput` after the first committed
(a lost acknowledgement), a zombie attempt racing its retry, or an attempt that failed half-way.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from rehydrate import Event, EventStore
from rehydrate.activities import ReplayActivities
from rehydrate.core.settings import Settings
from rehydrate.engine.apply import Folding
from rehydrate.engine.catalog import Catalog
from rehydrate.engine.projections import Projection, Registry, Row
from rehydrate.models import ChunkInput, ChunkResult, Plan, PlanInput
from rehydrate.sources import reading as store_module
from tests.helpers import domain

LANES = 2
CHUNK = 40


@pytest.fixture
def activity_settings(database_url: str, tmp_path: Path) -> Settings:
    # The activities need no Temporal server: only Postgres. Hash lanes, read in position order, so that
    # positions say what a chunk covered; stream-range lanes have their own test at the end.
    return Settings(
        database_url=database_url, data_dir=tmp_path / "data", lanes=LANES, chunk_size=CHUNK, lane_split="hash"
    )


# -- a projection that fails on demand -------------------------------------------------------------------


@dataclass
class Fault:
    """Off while `mode` is None. Otherwise the `at`-th handler call (and later ones) misbehave:
    "raise" raises in the handler; "bad_row" returns a row that cannot be stored (a number as owner), which fails
    the COPY *after* apply_events has already deleted the chunk's existing rows."""

    mode: str | None = None
    at: int = 1
    calls: int = 0
    fired: int = 0


FAULT = Fault()


@pytest.fixture
def fault() -> Iterator[Fault]:
    FAULT.mode, FAULT.at, FAULT.calls, FAULT.fired = None, 1, 0, 0
    yield FAULT
    FAULT.mode = None


def _faulty(handler: Any) -> Any:
    def handle(row: Row | None, event: Event) -> Row | None:
        new = handler(row, event)
        if FAULT.mode is None:
            return new
        FAULT.calls += 1
        if FAULT.calls < FAULT.at:
            return new
        if FAULT.mode == "raise":
            FAULT.fired += 1
            raise RuntimeError("injected fault")
        if row is not None and new is not None:
            FAULT.fired += 1
            return {**new, "owner": 12345}  # a number for a text column; later handlers leave owner alone
        return new

    return handle


# Same table and handlers as tests.helpers.domain.accounts, so the oracle of `domain.accounts` applies to it.
flaky_accounts = Projection("flaky_accounts", version=1, table=domain.Account, key="stream")
for _type, _handler in domain.accounts.handlers.items():
    flaky_accounts.on(_type)(_faulty(_handler))


# -- helpers --------------------------------------------------------------------------------------------


async def lane_of_streams(pool: asyncpg.Pool, lanes: int) -> dict[str, int]:
    """Each stream's lane, by the same hash the store partitions lanes with (stream-keyed projections)."""
    rows = await pool.fetch(
        "SELECT DISTINCT stream_id, (hashtextextended(stream_id, 0) & 9223372036854775807) % $1 FROM rehydrate.events",
        lanes,
    )
    return {row[0]: int(row[1]) for row in rows}


async def generation_rows(pool: asyncpg.Pool, projection: Projection, generation: int) -> dict[Any, Row]:
    physical = projection.table.physical_name(generation)
    rows = await pool.fetch(f'SELECT * FROM public."{physical}"')
    return {row[projection.table.key_column]: dict(row) for row in rows}


async def checkpoint(pool: asyncpg.Pool, projection: str, generation: int, lane: int) -> tuple[int, int, bool]:
    row = await pool.fetchrow(
        "SELECT position, events_applied, done FROM rehydrate.lane_checkpoints "
        "WHERE projection = $1 AND generation = $2 AND lane = $3",
        projection,
        generation,
        lane,
    )
    assert row is not None
    return (row[0], row[1], row[2])


@dataclass
class Lab:
    """One planned generation of a projection, its activities, and the oracle to check it against."""

    pool: asyncpg.Pool
    projection: Projection
    activities: ReplayActivities
    plan: Plan
    events: list[Event]
    lane_of: dict[str, int]

    def chunk(self, lane: int) -> ChunkInput:
        return ChunkInput(
            projection=self.projection.name,
            generation=self.plan.generation,
            lane=lane,
            lanes=len(self.plan.lanes),
            mark=self.plan.mark,
            chunk_size=self.plan.chunk_size,
        )

    async def run(self, lane: int) -> ChunkResult:
        return await ActivityEnvironment().run(self.activities.apply_chunk, self.chunk(lane))

    def handled(self, lanes: set[int], up_to: dict[int, int] | None = None) -> list[Event]:
        """Handled events of `lanes`, each lane up to its position in `up_to` (all of them when absent)."""
        return [
            e
            for e in self.events
            if e.type in self.projection.handlers
            and self.lane_of[e.stream_id] in lanes
            and (up_to is None or e.global_position <= up_to[self.lane_of[e.stream_id]])
        ]

    def expected(self, lanes: set[int], up_to: dict[int, int] | None = None) -> dict[Any, Row]:
        return domain.oracle(self.projection, self.handled(lanes, up_to))

    async def rows(self) -> dict[Any, Row]:
        return await generation_rows(self.pool, self.projection, self.plan.generation)

    async def checkpoint(self, lane: int) -> tuple[int, int, bool]:
        return await checkpoint(self.pool, self.projection.name, self.plan.generation, lane)

    async def applied(self) -> int:
        """The events_applied of every lane checkpoint, summed."""
        return sum([(await self.checkpoint(lane))[1] for lane in range(len(self.plan.lanes))])


async def make_lab(pool: asyncpg.Pool, store: EventStore, settings: Settings, projection: Projection, seed: int) -> Lab:
    await domain.append_all(store, domain.random_history(seed, streams=40, events=600))
    activities = ReplayActivities(pool, Registry([projection]), settings)
    plan = await ActivityEnvironment().run(
        activities.plan_replay,
        PlanInput(projection=projection.name, workflow_id=f"test-{projection.name}", run_id="run-1"),
    )
    assert len(plan.lanes) == LANES and plan.chunk_size == CHUNK
    lab = Lab(pool, projection, activities, plan, await domain.all_events(store), await lane_of_streams(pool, LANES))
    assert len(set(lab.lane_of.values())) == LANES, "the history must put streams in every lane"
    assert len(lab.handled({0})) > 3 * CHUNK, "lane 0 must take several chunks"
    return lab


# -- tests ----------------------------------------------------------------------------------------------


async def test_a_chunk_delivered_twice_continues_from_the_committed_checkpoint_and_applies_nothing_twice(
    pool: asyncpg.Pool, store: EventStore, activity_settings: Settings
) -> None:
    lab = await make_lab(pool, store, activity_settings, domain.accounts, seed=31)
    first = await lab.run(0)
    assert not first.done and first.chunk_events > 0
    assert await lab.rows() == lab.expected({0}, {0: first.position})
    assert await lab.checkpoint(0) == (first.position, first.applied, False)

    # The same ChunkInput again, as Temporal delivers it when the first attempt's completion was lost: it must
    # not fold the first chunk's events a second time, but take the next ones after the committed checkpoint.
    second = await lab.run(0)
    assert second.position > first.position
    assert second.applied == first.applied + second.chunk_events
    assert await lab.rows() == lab.expected({0}, {0: second.position})
    assert await lab.checkpoint(0) == (second.position, second.applied, second.done)

    # Run every remaining chunk of lane 0 twice; then lane 0 is complete and a further run changes nothing.
    result = second
    while not result.done:
        result = await lab.run(0)
        result = await lab.run(0) if not result.done else result
        assert await lab.rows() == lab.expected({0}, {0: result.position})
    done_rows, done_checkpoint = await lab.rows(), await lab.checkpoint(0)
    assert done_checkpoint == (result.position, len(lab.handled({0})), True)
    again = await lab.run(0)
    assert again == ChunkResult(position=result.position, applied=result.applied, chunk_events=0, done=True)
    assert await lab.rows() == done_rows
    assert await lab.checkpoint(0) == done_checkpoint

    # The other lane, once each: the generation's table is now the plain fold of all events.
    while not (await lab.run(1)).done:
        pass
    assert await lab.rows() == domain.oracle(domain.accounts, lab.events)
    assert await lab.applied() == len(lab.handled(set(range(LANES))))


async def test_two_attempts_of_the_same_chunk_at_once_are_serialised_by_the_lane_lock(
    pool: asyncpg.Pool, store: EventStore, activity_settings: Settings
) -> None:
    # A zombie attempt (its worker lost the heartbeat but still runs) and its retry, at the same time.
    lab = await make_lab(pool, store, activity_settings, domain.accounts, seed=32)
    results = await asyncio.gather(lab.run(0), lab.run(0))
    low, high = sorted(results, key=lambda r: r.position)
    assert low.position < high.position, "the second attempt started after the first one's commit"
    assert high.applied == low.applied + high.chunk_events
    assert await lab.rows() == lab.expected({0}, {0: high.position})
    assert await lab.checkpoint(0) == (high.position, high.applied, high.done)


@pytest.mark.parametrize("mode", ["raise", "bad_row"])
async def test_a_chunk_that_fails_midway_leaves_no_rows_and_no_checkpoint_movement(
    pool: asyncpg.Pool, store: EventStore, activity_settings: Settings, fault: Fault, mode: str
) -> None:
    lab = await make_lab(pool, store, activity_settings, flaky_accounts, seed=33)
    first = await lab.run(0)
    assert not first.done
    before_rows, before_checkpoint = await lab.rows(), await lab.checkpoint(0)
    assert before_rows == lab.expected({0}, {0: first.position})

    # The next chunk of lane 0 touches rows the first chunk wrote: with "bad_row", apply_events deletes them
    # before its COPY fails, so only the rollback of the whole transaction can bring them back.
    following = [e for e in lab.handled({0}) if e.global_position > first.position][:CHUNK]
    assert {e.stream_id for e in following} & set(before_rows)

    fault.mode, fault.at = mode, CHUNK // 2
    with pytest.raises(ApplicationError) as raised:
        await lab.run(0)
    assert fault.fired > 0
    assert raised.value.non_retryable and raised.value.type == "ProjectionError"
    expected_problem = "injected fault" if mode == "raise" else "cannot be stored"
    assert expected_problem in str(raised.value)
    assert await lab.rows() == before_rows
    assert await lab.checkpoint(0) == before_checkpoint

    # Fixed (the flag cleared), the same chunk runs again from the unmoved checkpoint, and the replay completes.
    fault.mode = None
    for lane in range(LANES):
        while not (await lab.run(lane)).done:
            pass
    assert await lab.rows() == domain.oracle(domain.accounts, lab.events)
    assert await lab.applied() == len(lab.handled(set(range(LANES))))


# -- stream-range lanes ---------------------------------------------------------------------------------------


async def range_read_so_far(pool: asyncpg.Pool, projection: str, generation: int, lane: int) -> set[int]:
    """Positions of the events a stream-range lane has read up to its checkpoint (compared in SQL, in the
    database's collation, as the lane reads them)."""
    rows = await pool.fetch(
        """SELECT e.global_position FROM rehydrate.events e JOIN rehydrate.lane_checkpoints c
             ON (c.low_stream IS NULL OR e.stream_id >= c.low_stream)
            AND (c.high_stream IS NULL OR e.stream_id < c.high_stream)
            AND c.after_stream IS NOT NULL AND (e.stream_id, e.stream_version) <= (c.after_stream, c.after_version)
           WHERE c.projection = $1 AND c.generation = $2 AND c.lane = $3 AND c.by_stream""",
        projection,
        generation,
        lane,
    )
    return {row[0] for row in rows}


async def test_stream_range_lanes_read_only_their_streams_and_a_chunk_delivered_twice_applies_nothing_twice(
    pool: asyncpg.Pool, store: EventStore, activity_settings: Settings
) -> None:
    settings = activity_settings.model_copy(update={"lane_split": "range"})
    lab = await make_lab(pool, store, settings, domain.accounts, seed=34)
    name, generation = lab.projection.name, lab.plan.generation
    bounds = await Catalog(pool, "rehydrate").lane_bounds(name, generation)
    assert bounds is not None and len(bounds) == LANES and bounds[0][0] is None and bounds[-1][1] is None
    handled = [e for e in lab.events if e.type in lab.projection.handlers]
    assert sum(lane.total for lane in lab.plan.lanes) == len(handled)
    assert all(lane.total > 0 for lane in lab.plan.lanes), "the sampled boundaries put events in every lane"

    def upto(positions: set[int]) -> list[Event]:
        return [e for e in handled if e.global_position in positions]

    positions = {e.global_position for e in handled}
    first = await lab.run(0)
    read = positions & await range_read_so_far(pool, name, generation, 0)
    assert not first.done and len(read) == CHUNK
    assert await lab.rows() == domain.oracle(domain.accounts, upto(read))
    # Whole streams, in version order: the chunk is a prefix of lane 0's (stream, version) order.
    streams = sorted({e.stream_id for e in upto(read)})
    assert len(streams) < CHUNK, "a chunk holds few streams, each with many events"

    # Delivered again (a lost completion) and, at the same time, a zombie attempt: serialised by the lane lock,
    # each takes the next chunk after the committed cursor.
    results = await asyncio.gather(lab.run(0), lab.run(0))
    read = positions & await range_read_so_far(pool, name, generation, 0)
    assert len(read) == 3 * CHUNK
    assert sorted(r.applied for r in results) == [2 * CHUNK, 3 * CHUNK]
    assert await lab.rows() == domain.oracle(domain.accounts, upto(read))

    for lane in range(LANES):
        while not (await lab.run(lane)).done:
            pass
    assert await lab.rows() == domain.oracle(domain.accounts, lab.events)
    assert await lab.applied() == len(handled)


async def test_auto_split_reads_by_stream_range_while_the_events_fit_in_the_cache_and_by_hash_beyond(
    pool: asyncpg.Pool, store: EventStore, activity_settings: Settings
) -> None:
    settings = activity_settings.model_copy(update={"lane_split": "auto"})
    lab = await make_lab(pool, store, settings, domain.accounts, seed=35)
    assert await Catalog(pool, "rehydrate").lane_bounds("accounts", lab.plan.generation) is not None
    async with pool.acquire() as conn:
        assert await store.fits_in_cache(conn)
        await conn.execute("SET effective_cache_size = '8kB'")  # a store far bigger than the cache
        try:
            assert not await store.fits_in_cache(conn)
        finally:
            await conn.execute("RESET effective_cache_size")


async def test_a_chunk_heartbeats_only_after_a_quarter_of_its_heartbeat_timeout_at_most_a_second(
    pool: asyncpg.Pool, store: EventStore, activity_settings: Settings
) -> None:
    """The SDK sends an activity's first heartbeat at once: for a chunk of well under a second, a round trip and a
    server write that tell the server nothing its completion will not. A chunk that runs longer still beats."""
    lab = await make_lab(pool, store, activity_settings, domain.accounts, seed=37)
    for timeout, expected in ((timedelta(seconds=30), 0), (None, 0), (timedelta(microseconds=40), 1)):
        beats: list[tuple[Any, ...]] = []
        env = ActivityEnvironment()
        env.info = replace(env.info, heartbeat_timeout=timeout)
        env.on_heartbeat = lambda *details, beats=beats: beats.append(details)
        result = await env.run(lab.activities.apply_chunk, lab.chunk(0))
        assert len(beats) == expected, (timeout, beats)
        assert beats == [(result.position,)] * expected


async def test_a_chunk_folds_its_fetched_rows_a_slice_at_a_time_and_lets_the_event_loop_turn_between_slices(
    pool: asyncpg.Pool, store: EventStore, activity_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker runs its workflow tasks, heartbeats and other chunks on the event loop its chunks fold on: a
    chunk that folded a whole fetch (50,000 events) in one go held them all up. Between slices it lets them in.
    Lanes by stream range: there folding a slice awaits nothing of its own (no lookup of stored rows)."""
    settings = activity_settings.model_copy(update={"lane_split": "range"})
    lab = await make_lab(pool, store, settings, domain.accounts, seed=38)
    monkeypatch.setattr(store_module, "SLICE", 7)
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    slices: list[tuple[int, int]] = []  # (events in the slice, turns the event loop had taken when it was folded)
    add = Folding.add

    async def counting_add(self: Folding, events: Sequence[Event]) -> None:
        slices.append((len(events), turns))
        await add(self, events)

    monkeypatch.setattr(Folding, "add", counting_add)
    counter = asyncio.create_task(count_turns())
    try:
        result = await lab.run(0)
    finally:
        counter.cancel()
    assert not result.done
    assert [size for size, _ in slices] == [7] * (CHUNK // 7) + [CHUNK % 7]  # one fetch, cut into slices
    assert all(later > earlier for (_, earlier), (_, later) in itertools.pairwise(slices)), slices
    read = await range_read_so_far(pool, lab.projection.name, lab.plan.generation, 0)
    assert await lab.rows() == domain.oracle(domain.accounts, [e for e in lab.events if e.global_position in read])
