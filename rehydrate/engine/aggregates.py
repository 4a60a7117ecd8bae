"""Aggregates folded from their own stream, and the repository that loads and saves them (with snapshots).

An aggregate is a pydantic model of its state with one method per event type it applies, and commands that
record new events::

    class Order(Aggregate):
        aggregate_type: ClassVar[str] = "order"   # its snapshots, `rehydrate snapshots rebuild order`
        stream_prefix: ClassVar[str] = "order-"   # its streams: order-1, order-2, …
        snapshot_every: ClassVar[int | None] = 100

        status: str = "new"
        total_cents: int = 0

        @applies("OrderPlaced")
        def _placed(self, event: Event) -> None:
            self.status = "placed"

        def place(self, customer_id: str) -> None:   # a command
            if self.status != "new":
                raise ValueError("already placed")
            self.record("OrderPlaced", {"customer_id": customer_id})

    orders = Repository(store, Order)
    order = await orders.load("order-1")             # or version=N, or as_of=datetime
    order.add_item(...)
    await orders.save(order)                         # ConcurrencyError if someone else saved first

Every field needs a default: that is the state before the first event. Being a pydantic model, the state
round-trips through a snapshot exactly (datetimes stay datetimes); a snapshot that no longer validates, or was
written by another `state_version` or other code (the `fingerprint`), is ignored and the stream folded from the
start.

Why `save` folds again what `record` already applied: a command's events only get their position and their
`recorded_at` when they are stored, and their payload and metadata come back from Postgres normalised (jsonb orders
keys). A handler may read any of these, so the state a command computed in memory is provisional. `save` appends,
reads the events back as stored, and folds them onto the state as it was last loaded or saved; the aggregate then
holds exactly what a later load gives, and a snapshot written by `save` or `Repository.snapshot` is always a state
that a fold of stored events produces. (Stamping `recorded_at` in `record` would fix one field, not the position or
the normalised payload.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from copy import deepcopy
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Self, TypeVar

import asyncpg
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from rehydrate.core.errors import UserError
from rehydrate.core.identifiers import check_identifier
from rehydrate.core.settings import Settings
from rehydrate.engine.snapshots import Snapshot, SnapshotStore
from rehydrate.engine.upcasting import Upcasters
from rehydrate.engine.user_modules import module_definitions, source_text
from rehydrate.sources.declaration import Source
from rehydrate.sources.events import Event, NewEvent
from rehydrate.sources.pools import Sources
from rehydrate.sources.reading import EventSource
from rehydrate.sources.store import EventStore

Applier = Callable[[Any, Event], None]
F = TypeVar("F", bound=Applier)
A = TypeVar("A", bound="Aggregate")

_APPLIES = "__rehydrate_applies__"


def applies(*event_types: str) -> Callable[[F], F]:
    """Mark an aggregate method as the one that applies `event_types` to its state."""

    def mark(method: F) -> F:
        setattr(method, _APPLIES, event_types)
        return method

    return mark


class AggregateError(UserError):
    """An aggregate could not apply an event of its stream: names the aggregate, stream, version and type."""


class AggregateNotFoundError(UserError):
    """A load found no events for the stream (or none recorded by the time asked for)."""


class Aggregate(BaseModel):
    """Base class of aggregates: state as pydantic fields, `@applies` methods, commands calling `record`.

    Class settings (ClassVar):
        aggregate_type: its name in snapshots, the CLI and the workflow id (default: class name, lower case).
        stream_prefix: what its stream ids start with (default: `aggregate_type + "-"`), for bulk rebuilds.
        state_version: bump it when the state's meaning changes, to ignore every snapshot written before.
        snapshot_every: `save` writes a snapshot each time the stream crosses a multiple of it (None: never).
        upcasters: brings old events to their current version before an `@applies` method sees them.
        event_source: the source its streams are read from (None: rehydrate's own store). A source rehydrate did not
            write is read only: such aggregates are loaded and snapshotted, never saved (their application saves).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    aggregate_type: ClassVar[str] = ""
    stream_prefix: ClassVar[str] = ""
    state_version: ClassVar[int] = 1
    snapshot_every: ClassVar[int | None] = None
    upcasters: ClassVar[Upcasters | None] = None
    event_source: ClassVar[Source | None] = None
    appliers: ClassVar[dict[str, Applier]] = {}

    _id: str = PrivateAttr(default="")
    _version: int = PrivateAttr(default=0)
    _pending: list[NewEvent] = PrivateAttr(default_factory=list)
    # The state as a fold of the stored events gave it at the last load or save (None: the empty state, version 0):
    # what `save` folds the stored events onto, and what `Repository.snapshot` writes.
    _stored: Aggregate | None = PrivateAttr(default=None)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "aggregate_type" not in cls.__dict__:
            cls.aggregate_type = cls.__name__.lower()
        check_identifier(cls.aggregate_type, f"aggregate type of {cls.__name__}")
        # A prefix set explicitly on a base class is inherited; otherwise it follows the aggregate type.
        if not any(
            "stream_prefix" in vars(klass)
            for klass in cls.__mro__
            if issubclass(klass, Aggregate) and klass is not Aggregate
        ):
            cls.stream_prefix = f"{cls.aggregate_type}-"
        appliers: dict[str, Applier] = {}
        for klass in reversed(cls.__mro__):
            for value in vars(klass).values():
                for event_type in getattr(value, _APPLIES, ()):
                    appliers[event_type] = value
        cls.appliers = appliers
        cls._fingerprint = None

    _fingerprint: ClassVar[str | None] = None

    # -- identity and pending events -----------------------------------------------------------------

    @property
    def id(self) -> str:
        """The stream id."""
        return self._id

    @property
    def version(self) -> int:
        """The stream version this state includes, pending events included."""
        return self._version

    @property
    def pending(self) -> list[NewEvent]:
        """Events recorded since the last load or save, not yet in the store."""
        return list(self._pending)

    @classmethod
    def new(cls, stream_id: str) -> Self:
        """A new aggregate (version 0) for the stream `stream_id`."""
        try:
            aggregate = cls()
        except ValidationError as error:
            raise UserError(
                f"aggregate {cls.__name__} cannot be created empty: {error}",
                fix="give every field a default: the state before the first event",
            ) from None
        aggregate._id = stream_id
        return aggregate

    def record(self, event_type: str, data: dict[str, Any], *, metadata: dict[str, Any] | None = None) -> None:
        """Apply a new event to the state and keep it for `save`, at its type's current schema version.

        The state this gives a command to check is provisional: its events have no position yet, and their
        `recorded_at` is this process's clock. `Repository.save` replaces it with the fold of the events as stored."""
        upcasters = type(self).upcasters
        schema_version = upcasters.current_version(event_type) if upcasters is not None else 1
        new = NewEvent(event_type, data, schema_version=schema_version, metadata=metadata or {})
        self._apply(
            Event(0, self._id, self._version + 1, event_type, schema_version, data, new.metadata, datetime.now(UTC))
        )
        self._pending.append(new)

    # -- folding ---------------------------------------------------------------------------------------

    def _apply(self, event: Event) -> None:
        applier = self.appliers.get(event.type)
        if applier is not None:
            upcasters = self.upcasters
            try:
                if upcasters is not None and event.type in upcasters.current:
                    event = upcasters.upcast(event)
                applier(self, event)
            except UserError:
                raise
            except Exception as error:
                raise AggregateError(
                    f"aggregate {self.aggregate_type!r} failed at version {event.stream_version} of stream "
                    f"{event.stream_id!r} (event {event.global_position}, type {event.type!r}): "
                    f"{getattr(applier, '__name__', applier)!r} raised {type(error).__name__}: {error}",
                    fix="fix the aggregate's method (or the event, or an upcaster)",
                ) from error
        self._version = event.stream_version

    def fold(self, events: Iterable[Event]) -> Self:
        """Apply stored events of this aggregate's stream, in version order."""
        for event in events:
            self._apply(event)
        return self

    @classmethod
    def fingerprint(cls) -> str:
        """A hash of what decides the state: type, state version, fields, `@applies` code and upcasters."""
        if cls._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(f"{cls.aggregate_type}:{cls.state_version}".encode())
            for name, field in sorted(cls.model_fields.items()):
                digest.update(f"{name}:{field.annotation!r}:{field.default!r}".encode())
            for event_type, applier in sorted(cls.appliers.items()):
                source = source_text(applier)
                digest.update(f"{event_type}:{source}".encode())
            if cls.upcasters:
                digest.update(cls.upcasters.fingerprint.encode())
            if cls.event_source is not None:  # a snapshot of another source's stream is not this one's
                digest.update(cls.event_source.identity().encode())
            cls._fingerprint = digest.hexdigest()[:16]
        return cls._fingerprint

    def _copy(self) -> Self:
        """An independent copy of the state, identity and version (no pending events)."""
        copy = self.model_copy(update={name: deepcopy(getattr(self, name)) for name in type(self).model_fields})
        copy._id, copy._version, copy._pending, copy._stored = self._id, self._version, [], None
        return copy

    def _mark_stored(self) -> None:
        """This state is a fold of the stored events: remember a copy of it (see `_stored`)."""
        self._pending = []
        self._stored = self._copy()

    def _replace_state(self, stored: Aggregate) -> None:
        """Take the fields and version of `stored` (a fold of stored events), dropping what commands applied."""
        for name in type(self).model_fields:
            setattr(self, name, getattr(stored, name))
        self._version = stored._version
        self._mark_stored()

    # -- snapshots -------------------------------------------------------------------------------------

    def to_snapshot(self) -> Snapshot:
        return Snapshot(
            stream_id=self._id,
            aggregate_type=self.aggregate_type,
            stream_version=self._version,
            state=self.model_dump(mode="json"),
            state_version=self.state_version,
            fingerprint=self.fingerprint(),
        )

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> Self | None:
        """The aggregate a snapshot holds, or None when it was written by other code or no longer validates."""
        if (
            snapshot.aggregate_type != cls.aggregate_type
            or snapshot.state_version != cls.state_version
            or snapshot.fingerprint != cls.fingerprint()
        ):
            return None
        try:
            aggregate = cls.model_validate(snapshot.state)
        except ValidationError:
            return None
        aggregate._id = snapshot.stream_id
        aggregate._version = snapshot.stream_version
        return aggregate


class Repository(Generic[A]):
    """Loads aggregates of one type from their streams (starting from a valid snapshot) and saves their events."""

    def __init__(self, store: EventStore | Sources, aggregate: type[A], *, use_snapshots: bool = True) -> None:
        # Snapshots are kept beside rehydrate's own store, whatever source the streams are read from.
        self._owns_sources = not isinstance(store, Sources)
        self.sources = store if isinstance(store, Sources) else Sources(store)
        self.store = self.sources.own
        self.aggregate = aggregate
        self.use_snapshots = use_snapshots
        self.snapshots = SnapshotStore(self.store.pool, self.store.schema)

    async def __aenter__(self) -> Repository[A]:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pool of the aggregate's source when it is in another database and this repository opened it."""
        if self._owns_sources:
            await self.sources.close()

    async def _source(self) -> EventSource:
        return await self.sources.of(self.aggregate.event_source)

    async def load(self, stream_id: str, *, version: int | None = None, as_of: datetime | None = None) -> A:
        """The aggregate's current state; with `version`, its state after that many events; with `as_of`, its
        state after the events recorded at or before that time."""
        if version is not None and as_of is not None:
            raise UserError("pass version= or as_of=, not both", fix="choose one")
        if version is not None and (not isinstance(version, int) or version < 1):
            raise UserError(f"version {version!r} is not a positive integer", fix="versions start at 1")
        if as_of is not None:
            if as_of.tzinfo is None:
                raise UserError(f"as_of {as_of!r} has no time zone", fix="pass an aware datetime, e.g. in UTC")
            version = await (await self._source()).stream_version(stream_id, as_of=as_of)
            if version == 0:
                raise AggregateNotFoundError(
                    f"{self.aggregate.aggregate_type} {stream_id!r} had no events at {as_of.isoformat()}",
                    fix="check the stream id and the time",
                )
        aggregate: A | None = None
        if self.use_snapshots:
            snapshot = await self.snapshots.get(stream_id, self.aggregate.aggregate_type)
            if snapshot is not None and (version is None or snapshot.stream_version <= version):
                aggregate = self.aggregate.from_snapshot(snapshot)
        if aggregate is None:
            aggregate = self.aggregate.new(stream_id)
        source = await self._source()
        events = await source.read_stream(stream_id, after_version=aggregate.version, up_to_version=version)
        aggregate.fold(events)
        if aggregate.version == 0:
            raise AggregateNotFoundError(
                f"{self.aggregate.aggregate_type} {stream_id!r} has no events", fix="check the stream id"
            )
        if version is not None and aggregate.version < version:
            raise UserError(
                f"{self.aggregate.aggregate_type} {stream_id!r} is at version {aggregate.version}, not {version} yet",
                fix=f"load a version from 1 to {aggregate.version}",
            )
        aggregate._mark_stored()
        return aggregate

    async def save(self, aggregate: A, *, connection: asyncpg.Connection | None = None) -> int:
        """Append the aggregate's pending events, expecting the stream where it was loaded; returns the new version.

        Raises ConcurrencyError (and writes nothing) when the stream moved meanwhile. Afterwards the aggregate's
        state is the fold of the events as stored — their positions, the database's `recorded_at`, payload and
        metadata as read back — not what `record` applied provisionally, so it equals what any later load gives.
        Writes a snapshot of that state in the same transaction when the aggregate type's `snapshot_every` says so.
        """
        pending = aggregate._pending
        if not pending:
            return aggregate.version
        source = self.aggregate.event_source
        if source is not None:
            raise UserError(
                f"{self.aggregate.aggregate_type} {aggregate.id!r} reads source {source.name!r}, which rehydrate does "
                "not write",
                fix="save it through the application that owns the source; rehydrate loads and snapshots it",
            )
        expected = aggregate.version - len(pending)
        every = aggregate.snapshot_every
        due = every is not None and aggregate.version // every > expected // every
        if connection is None:
            async with self.store.pool.acquire() as conn, conn.transaction():
                saved = await self._save(conn, aggregate, pending, expected, due)
        else:
            async with connection.transaction():
                saved = await self._save(connection, aggregate, pending, expected, due)
        aggregate._replace_state(saved)
        return saved.version

    async def _save(
        self, conn: asyncpg.Connection, aggregate: A, pending: Sequence[NewEvent], expected: int, due: bool
    ) -> Aggregate:
        stored = await self.store.append_returning(aggregate.id, pending, expected_version=expected, connection=conn)
        base = aggregate._stored
        saved = base._copy() if base is not None else self.aggregate.new(aggregate.id)
        saved.fold(stored)
        if due:
            await self.snapshots.put(conn, [saved.to_snapshot()])
        return saved

    async def snapshot(self, aggregate: A) -> None:
        """Write a snapshot of a saved aggregate now (on demand): of its state as its stored events fold it, at its
        version (a field changed outside an `@applies` method is not an event, and is not in it)."""
        if aggregate._pending:
            raise UserError(
                f"{aggregate.aggregate_type} {aggregate.id!r} has unsaved events", fix="save it before a snapshot"
            )
        stored = aggregate._stored
        if stored is None or stored.version == 0:
            raise UserError(
                f"{aggregate.aggregate_type} {aggregate.id!r} has no stored events to snapshot",
                fix="load it from its stream, or save it first",
            )
        async with self.store.pool.acquire() as conn:
            await self.snapshots.put(conn, [stored.to_snapshot()])


class AggregateRegistry:
    """The aggregate types a process knows, loaded from the modules named in REHYDRATE_AGGREGATES."""

    def __init__(self, aggregates: Iterable[type[Aggregate]] = ()) -> None:
        self._by_type: dict[str, type[Aggregate]] = {}
        for aggregate in aggregates:
            self.add(aggregate)

    def add(self, aggregate: type[Aggregate]) -> None:
        existing = self._by_type.get(aggregate.aggregate_type)
        if existing is not None and existing is not aggregate:
            raise UserError(
                f"two aggregates have the type {aggregate.aggregate_type!r}: {existing.__name__}, {aggregate.__name__}",
                fix="give one of them another aggregate_type",
            )
        self._by_type[aggregate.aggregate_type] = aggregate

    def get(self, aggregate_type: str) -> type[Aggregate]:
        try:
            return self._by_type[aggregate_type]
        except KeyError:
            raise UserError(
                f"unknown aggregate type {aggregate_type!r} (registered: {', '.join(self.names()) or 'none'})",
                fix="check the name, or add its module to REHYDRATE_AGGREGATES",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._by_type)

    def __iter__(self) -> Any:
        return iter(self._by_type[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._by_type)

    @classmethod
    def from_modules(cls, modules: Iterable[str]) -> AggregateRegistry:
        registry = cls()
        for aggregate in module_definitions(modules, _is_aggregate, what="Aggregate", setting="REHYDRATE_AGGREGATES"):
            registry.add(aggregate)
        return registry

    @classmethod
    def from_settings(cls, settings: Settings) -> AggregateRegistry:
        """The aggregate types of this project: the same in every process (see Settings.aggregate_modules)."""
        return cls.from_modules(settings.aggregate_modules)


def _is_aggregate(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, Aggregate) and value is not Aggregate
