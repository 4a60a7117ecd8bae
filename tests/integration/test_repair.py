"""Repairing selected keys of a live read model in place (the `Repair` workflow, on a real worker, Temporal and
Postgres): the keys' rows become the fold of their whole history while the tail applies new events to the same keys;
other keys are not touched; a dry run changes nothing; an unknown key changes nothing and says so."""

from __future__ import annotations

import asyncio

import pytest
from sqlmodel import Field, SQLModel
from temporalio.client import Client

from rehydrate import Event, EventStore, NewEvent
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.engine.projections import Projection, Registry, Row
from rehydrate.models import RepairInput, ReplayInput
from rehydrate.starter import repair, start_replay, wait_for_replay
from rehydrate.worker import running_worker
from tests.helpers import domain
from tests.helpers.waiting import eventually

CORRUPT = "UPDATE public.account SET balance = balance + 1000, history = 'x' WHERE account_id = ANY($1::text[])"


async def _built(client: Client, settings: Settings, store: EventStore) -> dict[str, dict[str, object]]:
    await domain.append_all(store, domain.random_history(41, streams=30, events=600))
    await wait_for_replay(await start_replay(client, settings, ReplayInput("accounts")))
    return await domain.read_model(store.pool, domain.accounts)


async def test_repaired_keys_equal_the_fold_while_the_tail_applies_new_events_to_them(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    async with running_worker(tail_settings, Registry([domain.accounts]), client=client):
        rows = await _built(client, tail_settings, store)
        keys = sorted(rows)[:6]
        others = sorted(rows)[6:8]
        await store.pool.execute(CORRUPT, keys + others)
        writing = True

        async def deposits() -> int:
            written = 0
            while writing:
                for key in keys:
                    await store.append(key, [NewEvent("Deposited", {"amount": 1})])
                    written += 1
                await asyncio.sleep(0.01)
            return written

        writer = asyncio.create_task(deposits())
        try:
            await asyncio.sleep(0.2)
            done = await repair(client, tail_settings, RepairInput("accounts", keys=keys, batch_size=4))
        finally:
            writing = False
            written = await writer
        assert (done.keys, done.changed, done.batches) == (6, 6, 2)
        assert written > 0

        async def caught_up() -> bool:
            want = domain.oracle(domain.accounts, await domain.all_events(store))
            got = await domain.read_model(store.pool, domain.accounts)
            return all(got.get(k) == want.get(k) for k in keys)

        await eventually(caught_up, within=30)
        want = domain.oracle(domain.accounts, await domain.all_events(store))
        got = await domain.read_model(store.pool, domain.accounts)
        # The keys not asked for keep their (wrong) rows; every other key is as it was.
        assert [k for k in got if got[k] != want.get(k)] == others


async def test_a_dry_run_shows_what_would_change_and_an_unknown_key_changes_nothing(
    client: Client, settings: Settings, store: EventStore
) -> None:
    async with running_worker(settings, Registry([domain.accounts]), client=client):
        rows = await _built(client, settings, store)
        keys = sorted(rows)[:3]
        await store.pool.execute(CORRUPT, keys[:2])
        before = await domain.read_model(store.pool, domain.accounts)
        dry = await repair(client, settings, RepairInput("accounts", keys=keys, dry_run=True))
        assert (dry.dry_run, dry.keys, dry.changed) == (True, 3, 2)
        assert [(d.key, d.problem) for d in dry.first] == [(keys[0], "differs"), (keys[1], "differs")]
        assert await domain.read_model(store.pool, domain.accounts) == before
        with pytest.raises(UserError, match=r"has no row and no event for key\(s\) 'no-such-account'"):
            await repair(client, settings, RepairInput("accounts", keys=[keys[0], "no-such-account"]))
        assert await domain.read_model(store.pool, domain.accounts) == before
        with pytest.raises(UserError, match="no key to repair"):
            await repair(client, settings, RepairInput("accounts", keys=[]))
        done = await repair(client, settings, RepairInput("accounts", keys=keys))
        assert done.changed == 2
        assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(
            domain.accounts, await domain.all_events(store)
        )


class KeyedCounter(SQLModel, table=True):
    __tablename__ = "keyed_counter"
    n: int = Field(primary_key=True)
    hits: int = 0


counters = Projection("counters", version=1, table=KeyedCounter, key="n")


@counters.on("Hit")
def hit(row: Row | None, event: Event) -> Row:
    return {"hits": (row or {}).get("hits", 0) + 1}


async def test_keys_are_read_as_the_key_column_writes_them_and_a_key_of_another_type_is_refused(
    client: Client, settings: Settings, store: EventStore
) -> None:
    """An integer key column: "042" is the key 42 (found through the column's index, not its text); "x" is refused,
    naming it, with nothing repaired."""
    for n in range(60):
        await store.append(f"s-{n % 7}", [NewEvent("Hit", {"n": n % 50})])
    async with running_worker(settings, Registry([counters]), client=client):
        await wait_for_replay(await start_replay(client, settings, ReplayInput("counters")))
        await store.pool.execute("UPDATE public.keyed_counter SET hits = 0 WHERE n IN (7, 42)")
        with pytest.raises(UserError, match=r"key\(s\) 'x' of 'counters' are not INTEGER values"):
            await repair(client, settings, RepairInput("counters", keys=["042", "x"]))
        assert await store.pool.fetchval("SELECT sum(hits) FROM public.keyed_counter WHERE n IN (7, 42)") == 0
        done = await repair(client, settings, RepairInput("counters", keys=["042", " 7", "7"]))
    assert (done.keys, done.changed) == (2, 2)
    rows = dict(await store.pool.fetch("SELECT n, hits FROM public.keyed_counter WHERE n IN (7, 42)"))
    assert rows == {7: 2, 42: 1}
