"""Commands on aggregates: after `save`, an aggregate is the fold of its events as stored, field for field, and every
snapshot (written by `save`, by `Repository.snapshot`, or by a bulk rebuild) is a state that such a fold gives.

The aggregate here reads everything a handler can read from an event: `recorded_at`, the position, the stream version,
metadata, and a payload that JSON storage normalises (key order) and that an upcaster brings from an older shape.
Random sequences of commands, saves (alone or in a caller's transaction), conflicting saves, snapshots and loads
(latest, by version, as of a time) are checked against a fold of the stored events after every step."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any, ClassVar

import pytest
from temporalio.client import Client

from rehydrate import (
    Aggregate,
    AggregateNotFoundError,
    ConcurrencyError,
    Event,
    EventStore,
    NewEvent,
    Repository,
    Upcasters,
    applies,
)
from rehydrate.core.settings import Settings
from rehydrate.engine.aggregates import AggregateRegistry
from rehydrate.engine.projections import Registry
from rehydrate.engine.snapshots import SnapshotStore
from rehydrate.models import SnapshotRebuildInput
from rehydrate.starter import start_snapshot_rebuild, wait_for_snapshot_rebuild
from rehydrate.worker import running_worker

tab_events = Upcasters()


@tab_events.upcaster("Charged", from_version=1)
def amount_to_cents(data: dict[str, Any]) -> dict[str, Any]:
    return {"cents": data.pop("amount") * 100, **data}


class Tab(Aggregate):
    """A bar tab: its handlers record what each event carried, so any value that differs shows."""

    aggregate_type: ClassVar[str] = "tab"
    snapshot_every: ClassVar[int | None] = 4
    upcasters: ClassVar[Upcasters | None] = tab_events

    total_cents: int = 0
    opened_at: datetime | None = None
    last_at: datetime | None = None
    positions: list[int] = []
    versions: list[int] = []
    served_by: list[str] = []
    payloads: list[dict[str, Any]] = []

    def _seen(self, event: Event) -> None:
        self.last_at = event.recorded_at
        self.positions.append(event.global_position)
        self.versions.append(event.stream_version)
        self.served_by.append(str(event.metadata.get("by", "")))
        self.payloads.append(event.data)

    @applies("Opened")
    def _opened(self, event: Event) -> None:
        self.opened_at = event.recorded_at
        self._seen(event)

    @applies("Charged")
    def _charged(self, event: Event) -> None:
        self.total_cents += event.data["cents"]
        self._seen(event)

    def open(self) -> None:
        if self.opened_at is not None:
            raise ValueError("already open")
        self.record("Opened", {"table": 7, "z": 1, "a": 2})

    def charge(self, cents: int, by: str) -> None:
        # Key order, a float and nesting: jsonb normalises the first, keeps the others.
        self.record(
            "Charged", {"cents": cents, "tip": cents / 7, "items": {"b": [1, 2], "a": None}}, metadata={"by": by}
        )


def state(tab: Tab) -> tuple[int, dict[str, Any]]:
    return tab.version, tab.model_dump()


async def folded(store: EventStore, stream: str, version: int | None = None) -> Tab:
    """The plain fold of the stored events (no snapshot, no repository)."""
    return Tab.new(stream).fold(await store.read_stream(stream, up_to_version=version))


async def assert_every_snapshot_is_a_fold(store: EventStore) -> int:
    snapshots = await SnapshotStore(store.pool).all("tab")
    for snapshot in snapshots:
        restored = Tab.from_snapshot(snapshot)
        assert restored is not None, snapshot
        assert state(restored) == state(await folded(store, snapshot.stream_id, snapshot.stream_version)), snapshot
    return len(snapshots)


async def seed_old_events(store: EventStore, streams: list[str]) -> None:
    """Streams written before Charged had cents: v1 events that the upcaster reads."""
    for stream in streams[:2]:
        await store.append(
            stream,
            [
                NewEvent("Opened", {"table": 1}),
                NewEvent("Charged", {"amount": 3, "note": "v1"}, schema_version=1, metadata={"by": "old"}),
            ],
        )


@pytest.mark.parametrize("seed", [61, 62, 63, 64])
async def test_after_save_and_in_every_snapshot_the_state_is_the_fold_of_the_stored_events(
    store: EventStore, seed: int
) -> None:
    rng = random.Random(seed)
    streams = [f"tab-{n}" for n in range(4)]
    await seed_old_events(store, streams)
    repository = Repository(store, Tab)
    cold = Repository(store, Tab, use_snapshots=False)
    held: dict[str, Tab] = {}  # aggregates a caller keeps after save, as a cache or a response would

    async def current(stream: str) -> Tab:
        if stream in held and rng.random() < 0.7:
            return held[stream]
        try:
            return await repository.load(stream)
        except AggregateNotFoundError:
            return Tab.new(stream)

    for _ in range(60):
        stream = rng.choice(streams)
        move = rng.random()
        if move < 0.55:
            tab = await current(stream)
            if tab.opened_at is None:
                tab.open()
            for _ in range(rng.randint(1, 3)):
                tab.charge(rng.randint(1, 900), rng.choice(["ann", "bo", "cy"]))
            if rng.random() < 0.4:
                async with store.pool.acquire() as conn, conn.transaction():
                    await repository.save(tab, connection=conn)
            else:
                await repository.save(tab)
            # Field for field what a fold of the stored events gives, and what a load gives.
            assert state(tab) == state(await folded(store, stream)) == state(await cold.load(stream))
            held[stream] = tab
        elif move < 0.65 and stream in held:
            # Another copy saves first: this one's save is refused and writes nothing.
            stale = await repository.load(stream)
            held[stream].charge(5, "ann")
            await repository.save(held[stream])
            stale.charge(1, "bo")
            with pytest.raises(ConcurrencyError):
                await repository.save(stale)
            assert state(await cold.load(stream)) == state(held[stream])
        elif move < 0.8 and stream in held:
            await repository.snapshot(held[stream])
        else:
            tab = await current(stream)
            if tab.version == 0:
                continue
            version = rng.randint(1, tab.version)
            assert state(await repository.load(stream, version=version)) == state(await folded(store, stream, version))
            events = await store.read_stream(stream)
            at = events[version - 1].recorded_at
            assert state(await repository.load(stream, as_of=at)) == state(await cold.load(stream, as_of=at))
        await assert_every_snapshot_is_a_fold(store)

    for stream in streams:
        assert state(await repository.load(stream)) == state(await folded(store, stream))
    assert await assert_every_snapshot_is_a_fold(store) > 0


async def test_save_returns_the_stored_recorded_at_and_a_snapshot_of_a_new_aggregate_is_refused(
    store: EventStore,
) -> None:
    repository = Repository(store, Tab)
    tab = Tab.new("tab-new")
    tab.open()
    provisional = tab.opened_at
    with pytest.raises(Exception, match="unsaved events"):
        await repository.snapshot(tab)
    await repository.save(tab)
    stored = (await store.read_stream("tab-new"))[0]
    assert tab.opened_at == stored.recorded_at and tab.positions == [stored.global_position] != [0]
    assert provisional is not None and abs(tab.opened_at - provisional) < timedelta(seconds=30)
    with pytest.raises(Exception, match="no stored events"):
        await repository.snapshot(Tab.new("tab-never-saved"))
    # A field changed outside an @applies method is not an event: the snapshot holds the stored fold.
    tab.total_cents = 10**9
    await repository.snapshot(tab)
    snapshot = await SnapshotStore(store.pool).get("tab-new", "tab")
    assert snapshot is not None and snapshot.state["total_cents"] == 0


async def test_a_bulk_snapshot_rebuild_agrees_with_load_for_every_stream(
    client: Client, settings: Settings, store: EventStore
) -> None:
    repository = Repository(store, Tab)
    rng = random.Random(65)
    for n in range(12):
        tab = Tab.new(f"tab-{n}")
        tab.open()
        for _ in range(rng.randint(1, 9)):
            tab.charge(rng.randint(1, 500), "ann")
            if rng.random() < 0.5:
                await repository.save(tab)
        await repository.save(tab)
    await seed_old_events(store, ["tab-old-0", "tab-old-1"])
    async with running_worker(settings, Registry(), client=client, aggregates=AggregateRegistry([Tab])):
        handle = await start_snapshot_rebuild(client, settings, SnapshotRebuildInput("tab", partitions=2, chunk_size=3))
        result = await wait_for_snapshot_rebuild(handle)
    assert result.streams == 14
    assert await assert_every_snapshot_is_a_fold(store) == 14
    for snapshot in await SnapshotStore(store.pool).all("tab"):
        assert state(await repository.load(snapshot.stream_id)) == state(await folded(store, snapshot.stream_id))
