"""The worked example: the Order aggregate over the demo's order history agrees with the demo's read model, reads
OrderPlaced v1 through its upcaster, and records v2."""

from __future__ import annotations

from rehydrate import EventStore
from rehydrate.engine.aggregates import Repository
from rehydrate.engine.importer import import_events
from rehydrate.examples import orders
from rehydrate.examples.order_aggregate import Order, OrderPlacedV2, order_events
from tests.helpers import domain


async def test_order_aggregate_agrees_with_the_order_summary_fold(store: EventStore) -> None:
    await import_events(store, enumerate(orders.generate(3000), start=1), source="demo history")
    events = await domain.all_events(store)
    summary = domain.oracle(orders.order_summary, events)
    repository = Repository(store, Order)
    streams = sorted({e.stream_id for e in events})
    for stream in streams:
        order = await repository.load(stream)
        row = summary.get(stream)
        if row is None:  # archived: the read model dropped it, the aggregate keeps its history
            assert any(e.type == "OrderArchived" for e in events if e.stream_id == stream)
            continue
        assert (order.status, order.customer_id, order.items, order.total_cents, order.paid_cents) == (
            row["status"],
            row["customer_id"],
            row["items"],
            row["total_cents"],
            row["paid_cents"],
        )
        assert order.channel == "web"  # every stored OrderPlaced is v1, read as v2

    placed = next(e for e in events if e.type == "OrderPlaced")
    assert placed.schema_version == 1
    typed = order_events.parse(order_events.upcast(placed))
    assert isinstance(typed, OrderPlacedV2) and typed.channel == "web"

    new = Order.new("order-new")
    new.place("customer-1", channel="app")
    new.add_item("sku-1", 2, 500)
    new.pay()
    await repository.save(new)
    stored = await store.read_stream("order-new")
    assert [(e.type, e.schema_version) for e in stored] == [("OrderPlaced", 2), ("ItemAdded", 1), ("OrderPaid", 1)]
    again = await repository.load("order-new")
    assert (again.status, again.channel, again.paid_cents) == ("paid", "app", 1000)
