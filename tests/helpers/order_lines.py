"""The orders-with-lines example's read model as a plain fold of the events (not through the projection's handlers),
and as it stands in Postgres: the oracle of the child-table tests."""

from __future__ import annotations

import asyncpg

from rehydrate import Event, EventStore, Row
from rehydrate.engine.importer import import_events
from rehydrate.examples import orders

Tables = tuple[dict[str, Row], dict[tuple[str, str], Row]]


def oracle(events: list[Event]) -> Tables:
    """Orders and their lines, folded plainly from the events (not through the projection's handlers)."""
    heads: dict[str, Row] = {}
    lines: dict[tuple[str, str], Row] = {}
    for e in events:
        order = heads.get(e.stream_id)
        if e.type == "OrderPlaced":
            heads[e.stream_id] = {
                "order_id": e.stream_id,
                "customer_id": e.data["customer_id"],
                "status": "placed",
                "lines": 0,
                "total_cents": 0,
                "updated_at": e.recorded_at,
            }
            continue
        if order is None:
            continue
        if e.type in ("ItemAdded", "ItemRemoved"):
            key, quantity = (e.stream_id, e.data["sku"]), e.data["quantity"]
            line = lines.get(key)
            if e.type == "ItemAdded":
                if line is None:
                    order["lines"] += 1
                    lines[key] = {"order_id": key[0], "sku": key[1], "quantity": 0}
                lines[key].update(
                    quantity=lines[key]["quantity"] + quantity, unit_price_cents=e.data["unit_price_cents"]
                )
                order["total_cents"] += quantity * e.data["unit_price_cents"]
            elif line is None:
                continue
            else:
                if line["quantity"] > quantity:
                    line["quantity"] -= quantity
                else:
                    del lines[key]
                    order["lines"] -= 1
                order["total_cents"] -= quantity * e.data["unit_price_cents"]
        elif e.type == "OrderArchived":
            del heads[e.stream_id]
            for key in [k for k in lines if k[0] == e.stream_id]:
                del lines[key]
            continue
        else:
            order["status"] = e.type.removeprefix("Order").lower()
        order["updated_at"] = e.recorded_at
    return heads, lines


async def read(pool: asyncpg.Pool) -> Tables:
    heads = {r["order_id"]: dict(r) for r in await pool.fetch("SELECT * FROM public.orders")}
    lines = {(r["order_id"], r["sku"]): dict(r) for r in await pool.fetch("SELECT * FROM public.order_lines")}
    return heads, lines


async def history(store: EventStore, events: int = 2000) -> None:
    await import_events(store, enumerate(orders.generate(events, seed=11), start=1), source="order history")
