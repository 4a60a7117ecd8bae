"""Read models rebuilt from a Kafka topic, against a real Kafka-protocol broker (tansu) and the real Temporal and
Postgres: partitions as lanes, offset ranges as chunks, each lane's offset written with its rows; producers writing all
along; the tail following; a verify; a repair of keys; the history guard; a topic whose partitions change or that
loses its history."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from temporalio.client import Client

from rehydrate import EventStore, NewEvent
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.engine import build, operations
from rehydrate.engine.catalog import Catalog
from rehydrate.engine.generations import Generations
from rehydrate.engine.projections import Projection, Registry
from rehydrate.models import PlanInput, RepairInput, ReplayInput
from rehydrate.sources.declaration import KafkaSource
from rehydrate.sources.mapping import KafkaTopic
from rehydrate.sources.pools import Sources
from rehydrate.starter import repair, start_replay, verify, wait_for_replay
from rehydrate.worker import running_worker
from tests.helpers import domain, kafka, legacy
from tests.helpers.waiting import eventually


def _topic() -> str:
    return f"ledger-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("workers", [1, 4])
async def test_a_read_model_rebuilt_from_a_topic_equals_the_fold_while_producers_write_and_the_tail_follows(
    client: Client, tail_settings: Settings, store: EventStore, kafka_bootstrap: str, workers: int
) -> None:
    """4 partitions; one worker running one chunk at a time, or four workers (two of them processes' worth of
    activity slots) running four; producers write during the build and the swap; a verify finds no drift."""
    topic = _topic()
    await kafka.create_topic(kafka_bootstrap, topic, 4)
    history = domain.random_history(21, streams=40, events=1500)
    await kafka.write_history(kafka_bootstrap, topic, history)
    projection = kafka.accounts(kafka_bootstrap, topic)
    registry = Registry([projection])
    more: list[tuple[str, NewEvent]] = []
    writing = True

    async def producer() -> None:
        seed = 100
        while writing:
            seed += 1
            batch = domain.random_history(seed, streams=45, events=20)
            # Streams of the batch go on from the history's: rename them apart so that a batch's Opened is its own.
            batch = [(f"{stream}-{seed}", event) for stream, event in batch]
            await kafka.write_history(kafka_bootstrap, topic, batch)
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
        assert result.events_applied >= 1500
        assert more, "producers wrote during the build and the swap"
        async with store.pool.acquire() as conn:
            catalog = Catalog(conn, store.schema)
            lanes = await catalog.log_lanes(projection.name, result.generation)
        assert [lane["lane"] for lane in lanes] == [0, 1, 2, 3]

        want = domain.oracle(projection, kafka.as_events(history + more))

        async def caught_up() -> bool:
            return await domain.read_model(store.pool, projection) == want

        await eventually(caught_up, within=30)
        checked = await verify(client, tail_settings, projection.name, registry=registry)
        assert checked.differing == 0 and checked.live_rows == len(want)


@contextlib.asynccontextmanager
async def in_process_workers(settings: Settings, registry: Registry, client: Client, n: int) -> AsyncIterator[None]:
    """`n` workers on one task queue in this process, each with a client of its own (one client takes one worker
    per task queue)."""
    async with contextlib.AsyncExitStack() as stack:
        for number in range(n):
            own = client if number == 0 else await Client.connect(settings.temporal_address)
            await stack.enter_async_context(running_worker(settings, registry, client=own))
        yield


async def test_a_compacted_topic_is_refused_by_plan_and_start_unless_a_partial_history_is_accepted(
    client: Client, settings: Settings, store: EventStore, kafka_bootstrap: str
) -> None:
    topic = _topic()
    await kafka.create_topic(kafka_bootstrap, topic, 2, **{"cleanup.policy": "compact"})
    history = domain.random_history(22, streams=10, events=60)
    await kafka.write_history(kafka_bootstrap, topic, history)
    projection = kafka.accounts(kafka_bootstrap, topic)
    with pytest.raises(UserError, match=r"topic '.*' is compacted \(cleanup.policy=compact\)") as refused:
        await operations.plan(store.pool, settings, projection)
    assert "--accept-partial-history" in (refused.value.fix or "")
    planned = await operations.plan(store.pool, settings, projection, accept_partial_history=True)
    assert planned.events == 60 and len(planned.lanes) == 2
    async with running_worker(settings, Registry([projection]), client=client):
        with pytest.raises(UserError, match=r"replay failed: topic .* is compacted"):
            await wait_for_replay(await start_replay(client, settings, ReplayInput(projection.name)))
        result = await wait_for_replay(
            await start_replay(client, settings, ReplayInput(projection.name, accept_partial_history=True))
        )
    assert await domain.read_model(store.pool, projection) == domain.oracle(projection, kafka.as_events(history))
    async with store.pool.acquire() as conn:
        rows = await Catalog(conn, store.schema).generations(projection.name)
    # The refused start made no generation.
    assert [(r["generation"], r["partial_history"]) for r in rows] == [(result.generation, True)]


async def test_bad_inputs_for_a_topic_are_refused_with_what_to_do(
    settings: Settings, store: EventStore, kafka_bootstrap: str
) -> None:
    """A projection keyed by a payload field; lanes other than the partitions; a cut-off; a missing topic."""
    source = KafkaSource("ledger", KafkaTopic(_topic()), kafka_bootstrap)
    with pytest.raises(UserError, match="a topic orders events only per message key"):
        Projection("totals", version=1, table=domain.GroupTotal, key="group", source=source)
    await kafka.create_topic(kafka_bootstrap, source.topic.topic, 3)
    projection = legacy.accounts(read=source)
    sources = Sources(store)
    try:
        async with store.pool.acquire() as conn:
            generations = Generations(conn, sources, settings.read_model_schema)
            with pytest.raises(UserError, match=r"whose lanes are its 3 partition\(s\), not 5"):
                await build.plan_generation(
                    conn, sources, settings, projection, PlanInput("accounts", "w", "r", lanes=5)
                )
            with pytest.raises(UserError, match="not available for a topic"):
                await build.plan_generation(
                    conn, sources, settings, projection, PlanInput("accounts", "w", "r", sandbox="s", to_position=9)
                )
            assert await generations.catalog.generations("accounts") == []
    finally:
        await sources.close()
    missing = legacy.accounts(read=KafkaSource("ledger", KafkaTopic("no-such-topic"), kafka_bootstrap))
    with pytest.raises(UserError, match="topic 'no-such-topic' does not exist"):
        await operations.plan(store.pool, settings, missing)


async def test_a_topic_made_anew_with_more_partitions_fails_the_tail_cleanly_and_leaves_the_read_model(
    client: Client, settings: Settings, store: EventStore, kafka_bootstrap: str
) -> None:
    """Keys move between partitions when a topic's partitions change (tansu adds none to a topic, so the topic is
    deleted and made anew with three): offsets no longer say what was read. The tail's batch is refused with what
    to do, and nothing is written."""
    topic = _topic()
    await kafka.create_topic(kafka_bootstrap, topic, 2)
    history = domain.random_history(23, streams=10, events=80)
    await kafka.write_history(kafka_bootstrap, topic, history)
    projection = kafka.accounts(kafka_bootstrap, topic)
    async with running_worker(settings, Registry([projection]), client=client):
        await wait_for_replay(await start_replay(client, settings, ReplayInput(projection.name)))
    before = await domain.read_model(store.pool, projection)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()
    await kafka.create_topic(kafka_bootstrap, topic, 3)
    await kafka.write_history(kafka_bootstrap, topic, domain.random_history(24, streams=10, events=30))
    sources = Sources(store)
    try:
        async with store.pool.acquire() as conn:
            with pytest.raises(UserError, match=r"the topic has 3 partition\(s\), the generation was built from 2"):
                await Generations(conn, sources, settings.read_model_schema).tail_batch(projection, 1000)
    finally:
        await sources.close()
    assert await domain.read_model(store.pool, projection) == before


async def test_a_broker_that_loses_its_topic_fails_the_tail_cleanly(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    """tansu keeps topics in memory only: killed and started again on its port, it holds nothing. The read model
    keeps what it had, and the tail's batch says the topic is gone instead of reading anything."""
    with kafka.tansu(tmp_path / "tansu-1.log") as bootstrap:
        topic = _topic()
        await kafka.create_topic(bootstrap, topic, 2)
        history = domain.random_history(25, streams=10, events=80)
        await kafka.write_history(bootstrap, topic, history)
        projection = kafka.accounts(bootstrap, topic)
        async with running_worker(settings, Registry([projection]), client=client):
            await wait_for_replay(await start_replay(client, settings, ReplayInput(projection.name)))
    before = await domain.read_model(store.pool, projection)
    assert before == domain.oracle(projection, kafka.as_events(history))
    port = int(bootstrap.rpartition(":")[2])
    with kafka.tansu(tmp_path / "tansu-2.log", port=port):
        sources = Sources(store)
        try:
            async with store.pool.acquire() as conn:
                with pytest.raises(UserError, match=f"topic '{topic}' does not exist"):
                    await Generations(conn, sources, settings.read_model_schema).tail_batch(projection, 1000)
        finally:
            await sources.close()
    assert await domain.read_model(store.pool, projection) == before


async def test_keys_repaired_from_a_topic_equal_their_fold(
    client: Client, settings: Settings, store: EventStore, kafka_bootstrap: str
) -> None:
    topic = _topic()
    await kafka.create_topic(kafka_bootstrap, topic, 3)
    history = domain.random_history(26, streams=12, events=150)
    await kafka.write_history(kafka_bootstrap, topic, history)
    projection = kafka.accounts(kafka_bootstrap, topic)
    async with running_worker(settings, Registry([projection]), client=client):
        await wait_for_replay(await start_replay(client, settings, ReplayInput(projection.name)))
        want = domain.oracle(projection, kafka.as_events(history))
        keys = sorted(want)[:2]
        await store.pool.execute("UPDATE public.account SET balance = -1 WHERE account_id = ANY($1::text[])", keys)
        done = await repair(client, settings, RepairInput(projection.name, keys=keys))
    assert (done.keys, done.changed) == (2, 2)
    assert await domain.read_model(store.pool, projection) == want
