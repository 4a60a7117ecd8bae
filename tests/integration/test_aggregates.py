"""Aggregates and the repository: the same state with and without snapshots, stale snapshots ignored, historical
state by version and time, optimistic concurrency on save, and the snapshot policy."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta
from typing import ClassVar

import pytest

from rehydrate import EventStore, NewEvent
from rehydrate.core.errors import ConcurrencyError, UserError
from rehydrate.engine.aggregates import AggregateNotFoundError, Repository
from rehydrate.engine.snapshots import SnapshotStore
from tests.helpers import domain
from tests.helpers import versioned as vs


class SnappyAccount(vs.Account):
    aggregate_type: ClassVar[str] = "snappy_account"
    snapshot_every: ClassVar[int | None] = 3


def plain_fold(stream: str, events: list[domain.Event]) -> vs.Account:
    return vs.Account.new(stream).fold(e for e in events if e.stream_id == stream)


def state(aggregate: vs.Account) -> tuple[int, dict[str, object]]:
    return aggregate.version, aggregate.model_dump()


@pytest.mark.parametrize("seed", [31, 32, 33])
async def test_load_with_and_without_a_snapshot_gives_the_same_state(store: EventStore, seed: int) -> None:
    await domain.append_all(store, vs.mixed_history(seed, streams=12, events=400))
    events = await domain.all_events(store)
    rng = random.Random(seed)
    cold = Repository(store, vs.Account, use_snapshots=False)
    warm = Repository(store, vs.Account)
    streams = sorted({e.stream_id for e in events})
    for stream in streams:
        expected = await cold.load(stream)
        assert state(expected) == state(plain_fold(stream, events))
        at = rng.randint(1, expected.version)
        await warm.snapshot(await cold.load(stream, version=at))
        assert (await warm.snapshots.get(stream, "account")).stream_version == at  # type: ignore[union-attr]
        assert state(await warm.load(stream)) == state(expected)
        for version in {1, at, expected.version, rng.randint(1, expected.version)}:
            assert state(await warm.load(stream, version=version)) == state(await cold.load(stream, version=version))


async def test_a_valid_snapshot_is_used_and_a_stale_one_is_ignored(store: EventStore) -> None:
    await domain.append_all(store, vs.mixed_history(34, streams=3, events=90))
    repository = Repository(store, vs.Account)
    cold = Repository(store, vs.Account, use_snapshots=False)
    stream = "acct-0"
    full = await cold.load(stream)
    middle = await cold.load(stream, version=full.version // 2)
    doctored = dataclasses.replace(middle.to_snapshot(), state={**middle.model_dump(mode="json"), "balance": 10**9})
    async with store.pool.acquire() as conn:
        await repository.snapshots.put(conn, [doctored])
    # The snapshot is really where the load starts: its (doctored) balance is carried forward.
    assert (await repository.load(stream)).balance == full.balance - middle.balance + 10**9
    stale = [
        dataclasses.replace(doctored, state_version=vs.Account.state_version + 1),
        dataclasses.replace(doctored, fingerprint="0123456789abcdef"),
        dataclasses.replace(doctored, state={**doctored.state, "balance": "not a number"}),
    ]
    for snapshot in stale:
        async with store.pool.acquire() as conn:
            await store.pool.execute("DELETE FROM rehydrate.snapshots")
            await repository.snapshots.put(conn, [snapshot])
        assert state(await repository.load(stream)) == state(full)
    # A snapshot newer than the version asked for is not used either.
    async with store.pool.acquire() as conn:
        await repository.snapshots.put(conn, [dataclasses.replace(full.to_snapshot(), state=doctored.state)])
    assert state(await repository.load(stream, version=middle.version)) == state(middle)


async def test_version_and_as_of_give_the_historical_state(store: EventStore) -> None:
    start = datetime(2025, 3, 1, tzinfo=UTC)
    history = [e for s, e in vs.mixed_history(35, streams=1, events=60)]
    for n, event in enumerate(history):
        await store.append("acct-0", [dataclasses.replace(event, recorded_at=start + timedelta(minutes=n))])
    events = await domain.all_events(store)
    repository = Repository(store, vs.Account)
    await repository.snapshot(await repository.load("acct-0", version=40))
    for n in (1, 7, 39, 40, 41, 60):
        expected = state(vs.Account.new("acct-0").fold(events[:n]))
        assert state(await repository.load("acct-0", version=n)) == expected
        at = start + timedelta(minutes=n - 1, seconds=30)
        assert state(await repository.load("acct-0", as_of=at)) == expected
    with pytest.raises(AggregateNotFoundError, match="had no events at"):
        await repository.load("acct-0", as_of=start - timedelta(days=1))
    with pytest.raises(UserError, match="is at version 60, not 61"):
        await repository.load("acct-0", version=61)
    with pytest.raises(UserError, match="no time zone"):
        await repository.load("acct-0", as_of=datetime(2025, 3, 1))
    with pytest.raises(AggregateNotFoundError, match="has no events"):
        await repository.load("acct-404")


async def test_save_appends_pending_events_with_optimistic_concurrency_and_snapshots_by_policy(
    store: EventStore,
) -> None:
    await store.append("acct-1", [NewEvent("Opened", {"owner": "ada", "group": "g0"})])
    repository = Repository(store, SnappyAccount)
    first = await repository.load("acct-1")
    second = await repository.load("acct-1")
    first.deposit(5)
    first.deposit(7)
    assert first.balance == 12 and first.version == 3 and len(first.pending) == 2
    assert await repository.save(first) == 3
    assert first.pending == []
    # The policy (every 3 events) wrote a snapshot at version 3, in the same transaction as the append.
    snapshot = await SnapshotStore(store.pool).get("acct-1", "snappy_account")
    assert snapshot is not None and snapshot.stream_version == 3 and snapshot.state["balance"] == 12
    second.deposit(100)
    with pytest.raises(ConcurrencyError):
        await repository.save(second)
    stored = await store.read_stream("acct-1")
    assert [(e.type, e.schema_version, e.data) for e in stored[1:]] == [
        ("Deposited", 3, {"money": {"cents": 5}, "group": "g0"}),
        ("Deposited", 3, {"money": {"cents": 7}, "group": "g0"}),
    ]
    reloaded = await repository.load("acct-1")
    assert state(reloaded) == state(first)
    reloaded.deposit(1)
    await repository.save(reloaded)
    assert (await SnapshotStore(store.pool).get("acct-1", "snappy_account")).stream_version == 3  # type: ignore[union-attr]
    assert (await Repository(store, SnappyAccount, use_snapshots=False).load("acct-1")).balance == 13


def test_aggregate_without_defaults_is_refused_clearly() -> None:
    from rehydrate.engine.aggregates import Aggregate

    class Broken(Aggregate):
        owner: str

    with pytest.raises(UserError, match="give every field a default"):
        Broken.new("broken-1")
