"""Appending events from a service: a new stream, then more events with optimistic concurrency."""

import asyncio
import sys

from rehydrate import NO_STREAM, ConcurrencyError, EventStore, NewEvent, create_pool


async def place_order(store: EventStore, order_id: str, customer_id: str) -> int:
    """Open a new order stream; fails with ConcurrencyError if the stream exists already."""
    placed = NewEvent("OrderPlaced", {"order_id": order_id, "customer_id": customer_id})
    return await store.append(order_id, [placed], expected_version=NO_STREAM)


async def add_item(store: EventStore, order_id: str, seen: int, sku: str, quantity: int, price: int) -> int:
    """Append to a stream last seen at version `seen`; returns the stream's new version."""
    item = NewEvent("ItemAdded", {"sku": sku, "quantity": quantity, "unit_price_cents": price})
    return await store.append(order_id, [item], expected_version=seen)


async def main(url: str) -> None:
    store = EventStore(await create_pool(url))
    version = await place_order(store, "order-1", "customer-7")
    version = await add_item(store, "order-1", version, "sku-42", 2, 1_250)
    try:
        await add_item(store, "order-1", version - 1, "sku-43", 1, 990)  # a stale version
    except ConcurrencyError as error:
        print(f"refused: {error.message}")  # reload the stream and decide again
    await store.pool.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))  # python append_events.py postgresql://…
