"""The bulk snapshot rebuild: a Temporal workflow over an aggregate type's streams in partitions × chunks; the
same snapshots as loading each stream, after continue-as-new, after a worker SIGKILL, and when cancelled."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from rehydrate import EventStore
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.engine.aggregates import AggregateRegistry, Repository
from rehydrate.engine.projections import Registry
from rehydrate.engine.snapshots import SnapshotStore
from rehydrate.models import SnapshotRebuildInput
from rehydrate.starter import cancel_snapshot_rebuild, start_snapshot_rebuild, wait_for_snapshot_rebuild
from rehydrate.worker import running_worker
from rehydrate.workflows import SnapshotRebuildWorkflow
from tests.helpers import versioned as vs
from tests.helpers.cli import rehydrate
from tests.helpers.slow_aggregates import SlowAccount


async def test_rebuild_writes_the_snapshot_of_every_stream_across_continue_as_new(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await vs.load_history(store, 41, streams=200, events=1500)
    aggregates = AggregateRegistry([vs.Account])
    async with running_worker(settings, aggregates=aggregates, registry=Registry(), client=client):
        handle = await start_snapshot_rebuild(
            client, settings, SnapshotRebuildInput("account", partitions=3, chunk_size=1), aggregates=aggregates
        )
        result = await wait_for_snapshot_rebuild(handle)
        # A second rebuild forgets the first one's partition cursors, as old generations are dropped.
        again = await start_snapshot_rebuild(
            client, settings, SnapshotRebuildInput("account", partitions=2, chunk_size=100), aggregates=aggregates
        )
        await wait_for_snapshot_rebuild(again)
        cursors = await store.pool.fetch(
            "SELECT rebuild_id, count(*) AS n FROM rehydrate.snapshot_rebuilds GROUP BY rebuild_id"
        )
        assert [(row["rebuild_id"], row["n"]) for row in cursors] == [(again.first_execution_run_id, 2)]
        with pytest.raises(UserError, match="unknown aggregate type 'acount'"):
            await start_snapshot_rebuild(client, settings, SnapshotRebuildInput("acount"), aggregates=aggregates)
    expected = await vs.expected_snapshots(store, vs.Account)
    assert result.streams == len(expected) == 200 and result.runs > 1
    assert await SnapshotStore(store.pool).all("account") == expected
    # Loads now start from these snapshots and still give the stream's state.
    warm = Repository(store, vs.Account)
    assert (await warm.load("acct-5")).to_snapshot() == expected[[s.stream_id for s in expected].index("acct-5")]


async def test_a_cancelled_rebuild_ends_cancelled_and_leaves_only_valid_snapshots(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await vs.load_history(store, 43, streams=150, events=3000)
    aggregates = AggregateRegistry([SlowAccount])
    async with running_worker(settings, aggregates=aggregates, registry=Registry(), client=client):
        handle = await start_snapshot_rebuild(
            client, settings, SnapshotRebuildInput("slow_account", partitions=2, chunk_size=5)
        )
        while (await handle.query(SnapshotRebuildWorkflow.progress)).streams_done == 0:
            await asyncio.sleep(0.05)
        await cancel_snapshot_rebuild(client, "slow_account", settings.temporal_task_queue)
        with pytest.raises(UserError):
            await wait_for_snapshot_rebuild(handle)
        assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    written = await SnapshotStore(store.pool).all("slow_account")
    expected = {s.stream_id: s for s in await vs.expected_snapshots(store, SlowAccount)}
    assert 0 < len(written) < len(expected)
    assert all(expected[s.stream_id] == s for s in written)


async def test_snapshots_rebuild_command_runs_the_workflow_and_names_an_unknown_type(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    await vs.load_history(store, 44, streams=20, events=300)
    env = {"REHYDRATE_AGGREGATES": "tests.helpers.versioned"}
    unknown = await rehydrate(settings, tmp_path, "snapshots", "rebuild", "acount", **env)
    assert unknown.code == 1 and "unknown aggregate type 'acount'" in unknown.stderr, unknown
    async with running_worker(settings, Registry(), client=client, aggregates=AggregateRegistry([vs.Account])):
        done = await rehydrate(settings, tmp_path, "snapshots", "rebuild", "account", "--wait", "--json", **env)
    assert done.code == 0, done
    assert orjson.loads(done.stdout)["streams"] == 20
    assert await SnapshotStore(store.pool).all("account") == await vs.expected_snapshots(store, vs.Account)
