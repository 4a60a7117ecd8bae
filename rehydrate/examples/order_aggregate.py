"""The demo's orders as an aggregate: an `Order` folded from its own stream (`order-0000042`), saved with
optimistic concurrency, snapshotted every 50 events, and an upcaster that reads OrderPlaced v1 as v2.

    REHYDRATE_AGGREGATES=rehydrate.examples.order_aggregate rehydrate snapshots rebuild order --wait
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from pydantic import BaseModel

from rehydrate import Aggregate, Event, Upcasters, applies

order_events = Upcasters()


@order_events.upcaster("OrderPlaced", from_version=1)
def placed_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v2 names the sales channel; every v1 order came from the web shop (and older ones had no currency)."""
    return {**data, "currency": data.get("currency", "EUR"), "channel": "web"}


@order_events.model("OrderPlaced", version=2)
class OrderPlacedV2(BaseModel):
    """The typed payload, for handlers that want one: `order_events.parse(event)`."""

    order_id: str
    customer_id: str
    currency: str
    channel: str


class OrderLine(BaseModel):
    sku: str
    quantity: int
    unit_price_cents: int


class Order(Aggregate):
    """An order: placed, items added and removed, then paid, shipped, delivered, or cancelled."""

    aggregate_type: ClassVar[str] = "order"
    stream_prefix: ClassVar[str] = "order-"
    state_version: ClassVar[int] = 1
    snapshot_every: ClassVar[int | None] = 50
    upcasters: ClassVar[Upcasters | None] = order_events

    status: str = "new"
    customer_id: str | None = None
    channel: str | None = None
    lines: list[OrderLine] = []
    paid_cents: int = 0
    updated_at: datetime | None = None

    @property
    def total_cents(self) -> int:
        return sum(line.quantity * line.unit_price_cents for line in self.lines)

    @property
    def items(self) -> int:
        return sum(line.quantity for line in self.lines)

    # -- applying events (stored ones, upcast to their current version, and new ones) ------------------------

    @applies("OrderPlaced")
    def _placed(self, event: Event) -> None:
        self.status = "placed"
        self.customer_id = event.data["customer_id"]
        self.channel = event.data["channel"]  # v2: an OrderPlaced v1 arrives here upcast
        self.updated_at = event.recorded_at

    @applies("ItemAdded")
    def _item_added(self, event: Event) -> None:
        self.lines.append(OrderLine.model_validate(event.data))
        self.updated_at = event.recorded_at

    @applies("ItemRemoved")
    def _item_removed(self, event: Event) -> None:
        removed = OrderLine.model_validate(event.data)
        if removed in self.lines:
            self.lines.remove(removed)
        self.updated_at = event.recorded_at

    @applies("OrderPaid", "OrderShipped", "OrderDelivered", "OrderCancelled")
    def _status(self, event: Event) -> None:
        self.status = event.type.removeprefix("Order").lower()
        if event.type == "OrderPaid":
            self.paid_cents += event.data["amount_cents"]
        self.updated_at = event.recorded_at

    # -- commands: check the rules against the current state, then record --------------------------------------

    def place(self, customer_id: str, *, channel: str = "web") -> None:
        if self.status != "new":
            raise ValueError(f"order {self.id} is already {self.status}")
        self.record(
            "OrderPlaced", {"order_id": self.id, "customer_id": customer_id, "currency": "EUR", "channel": channel}
        )

    def add_item(self, sku: str, quantity: int, unit_price_cents: int) -> None:
        if self.status != "placed":
            raise ValueError(f"order {self.id} is {self.status}: items can no longer change")
        self.record("ItemAdded", {"sku": sku, "quantity": quantity, "unit_price_cents": unit_price_cents})

    def pay(self) -> None:
        if self.status != "placed" or not self.lines:
            raise ValueError(f"order {self.id} cannot be paid while {self.status}")
        self.record("OrderPaid", {"customer_id": self.customer_id, "amount_cents": self.total_cents})
