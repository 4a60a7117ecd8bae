"""The tail: new events reach the active read model in order, exactly once, gap-safe under concurrent writers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
from temporalio.client import Client
from temporalio.service import RPCError

from rehydrate.errors import ConcurrencyError
from rehydrate.models import ReplayInput
from rehydrate.settings import Settings
from rehydrate.starter import start_replay, start_tail, stop_tail, tail_state, wait_for_replay
from rehydrate.store import EventStore, NewEvent
from rehydrate.worker import running_worker
from rehydrate.workflows import tail_workflow_id
from tests import support


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def matches_oracle(store: EventStore) -> bool:
    events = await support.all_events(store)
    return await support.read_model(store.pool, support.accounts) == support.oracle(support.accounts, events)


@pytest.fixture
async def tail_settings(settings: Settings, client: Client) -> AsyncIterator[Settings]:
    yield settings.model_copy(update={"tails": True})
    # Tail workflow ids are fixed per projection and every test shares the session's Temporal server: end this
    # test's tails so that the next test's worker starts its own instead of attaching to an orphan.
    for name in support.registry().names():
        with contextlib.suppress(RPCError):
            await client.get_workflow_handle(tail_workflow_id(name)).terminate("test finished")


async def test_the_tail_applies_new_events_after_the_swap(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    await support.append_all(store, support.random_history(41, events=300))
    async with running_worker(tail_settings, support.registry(), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("accounts")))
        await support.append_all(store, support.random_history(42, events=200))
        await eventually(lambda: matches_oracle(store))
        assert (await tail_state(client, "accounts"))[0] == "RUNNING"


async def active_checkpoint(store: EventStore, projection: str) -> int:
    return int(
        await store.pool.fetchval(
            """SELECT g.checkpoint_xmin::text::bigint FROM rehydrate.generations g
               JOIN rehydrate.projections p ON p.name = g.projection AND p.active_generation = g.generation
               WHERE g.projection = $1""",
            projection,
        )
    )


async def test_the_tail_never_passes_an_event_whose_transaction_commits_late(
    client: Client, tail_settings: Settings, store: EventStore, database_url: str
) -> None:
    await support.append_all(store, support.random_history(43, events=100))
    async with running_worker(tail_settings, support.registry(), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("accounts")))
        before = await support.read_model(store.pool, support.accounts)
        a = await asyncpg.connect(database_url)
        try:
            tx = a.transaction()
            await tx.start()
            await store.append("late-a", [NewEvent("Opened", {"owner": "a", "group": "g"})], connection=a)
            a_xid = int(await a.fetchval("SELECT pg_current_xact_id()::text::bigint"))
            await store.append("early-b", [NewEvent("Opened", {"owner": "b", "group": "g"})])
            await asyncio.sleep(2.5)  # more than two poll intervals, and B's NOTIFY has woken the tail
            assert await support.read_model(store.pool, support.accounts) == before
            assert await active_checkpoint(store, "accounts") <= a_xid
            await tx.commit()
        finally:
            await a.close()
        await eventually(lambda: matches_oracle(store))
    rows = await support.read_model(store.pool, support.accounts)
    assert rows["late-a"]["owner"] == "a" and rows["early-b"]["owner"] == "b"


async def test_the_tail_applies_a_stream_in_stream_order_when_transaction_order_differs(
    client: Client, tail_settings: Settings, store: EventStore, database_url: str
) -> None:
    await support.append_all(store, support.random_history(44, events=50))
    async with running_worker(tail_settings, support.registry(), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("accounts")))
        t1, blocker = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
        try:
            t1_tx, blocker_tx = t1.transaction(), blocker.transaction()
            await t1_tx.start()
            await t1.fetchval("SELECT pg_current_xact_id()")  # T1 takes the earlier transaction id
            await blocker_tx.start()
            await blocker.fetchval("SELECT pg_current_xact_id()")
            await store.append("s", [NewEvent("Opened", {"owner": "x", "group": "g"})])  # version 1, later id
            await store.append(
                "s", [NewEvent("Deposited", {"amount": 7, "group": "g"})], expected_version=1, connection=t1
            )
            await t1_tx.commit()  # version 2 is now below the mark, version 1 is not
            await asyncio.sleep(2.5)
            assert "s" not in await support.read_model(store.pool, support.accounts)
            await blocker_tx.commit()
        finally:
            await t1.close()
            await blocker.close()
        await eventually(lambda: matches_oracle(store))
    row = (await support.read_model(store.pool, support.accounts))["s"]
    assert (row["history"], row["balance"]) == ("oD", 7)


async def test_concurrent_writers_during_a_replay_and_its_swap_end_equal_to_the_oracle(
    client: Client, tail_settings: Settings, store: EventStore, database_url: str
) -> None:
    await support.append_all(store, support.random_history(45, streams=40, events=1500))
    stop = asyncio.Event()

    async def writer(seed: int) -> None:
        for stream, event in support.random_history(seed, streams=40, events=100_000):
            if stop.is_set():
                return
            with contextlib.suppress(ConcurrencyError):  # another writer appended to the stream first
                await store.append(stream, [event])
            await asyncio.sleep(0.002)

    async def late_committer() -> None:
        conn = await asyncpg.connect(database_url)
        n = 0
        try:
            while not stop.is_set():
                tx = conn.transaction()
                await tx.start()
                await store.append(f"late-{n}", [NewEvent("Opened", {"owner": "l", "group": "g"})], connection=conn)
                await asyncio.sleep(0.15)  # others append and commit meanwhile
                await tx.commit()
                n += 1
        finally:
            await conn.close()

    async with running_worker(tail_settings, support.registry(), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("accounts")))
        writers = [asyncio.create_task(writer(seed)) for seed in (46, 47, 48)]
        writers.append(asyncio.create_task(late_committer()))
        try:
            result = await wait_for_replay(
                await start_replay(client, tail_settings, ReplayInput("accounts", lanes=3, chunk_size=40))
            )
        finally:
            stop.set()
            await asyncio.gather(*writers)
        await eventually(lambda: matches_oracle(store), within=30)
    active = await store.pool.fetchval("SELECT active_generation FROM rehydrate.projections WHERE name = 'accounts'")
    assert active == result.generation == 2


async def test_a_poison_event_stops_that_projections_tail_with_a_clear_error_and_the_others_go_on(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    await support.append_all(store, support.random_history(49, events=100))
    async with running_worker(tail_settings, support.registry(), client=client):
        for name in ("accounts", "group_totals"):
            await wait_for_replay(await start_replay(client, tail_settings, ReplayInput(name)))
        groups_before = await support.read_model(store.pool, support.group_totals)
        # group_totals is keyed by the payload's "group": this event has none.
        await store.append("poison", [NewEvent("Opened", {"owner": "p"})])
        poison = (await store.read_stream("poison"))[0]

        async def tail_failed() -> bool:
            return (await tail_state(client, "group_totals"))[0] == "FAILED"

        await eventually(tail_failed)
        _, error = await tail_state(client, "group_totals")
        assert error is not None
        assert f"event {poison.global_position}" in error and "'poison'" in error and "'Opened'" in error
        recorded = await store.pool.fetchval("SELECT tail_error FROM rehydrate.projections WHERE name = 'group_totals'")
        assert recorded is not None and "group" in recorded
        assert await support.read_model(store.pool, support.group_totals) == groups_before
        # The other projection's tail goes on: it applied the event (it keys by stream) and applies later ones.
        await store.append("after", [NewEvent("Opened", {"owner": "z", "group": "g1"})])
        await eventually(lambda: matches_oracle(store))
        assert (await tail_state(client, "accounts"))[0] == "RUNNING"


async def test_tail_stop_holds_new_events_back_and_tail_start_applies_them_exactly_once(
    client: Client, tail_settings: Settings, store: EventStore, pool: asyncpg.Pool
) -> None:
    await support.append_all(store, support.random_history(50, events=100))
    async with running_worker(tail_settings, support.registry(), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("accounts")))
        await stop_tail(client, pool, tail_settings, "accounts")

        async def cancelled() -> bool:
            return (await tail_state(client, "accounts"))[0] == "CANCELED"

        await eventually(cancelled)
        before = await support.read_model(store.pool, support.accounts)
        await support.append_all(store, support.random_history(51, events=100))
        await asyncio.sleep(1.5)
        assert await support.read_model(store.pool, support.accounts) == before
    # A worker that starts again leaves a stopped tail stopped.
    async with running_worker(tail_settings, support.registry(), client=client):
        await asyncio.sleep(1.5)
        assert (await tail_state(client, "accounts"))[0] == "CANCELED"
        await start_tail(client, pool, tail_settings, "accounts")
        await eventually(lambda: matches_oracle(store))
        assert (await tail_state(client, "accounts"))[0] == "RUNNING"
