"""Pause, resume and tune a running replay: a paused replay runs no chunk and holds no transaction or lock, it
resumes where it stopped, and a new --max-parallel bounds the chunks that start after it."""

from __future__ import annotations

import asyncio

import asyncpg
from temporalio.client import Client

from rehydrate import EventStore
from rehydrate.core.settings import Settings
from rehydrate.models import ReplayInput
from rehydrate.starter import signal_replay, start_replay, tune_replay, wait_for_replay
from rehydrate.worker import running_worker
from rehydrate.workflows import ReplayWorkflow
from tests.helpers import domain


async def pending_activities(handle: object) -> int:
    description = await handle.describe()  # type: ignore[attr-defined]
    return len(description.raw_description.pending_activities)


async def others_busy(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Other client sessions on this database inside a transaction, running a statement, or holding a lock
    (autovacuum's workers come and go on their own)."""
    return await conn.fetch(
        """SELECT a.pid, a.state, a.query FROM pg_stat_activity a
           WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
             AND a.backend_type = 'client backend'
             AND (a.state <> 'idle' OR a.xact_start IS NOT NULL
                  OR EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid))"""
    )


async def test_paused_replay_runs_nothing_holds_no_transaction_and_resumes_to_the_oracle(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(41, streams=30, events=900))
    events = await domain.all_events(store)
    async with running_worker(settings, domain.registry(), client=client):
        handle = await start_replay(client, settings, ReplayInput("accounts", lanes=3, chunk_size=5, max_parallel=3))
        while (await handle.query(ReplayWorkflow.progress)).events_applied < 30:
            await asyncio.sleep(0.02)
        await signal_replay(client, "accounts", "pause", task_queue=settings.temporal_task_queue)
        while True:  # the chunks that were running finish, and the workflow has taken their results
            paused = await handle.query(ReplayWorkflow.progress)
            stored = await store.pool.fetchval("SELECT sum(events_applied) FROM rehydrate.lane_checkpoints")
            if await pending_activities(handle) == 0 and paused.events_applied == stored:
                break
            await asyncio.sleep(0.05)
        assert paused.paused and paused.phase == "building" and paused.events_applied < paused.events_total
        lanes = await store.pool.fetch("SELECT * FROM rehydrate.lane_checkpoints ORDER BY generation, lane")
        async with store.pool.acquire() as conn:
            for _ in range(10):  # 1.5 s: no chunk starts, no session of the worker does anything
                await asyncio.sleep(0.15)
                assert await pending_activities(handle) == 0
                assert await others_busy(conn) == []
        assert await store.pool.fetch("SELECT * FROM rehydrate.lane_checkpoints ORDER BY generation, lane") == lanes
        assert (await handle.query(ReplayWorkflow.progress)).events_applied == paused.events_applied

        assert await tune_replay(client, "accounts", 1, task_queue=settings.temporal_task_queue) == 3
        await signal_replay(client, "accounts", "resume", task_queue=settings.temporal_task_queue)
        most = 0
        while (progress := await handle.query(ReplayWorkflow.progress)).phase == "building":
            most = max(most, await pending_activities(handle))
            assert progress.max_parallel == 1
            await asyncio.sleep(0.01)
        result = await wait_for_replay(handle)
    assert most == 1, "after the tune, one chunk at a time"
    assert result.events_applied == sum(1 for e in events if e.type in domain.accounts.handlers)
    assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, events)
