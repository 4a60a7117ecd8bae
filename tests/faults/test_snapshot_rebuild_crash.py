"""The bulk snapshot rebuild survives a worker SIGKILL and writes the same snapshots as a clean run."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

from temporalio.client import Client

from rehydrate import EventStore
from rehydrate.core.settings import Settings
from rehydrate.engine.aggregates import AggregateRegistry
from rehydrate.engine.projections import Registry
from rehydrate.engine.snapshots import SnapshotStore
from rehydrate.models import SnapshotRebuildInput
from rehydrate.starter import start_snapshot_rebuild, wait_for_snapshot_rebuild
from rehydrate.worker import running_worker
from rehydrate.workflows import SnapshotRebuildWorkflow
from tests.helpers import versioned as vs
from tests.helpers.slow_aggregates import SlowAccount
from tests.helpers.workers import (
    chunk_transactions_open,
    forget_sticky_worker,
    kill_inside_chunks,
    kill_workers,
    log_tail,
    retried_attempts,
    rolled_back,
    start_worker,
)


async def test_rebuild_survives_a_worker_kill_and_writes_the_same_snapshots_as_a_clean_run(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    await vs.load_history(store, 42, streams=200, events=4000)
    input = SnapshotRebuildInput("slow_account", partitions=3, chunk_size=10, heartbeat_timeout_seconds=2)
    aggregates = AggregateRegistry([SlowAccount])
    async with running_worker(settings, aggregates=aggregates, registry=Registry(), client=client):
        clean = await wait_for_snapshot_rebuild(await start_snapshot_rebuild(client, settings, input))
    clean_snapshots = await SnapshotStore(store.pool).all("slow_account")
    assert clean.streams == len(clean_snapshots) == 200
    assert clean_snapshots == await vs.expected_snapshots(store, SlowAccount)
    await store.pool.execute("DELETE FROM rehydrate.snapshots")

    env = {"REHYDRATE_AGGREGATES": "tests.helpers.slow_aggregates", "REHYDRATE_PROJECTIONS": ""}
    logs = {"A": tmp_path / "worker-a.log", "B": tmp_path / "worker-b.log"}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        workers["A"] = start_worker(settings, logs["A"], env)
        handle = await start_snapshot_rebuild(client, settings, input)
        deadline = time.monotonic() + 60
        while True:
            assert workers["A"].poll() is None, f"worker A exited early:\n{log_tail(logs['A'])}"
            assert time.monotonic() < deadline, "the rebuild never reached its middle"
            progress = await handle.query(SnapshotRebuildWorkflow.progress)
            assert progress.phase in ("planning", "building"), progress
            if (
                0 < progress.streams_done < progress.streams_total
                and await chunk_transactions_open(store.pool, "snapshot_rebuilds")
                and (killed := await kill_inside_chunks(workers["A"], store.pool, "snapshot_rebuilds"))
            ):
                break
            await asyncio.sleep(0.01)
        await asyncio.to_thread(workers["A"].wait)
        await forget_sticky_worker(client, handle)
        assert await rolled_back(store.pool, killed), "a chunk A held open committed"
        workers["B"] = start_worker(settings, logs["B"], env)
        result = await asyncio.wait_for(wait_for_snapshot_rebuild(handle), 120)
        retried = await retried_attempts(client, handle, "rehydrate.snapshot_chunk")
    finally:
        await kill_workers(workers, logs)
    assert workers["A"].returncode == -signal.SIGKILL
    assert retried >= 1, "a chunk attempt that was running on worker A was retried on worker B"
    assert result.streams == 200
    assert await SnapshotStore(store.pool).all("slow_account") == clean_snapshots
