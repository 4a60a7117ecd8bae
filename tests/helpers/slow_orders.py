"""The orders-with-lines example with a small cost per event, for the worker processes of the child-table crash test
(REHYDRATE_PROJECTIONS=tests.helpers.slow_orders): same name, tables, key and handlers, so the test checks both
tables against `order_lines.oracle` unchanged. See `slow_domain` for why a cost."""

from __future__ import annotations

from rehydrate.examples import order_lines
from tests.helpers.slow_domain import slowed

orders = slowed(order_lines.orders, children=[order_lines.OrderLine])
