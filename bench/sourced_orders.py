"""The demo's `order_summary`, reading the source that REHYDRATE_BENCH_SOURCE names (declared in settings) instead of
rehydrate's own store: what `sources_speed.py`'s workers serve."""

from __future__ import annotations

import os

from rehydrate import Projection
from rehydrate.examples import orders

order_summary = Projection(
    "order_summary", version=1, table=orders.OrderSummary, key="stream", source=os.environ["REHYDRATE_BENCH_SOURCE"]
)
for event_type, handler in orders.order_summary.handlers.items():
    order_summary.on(event_type)(handler)
