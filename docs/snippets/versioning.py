"""OrderPlaced in three shapes: upcasters bring v1 and v2 events to v3 before any handler sees them."""

from typing import Any

from pydantic import BaseModel
from sqlmodel import Field, SQLModel

from rehydrate import Event, Projection, Row, Upcasters

order_events = Upcasters()


@order_events.upcaster("OrderPlaced", from_version=1)
def placed_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v2 names the sales channel; every v1 order came from the web shop."""
    return {**data, "currency": data.get("currency", "EUR"), "channel": "web"}


@order_events.upcaster("OrderPlaced", from_version=2)  # chained: v1 → v2 → v3
def placed_v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    """v3 nests the customer."""
    rest = {key: value for key, value in data.items() if key != "customer_id"}
    return {**rest, "customer": {"id": data["customer_id"]}}


@order_events.model("OrderPlaced", version=3)
class OrderPlaced(BaseModel):
    """The typed v3 payload, for a handler that wants one: `order_events.parse(event)`."""

    order_id: str
    currency: str
    channel: str
    customer: dict[str, str]


class OrderChannel(SQLModel, table=True):
    __tablename__ = "order_channels"
    order_id: str = Field(primary_key=True)
    customer_id: str
    channel: str
    currency: str


order_channels = Projection("order_channels", version=1, table=OrderChannel, key="stream", upcasters=order_events)


@order_channels.on("OrderPlaced")
def placed(row: Row | None, event: Event) -> Row:
    placed = order_events.parse(event)  # always v3 here, whatever version was stored
    assert isinstance(placed, OrderPlaced)
    return {"customer_id": placed.customer["id"], "channel": placed.channel, "currency": placed.currency}
