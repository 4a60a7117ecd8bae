"""The replay against the oracle fold: any lanes, chunk sizes, continue-as-new; catch-up; swap; cancel."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from rehydrate import EventStore
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.deployment import build_id
from rehydrate.engine import build
from rehydrate.engine.aggregates import AggregateRegistry
from rehydrate.engine.generations import Generations
from rehydrate.models import ChunkInput, PlanInput, ReplayInput
from rehydrate.sources.pools import Sources
from rehydrate.starter import cancel_replay, replay_status, start_replay, wait_for_replay
from rehydrate.worker import running_worker
from rehydrate.workflows import ReplayWorkflow
from tests.helpers import domain


async def replay(client: Client, settings: Settings, input: ReplayInput) -> object:
    handle = await start_replay(client, settings, input)
    return await wait_for_replay(handle)


@pytest.mark.parametrize(
    ("lanes", "chunk_size", "seed", "split"),
    [(1, 37, 1, "range"), (3, 11, 2, "range"), (3, 11, 2, "hash"), (8, 5, 3, "range"), (3, 1000, 4, "hash")],
)
async def test_replay_equals_the_oracle_fold_for_any_lanes_and_chunk_size(
    client: Client, settings: Settings, store: EventStore, lanes: int, chunk_size: int, seed: int, split: str
) -> None:
    settings = settings.model_copy(update={"lane_split": split})  # payload-keyed projections always use hash
    await domain.append_all(store, domain.random_history(seed, streams=30, events=500))
    events = await domain.all_events(store)
    registry = domain.registry()
    async with running_worker(settings, registry, client=client):
        for projection in registry:
            result = await replay(client, settings, ReplayInput(projection.name, lanes=lanes, chunk_size=chunk_size))
            expected = domain.oracle(projection, events)
            assert await domain.read_model(store.pool, projection) == expected
            assert result.rows == len(expected)  # type: ignore[attr-defined]


async def test_replay_continues_as_new_and_still_equals_the_oracle(
    client: Client, settings: Settings, store: EventStore
) -> None:
    # 1,200 events in chunks of 5 over 2 lanes: ~240 activities, far past the session's continue-as-new limit.
    await domain.import_all(store, domain.random_history(9, streams=25, events=1200))
    events = await domain.all_events(store)
    async with running_worker(settings, domain.registry(), client=client):
        result = await replay(client, settings, ReplayInput("accounts", lanes=2, chunk_size=5))
    assert result.runs > 1  # type: ignore[attr-defined]
    assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, events)


async def test_second_replay_swaps_a_new_generation_and_keeps_the_previous_for_rollback(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(5, events=200))
    async with running_worker(settings, domain.registry(), client=client):
        first = await replay(client, settings, ReplayInput("accounts"))
        await domain.append_all(store, domain.random_history(6, events=50))
        second = await replay(client, settings, ReplayInput("accounts"))
        third = await replay(client, settings, ReplayInput("accounts"))
    assert (first.generation, second.generation, third.generation) == (1, 2, 3)  # type: ignore[attr-defined]
    assert third.previous_generation == 2  # type: ignore[attr-defined]
    states = dict(
        await store.pool.fetch("SELECT generation, state FROM rehydrate.generations WHERE projection = 'accounts'")
    )
    assert states == {1: "dropped", 2: "retired", 3: "active"}
    tables = {
        r[0] for r in await store.pool.fetch("SELECT tablename FROM pg_tables WHERE tablename LIKE 'account__g%'")
    }
    assert tables == {"account__g2", "account__g3"}
    indexes = await store.pool.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'account__g3'")
    assert any("owner" in r[0] for r in indexes), "secondary index is built after the load"
    events = await domain.all_events(store)
    assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, events)


async def test_a_swap_run_again_after_it_committed_reports_the_generation_it_replaced_and_its_delta(
    client: Client, settings: Settings, store: EventStore
) -> None:
    """A swap's attempt can commit and then lose its result (its worker dies before it reports): Temporal runs the
    activity again, and that attempt finds the generation active. It reports what the committed attempt did, the
    generation it replaced and the events its last delta applied, not None and 0."""
    await domain.append_all(store, domain.random_history(31, streams=12, events=300))
    async with running_worker(settings, domain.registry(), client=client):
        first = await replay(client, settings, ReplayInput("accounts"))
    projection, sources = domain.accounts, Sources(store)
    try:
        async with store.pool.acquire() as conn:
            # Generation 2, built as the workflow's steps build it: plan, every lane's chunks, the indexes.
            plan = await build.plan_generation(conn, sources, settings, projection, PlanInput("accounts", "w", "r"))
            for lane in plan.lanes:
                done = False
                while not done:
                    chunk = ChunkInput("accounts", plan.generation, lane.lane, len(plan.lanes), plan.mark, 50)
                    progress = build.ChunkProgress(heartbeat=lambda position: None, quiet_until=float("inf"))
                    done = (
                        await build.apply_chunk(conn, sources, settings.read_model_schema, projection, chunk, progress)
                    ).done
            generations = Generations(conn, sources, settings.read_model_schema)
            await generations.index(projection, plan.generation)
            await domain.append_all(store, domain.random_history(32, streams=3, events=7))  # after the target
            swapped = await generations.swap(projection, plan.generation)
            again = await generations.swap(projection, plan.generation)
    finally:
        await sources.close()
    assert (swapped.previous_generation, swapped.final_delta) == (first.generation, 7)  # type: ignore[attr-defined]
    assert again.committed_before and not swapped.committed_before  # the retry's metrics count nothing again
    assert (again.generation, again.previous_generation, again.final_delta, again.rows) == (
        plan.generation,
        first.generation,  # type: ignore[attr-defined]
        7,
        swapped.rows,
    )
    events = await domain.all_events(store)
    assert await domain.read_model(store.pool, projection) == domain.oracle(projection, events)


async def test_events_appended_during_the_replay_are_in_the_read_model_after_the_swap(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(11, streams=30, events=800))
    more = domain.random_history(12, streams=30, events=300)
    registry = domain.registry()
    async with running_worker(settings, registry, client=client):
        handle = await start_replay(client, settings, ReplayInput("accounts", lanes=2, chunk_size=10))

        async def writer() -> None:
            for stream, event in more:
                await store.append(stream, [event])
                await asyncio.sleep(0)

        result, _ = await asyncio.gather(wait_for_replay(handle), writer())
    # Everything the writer appended before the swap is in; the rest only differs by what came after the swap.
    generation = await store.pool.fetchrow(
        "SELECT checkpoint_xmin::text::bigint AS mark FROM rehydrate.generations WHERE generation = $1",
        result.generation,
    )
    covered = await store.pool.fetch(
        "SELECT global_position FROM rehydrate.events WHERE tx_id < $1::text::xid8", str(generation["mark"])
    )
    events = [e for e in await domain.all_events(store) if e.global_position in {r[0] for r in covered}]
    # Some of the writer's events came before the swap (the catch-up applied them); on a busy machine the replay may
    # swap before the writer is done, and what came after is the tail's.
    assert len(events) > 800 and result.caught_up > 0
    assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, events)


async def test_a_second_start_while_a_replay_runs_is_refused_with_a_clear_error(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(3, events=50))
    # No worker: the first replay stays running.
    await start_replay(client, settings, ReplayInput("accounts"))
    with pytest.raises(UserError, match="already running"):
        await start_replay(client, settings, ReplayInput("accounts"))
    attached = await start_replay(client, settings, ReplayInput("accounts"), attach=True)
    async with running_worker(settings, domain.registry(), client=client):
        result = await wait_for_replay(attached)
    assert result.generation == 1


async def test_cancel_drops_the_half_built_generation_and_keeps_the_active_one(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(21, events=300))
    registry = domain.registry()
    async with running_worker(settings, registry, client=client):
        await replay(client, settings, ReplayInput("accounts"))
        before = await domain.read_model(store.pool, domain.accounts)
        handle = await start_replay(client, settings, ReplayInput("accounts", lanes=1, chunk_size=1, max_parallel=1))
        while (await handle.query(ReplayWorkflow.progress)).events_applied < 5:
            await asyncio.sleep(0.05)
        await cancel_replay(client, "accounts", task_queue=settings.temporal_task_queue)
        with pytest.raises(UserError):
            await wait_for_replay(handle)
        status = await replay_status(client, "accounts", task_queue=settings.temporal_task_queue)
    assert status.status == WorkflowExecutionStatus.CANCELED.name
    assert await domain.read_model(store.pool, domain.accounts) == before
    rows = await store.pool.fetch("SELECT generation, state FROM rehydrate.generations ORDER BY generation")
    assert [tuple(r) for r in rows] == [(1, "active"), (2, "cancelled")]
    assert await store.pool.fetchval("SELECT to_regclass('public.account__g2')") is None


async def test_an_unversioned_worker_names_its_build_by_its_projections(
    client: Client, settings: Settings, store: EventStore
) -> None:
    # Without a build id the SDK hashes every loaded module's code at each worker start.
    await domain.append_all(store, domain.random_history(9, streams=5, events=40))
    registry = domain.registry()
    async with running_worker(settings, registry, client=client):
        handle = await start_replay(client, settings, ReplayInput("accounts"))
        await wait_for_replay(handle)
    history = await client.get_workflow_handle(handle.id, run_id=handle.result_run_id).fetch_history()
    builds = {
        event.workflow_task_completed_event_attributes.worker_version.build_id
        for event in history.events
        if event.HasField("workflow_task_completed_event_attributes")
    }
    assert builds == {build_id(registry, AggregateRegistry.from_settings(settings))}
