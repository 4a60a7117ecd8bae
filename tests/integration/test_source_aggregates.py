"""Aggregates whose streams live in a source rehydrate did not write: py-eventsourcing's table, in another database.
Each loads (current, at a version, from a snapshot) as the library itself folds it; the bulk snapshot rebuild reads
the source; saving is refused, naming who saves."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.client import Client

from rehydrate import EventStore
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.engine.aggregates import AggregateRegistry, Repository
from rehydrate.engine.projections import Registry
from rehydrate.engine.snapshots import SnapshotStore
from rehydrate.models import SnapshotRebuildInput
from rehydrate.sources.pools import Sources
from rehydrate.starter import start_snapshot_rebuild, wait_for_snapshot_rebuild
from rehydrate.worker import running_worker
from tests.helpers import es_bank


async def test_aggregates_load_and_snapshot_from_py_eventsourcing_and_are_never_saved_there(
    client: Client, settings: Settings, store: EventStore, other_database: str
) -> None:
    app = await asyncio.to_thread(es_bank.bank, other_database, compress=True)
    try:
        ids = await asyncio.to_thread(es_bank.write_history, app, 31, 12, 300)
        expected = await asyncio.to_thread(es_bank.expected, app, ids)
        state = es_bank.aggregate(app, other_database)

        def fields(account: object) -> dict[str, object]:
            return {"owner": account.owner, "balance": account.balance, "changes": account.changes}  # type: ignore[attr-defined]

        async with Repository(store, state) as accounts:
            for account_id in ids:
                loaded = await accounts.load(str(account_id))
                assert {"account_id": str(account_id), **fields(loaded)} == expected[str(account_id)]
                first = await accounts.load(str(account_id), version=1)
                assert (first.version, first.balance, first.changes) == (1, 0, 0)  # type: ignore[attr-defined]
            loaded.record("Account.Deposited", {"amount": 5})
            with pytest.raises(UserError, match="reads source 'bank', which rehydrate does not write") as refused:
                await accounts.save(loaded)
            assert "the application that owns the source" in refused.value.fix

        async with running_worker(settings, Registry(), client=client, aggregates=AggregateRegistry([state])):
            handle = await start_snapshot_rebuild(
                client, settings, SnapshotRebuildInput("bank_account", partitions=2, chunk_size=5)
            )
            result = await wait_for_snapshot_rebuild(handle)
        assert result.streams == len(ids)
        assert len(await SnapshotStore(store.pool).all("bank_account")) == len(ids)
        async with Sources(store) as sources:
            with_snapshots, from_events = Repository(sources, state), Repository(sources, state, use_snapshots=False)
            for account_id in ids:
                snapshotted = await with_snapshots.load(str(account_id))
                assert fields(snapshotted) == fields(await from_events.load(str(account_id)))
                assert {"account_id": str(account_id), **fields(snapshotted)} == expected[str(account_id)]
    finally:
        await asyncio.to_thread(app.close)
