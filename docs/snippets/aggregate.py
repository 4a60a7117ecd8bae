"""An order as an aggregate: its state folded from its own stream, commands that record new events, snapshots."""

from datetime import datetime
from typing import ClassVar

from rehydrate import Aggregate, Event, EventStore, Repository, applies


class Order(Aggregate):
    aggregate_type: ClassVar[str] = "order"  # names its snapshots: `rehydrate snapshots rebuild order`
    stream_prefix: ClassVar[str] = "order-"  # its streams: order-0000042, …
    snapshot_every: ClassVar[int | None] = 50  # save() writes a snapshot every 50 events (None: on demand only)
    state_version: ClassVar[int] = 1  # bump it to ignore every older snapshot

    status: str = "new"  # every field has a default: the state before the first event
    customer_id: str | None = None
    total_cents: int = 0
    paid_cents: int = 0

    @applies("OrderPlaced")
    def _placed(self, event: Event) -> None:
        self.status, self.customer_id = "placed", event.data["customer_id"]

    @applies("ItemAdded")
    def _item_added(self, event: Event) -> None:
        self.total_cents += event.data["quantity"] * event.data["unit_price_cents"]

    @applies("OrderPaid")
    def _paid(self, event: Event) -> None:
        self.status, self.paid_cents = "paid", self.paid_cents + event.data["amount_cents"]

    def place(self, customer_id: str) -> None:  # a command: check the rules, then record
        if self.status != "new":
            raise ValueError(f"order {self.id} is already {self.status}")
        self.record("OrderPlaced", {"order_id": self.id, "customer_id": customer_id})

    def add_item(self, sku: str, quantity: int, unit_price_cents: int) -> None:
        if self.status != "placed":
            raise ValueError(f"order {self.id} is {self.status}: its items can no longer change")
        self.record("ItemAdded", {"sku": sku, "quantity": quantity, "unit_price_cents": unit_price_cents})

    def pay(self) -> None:
        if self.status != "placed" or self.total_cents == 0:
            raise ValueError(f"order {self.id} cannot be paid while {self.status}")
        self.record("OrderPaid", {"customer_id": self.customer_id, "amount_cents": self.total_cents})


async def checkout(store: EventStore, order_id: str, customer_id: str) -> Order:
    """Place an order with one item and pay it, saving after each step as a service would."""
    orders = Repository(store, Order)
    order = Order.new(order_id)  # a new stream: saved with expected version 0
    order.place(customer_id)
    order.add_item("sku-42", 2, 1_250)
    await orders.save(order)
    order = await orders.load(order_id)  # the current state (from a snapshot when there is a valid one)
    order.pay()
    await orders.save(order)  # ConcurrencyError if the stream moved since the load
    return order


async def history(store: EventStore, order_id: str, when: datetime) -> tuple[Order, Order]:
    """The order after its first event, and as it stood at `when` (an aware datetime)."""
    orders = Repository(store, Order)
    return await orders.load(order_id, version=1), await orders.load(order_id, as_of=when)
