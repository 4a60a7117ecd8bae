"""A read model of orders, one row per order stream: its customer, its status, and the items added to it."""

from sqlmodel import Field, SQLModel

from rehydrate import Event, Projection, Row


class OrderTotal(SQLModel, table=True):
    __tablename__ = "order_totals"
    order_id: str = Field(primary_key=True)  # the key column: one row per stream
    customer_id: str = Field(index=True)  # secondary indexes are built after the load
    status: str
    items: int = 0
    total_cents: int = 0


order_totals = Projection("order_totals", version=1, table=OrderTotal, key="stream")


@order_totals.on("OrderPlaced")
def placed(row: Row | None, event: Event) -> Row:
    return {"customer_id": event.data["customer_id"], "status": "placed"}


@order_totals.on("ItemAdded")
def item_added(row: Row | None, event: Event) -> Row | None:
    if row is None:
        return None  # an item for an order never placed: no row
    row["items"] += event.data["quantity"]
    row["total_cents"] += event.data["quantity"] * event.data["unit_price_cents"]
    return row


@order_totals.on("OrderPaid", "OrderShipped", "OrderDelivered", "OrderCancelled")
def status_changed(row: Row | None, event: Event) -> Row | None:
    if row is not None:
        row["status"] = event.type.removeprefix("Order").lower()
    return row


@order_totals.on("OrderArchived")
def archived(row: Row | None, event: Event) -> None:
    return None  # None deletes the row
