"""The demo's order domain: an event generator and two projections (one keyed by stream, one by customer)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import Field, SQLModel

from rehydrate import Event, Projection, Row


class OrderSummary(SQLModel, table=True):
    """One row per order: its status, items and totals."""

    __tablename__ = "order_summary"
    order_id: str = Field(primary_key=True)
    customer_id: str = Field(index=True)
    status: str
    items: int = 0
    total_cents: int = 0
    paid_cents: int = 0
    updated_at: datetime


class CustomerStats(SQLModel, table=True):
    """One row per customer: orders placed, cancelled, and money spent."""

    __tablename__ = "customer_stats"
    customer_id: str = Field(primary_key=True)
    orders: int = 0
    cancelled: int = 0
    spent_cents: int = 0
    last_order_at: datetime | None = None


order_summary = Projection("order_summary", version=1, table=OrderSummary, key="stream")
customer_stats = Projection("customer_stats", version=1, table=CustomerStats, key="customer_id")


@order_summary.on("OrderPlaced")
def order_placed(row: Row | None, event: Event) -> Row:
    return {"customer_id": event.data["customer_id"], "status": "placed", "updated_at": event.recorded_at}


@order_summary.on("ItemAdded", "ItemRemoved")
def item_changed(row: Row | None, event: Event) -> Row | None:
    if row is None:
        return None
    sign = 1 if event.type == "ItemAdded" else -1
    quantity = event.data["quantity"]
    row["items"] += sign * quantity
    row["total_cents"] += sign * quantity * event.data["unit_price_cents"]
    row["updated_at"] = event.recorded_at
    return row


@order_summary.on("OrderPaid", "OrderShipped", "OrderDelivered", "OrderCancelled")
def status_changed(row: Row | None, event: Event) -> Row | None:
    if row is None:
        return None
    row["status"] = event.type.removeprefix("Order").lower()
    if event.type == "OrderPaid":
        row["paid_cents"] += event.data["amount_cents"]
    row["updated_at"] = event.recorded_at
    return row


@order_summary.on("OrderArchived")
def archived(row: Row | None, event: Event) -> None:
    return None


@customer_stats.on("OrderPlaced")
def customer_ordered(row: Row | None, event: Event) -> Row:
    row = row or {"orders": 0, "cancelled": 0, "spent_cents": 0}
    row["orders"] += 1
    row["last_order_at"] = event.recorded_at
    return row


@customer_stats.on("OrderPaid")
def customer_paid(row: Row | None, event: Event) -> Row:
    row = row or {"orders": 0, "cancelled": 0, "spent_cents": 0}
    row["spent_cents"] += event.data["amount_cents"]
    return row


@customer_stats.on("OrderCancelled")
def customer_cancelled(row: Row | None, event: Event) -> Row:
    row = row or {"orders": 0, "cancelled": 0, "spent_cents": 0}
    row["cancelled"] += 1
    return row


def generate(events: int, *, seed: int = 7, start: datetime | None = None) -> Iterator[dict[str, Any]]:
    """A deterministic order history of about `events` events over many interleaved streams.

    Each order is placed, gets items (some removed), and is then paid and shipped and delivered, or
    cancelled; some are archived. About 40 orders are open at any moment, so their events interleave.
    """
    rng = random.Random(seed)
    clock = start or datetime(2025, 1, 1, tzinfo=UTC)
    customers = [f"customer-{n:05d}" for n in range(max(events // 40, 10))]
    skus = [f"sku-{n:04d}" for n in range(500)]
    open_orders: list[Iterator[tuple[str, dict[str, Any]]]] = []
    stream_ids: list[str] = []
    emitted = 0
    next_order = 0

    def lifecycle(order_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        customer = rng.choice(customers)
        yield "OrderPlaced", {"order_id": order_id, "customer_id": customer, "currency": "EUR"}
        lines: list[tuple[str, int, int]] = []
        for _ in range(rng.randint(1, 8)):
            line = (rng.choice(skus), rng.randint(1, 5), rng.randint(199, 19_999))
            lines.append(line)
            yield "ItemAdded", {"sku": line[0], "quantity": line[1], "unit_price_cents": line[2]}
        if len(lines) > 1 and rng.random() < 0.3:
            sku, quantity, price = lines.pop(rng.randrange(len(lines)))
            yield "ItemRemoved", {"sku": sku, "quantity": quantity, "unit_price_cents": price}
        total = sum(quantity * price for _, quantity, price in lines)
        if rng.random() < 0.12:
            yield (
                "OrderCancelled",
                {"customer_id": customer, "reason": rng.choice(["changed mind", "too slow"])},
            )
        else:
            yield "OrderPaid", {"customer_id": customer, "amount_cents": total}
            yield "OrderShipped", {"carrier": rng.choice(["dhl", "ups", "post"])}
            if rng.random() < 0.9:
                yield "OrderDelivered", {}
        if rng.random() < 0.05:
            yield "OrderArchived", {}

    while emitted < events:
        while len(open_orders) < 40:
            order_id = f"order-{next_order:07d}"
            next_order += 1
            open_orders.append(lifecycle(order_id))
            stream_ids.append(order_id)
        index = rng.randrange(len(open_orders))
        step = next(open_orders[index], None)
        if step is None:
            open_orders.pop(index)
            stream_ids.pop(index)
            continue
        clock += timedelta(seconds=rng.randint(1, 90))
        event_type, data = step
        yield {
            "stream_id": stream_ids[index],
            "type": event_type,
            "data": data,
            "recorded_at": clock.isoformat(),
        }
        emitted += 1
