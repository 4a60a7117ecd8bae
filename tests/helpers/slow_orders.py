"""The orders-with-lines example with a small cost per event, for the worker processes of the child-table crash test
(REHYDRATE_PROJECTIONS=tests.helpers.slow_orders): same name, tables, key and handlers, so the test checks both
tables against `order_lines.oracle` unchanged. See `slow_domain` for why a cost."""

from __future__ import annotations

import functools
import time

from rehydrate import Children, Event, Projection, Row
from rehydrate.engine.projections import Handler
from rehydrate.examples import order_lines
from tests.helpers.slow_domain import EVENT_COST_SECONDS


def slow(handler: Handler, takes_children: bool) -> Handler:
    if takes_children:

        @functools.wraps(handler)
        def with_children(row: Row | None, event: Event, children: Children) -> Row | None:
            time.sleep(EVENT_COST_SECONDS)
            return handler(row, event, children)

        return with_children

    @functools.wraps(handler)
    def plain(row: Row | None, event: Event) -> Row | None:
        time.sleep(EVENT_COST_SECONDS)
        return handler(row, event)

    return plain


def slowed(projection: Projection) -> Projection:
    """A copy of `projection` with its child tables whose handlers take EVENT_COST_SECONDS an event."""
    slowed = Projection(
        projection.name,
        version=projection.version,
        table=projection.model,
        children=[order_lines.OrderLine],
    )
    for event_type, handler in projection.handlers.items():
        reads = sorted(projection.reads[event_type])
        slowed.on(event_type, reads=reads)(slow(handler, projection.takes_children[event_type]))
    return slowed


orders = slowed(order_lines.orders)
