"""rehydrate: durable, zero-downtime rebuilds of event-sourced read models, on Temporal and Postgres."""

from rehydrate.aggregates import Aggregate, AggregateNotFoundError, AggregateRegistry, Repository, applies
from rehydrate.errors import (
    ConcurrencyError,
    ProjectionError,
    RehydrateError,
    UnknownProjectionError,
    UserError,
)
from rehydrate.projections import Projection, Registry, Row
from rehydrate.settings import Settings
from rehydrate.store import NO_STREAM, Event, EventStore, NewEvent
from rehydrate.upcasting import UpcastError, Upcasters

__all__ = [
    "NO_STREAM",
    "Aggregate",
    "AggregateNotFoundError",
    "AggregateRegistry",
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
]
