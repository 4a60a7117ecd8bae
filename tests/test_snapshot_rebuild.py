"""The bulk snapshot rebuild: a Temporal workflow over an aggregate type's streams in partitions × chunks; the
same snapshots as loading each stream, after continue-as-new, after a worker SIGKILL, and when cancelled."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from temporalio.api.enums.v1 import EventType, TimeoutType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from rehydrate.aggregates import AggregateRegistry, Repository
from rehydrate.errors import UserError
from rehydrate.importer import import_events
from rehydrate.models import SnapshotRebuildInput
from rehydrate.projections import Registry
from rehydrate.settings import Settings
from rehydrate.snapshots import Snapshot, SnapshotStore
from rehydrate.starter import cancel_snapshot_rebuild, start_snapshot_rebuild, wait_for_snapshot_rebuild
from rehydrate.store import EventStore
from rehydrate.worker import running_worker
from rehydrate.workflows import SnapshotRebuildWorkflow
from tests import versioned_support as vs
from tests.slow_aggregates import SlowAccount
from tests.test_cli import rehydrate
from tests.test_crash import _tail, start_worker


async def load_history(store: EventStore, seed: int, streams: int, events: int) -> None:
    history = vs.mixed_history(seed, streams=streams, events=events)
    lines = ({"stream_id": s, "type": e.type, "data": e.data, "schema_version": e.schema_version} for s, e in history)
    await import_events(store, enumerate(lines, start=1), source="snapshot test history")
    # A stream of another aggregate type, which a rebuild of accounts must leave alone.
    await store.pool.execute(
        """INSERT INTO rehydrate.events (stream_id, stream_version, event_type, payload)
           VALUES ('order-1', 1, 'OrderPlaced', '{}')"""
    )


async def expected_snapshots(store: EventStore, aggregate: type[vs.Account]) -> list[Snapshot]:
    """Each stream loaded from its events alone, as a snapshot."""
    cold = Repository(store, aggregate, use_snapshots=False)
    ids = [r[0] for r in await store.pool.fetch("SELECT DISTINCT stream_id FROM rehydrate.events ORDER BY 1")]
    return [(await cold.load(i)).to_snapshot() for i in ids if i.startswith(aggregate.stream_prefix)]


async def test_rebuild_writes_the_snapshot_of_every_stream_across_continue_as_new(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await load_history(store, 41, streams=200, events=1500)
    aggregates = AggregateRegistry([vs.Account])
    async with running_worker(settings, aggregates=aggregates, registry=Registry(), client=client):
        handle = await start_snapshot_rebuild(
            client, settings, SnapshotRebuildInput("account", partitions=3, chunk_size=1), aggregates=aggregates
        )
        result = await wait_for_snapshot_rebuild(handle)
        with pytest.raises(UserError, match="unknown aggregate type 'acount'"):
            await start_snapshot_rebuild(client, settings, SnapshotRebuildInput("acount"), aggregates=aggregates)
    expected = await expected_snapshots(store, vs.Account)
    assert result.streams == len(expected) == 200 and result.runs > 1
    assert await SnapshotStore(store.pool).all("account") == expected
    # Loads now start from these snapshots and still give the stream's state.
    warm = Repository(store, vs.Account)
    assert (await warm.load("acct-5")).to_snapshot() == expected[[s.stream_id for s in expected].index("acct-5")]


async def snapshot_chunks_retried(client: Client, handle: WorkflowHandle) -> int:  # type: ignore[type-arg]
    """Chunk activities started again after a heartbeat timeout, over every run of the rebuild."""
    run_id: str | None = handle.first_execution_run_id or handle.result_run_id
    retried = 0
    while run_id:
        history = await client.get_workflow_handle(handle.id, run_id=run_id).fetch_history()
        run_id = None
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                started = event.activity_task_started_event_attributes
                if started.attempt > 1 and (
                    started.last_failure.timeout_failure_info.timeout_type == TimeoutType.TIMEOUT_TYPE_HEARTBEAT
                ):
                    retried += 1
            elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
                run_id = event.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    return retried


async def chunk_transactions_open(store: EventStore) -> int:
    return int(
        await store.pool.fetchval(
            """SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
               WHERE c.relname = 'snapshot_rebuilds' AND l.mode IN ('RowShareLock', 'RowExclusiveLock')
                 AND l.granted AND l.pid <> pg_backend_pid()"""
        )
    )


async def test_rebuild_survives_a_worker_kill_and_writes_the_same_snapshots_as_a_clean_run(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    await load_history(store, 42, streams=200, events=4000)
    input = SnapshotRebuildInput("slow_account", partitions=3, chunk_size=10, heartbeat_timeout_seconds=2)
    aggregates = AggregateRegistry([SlowAccount])
    async with running_worker(settings, aggregates=aggregates, registry=Registry(), client=client):
        clean = await wait_for_snapshot_rebuild(await start_snapshot_rebuild(client, settings, input))
    clean_snapshots = await SnapshotStore(store.pool).all("slow_account")
    assert clean.streams == len(clean_snapshots) == 200
    assert clean_snapshots == await expected_snapshots(store, SlowAccount)
    await store.pool.execute("DELETE FROM rehydrate.snapshots")

    env = {"REHYDRATE_AGGREGATES": "tests.slow_aggregates", "REHYDRATE_PROJECTIONS": ""}
    logs = {"A": tmp_path / "worker-a.log", "B": tmp_path / "worker-b.log"}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        workers["A"] = start_worker(settings, logs["A"], env)
        handle = await start_snapshot_rebuild(client, settings, input)
        deadline = time.monotonic() + 60
        while True:
            assert workers["A"].poll() is None, f"worker A exited early:\n{_tail(logs['A'])}"
            assert time.monotonic() < deadline, "the rebuild never reached its middle"
            progress = await handle.query(SnapshotRebuildWorkflow.progress)
            assert progress.phase in ("planning", "building"), progress
            if 0 < progress.streams_done < progress.streams_total and await chunk_transactions_open(store):
                workers["A"].send_signal(signal.SIGKILL)
                break
            await asyncio.sleep(0.01)
        await asyncio.to_thread(workers["A"].wait)
        workers["B"] = start_worker(settings, logs["B"], env)
        result = await asyncio.wait_for(wait_for_snapshot_rebuild(handle), 120)
        retried = await snapshot_chunks_retried(client, handle)
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.kill()
            await asyncio.to_thread(worker.wait)
        for name, log in logs.items():
            print(f"--- worker {name} ---\n{_tail(log)}")
    assert workers["A"].returncode == -signal.SIGKILL
    assert retried >= 1, "a chunk attempt that was running on worker A was retried on worker B"
    assert result.streams == 200
    assert await SnapshotStore(store.pool).all("slow_account") == clean_snapshots


async def test_a_cancelled_rebuild_ends_cancelled_and_leaves_only_valid_snapshots(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await load_history(store, 43, streams=150, events=3000)
    aggregates = AggregateRegistry([SlowAccount])
    async with running_worker(settings, aggregates=aggregates, registry=Registry(), client=client):
        handle = await start_snapshot_rebuild(
            client, settings, SnapshotRebuildInput("slow_account", partitions=2, chunk_size=5)
        )
        while (await handle.query(SnapshotRebuildWorkflow.progress)).streams_done == 0:
            await asyncio.sleep(0.05)
        await cancel_snapshot_rebuild(client, "slow_account")
        with pytest.raises(UserError):
            await wait_for_snapshot_rebuild(handle)
        assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    written = await SnapshotStore(store.pool).all("slow_account")
    expected = {s.stream_id: s for s in await expected_snapshots(store, SlowAccount)}
    assert 0 < len(written) < len(expected)
    assert all(expected[s.stream_id] == s for s in written)


async def test_snapshots_rebuild_command_runs_the_workflow_and_names_an_unknown_type(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    await load_history(store, 44, streams=20, events=300)
    env = {"REHYDRATE_AGGREGATES": "tests.versioned_support"}
    unknown = await rehydrate(settings, tmp_path, "snapshots", "rebuild", "acount", **env)
    assert unknown.code == 1 and "unknown aggregate type 'acount'" in unknown.stderr, unknown
    async with running_worker(settings, Registry(), client=client, aggregates=AggregateRegistry([vs.Account])):
        done = await rehydrate(settings, tmp_path, "snapshots", "rebuild", "account", "--wait", "--json", **env)
    assert done.code == 0, done
    assert orjson.loads(done.stdout)["streams"] == 20
    assert await SnapshotStore(store.pool).all("account") == await expected_snapshots(store, vs.Account)
