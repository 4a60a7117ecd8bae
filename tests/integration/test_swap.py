"""The swap: readers polling the read model during replays never see an error, an empty table or a mix."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import asyncpg
import pytest
from temporalio.client import Client

from rehydrate import EventStore
from rehydrate.core.settings import Settings
from rehydrate.engine.generations import Generations
from rehydrate.models import ReplayInput
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.worker import running_worker
from tests.helpers import domain


async def test_readers_never_see_an_error_an_empty_table_or_a_mix_during_swaps(
    client: Client, settings: Settings, store: EventStore, database_url: str
) -> None:
    await domain.import_all(store, domain.random_history(31, streams=60, events=1500))
    events = await domain.all_events(store)
    expected = domain.oracle(domain.accounts, events)
    expected_state = (len(expected), sum(row["balance"] for row in expected.values()))
    async with running_worker(settings, domain.registry(), client=client):
        await wait_for_replay(await start_replay(client, settings, ReplayInput("accounts")))

        stop = asyncio.Event()
        seen: list[tuple[int, int]] = []
        errors: list[BaseException] = []

        async def reader() -> None:
            conn = await asyncpg.connect(database_url)
            try:
                while not stop.is_set():
                    try:
                        # One statement sees one generation: the count and the sum must agree with it.
                        row = await conn.fetchrow("SELECT count(*), coalesce(sum(balance), 0) FROM account")
                        seen.append((row[0], row[1]))
                    except Exception as error:  # any error is a failure of the swap's promise
                        errors.append(error)
                    await asyncio.sleep(0)
            finally:
                await conn.close()

        readers = [asyncio.create_task(reader()) for _ in range(4)]
        results = []
        for lanes in (1, 4, 2):
            handle = await start_replay(client, settings, ReplayInput("accounts", lanes=lanes, chunk_size=100))
            results.append(await wait_for_replay(handle))
        stop.set()
        await asyncio.gather(*readers)

    assert errors == []
    assert len(seen) > 100
    assert set(seen) == {expected_state}, "every read saw a whole generation with the oracle's rows"
    assert [r.generation for r in results] == [2, 3, 4]
    assert all(r.swap_lock_ms < 1000 for r in results), [r.swap_lock_ms for r in results]
    assert await domain.read_model(store.pool, domain.accounts) == expected


async def test_the_new_generation_is_analyzed_beside_the_catch_up(
    client: Client, settings: Settings, store: EventStore
) -> None:
    """ANALYZE does not block the catch-up's writes, so it runs beside them; the replay ends only when the table has
    its statistics."""
    await domain.import_all(store, domain.random_history(32, streams=60, events=1500))
    async with running_worker(settings, domain.registry(), client=client):
        handle = await start_replay(client, settings, ReplayInput("accounts"))
        result = await wait_for_replay(handle)
    physical = await store.pool.fetchval(
        "SELECT physical_table FROM rehydrate.generations WHERE projection = 'accounts' AND generation = $1",
        result.generation,
    )
    analyzed = await store.pool.fetchrow(
        "SELECT c.reltuples, (SELECT count(*) FROM pg_stats s WHERE s.tablename = c.relname) AS columns "
        "FROM pg_class c WHERE c.relname = $1",
        physical,
    )
    assert analyzed["reltuples"] == result.rows > 0
    assert analyzed["columns"] == len(domain.accounts.table.columns)

    history = await client.get_workflow_handle(handle.id, run_id=handle.result_run_id).fetch_history()
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name.removeprefix("rehydrate.")
        for e in history.events
        if e.activity_task_scheduled_event_attributes.activity_type.name
    ]
    assert "finish_tables" not in scheduled
    finish = scheduled[scheduled.index("index_tables") :]
    assert finish[:2] == ["index_tables", "analyze_table"] and finish[-1] == "swap", finish


async def test_the_views_move_to_the_new_generation_only_once_it_is_analyzed(
    client: Client, settings: Settings, store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers' queries are planned from the tables' statistics: a swap while ANALYZE still runs beside the catch-up
    would serve them plans made without any (a join that scans a whole child table). The swap waits for it."""
    await domain.import_all(store, domain.random_history(33, streams=60, events=1500))
    analyzed: list[datetime] = []
    analyze = Generations.analyze

    async def slow_analyze(self: Generations, projection: str, generation: int) -> None:
        await asyncio.sleep(1.5)  # a big table's ANALYZE, still running when the catch-up is done
        await analyze(self, projection, generation)
        analyzed.append(datetime.fromtimestamp(time.time(), UTC))

    monkeypatch.setattr(Generations, "analyze", slow_analyze)
    async with running_worker(settings, domain.registry(), client=client):
        result = await wait_for_replay(await start_replay(client, settings, ReplayInput("accounts")))
    activated = await store.pool.fetchval(
        "SELECT activated_at FROM rehydrate.generations WHERE projection = 'accounts' AND generation = $1",
        result.generation,
    )
    assert len(analyzed) == 1
    assert analyzed[0] < activated, (analyzed[0], activated)
