"""A worker killed inside a replay's long steps, not only inside a chunk: building the indexes and the catch-up.

Those steps run one statement for seconds or minutes on a big table, under a time limit of an hour or two; they
heartbeat while they run, so a worker that dies inside one is noticed after the replay's heartbeat timeout and the
step runs again on another worker within seconds. The test holds each step inside its statement with a lock of its
own, kills the worker running it, lets go, and times how long until the step has run elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import time
from pathlib import Path

import asyncpg
from temporalio.client import Client

from rehydrate import EventStore
from rehydrate.core.identifiers import qualified
from rehydrate.core.settings import Settings
from rehydrate.engine.importer import import_events
from rehydrate.models import ReplayInput
from rehydrate.starter import start_replay, wait_for_replay
from tests.faults.test_faults import until
from tests.helpers import domain
from tests.helpers.workers import blocked_by, forget_sticky_worker, kill_workers, polling, start_worker

HEARTBEAT_TIMEOUT = 2.0
# A step's retry reaches a live worker after the heartbeat timeout and the retry's first back-off (1 s); on a loaded
# machine a worker's start and the workflow task's move add a few seconds. Without heartbeats it would be an hour.
RECOVERY_LIMIT = 20.0


async def test_a_worker_killed_while_indexing_or_catching_up_is_replaced_within_seconds(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    history = domain.random_history(5151, streams=80, events=4000)
    lines = ({"stream_id": stream, "type": event.type, "data": event.data} for stream, event in history)
    await import_events(store, enumerate(lines, start=1), source="step kill history")
    logs = {name: tmp_path / f"worker-{name}.log" for name in "ABC"}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    index_gate = await asyncpg.connect(str(settings.database_url))
    catch_up_gate = await asyncpg.connect(str(settings.database_url))
    recoveries: list[float] = []
    try:
        workers["A"] = start_worker(settings, logs["A"])
        handle = await start_replay(
            client,
            settings,
            ReplayInput(domain.accounts.name, lanes=2, chunk_size=500, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT),
        )

        async def planned() -> bool:
            return bool(
                await store.pool.fetchval(
                    "SELECT count(*) FROM rehydrate.generations WHERE projection = $1", domain.accounts.name
                )
            )

        await until(planned, 60, "the plan")
        generation, table = await store.pool.fetchrow(
            "SELECT generation, physical_table FROM rehydrate.generations WHERE projection = $1",
            domain.accounts.name,
        )
        # ROW EXCLUSIVE lets the chunks write and keeps CREATE INDEX (SHARE) waiting; FOR KEY SHARE on the
        # generation's row keeps the catch-up's FOR UPDATE waiting, and nothing before it.
        await index_gate.execute("BEGIN")
        await index_gate.execute(f"LOCK TABLE {qualified(settings.read_model_schema, table)} IN ROW EXCLUSIVE MODE")
        await catch_up_gate.execute("BEGIN")
        await catch_up_gate.execute(
            "SELECT 1 FROM rehydrate.generations WHERE projection = $1 AND generation = $2 FOR KEY SHARE",
            domain.accounts.name,
            generation,
        )
        for victim, gate, heir in (("A", index_gate, "B"), ("B", catch_up_gate, "C")):
            await until(lambda gate=gate: blocked_by(store.pool, gate), 90, f"worker {victim} to wait in its step")
            workers[heir] = start_worker(settings, logs[heir])
            # The recovery is timed from the kill: the heir is polling by then, as a standby worker would be.
            heir_polls = functools.partial(polling, client, settings.temporal_task_queue, workers[heir])
            await until(heir_polls, 60, f"worker {heir} to poll the task queue", 0.1)
            workers[victim].kill()
            killed = time.monotonic()
            await asyncio.to_thread(workers[victim].wait)
            # The step's retry is what is timed, not the 3 s the next workflow task would wait on the dead worker.
            await forget_sticky_worker(client, handle)
            await gate.execute("COMMIT")  # the killed worker's statement died with its connection
            if gate is index_gate:
                await until(lambda: blocked_by(store.pool, catch_up_gate), 60, "the indexes built elsewhere")
            else:
                await asyncio.wait_for(wait_for_replay(handle), 60)
            recoveries.append(time.monotonic() - killed)
        result = await wait_for_replay(handle)
    finally:
        for gate in (index_gate, catch_up_gate):
            await gate.close()
        await kill_workers(workers, logs)
    print(f"recoveries after each kill (indexes, catch-up): {[round(r, 1) for r in recoveries]} s")
    assert result.generation == generation
    assert all(r < RECOVERY_LIMIT for r in recoveries), recoveries
    events = await domain.all_events(store)
    assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, events)
