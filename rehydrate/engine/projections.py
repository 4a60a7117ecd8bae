"""The projection API: a name, a version, one SQLModel table, the key that partitions its rows, and handlers.

A handler receives the current row for the event's key as a plain dict (or None) and the event, and returns
the new row (a dict) or None to delete it. Rows stay dicts on the hot path; the SQLModel class only
describes the table.
"""

from __future__ import annotations

import hashlib
import inspect
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlmodel import SQLModel

from rehydrate.core.errors import ProjectionError, UnknownProjectionError, UserError
from rehydrate.core.identifiers import check_identifier, derived_name
from rehydrate.core.settings import Settings, projections_origin
from rehydrate.engine.upcasting import UpcastError, Upcasters
from rehydrate.engine.user_modules import module_definitions, source_text
from rehydrate.sources.declaration import AnySource, KafkaSource, Source, sources_from_settings
from rehydrate.sources.events import Event, KeySpec

Row = dict[str, Any]
Handler = Callable[[Row | None, Event], Row | None]

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]
_SQL_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_ ]*(\(\d+(, ?\d+)?\))?[A-Za-z ]*$")


def _tuple_getter(names: tuple[str, ...]) -> Callable[[Row], tuple[Any, ...]]:
    if len(names) == 1:
        name = names[0]
        return lambda row: (row[name],)
    if not names:
        return lambda row: ()
    return operator.itemgetter(*names)


@dataclass(frozen=True)
class TableShape:
    """What rehydrate needs of a read-model table, read once from its SQLModel class."""

    name: str
    columns: tuple[str, ...]
    key_column: str
    key_sql_type: str
    defaults: dict[str, Any]
    required: frozenset[str]
    sa_table: sa.Table

    @cached_property
    def blank_row(self) -> Row:
        """Every column, at its default or None: what a new row starts from."""
        return {column: self.defaults.get(column) for column in self.columns}

    @cached_property
    def column_set(self) -> frozenset[str]:
        return frozenset(self.columns)

    @cached_property
    def values(self) -> Callable[[Row], tuple[Any, ...]]:
        """A row's values in column order, taken in C (KeyError: a column is missing)."""
        return _tuple_getter(self.columns)

    @cached_property
    def required_values(self) -> Callable[[Row], tuple[Any, ...]]:
        return _tuple_getter(tuple(sorted(self.required)))

    @classmethod
    def of(cls, model: type[SQLModel], projection: str) -> TableShape:
        table = getattr(model, "__table__", None)
        if not isinstance(table, sa.Table):
            raise UserError(
                f"projection {projection!r}: {model.__name__} is not a table model",
                fix="declare it as `class X(SQLModel, table=True)`",
            )
        check_identifier(table.name, f"table name of projection {projection!r}")
        keys = list(table.primary_key.columns)
        if len(keys) != 1:
            raise UserError(
                f"projection {projection!r}: table {table.name!r} needs exactly one primary-key column "
                f"(it has {len(keys)})",
                fix="mark the column that holds the projection's key with Field(primary_key=True)",
            )
        defaults: dict[str, Any] = {}
        required: set[str] = set()
        for column in table.columns:
            check_identifier(column.name, f"column of table {table.name!r}")
            default = column.default
            if default is not None and getattr(default, "is_scalar", False):
                defaults[column.name] = default.arg
            elif not column.nullable and column.server_default is None and not column.primary_key:
                required.add(column.name)
        key = keys[0]
        key_sql_type = key.type.compile(dialect=_DIALECT)
        if not _SQL_TYPE.match(key_sql_type):
            # It is cast to in statements (`$1::type`): only a plain type name, never what a custom type prints.
            raise UserError(
                f"projection {projection!r}: key column {key.name!r} has type {key_sql_type!r}, not a plain SQL type",
                fix="give the key column a built-in type (str, int, uuid.UUID, …)",
            )
        return cls(
            name=table.name,
            columns=tuple(column.name for column in table.columns),
            key_column=key.name,
            key_sql_type=key_sql_type,
            defaults=defaults,
            required=frozenset(required),
            sa_table=table,
        )

    def physical_name(self, generation: int) -> str:
        return derived_name(self.name, f"__g{generation}")


