"""A projection with a child table (the orders-with-lines example, on a real worker, Temporal and Postgres): built
equal to a plain fold of the events for 1 and 4 lanes, kept equal by the tail as lines change and orders are deleted,
swapped and rolled back in one transaction under readers that join both tables, verified and repaired key by key
across both tables."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from sqlmodel import Field, SQLModel
from temporalio.client import Client

from rehydrate import Children, Event, EventStore, NewEvent, Projection, Row
from rehydrate.core.settings import Settings
from rehydrate.engine.generations import Generations
from rehydrate.engine.operations import rollback
from rehydrate.engine.projections import Registry
from rehydrate.examples import order_lines
from rehydrate.models import RepairInput, ReplayInput
from rehydrate.sources.pools import Sources
from rehydrate.starter import repair, start_replay, tail_state, verify, wait_for_replay
from rehydrate.worker import running_worker
from rehydrate.workflows import ReplayWorkflow
from tests.helpers import domain
from tests.helpers.cli import rehydrate
from tests.helpers.order_lines import Tables, history, oracle, read
from tests.helpers.waiting import eventually


async def changes_to_stored_orders(store: EventStore, heads: dict[str, Row], lines: dict[tuple[str, str], Row]) -> int:
    """Events on orders the read model holds: more of a line it has, a line removed whole, an order archived."""
    ids = sorted(heads)
    written = 0
    for number, order_id in enumerate(ids[:30]):
        own = sorted(sku for (o, sku) in lines if o == order_id)
        if not own:
            continue
        line = lines[(order_id, own[0])]
        if number % 3 == 0:
            change = NewEvent("ItemAdded", {"sku": own[0], "quantity": 2, "unit_price_cents": 300})
        elif number % 3 == 1:
            change = NewEvent(
                "ItemRemoved",
                {"sku": own[0], "quantity": line["quantity"], "unit_price_cents": line["unit_price_cents"]},
            )
        else:
            change = NewEvent("OrderArchived", {})
        await store.append(order_id, [change])
        written += 1
    return written


@pytest.mark.parametrize("lanes", [1, 4])
async def test_both_tables_equal_the_plain_fold_and_the_tail_keeps_them_so(
    client: Client, tail_settings: Settings, store: EventStore, lanes: int, tmp_path: Path
) -> None:
    await history(store)
    async with running_worker(tail_settings, Registry([order_lines.orders]), client=client):
        handle = await start_replay(client, tail_settings, ReplayInput("orders", lanes=lanes, chunk_size=300))
        await wait_for_replay(handle)
        assert (await handle.query(ReplayWorkflow.progress)).tables == ["orders__g1", "order_lines__g1"]
        built = await read(store.pool)
        assert built == oracle(await domain.all_events(store))
        assert len(built[1]) > len(built[0]) > 100
        assert await changes_to_stored_orders(store, *built) >= 20

        async def tail_caught_up() -> bool:
            return await read(store.pool) == oracle(await domain.all_events(store))

        await eventually(tail_caught_up, within=30)
    if lanes == 1:  # `rehydrate generations` names each build's tables
        listed = await rehydrate(
            tail_settings, tmp_path, "generations", "orders", "--json", REHYDRATE_PROJECTIONS=order_lines.__name__
        )
        assert listed.code == 0, listed
        [generation] = orjson.loads(listed.stdout)
        assert generation["tables"] == ["orders__g1", "order_lines__g1"]


class TaggedOrder(SQLModel, table=True):
    __tablename__ = "tagged_orders"
    order_id: str = Field(primary_key=True)
    tag: int


class TaggedLine(SQLModel, table=True):
    __tablename__ = "tagged_lines"
    order_id: str = Field(primary_key=True)
    sku: str = Field(primary_key=True)
    tag: int


TAG = {"value": 1}  # what every row of the next build holds: readers tell generations apart by it
tagged = Projection("tagged_orders", version=1, table=TaggedOrder, children=[TaggedLine])


@tagged.on("OrderPlaced")
def tagged_placed(row: Row | None, event: Event) -> Row:
    return {"tag": TAG["value"]}


@tagged.on("ItemAdded")
def tagged_item(row: Row | None, event: Event, children: Children) -> Row | None:
    if row is not None:
        children[TaggedLine].put({"sku": event.data["sku"], "tag": TAG["value"]})
    return row


READERS = [
    # Both join orders: the swap and the readers lock the two views in either order.
    "SELECT array_agg(DISTINCT o.tag) AS heads, array_agg(DISTINCT l.tag) AS lines, count(*) AS n "
    "FROM public.tagged_orders o JOIN public.tagged_lines l USING (order_id)",
    "SELECT array_agg(DISTINCT o.tag) AS heads, array_agg(DISTINCT l.tag) AS lines, count(*) AS n "
    "FROM public.tagged_lines l JOIN public.tagged_orders o USING (order_id)",
]


# A swap waiting for the lines' view (a reader holds it): the orders' view must not have changed meanwhile.
SWAP_WAITING = """SELECT count(*) FROM pg_locks
    WHERE relation = 'public.tagged_lines'::regclass AND mode = 'AccessExclusiveLock' AND NOT granted"""


async def test_readers_joining_both_tables_see_one_generation_through_the_swap_and_a_rollback(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await history(store, 1500)
    seen: list[int] = []
    problems: list[str] = []
    reading = True

    async def reader(statement: str) -> int:
        queries = 0
        async with store.pool.acquire() as conn:
            while reading:
                try:
                    row = await conn.fetchrow(statement)
                except asyncpg.PostgresError as error:
                    problems.append(f"{type(error).__name__}: {error}")
                    continue
                queries += 1
                tags = {*(row["heads"] or []), *(row["lines"] or [])}
                if row["n"] == 0 or len(tags) != 1:
                    problems.append(f"{row['n']} rows, tags {sorted(tags)}")
                else:
                    seen.append(tags.pop())
                await asyncio.sleep(0.01)  # busy readers, not a wall: see the swap's lock in docs/child-tables.md
        return queries

    registry = Registry([tagged])
    async with running_worker(settings, registry, client=client):
        TAG["value"] = 1
        await wait_for_replay(await start_replay(client, settings, ReplayInput("tagged_orders", lanes=2)))
        readers = [asyncio.create_task(reader(statement)) for statement in READERS * 2]
        try:
            TAG["value"] = 2
            await wait_for_replay(await start_replay(client, settings, ReplayInput("tagged_orders", lanes=2)))
            await asyncio.sleep(0.3)
            assert seen[-1] == 2
            done = await rollback(store.pool, settings, tagged)
            assert (done.from_generation, done.to_generation) == (2, 1)
            await asyncio.sleep(0.3)
        finally:
            reading = False
            queries = await asyncio.gather(*readers)
    assert problems == []
    assert min(queries) > 10, queries
    assert seen[0] == 1 and 2 in seen and seen[-1] == 1

    # A reader holds the lines' view in an open transaction: the next swap waits for it, and until it gets it the
    # orders' view still shows the old generation (a swap of one view at a time would have moved it already).
    async with running_worker(settings, registry, client=client), store.pool.acquire() as holder:
        transaction = holder.transaction()
        await transaction.start()
        await holder.fetchval("SELECT count(*) FROM public.tagged_lines")
        TAG["value"] = 3
        handle = await start_replay(client, settings, ReplayInput("tagged_orders", lanes=2))
        waits, deadline = 0, time.monotonic() + 20
        while waits < 2 and time.monotonic() < deadline:
            waits += await store.pool.fetchval(SWAP_WAITING)
            # (Waits while the swap holds the orders' view, until it gives up.)
            assert await store.pool.fetch("SELECT DISTINCT tag FROM public.tagged_orders") == [(1,)]
            await asyncio.sleep(0.01)
        assert waits >= 2, "the swap never waited for the lines' view"
        await transaction.commit()
        await wait_for_replay(handle)
    assert await store.pool.fetchval("SELECT array_agg(DISTINCT tag) FROM public.tagged_lines") == [3]
    assert await store.pool.fetchval("SELECT array_agg(DISTINCT tag) FROM public.tagged_orders") == [3]


CORRUPT_LINES = "UPDATE public.order_lines SET quantity = quantity + 100 WHERE order_id = ANY($1::text[])"


async def test_verify_finds_drift_in_a_child_table_and_repair_mends_the_keys_while_the_tail_writes_to_them(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    await history(store)
    async with running_worker(tail_settings, Registry([order_lines.orders]), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("orders", lanes=2)))
        _, lines = await read(store.pool)
        with_lines = sorted({order_id for order_id, _ in lines})
        keys, others = with_lines[:5], with_lines[5:7]
        await store.pool.execute(CORRUPT_LINES, keys + others)
        checked = await verify(client, tail_settings, "orders", show=10)
        assert checked.differing == 7
        assert [(d.key, d.problem) for d in checked.first] == [(k, "differs") for k in sorted(keys + others)]

        writing = True

        async def more_lines() -> int:
            written = 0
            while writing:
                for key in keys:
                    item = {"sku": f"sku-new-{written % 3}", "quantity": 1, "unit_price_cents": 100}
                    await store.append(key, [NewEvent("ItemAdded", item)])
                    written += 1
                await asyncio.sleep(0.01)
            return written

        writer = asyncio.create_task(more_lines())
        try:
            await asyncio.sleep(0.2)
            done = await repair(client, tail_settings, RepairInput("orders", keys=keys, batch_size=3))
        finally:
            writing = False
            written = await writer
        assert (done.keys, done.changed, done.batches) == (5, 5, 2)
        assert written > 0

        def of(tables: Tables, wanted: list[str]) -> Any:
            return (
                {k: v for k, v in tables[0].items() if k in wanted},
                {k: v for k, v in tables[1].items() if k[0] in wanted},
            )

        async def repaired() -> bool:
            return of(await read(store.pool), keys) == of(oracle(await domain.all_events(store)), keys)

        await eventually(repaired, within=30)
        # The keys not asked for keep their wrong lines.
        now, want = await read(store.pool), oracle(await domain.all_events(store))
        assert of(now, others) != of(want, others)
        assert of(now, with_lines[7:]) == of(want, with_lines[7:])


FAILING = {"order": ""}  # the order whose ItemAdded handler fails, while set
parking = Projection("orders", version=1, table=order_lines.Order, children=[order_lines.OrderLine], on_error="park")
for event_type, handler in order_lines.orders.handlers.items():
    if event_type == "ItemAdded":

        def failing(row: Row | None, event: Event, children: Children, handler: Any = handler) -> Row | None:
            if event.stream_id == FAILING["order"]:
                raise ValueError("no such SKU")
            return handler(row, event, children)

        parking.on(event_type, reads=order_lines.OrderLine)(failing)
    else:
        parking.on(event_type, reads=sorted(order_lines.orders.reads[event_type]))(handler)


async def test_a_parked_key_leaves_both_tables_alone_and_its_retry_rebuilds_both(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await history(store, 1500)
    want = oracle(await domain.all_events(store))
    FAILING["order"] = victim = sorted({order_id for order_id, _ in want[1]})[3]
    async with running_worker(settings, Registry([parking]), client=client):
        input = ReplayInput("orders", lanes=2, allow_dead_letters=True)
        await wait_for_replay(await start_replay(client, settings, input))
    others = ({k: v for k, v in want[0].items() if k != victim}, {k: v for k, v in want[1].items() if k[0] != victim})
    assert await read(store.pool) == others
    FAILING["order"] = ""
    sources = Sources(store)
    try:
        async with store.pool.acquire() as conn:
            retried = await Generations(conn, sources, settings.read_model_schema).retry_dead_letters(parking)
    finally:
        await sources.close()
    assert retried == (1, 0)
    assert await read(store.pool) == want


class GrownOrder(SQLModel, table=True):
    __tablename__ = "grown_orders"
    order_id: str = Field(primary_key=True)
    lines: int = 0


class GrownLine(SQLModel, table=True):
    __tablename__ = "grown_lines"
    order_id: str = Field(primary_key=True)
    sku: str = Field(primary_key=True)


before_lines = Projection("grown_orders", version=1, table=GrownOrder)
with_lines = Projection("grown_orders", version=1, table=GrownOrder, children=[GrownLine])


@before_lines.on("OrderPlaced")
@with_lines.on("OrderPlaced")
def grown_placed(row: Row | None, event: Event) -> Row:
    return {"lines": 0}


@with_lines.on("ItemAdded")
def grown_item(row: Row | None, event: Event, children: Children) -> Row | None:
    if row is not None:
        children[GrownLine].put({"sku": event.data["sku"]})
    return row


async def test_code_that_adds_a_child_table_stops_the_tail_of_a_generation_built_without_it(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    await history(store, 300)
    async with running_worker(tail_settings, Registry([before_lines]), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("grown_orders")))
    async with running_worker(tail_settings, Registry([with_lines]), client=client):

        async def tail_failed() -> bool:
            return (await tail_state(client, "grown_orders", tail_settings.temporal_task_queue))[0] == "FAILED"

        await eventually(tail_failed, within=30)
        _, error = await tail_state(client, "grown_orders", tail_settings.temporal_task_queue)
    assert error is not None and "was built with the child tables none; the code has ['grown_lines']" in error, error
    assert "rehydrate replay start grown_orders" in error
