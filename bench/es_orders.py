"""The demo's orders as a py-eventsourcing application stores them, and `order_summary` reading them: what
`sources_speed.py`'s py-eventsourcing workers serve, and how it fills the table.

The application is the real library's (`eventsourcing.application.Application` with its PostgreSQL recorder, on the
database REHYDRATE_BENCH_ES_URL names); its table is `orders_events`. Each stored event's `state` is what the
application's mapper makes of the demo event's payload plus its `timestamp` (py-eventsourcing keeps an event's time in
its state, not in a column), so the projection takes `updated_at` from there.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from eventsourcing.application import Application

from rehydrate import Event, Projection
from rehydrate.engine.projections import Row
from rehydrate.examples import orders
from rehydrate.sources.declaration import Source
from rehydrate.sources.presets import eventsourcing_table

TOPIC = "rehydrate.examples.orders:{}"  # the preset reads the event type after the colon
NAMESPACE = uuid.UUID("6f1c3b8e-1d2a-4c55-9a57-3f0e1c2b4d6a")


class Orders(Application[uuid.UUID]):
    """Its events table is `orders_events`."""


def application(url: str) -> Orders:
    """The application on `url` (a host in the query, as the embedded server's URL has it, is honoured)."""
    parts, query = urlsplit(url), parse_qs(urlsplit(url).query)
    return Orders(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": parts.path.lstrip("/"),
            "POSTGRES_HOST": query.get("host", [parts.hostname or "127.0.0.1"])[0],
            "POSTGRES_PORT": str(parts.port or query.get("port", ["5432"])[0]),
            "POSTGRES_USER": unquote(parts.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(parts.password or ""),
        }
    )


def originator_id(stream_id: str) -> uuid.UUID:
    """py-eventsourcing's streams are uuids: each demo stream's, derived from its id."""
    return uuid.uuid5(NAMESPACE, stream_id)


def stored(app: Orders, row: Any) -> tuple[uuid.UUID, int, str, bytes, int]:
    """One demo event (global_position, stream_id, stream_version, event_type, payload, recorded_at) as a row of
    `orders_events`, its state made by the application's own transcoder."""
    position, stream_id, version, event_type, payload, recorded_at = row
    state = app.mapper.transcoder.encode({**payload, "timestamp": recorded_at})
    return originator_id(stream_id), version, TOPIC.format(event_type), state, position


def _timed(handler: Any) -> Any:
    def apply(row: Row | None, event: Event) -> Row | None:
        return handler(row, dataclasses.replace(event, recorded_at=event.data["timestamp"]))

    return apply


if "REHYDRATE_BENCH_ES_URL" in os.environ:
    _app = application(os.environ["REHYDRATE_BENCH_ES_URL"])
    source = Source("orders_es", eventsourcing_table(_app.mapper, table="orders_events"))
    order_summary = Projection("order_summary", version=1, table=orders.OrderSummary, key="stream", source=source)
    for event_type, handler in orders.order_summary.handlers.items():
        order_summary.on(event_type)(_timed(handler))
