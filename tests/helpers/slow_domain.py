"""The domain's projections with a small cost per event, for the worker processes of the fault tests.

Same names, tables, keys and handlers as `domain.accounts` and `domain.group_totals`, so the tests check the read
models against `domain.oracle` unchanged. Only the worker (REHYDRATE_PROJECTIONS=tests.helpers.slow_domain) imports
this module, and it builds new Projection objects rather than touching the domain's.

Why a cost: a chunk of the real handlers folds in a millisecond or two, so a worker killed at a random moment is
almost always between chunks (waiting on Temporal), and the crash test would mostly prove the easy case. With
~0.25 ms per event a chunk of 100 events keeps its transaction open for ~25 ms of folding, most of a chunk's life,
so a kill lands inside an open chunk transaction (the test also waits until it sees one). The cost is kept small
because the fold blocks the worker's event loop, and with it the heartbeats: the chunks in flight together must
fold well inside the crash test's 2 s heartbeat timeout, or they would time out without any crash.
"""

from __future__ import annotations

import functools
import os
import time

from sqlmodel import SQLModel

from rehydrate import Children, Event
from rehydrate.engine.projections import Handler, Projection, Row
from tests.helpers import domain

EVENT_COST_SECONDS = float(os.environ.get("REHYDRATE_TEST_EVENT_COST", "0.00025"))


def slow(handler: Handler, takes_children: bool = False) -> Handler:
    if takes_children:

        @functools.wraps(handler)
        def with_children(row: Row | None, event: Event, children: Children) -> Row | None:
            time.sleep(EVENT_COST_SECONDS)
            return handler(row, event, children)

        return with_children

    @functools.wraps(handler)
    def handle(row: Row | None, event: Event) -> Row | None:
        time.sleep(EVENT_COST_SECONDS)
        return handler(row, event)

    return handle


def slowed(projection: Projection, children: list[type[SQLModel]] | None = None) -> Projection:
    """A copy of `projection` (same name, tables, key, source; `children`: its child tables' models) whose handlers
    take EVENT_COST_SECONDS an event."""
    slowed = Projection(
        projection.name,
        version=projection.version,
        table=projection.model,
        children=children or [],
        key=projection.key.field or "stream",
        strict=projection.strict,
        ignore=projection.ignore,
        on_error=projection.on_error,
        source=projection.source,
    )
    for event_type, handler in projection.handlers.items():
        reads = sorted(projection.reads[event_type])
        slowed.on(event_type, reads=reads)(slow(handler, projection.takes_children[event_type]))
    return slowed


accounts = slowed(domain.accounts)
group_totals = slowed(domain.group_totals)
