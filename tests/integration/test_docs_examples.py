"""The examples the README and the docs show, run as written: the README's projection builds its read model in a real
replay, the loading-events examples append and import, the versioning example replays stored v1/v2/v3 events, and
the aggregate example places, pays and reloads an order. Each imports its module from docs/snippets, the very file
the pages include."""

from __future__ import annotations

import importlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from rehydrate import NO_STREAM, AggregateNotFoundError, ConcurrencyError, EventStore, NewEvent, Registry, Repository
from rehydrate.core.settings import Settings
from rehydrate.engine.importer import import_events, read_jsonl
from rehydrate.models import ReplayInput, ReplayResult
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.worker import running_worker

SNIPPETS = Path(__file__).resolve().parents[2] / "docs" / "snippets"

# The same module names everywhere in a test session: a SQLModel table may be defined only once per process.
order_totals = importlib.import_module("docs.snippets.order_totals")
append_events = importlib.import_module("docs.snippets.append_events")
versioning = importlib.import_module("docs.snippets.versioning")
aggregate = importlib.import_module("docs.snippets.aggregate")


async def replay(client: Client, settings: Settings, registry: Registry, projection: str) -> ReplayResult:
    async with running_worker(settings, registry, client=client):
        handle = await start_replay(client, settings, ReplayInput(projection), registry=registry)
        return await wait_for_replay(handle)


async def rows(store: EventStore, view: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await store.pool.fetch(f"SELECT * FROM public.{view} ORDER BY 1")]


async def test_the_readme_projection_builds_its_read_model_in_a_real_replay(
    client: Client, settings: Settings, store: EventStore
) -> None:
    def placed(order: str, customer: str) -> NewEvent:
        return NewEvent("OrderPlaced", {"order_id": order, "customer_id": customer})

    def item(quantity: int, price: int) -> NewEvent:
        return NewEvent("ItemAdded", {"sku": "sku-1", "quantity": quantity, "unit_price_cents": price})

    await store.append("order-1", [placed("order-1", "c-1"), item(2, 1_250)], expected_version=NO_STREAM)
    await store.append("order-2", [placed("order-2", "c-2")], expected_version=NO_STREAM)
    await store.append("order-1", [NewEvent("OrderPaid", {"amount_cents": 2_500})], expected_version=2)
    await store.append("order-2", [item(1, 990), item(3, 100)], expected_version=1)
    await store.append("order-3", [placed("order-3", "c-1"), NewEvent("OrderArchived", {})])  # deleted again
    await store.append("order-4", [item(5, 5)])  # an item for an order never placed: no row
    await store.append("order-1", [NewEvent("OrderShipped", {"carrier": "post"})])

    result = await replay(client, settings, Registry([order_totals.order_totals]), "order_totals")

    assert await rows(store, "order_totals") == [
        {"order_id": "order-1", "customer_id": "c-1", "status": "shipped", "items": 2, "total_cents": 2_500},
        {"order_id": "order-2", "customer_id": "c-2", "status": "placed", "items": 4, "total_cents": 1_290},
    ]
    assert (result.generation, result.rows, result.events_applied) == (1, 2, 10)


async def test_the_loading_events_examples_import_the_sample_file_and_append_with_optimistic_concurrency(
    settings: Settings, store: EventStore, capsys: pytest.CaptureFixture[str]
) -> None:
    report = await import_events(store, read_jsonl(SNIPPETS / "orders.jsonl"), source="orders.jsonl")
    assert (report.events, report.streams) == (4, 2)
    first = await store.read_stream("order-0000001")
    assert [(e.stream_version, e.type) for e in first] == [(1, "OrderPlaced"), (2, "ItemAdded"), (3, "OrderPaid")]
    assert first[2].metadata == {"request_id": "r-81"}
    second = await store.read_stream("order-0000002")
    assert second[0].recorded_at.isoformat() == "2025-06-01T09:30:00+00:00"

    version = await append_events.place_order(store, "order-9", "customer-3")
    assert await append_events.add_item(store, "order-9", version, "sku-7", 1, 500) == 2
    with pytest.raises(ConcurrencyError):
        await append_events.place_order(store, "order-9", "customer-3")  # the stream exists
    with pytest.raises(ConcurrencyError):
        await append_events.add_item(store, "order-9", 1, "sku-8", 1, 100)  # seen at 1, now at 2
    assert [e.type for e in await store.read_stream("order-9")] == ["OrderPlaced", "ItemAdded"]

    # The script as a user runs it: `python append_events.py URL`.
    await append_events.main(str(settings.database_url))
    assert capsys.readouterr().out == "refused: stream 'order-1' is at version 2, not the expected 1\n"
    assert [e.type for e in await store.read_stream("order-1")] == ["OrderPlaced", "ItemAdded"]


async def test_the_versioning_example_replays_stored_v1_v2_and_v3_events_as_v3(
    client: Client, settings: Settings, store: EventStore
) -> None:
    shapes = [
        ("order-1", 1, {"order_id": "order-1", "customer_id": "c-1"}),
        ("order-2", 2, {"order_id": "order-2", "customer_id": "c-2", "currency": "USD", "channel": "app"}),
        ("order-3", 3, {"order_id": "order-3", "currency": "EUR", "channel": "shop", "customer": {"id": "c-3"}}),
    ]
    for stream, version, data in shapes:
        await store.append(stream, [NewEvent("OrderPlaced", data, schema_version=version)], expected_version=NO_STREAM)

    await replay(client, settings, Registry([versioning.order_channels]), "order_channels")

    assert await rows(store, "order_channels") == [
        {"order_id": "order-1", "customer_id": "c-1", "channel": "web", "currency": "EUR"},
        {"order_id": "order-2", "customer_id": "c-2", "channel": "app", "currency": "USD"},
        {"order_id": "order-3", "customer_id": "c-3", "channel": "shop", "currency": "EUR"},
    ]


async def test_the_aggregate_example_places_pays_and_reloads_an_order(store: EventStore) -> None:
    order = await aggregate.checkout(store, "order-0000042", "customer-7")
    assert (order.status, order.total_cents, order.paid_cents, order.version) == ("paid", 2_500, 2_500, 3)

    orders = Repository(store, aggregate.Order)
    again = await orders.load("order-0000042")
    assert again.model_dump() == order.model_dump()

    stored = await store.read_stream("order-0000042")
    first, now = await aggregate.history(store, "order-0000042", stored[-1].recorded_at)
    assert (first.status, first.version) == ("placed", 1)
    assert now.model_dump() == order.model_dump()
    with pytest.raises(AggregateNotFoundError):
        await aggregate.history(store, "order-0000042", stored[0].recorded_at - timedelta(days=1))

    with pytest.raises(ValueError, match="cannot be paid"):
        again.pay()  # a command checks the rules against the current state
    stale = await orders.load("order-0000042", version=2)
    stale.pay()
    with pytest.raises(ConcurrencyError):
        await orders.save(stale)  # the stream moved on since version 2
