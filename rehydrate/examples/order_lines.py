"""Orders with their lines: one projection, two tables swapped together (the demo's order events).

`orders` has one row per order; `order_lines` has one row per product of an order, keyed by the order and the
product's SKU. A reader joining the two always sees one generation of both.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from rehydrate import Children, Event, Projection, Row


class Order(SQLModel, table=True):
    """One row per order: its customer, status and totals."""

    __tablename__ = "orders"
    order_id: str = Field(primary_key=True)
    customer_id: str = Field(index=True)
    status: str
    lines: int = 0
    total_cents: int = 0
    updated_at: datetime


class OrderLine(SQLModel, table=True):
    """One row per product of an order."""

    __tablename__ = "order_lines"
    order_id: str = Field(primary_key=True)
    sku: str = Field(primary_key=True, index=True)
    quantity: int
    unit_price_cents: int


orders = Projection("orders", version=1, table=Order, children=[OrderLine])


@orders.on("OrderPlaced")
def placed(order: Row | None, event: Event) -> Row:
    return {"customer_id": event.data["customer_id"], "status": "placed", "updated_at": event.recorded_at}


@orders.on("ItemAdded", reads=OrderLine)
def item_added(order: Row | None, event: Event, children: Children) -> Row | None:
    if order is None:
        return None
    lines = children[OrderLine]
    sku, quantity, price = event.data["sku"], event.data["quantity"], event.data["unit_price_cents"]
    line = lines.get(sku)
    if line is None:
        order["lines"] += 1
        lines.put({"sku": sku, "quantity": quantity, "unit_price_cents": price})
    else:
        lines.put({**line, "quantity": line["quantity"] + quantity, "unit_price_cents": price})
    order["total_cents"] += quantity * price
    order["updated_at"] = event.recorded_at
    return order


@orders.on("ItemRemoved", reads=OrderLine)
def item_removed(order: Row | None, event: Event, children: Children) -> Row | None:
    if order is None:
        return None
    lines = children[OrderLine]
    sku, quantity = event.data["sku"], event.data["quantity"]
    line = lines.get(sku)
    if line is None:
        return order
    if line["quantity"] > quantity:
        lines.put({**line, "quantity": line["quantity"] - quantity})
    else:
        lines.delete(sku)
        order["lines"] -= 1
    order["total_cents"] -= quantity * event.data["unit_price_cents"]
    order["updated_at"] = event.recorded_at
    return order


@orders.on("OrderPaid", "OrderShipped", "OrderDelivered", "OrderCancelled")
def status_changed(order: Row | None, event: Event) -> Row | None:
    if order is None:
        return None
    order["status"] = event.type.removeprefix("Order").lower()
    order["updated_at"] = event.recorded_at
    return order


@orders.on("OrderArchived")
def archived(order: Row | None, event: Event) -> None:
    return None  # the order and its lines are deleted