class Projection:
    """A read model built from events.

    Example:
        ```python
        order_summary = Projection("order_summary", version=1, table=OrderSummary, key="stream")

        @order_summary.on("OrderPlaced")
        def placed(row, event):
            return {"customer_id": event.data["customer_id"], "status": "placed"}
        ```

    Args:
        name: the projection's name, a plain identifier.
        version: bump it when the handlers change meaning; shown with each generation.
        table: the SQLModel table class; its single primary-key column holds the key.
        key: "stream" to keep a row per stream, or the name of a payload field present in every handled event.
        strict: read every event type and fail on one without a handler (unless listed in `ignore`).
        ignore: event types a strict projection skips on purpose.
        upcasters: the upcasters that bring old events to their current version before a handler sees them.
        on_error: "stop" (default): a handler that fails stops the replay (and the tail). "park": the failing event
            and every later event of its key are kept as dead letters, the key's row is left as it was, and the
            replay goes on (it swaps only with `--allow-dead-letters`); `rehydrate dead-letters retry` rebuilds
            the parked keys after a fix.
    """

    def __init__(
        self,
        name: str,
        *,
        version: int,
        table: type[SQLModel],
        key: str = "stream",
        strict: bool = False,
        ignore: Iterable[str] = (),
        description: str = "",
        upcasters: Upcasters | None = None,
        on_error: str = "stop",
        source: AnySource | str | None = None,
    ) -> None:
        self.name = check_identifier(name, "projection name")
        # Where its events are: a Source, a source's name in settings (resolved by the registry), or None: rehydrate's
        # own store.
        self.source: AnySource | str | None = source
        if not isinstance(version, int) or version < 1:
            raise UserError(f"projection {name!r}: version {version!r} is not a positive integer", fix="use 1, 2, …")
        self.version = version
        self.table = TableShape.of(table, name)
        self.model = table
        self.key = KeySpec(None if key == "stream" else key)
        self._check_source_key()
        self.strict = strict
        self.ignore = frozenset(ignore)
        self.description = description or (inspect.getdoc(table) or "").split("\n")[0]
        self.handlers: dict[str, Handler] = {}
        self.upcasters = upcasters
        if on_error not in ("stop", "park"):
            raise UserError(
                f"projection {name!r}: on_error={on_error!r} is not 'stop' or 'park'", fix="use one of them"
            )
        self.on_error = on_error

    def _check_source_key(self) -> None:
        """A Kafka topic orders events only per partition, that is per message key: a projection keyed by a payload
        field would fold one key's events from several partitions, in no order."""
        if isinstance(self.source, KafkaSource) and self.key.field is not None:
            raise UserError(
                f"projection {self.name!r} reads Kafka source {self.source.name!r} keyed by the field "
                f"{self.key.field!r}: a topic orders events only per message key",
                fix="key the projection by the stream (key='stream', the message key), or have producers key "
                "messages by that field",
            )

    def on(self, *event_types: str) -> Callable[[Handler], Handler]:
        """Register the decorated function as the handler of `event_types`."""

        def register(handler: Handler) -> Handler:
            for event_type in event_types:
                if event_type in self.handlers:
                    raise UserError(
                        f"projection {self.name!r} has two handlers for {event_type!r}",
                        fix="keep one of them",
                    )
                self.handlers[event_type] = handler
            return handler

        return register

    @property
    def event_types(self) -> list[str] | None:
        """The event types to read from the store; None for a strict projection, which reads them all."""
        if self.strict:
            return None
        return sorted(self.handlers)

    def upcaster(self) -> Callable[[Event], Event] | None:
        """What the fold runs each event through before its handler; None when nothing is versioned."""
        upcasters = self.upcasters
        if upcasters is None or not upcasters.current:
            return None
        key_field = self.key.field

        def upcast(event: Event) -> Event:
            try:
                new = upcasters.upcast(event)
            except UpcastError as error:
                raise ProjectionError(
                    self.name,
                    event.global_position,
                    event.stream_id,
                    event.type,
                    f"schema version {event.schema_version}: {error.problem}",
                    error.fix or "",
                ) from None
            # Lanes are cut in SQL on the stored payload's key: an upcaster that moved an event to another key
            # would put one key's events in two lanes, applied in parallel and out of order.
            if key_field is not None and new is not event and new.data.get(key_field) != event.data.get(key_field):
                raise ProjectionError(
                    self.name,
                    event.global_position,
                    event.stream_id,
                    event.type,
                    f"an upcaster changed the key field {key_field!r} ({event.data.get(key_field)!r} → "
                    f"{new.data.get(key_field)!r})",
                    "upcasters may not change the field a projection is keyed by; key it by another field",
                )
            return new

        return upcast

    @property
    def event_source(self) -> AnySource | None:
        """The source it reads (None: rehydrate's own store)."""
        if isinstance(self.source, str):
            raise UserError(
                f"projection {self.name!r} reads source {self.source!r}, which this process has not resolved",
                fix=f"declare [sources.{self.source}] in rehydrate.toml (processes load it with the projections)",
            )
        return self.source

    def key_of(self, event: Event) -> Any:
        if self.key.field is None:
            return event.stream_id
        return event.data[self.key.field]

    @property
    def fingerprint(self) -> str:
        """A hash of what decides the rows: name, version, key, table shape, the event types handled (and
        strict/ignore), each handler's code, and the upcasters the handled types depend on. A generation records
        the fingerprint it was built with; `rehydrate projections` calls it STALE when the code's differs."""
        digest = hashlib.sha256()
        digest.update(f"{self.name}:{self.version}:{self.key.field}:{self.table.columns}".encode())
        digest.update(f"strict={self.strict}:ignore={sorted(self.ignore)}:types={sorted(self.handlers)}".encode())
        for event_type in sorted(self.handlers):
            digest.update(f"{event_type}:{code_hash(self.handlers[event_type])}".encode())
        for part in self.upcaster_fingerprints():
            digest.update(part.encode())
        if self.source is not None:  # (rehydrate's own store adds nothing: fingerprints made before sources stand)
            digest.update(self.source.encode() if isinstance(self.source, str) else self.source.identity().encode())
        return digest.hexdigest()[:16]

    def upcaster_fingerprints(self) -> list[str]:
        """The fingerprint of the upcasters this projection reads its events through (none: an empty list)."""
        return [self.upcasters.fingerprint] if self.upcasters else []

    def __repr__(self) -> str:
        return f"Projection({self.name!r}, version={self.version})"


