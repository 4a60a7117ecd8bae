"""A tail survives its worker process being killed in the middle of a batch: nothing lost, nothing doubled.

Worker A (a real `python -m rehydrate worker` process, with slow handlers so a batch keeps its transaction open)
is SIGKILLed while a tail batch holds the projection's lock; worker B takes over after the tail activity's
heartbeat timeout and goes on from the committed checkpoint. One writer appends throughout, so commit order is
position order and both read models must equal the plain fold, counters included.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import asyncpg
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError

from rehydrate.models import ReplayInput, TailInput
from rehydrate.settings import Settings
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.store import EventStore
from rehydrate.worker import running_worker
from rehydrate.workflows import TailWorkflow, tail_workflow_id
from tests import support
from tests.test_crash import start_worker


async def tail_batches_open(pool: asyncpg.Pool) -> int:
    """Sessions (other than ours) holding a projection's tail lock: tail batches between start and commit.

    The only other advisory lock rehydrate takes is the schema set-up's (a fixed key), left out here."""
    schema_lock = 0x7265687964726174
    return int(
        await pool.fetchval(
            """SELECT count(*) FROM pg_locks
               WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()
                 AND NOT (classid::bigint = $1 AND objid::bigint = $2)""",
            schema_lock >> 32,
            schema_lock & 0xFFFFFFFF,
        )
    )


async def all_equal_the_oracle(store: EventStore) -> bool:
    events = await support.all_events(store)
    for projection in support.registry():
        if await support.read_model(store.pool, projection) != support.oracle(projection, events):
            return False
    return True


async def test_tail_survives_a_worker_kill_mid_batch_without_losing_or_doubling_events(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    await support.append_all(store, support.random_history(61, streams=50, events=300))
    registry = support.registry()
    async with running_worker(settings, registry, client=client):
        for projection in registry:
            await wait_for_replay(await start_replay(client, settings, ReplayInput(projection.name)))
    for projection in registry:
        await client.start_workflow(
            TailWorkflow.run,
            TailInput(projection.name, batch_size=100, poll_seconds=0.2, heartbeat_timeout_seconds=2),
            id=tail_workflow_id(projection.name),
            task_queue=settings.temporal_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.TERMINATE_EXISTING,
        )

    stop = asyncio.Event()

    async def writer() -> None:
        for stream, event in support.random_history(62, streams=50, events=100_000):
            if stop.is_set():
                return
            await store.append(stream, [event])
            await asyncio.sleep(0.001)

    worker_a = start_worker(settings, tmp_path / "worker-a.log")
    worker_b = None
    writing = asyncio.create_task(writer())
    try:

        async def scenario() -> None:
            nonlocal worker_b
            while await tail_batches_open(store.pool) == 0:
                await asyncio.sleep(0.005)
            worker_a.send_signal(signal.SIGKILL)
            assert worker_a.wait(10) == -signal.SIGKILL
            worker_b = start_worker(settings, tmp_path / "worker-b.log")
            await asyncio.sleep(4)  # B takes over after the 2 s heartbeat timeout while the writer goes on
            stop.set()
            await writing
            deadline = time.monotonic() + 60
            while not await all_equal_the_oracle(store):
                assert time.monotonic() < deadline, "the tail did not catch up after the crash"
                await asyncio.sleep(0.2)

        await asyncio.wait_for(scenario(), 120)
    finally:
        stop.set()
        for process in (worker_a, worker_b):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
        for projection in registry:
            with contextlib.suppress(RPCError):
                await client.get_workflow_handle(tail_workflow_id(projection.name)).terminate("test finished")

    # No event applied twice: each active generation counted every handled event exactly once.
    for projection in registry:
        applied, handled = await store.pool.fetchrow(
            """SELECT g.events_applied,
                      (SELECT count(*) FROM rehydrate.events WHERE event_type = ANY($2::text[]))
               FROM rehydrate.generations g JOIN rehydrate.projections p
                 ON p.name = g.projection AND p.active_generation = g.generation
               WHERE g.projection = $1""",
            projection.name,
            projection.event_types,
        )
        assert applied == handled, projection.name
