"""rehydrate: durable, zero-downtime rebuilds of event-sourced read models, on Temporal and Postgres.

The public API: what a service or a projection module imports. Everything else is reached through the `rehydrate`
command, the Temporal workflows, or these names.

Each name is imported when first used (PEP 562), so that importing a part of the package (the `rehydrate` command
starts with `rehydrate.cli`) does not load SQLAlchemy, asyncpg and pydantic-settings before it needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rehydrate.core.lazy import lazy_names

if TYPE_CHECKING:
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

# Where each public name lives.
_HOMES = {
    "create_pool": "rehydrate.core.database",
    **dict.fromkeys(
        ("ConcurrencyError", "ProjectionError", "RehydrateError", "UnknownProjectionError", "UserError"),
        "rehydrate.core.errors",
    ),
    "Settings": "rehydrate.core.settings",
    **dict.fromkeys(
        ("Aggregate", "AggregateNotFoundError", "AggregateRegistry", "Repository", "applies"),
        "rehydrate.engine.aggregates",
    ),
    **dict.fromkeys(("Children", "ChildRows"), "rehydrate.engine.children"),
    **dict.fromkeys(("Projection", "Registry", "Row"), "rehydrate.engine.projections"),
    **dict.fromkeys(("UpcastError", "Upcasters"), "rehydrate.engine.upcasting"),
    **dict.fromkeys(("NO_STREAM", "Event", "NewEvent"), "rehydrate.sources.events"),
    "EventStore": "rehydrate.sources.store",
}

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


__getattr__ = lazy_names(__name__, _HOMES, globals())


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
