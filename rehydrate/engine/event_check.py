"""`rehydrate events check`: every (event type, schema version) in the store that a replay or a load would fail on
or silently skip: no upcaster path to the current version, or no handler in any projection or aggregate."""

from __future__ import annotations

from dataclasses import dataclass, field

from rehydrate.engine.aggregates import AggregateRegistry
from rehydrate.engine.projections import Registry
from rehydrate.engine.upcasting import Upcasters
from rehydrate.sources.store import EventStore


@dataclass
class TypeVersion:
    """One (type, version) of the store, who handles it, and what is wrong with it (nothing when `ok`)."""

    event_type: str
    schema_version: int
    events: int
    handled_by: list[str] = field(default_factory=list)
    no_handler: bool = False
    no_upcaster_path: list[str] = field(default_factory=list)  # one line per consumer that cannot upcast it

    @property
    def ok(self) -> bool:
        return not self.no_handler and not self.no_upcaster_path

    @property
    def problems(self) -> list[str]:
        """One line per problem (none when `ok`)."""
        return (["no handler in any projection or aggregate"] if self.no_handler else []) + self.no_upcaster_path


async def check_events(store: EventStore, projections: Registry, aggregates: AggregateRegistry) -> list[TypeVersion]:
    """One GROUP BY over rehydrate's own events, checked against the code of the projections and aggregates that read
    them (not those that read another source)."""
    consumers: list[tuple[str, frozenset[str], Upcasters | None]] = [
        (f"projection {p.name}", frozenset(p.handlers) | p.ignore, p.upcasters)
        for p in projections
        if p.event_source is None
    ]
    consumers += [
        (f"aggregate {a.aggregate_type}", frozenset(a.appliers), a.upcasters)
        for a in aggregates
        if a.event_source is None
    ]
    report = []
    for event_type, version, count in await store.type_versions():
        row = TypeVersion(event_type, version, count)
        for name, handled, upcasters in consumers:
            if event_type not in handled:
                continue
            row.handled_by.append(name)
            gap = upcasters.gap(event_type, version) if upcasters is not None else None
            if gap is None:
                continue
            if gap.missing_from is None:
                row.no_upcaster_path.append(f"{name}: newer than its current version {gap.current}")
            else:
                row.no_upcaster_path.append(
                    f"{name}: no upcaster v{gap.missing_from}→v{gap.missing_from + 1} (current version {gap.current})"
                )
        row.no_handler = not row.handled_by
        report.append(row)
    return report
