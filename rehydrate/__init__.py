"""rehydrate: durable, zero-downtime rebuilds of event-sourced read models, on Temporal and Postgres."""

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

__all__ = [
    "NO_STREAM",
    "ConcurrencyError",
    "Event",
    "EventStore",
    "NewEvent",
    "Projection",
    "ProjectionError",
    "Registry",
    "RehydrateError",
    "Row",
    "Settings",
    "UnknownProjectionError",
    "UserError",
]