def code_hash(function: Callable[..., Any]) -> str:
    """A short hash of a function's code (see `source_text`)."""
    return hashlib.sha256(source_text(function).encode()).hexdigest()[:16]


class Registry:
    """The projections a process knows, loaded from the modules named in settings."""

    def __init__(self, projections: Iterable[Projection] = (), origin: str = "") -> None:
        self._by_name: dict[str, Projection] = {}
        self.origin = origin  # where its modules were named, for errors
        for projection in projections:
            self.add(projection)

    def add(self, projection: Projection) -> None:
        existing = self._by_name.get(projection.name)
        if existing is not None and existing is not projection:
            raise UserError(
                f"two projections are named {projection.name!r}", fix="rename one of them; names are unique"
            )
        self._by_name[projection.name] = projection

    def get(self, name: str) -> Projection:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownProjectionError(name, list(self._by_name), self.origin) from None

    def __iter__(self) -> Any:
        return iter(sorted(self._by_name.values(), key=lambda p: p.name))

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    @classmethod
    def from_modules(cls, modules: Iterable[str], origin: str = "") -> Registry:
        registry = cls(origin=origin)
        for projection in module_definitions(
            modules, _is_projection, what="Projection", setting="REHYDRATE_PROJECTIONS"
        ):
            registry.add(projection)
        return registry

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        """The projections of this project: the same in every process (see Settings.projection_modules), their
        sources named in settings resolved."""
        modules = settings.projection_modules
        registry = cls.from_modules(modules, f"{', '.join(modules)}, named by {projections_origin(settings)}")
        registry.resolve_sources(sources_from_settings(settings.sources))
        return registry

    def resolve_sources(self, declared: dict[str, AnySource]) -> None:
        """Give each projection that names its source the Source of that name."""
        for projection in self._by_name.values():
            if isinstance(projection.source, str):
                found = declared.get(projection.source)
                if found is None:
                    raise UserError(
                        f"projection {projection.name!r} reads source {projection.source!r}, which is not declared "
                        f"(declared: {', '.join(sorted(declared)) or 'none'})",
                        fix=f"declare it as [sources.{projection.source}] in rehydrate.toml, or pass a Source",
                    )
                projection.source = found
                projection._check_source_key()

    def sources(self) -> list[AnySource]:
        """The sources its projections read (rehydrate's own store left out)."""
        found = {p.source.name: p.source for p in self._by_name.values() if isinstance(p.source, Source | KafkaSource)}
        return [found[name] for name in sorted(found)]


def _is_projection(value: object) -> bool:
    return isinstance(value, Projection)
