"""Read models rebuilt from a Kinesis stream, against moto's server mode (an emulator of the Kinesis API) and the real
Temporal and Postgres: shards as lanes, each lane's ordinal and sequence number written with its rows; producers
writing all along; the tail following; a verify; a resharded stream's lanes started after their parents' lanes; the
history guard; a reshard after the build; bad records parked."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from rehydrate import EventStore, NewEvent
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.engine import operations
from rehydrate.engine.catalog import Catalog
from rehydrate.engine.generations import Generations
from rehydrate.engine.projections import Registry
from rehydrate.models import ChunkInput, ChunkResult, ReplayInput
from rehydrate.sources.pools import Sources
from rehydrate.starter import start_replay, verify, wait_for_replay
from rehydrate.worker import running_worker
from tests.helpers import domain, kinesis
from tests.helpers.waiting import eventually
from tests.integration.test_kafka_replays import in_process_workers


def _stream() -> str:
    return f"ledger-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_read_model_rebuilt_from_a_stream_equals_the_fold_while_producers_write_and_the_tail_follows(
    client: Client, tail_settings: Settings, store: EventStore, kinesis_endpoint: str, workers: int
) -> None:
    """4 shards; one or two workers; producers write during the build, the catch-up and the swap, and after it (the
    tail's); a verify finds no drift."""
    stream = _stream()
    kinesis.create_stream(kinesis_endpoint, stream, 4)
    history = domain.random_history(21, streams=40, events=1500)
    kinesis.write_history(kinesis_endpoint, stream, history)
    projection = kinesis.accounts(kinesis_endpoint, stream)
    registry = Registry([projection])
    more: list[tuple[str, NewEvent]] = []
    writing = True

    async def producer() -> None:
        seed = 100
        while writing:
            seed += 1
            batch = domain.random_history(seed, streams=45, events=20)
            batch = [(f"{key}-{seed}", event) for key, event in batch]
            await asyncio.to_thread(kinesis.write_history, kinesis_endpoint, stream, batch)
            more.extend(batch)
            await asyncio.sleep(0.02)

    async with in_process_workers(tail_settings, registry, client, workers):
        writes = asyncio.create_task(producer())
        try:
            handle = await start_replay(
                client, tail_settings, ReplayInput(projection.name, chunk_size=100, max_parallel=workers)
            )
            result = await wait_for_replay(handle)
        finally:
            writing = False
            await writes
        # Every handled event of the history was applied before the swap (the rest is the tail's).
        assert result.events_applied >= sum(event.type in projection.handlers for _, event in history)
        assert more, "producers wrote during the build and the swap"
        async with store.pool.acquire() as conn:
            lanes = await Catalog(conn, store.schema).log_lanes(projection.name, result.generation)
        assert [lane["partition_name"] for lane in lanes] == [
            s["ShardId"] for s in kinesis.shards(kinesis_endpoint, stream)
        ]
        assert all(lane["log_cursor"] for lane in lanes)
        after = domain.random_history(999, streams=5, events=40)
        after = [(f"{key}-after", event) for key, event in after]
        kinesis.write_history(kinesis_endpoint, stream, after)
        want = domain.oracle(projection, kinesis.as_events(history + more + after))

        async def caught_up() -> bool:
            return await domain.read_model(store.pool, projection) == want

        await eventually(caught_up, within=30)
        checked = await verify(client, tail_settings, projection.name, registry=registry)
        assert checked.differing == 0 and checked.live_rows == len(want)


async def test_a_resharded_stream_is_rebuilt_with_each_lane_started_after_its_parents(
    client: Client, settings: Settings, store: EventStore, kinesis_endpoint: str
) -> None:
    """Two shards; one split, then the two children merged. moto changes the shard list as Kinesis does (parents
    closed, children naming them) but goes on putting records into the first shard that covers a key's hash, the
    closed parent included, so its children stay empty: the records' order across a reshard cannot be shown with
    it. What is shown: the lanes are the shards with their parents, the read model equals the fold, and in the
    replay's history no chunk of a child's lane is scheduled before the chunk that finished each of its parents."""
    stream = _stream()
    kinesis.create_stream(kinesis_endpoint, stream, 2)
    history = domain.random_history(41, streams=30, events=1200)
    kinesis.write_history(kinesis_endpoint, stream, history[:400])
    kinesis.split(kinesis_endpoint, stream, kinesis.shards(kinesis_endpoint, stream)[0])
    kinesis.write_history(kinesis_endpoint, stream, history[400:800])
    opened = sorted(
        kinesis.open_shards(kinesis_endpoint, stream), key=lambda s: int(s["HashKeyRange"]["StartingHashKey"])
    )
    kinesis.merge(kinesis_endpoint, stream, opened[0], opened[1])
    kinesis.write_history(kinesis_endpoint, stream, history[800:])
    projection = kinesis.accounts(kinesis_endpoint, stream)
    async with running_worker(settings, Registry([projection]), client=client):
        handle = await start_replay(client, settings, ReplayInput(projection.name, chunk_size=37, max_parallel=4))
        result = await wait_for_replay(handle)
    assert result.events_applied == sum(event.type in projection.handlers for _, event in history)
    assert await domain.read_model(store.pool, projection) == domain.oracle(projection, kinesis.as_events(history))
    async with store.pool.acquire() as conn:
        lanes = await Catalog(conn, store.schema).log_lanes(projection.name, result.generation)
    shards = kinesis.shards(kinesis_endpoint, stream)
    lane_of = {s["ShardId"]: n for n, s in enumerate(shards)}
    parents = [[lane_of[p] for p in (s.get("ParentShardId"), s.get("AdjacentParentShardId")) if p] for s in shards]
    assert [list(lane["parent_lanes"]) for lane in lanes] == parents == [[], [], [0], [0], [2, 3]]
    first_scheduled, finished = await _chunk_order(client, handle.id)
    assert len(first_scheduled) == 5
    for lane, waits_for in enumerate(parents):
        for parent in waits_for:
            assert first_scheduled[lane] > finished[parent], f"lane {lane} started before its parent {parent} ended"
    assert first_scheduled[2] > first_scheduled[0] + 10, "lane 0's many chunks ran before its children's first"


async def _chunk_order(client: Client, workflow_id: str) -> tuple[dict[int, int], dict[int, int]]:
    """In a replay's history (one run): each lane's first chunk's scheduled event id, and the event id of the
    completion of the chunk that finished it."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    lane_of: dict[int, int] = {}
    first: dict[int, int] = {}
    finished: dict[int, int] = {}
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attributes = event.activity_task_scheduled_event_attributes
            if attributes.activity_type.name == "rehydrate.apply_chunk":
                (chunk,) = await client.data_converter.decode(attributes.input.payloads, [ChunkInput])
                lane_of[event.event_id] = chunk.lane
                first.setdefault(chunk.lane, event.event_id)
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attributes = event.activity_task_completed_event_attributes
            if attributes.scheduled_event_id in lane_of:
                (done,) = await client.data_converter.decode(attributes.result.payloads, [ChunkResult])
                if done.done:
                    finished[lane_of[attributes.scheduled_event_id]] = event.event_id
    return first, finished


async def test_an_old_stream_is_refused_by_plan_and_start_unless_a_partial_history_is_accepted(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    with kinesis.moto_server(tmp_path / "moto.log", behind_hours=30) as endpoint:
        stream = _stream()
        kinesis.create_stream(endpoint, stream, 2)
        history = domain.random_history(22, streams=10, events=60)
        kinesis.write_history(endpoint, stream, history)
        projection = kinesis.accounts(endpoint, stream)
        with pytest.raises(UserError, match=rf"stream '{stream}' was created .* retention period") as refused:
            await operations.plan(store.pool, settings, projection)
        assert "--accept-partial-history" in (refused.value.fix or "")
        planned = await operations.plan(store.pool, settings, projection, accept_partial_history=True)
        assert len(planned.lanes) == 2
        async with running_worker(settings, Registry([projection]), client=client):
            with pytest.raises(UserError, match=rf"replay failed: stream '{stream}' was created"):
                await wait_for_replay(await start_replay(client, settings, ReplayInput(projection.name)))
            result = await wait_for_replay(
                await start_replay(client, settings, ReplayInput(projection.name, accept_partial_history=True))
            )
        assert await domain.read_model(store.pool, projection) == domain.oracle(projection, kinesis.as_events(history))
    async with store.pool.acquire() as conn:
        rows = await Catalog(conn, store.schema).generations(projection.name)
    assert [(r["generation"], r["partial_history"]) for r in rows] == [(result.generation, True)]


async def test_a_reshard_after_the_build_stops_the_tail_cleanly_and_leaves_the_read_model(
    client: Client, settings: Settings, store: EventStore, kinesis_endpoint: str
) -> None:
    stream = _stream()
    kinesis.create_stream(kinesis_endpoint, stream, 2)
    history = domain.random_history(23, streams=10, events=80)
    kinesis.write_history(kinesis_endpoint, stream, history)
    projection = kinesis.accounts(kinesis_endpoint, stream)
    async with running_worker(settings, Registry([projection]), client=client):
        await wait_for_replay(await start_replay(client, settings, ReplayInput(projection.name)))
    before = await domain.read_model(store.pool, projection)
    assert before == domain.oracle(projection, kinesis.as_events(history))
    kinesis.split(kinesis_endpoint, stream, kinesis.shards(kinesis_endpoint, stream)[1])
    kinesis.write_history(kinesis_endpoint, stream, domain.random_history(24, streams=10, events=30))
    sources = Sources(store)
    try:
        async with store.pool.acquire() as conn:
            with pytest.raises(UserError, match="that the generation was not planned on: it was resharded") as error:
                await Generations(conn, sources, settings.read_model_schema).tail_batch(projection, 1000)
            assert "rebuild the projection with a new replay" in (error.value.fix or "")
    finally:
        await sources.close()
    assert await domain.read_model(store.pool, projection) == before


async def test_records_that_are_not_events_are_parked_naming_their_shard_and_record(
    client: Client, settings: Settings, store: EventStore, kinesis_endpoint: str
) -> None:
    """Data that is not JSON, and JSON without a type field, among good records: each bad one parks its key; every
    other key equals its fold."""
    stream = _stream()
    kinesis.create_stream(kinesis_endpoint, stream, 2)
    history = domain.random_history(25, streams=12, events=200)
    kinesis.write_history(kinesis_endpoint, stream, history)
    kinesis.put(kinesis_endpoint, stream, [("acct-bad-1", b"\xffnot json"), ("acct-bad-2", {"owner": "x"})])
    projection = kinesis.accounts(kinesis_endpoint, stream, on_error="park")
    async with running_worker(settings, Registry([projection]), client=client):
        await wait_for_replay(
            await start_replay(client, settings, ReplayInput(projection.name, allow_dead_letters=True))
        )
    assert await domain.read_model(store.pool, projection) == domain.oracle(projection, kinesis.as_events(history))
    parked = await store.pool.fetch(
        "SELECT stream_id, error FROM rehydrate.dead_letters WHERE projection = 'accounts' ORDER BY stream_id"
    )
    assert [row["stream_id"] for row in parked] == ["acct-bad-1"]
    assert "could not decode the data of record" in parked[0]["error"] and "of shard shardId-" in parked[0]["error"]
