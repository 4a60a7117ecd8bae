"""rehydrate: durable, zero-downtime rebuilds of event-sourced read models, on Temporal and Postgres.

The public API: what a service or a projection module imports. Everything else is reached through the `rehydrate`
command, the Temporal workflows, or these names.
"""

from rehydrate.core.database import create_pool
from rehydrate.core.errors import (
    ConcurrencyError,
    ProjectionError,
    RehydrateError,
    UnknownProjectionError,
    UserError,
)
from rehydrate.core.settings import Settings
from rehydrate.engine.aggregates import Aggregate, AggregateNotFoundError, AggregateRegistry, Repository, applies
from rehydrate.engine.children import Children, ChildRows
from rehydrate.engine.projections import Projection, Registry, Row
from rehydrate.engine.upcasting import UpcastError, Upcasters
from rehydrate.sources.events import NO_STREAM, Event, NewEvent
from rehydrate.sources.store import EventStore

__all__ = [
    "NO_STREAM",
    "Aggregate",
    "AggregateNotFoundError",
    "AggregateRegistry",
    "ChildRows",
    "Children",
    "ConcurrencyError",
    "Event",
    "EventStore",
    "NewEvent",
    "Projection",
    "ProjectionError",
    "Registry",
    "RehydrateError",
    "Repository",
    "Row",
    "Settings",
    "UnknownProjectionError",
    "UpcastError",
    "Upcasters",
    "UserError",
    "applies",
    "create_pool",
]
