"""The projection API: a name, a version, its SQLModel tables, the key that partitions its rows, and handlers.

A projection has one main table, a row per key, and may have child tables, many rows per key (an order's lines):
each child table's primary key is the projection's key column and the child's own key. A handler receives the
current row for the event's key as a plain dict (or None) and the event, and returns the new row (a dict) or None
to delete the key (its child rows with it); a handler with a third parameter also receives the key's child rows
(`ChildRows`). Rows stay dicts on the hot path; the SQLModel classes only describe the tables.
"""

from __future__ import annotations

import hashlib
import inspect
import operator
import re
from collections.abc import Callable, Iterable, Mapping
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
from rehydrate.sources.declaration import AnySource, KafkaSource, KinesisSource, Source, sources_from_settings
from rehydrate.sources.events import Event, KeySpec

Row = dict[str, Any]
Handler = Callable[..., Row | None]  # (row, event) or (row, event, children) -> the new row, or None
TableRef = type[SQLModel] | str  # a table of a projection: its model class or its name

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
    # A child table's own key: the primary-key columns besides the projection's key column (`key_column`), and their
    # SQL types. Empty for the main table.
    child_key: tuple[str, ...] = ()
    child_key_sql_types: tuple[str, ...] = ()

    @property
    def is_child(self) -> bool:
        return bool(self.child_key)

    @cached_property
    def child_key_of(self) -> Callable[[Row], Any]:
        """A child row's own key: the value of its one child-key column, or the tuple of several."""
        if len(self.child_key) == 1:
            return operator.itemgetter(self.child_key[0])
        return _tuple_getter(self.child_key)

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
    def of(
        cls, model: type[SQLModel], projection: str, *, parent: TableShape | None = None, key: str = ""
    ) -> TableShape:
        """The shape of a projection's main table (one primary-key column: the key), or with `parent` (the main
        table's shape) of a child table, whose primary key is the column `key` (by default named like the parent's
        key column) holding the projection's key, and the child's own key columns."""
        table = getattr(model, "__table__", None)
        if not isinstance(table, sa.Table):
            raise UserError(
                f"projection {projection!r}: {model.__name__} is not a table model",
                fix="declare it as `class X(SQLModel, table=True)`",
            )
        check_identifier(table.name, f"table name of projection {projection!r}")
        keys = list(table.primary_key.columns)
        if parent is None and len(keys) != 1:
            raise UserError(
                f"projection {projection!r}: table {table.name!r} needs exactly one primary-key column "
                f"(it has {len(keys)})",
                fix="mark the column that holds the projection's key with Field(primary_key=True); a table with "
                "several rows per key is a child table: pass it in children=[...]",
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
        key_column = keys[0] if parent is None else _parent_column(table, projection, parent, key)
        key_sql_type = _plain_type(key_column, projection)
        child_key = tuple(c for c in keys if c is not key_column)
        if parent is not None:
            if key_sql_type != parent.key_sql_type:
                raise UserError(
                    f"projection {projection!r}: column {key_column.name!r} of child table {table.name!r} is "
                    f"{key_sql_type}, but the key column {parent.key_column!r} of {parent.name!r} is "
                    f"{parent.key_sql_type}",
                    fix="give both the same type",
                )
            if not child_key:
                raise UserError(
                    f"projection {projection!r}: child table {table.name!r} has no key of its own: its primary key "
                    f"is only the projection's key column {key_column.name!r}",
                    fix="add the child's own key column to its primary key (an order line's line_no), or put its "
                    f"columns in {parent.name!r}, which has one row per key",
                )
        return cls(
            name=table.name,
            columns=tuple(column.name for column in table.columns),
            key_column=key_column.name,
            key_sql_type=key_sql_type,
            defaults=defaults,
            required=frozenset(required),
            sa_table=table,
            child_key=tuple(c.name for c in child_key),
            child_key_sql_types=tuple(_plain_type(c, projection) for c in child_key),
        )

    def physical_name(self, generation: int) -> str:
        return physical_name(self.name, generation)


def physical_name(table: str, generation: int) -> str:
    """The table of one generation: `<table>__g<N>` (shortened to fit an identifier)."""
    return derived_name(table, f"__g{generation}")


def _plain_type(column: sa.Column[Any], projection: str) -> str:
    sql_type: str = column.type.compile(dialect=_DIALECT)
    if not _SQL_TYPE.match(sql_type):
        # It is cast to in statements (`$1::type`): only a plain type name, never what a custom type prints.
        raise UserError(
            f"projection {projection!r}: key column {column.name!r} has type {sql_type!r}, not a plain SQL type",
            fix="give the key column a built-in type (str, int, uuid.UUID, …)",
        )
    return sql_type


def _parent_column(table: sa.Table, projection: str, parent: TableShape, key: str) -> sa.Column[Any]:
    """The column of a child table that holds the projection's key: part of its primary key."""
    name = key or parent.key_column
    column = table.columns.get(name)
    if column is None or not column.primary_key:
        has = "has no column" if column is None else "does not have in its primary key the column"
        raise UserError(
            f"projection {projection!r}: child table {table.name!r} {has} {name!r}, which holds the projection's key",
            fix=f"add {name!r} (the key of {parent.name!r}) to its primary key with Field(primary_key=True), or name "
            "the column that holds it: children={ChildModel: 'column'}",
        )
    return column


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
        children: child tables, several rows per key: SQLModel classes whose primary key is a column named like
            `table`'s key column plus the child's own key (`{Model: "column"}` names another column for the key).
            Built, indexed and swapped with `table`; a handler with a third parameter writes them (`ChildRows`).
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
        children: Iterable[type[SQLModel]] | Mapping[type[SQLModel], str] = (),
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
        named = self._named(children)
        self.children = tuple(TableShape.of(model, name, parent=self.table, key=column) for model, column in named)
        self.tables = (self.table, *self.children)  # every table of a generation, the main one first
        self._child_models = {model: shape for (model, _), shape in zip(named, self.children, strict=True)}
        seen: set[str] = set()
        for shape in self.tables:
            if shape.name in seen:
                raise UserError(f"projection {name!r} names table {shape.name!r} twice", fix="keep one of them")
            seen.add(shape.name)
        # Per event type: whether its handler takes the key's child rows, and the child tables it reads.
        self.takes_children: dict[str, bool] = {}
        self.reads: dict[str, frozenset[str]] = {}
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

    @staticmethod
    def _named(children: Iterable[type[SQLModel]] | Mapping[type[SQLModel], str]) -> list[tuple[type[SQLModel], str]]:
        return list(children.items()) if isinstance(children, Mapping) else [(model, "") for model in children]

    def child(self, table: TableRef) -> TableShape:
        """One of its child tables, by model class or name (a UserError naming its tables when it has no such)."""
        if isinstance(table, str):
            found = next((shape for shape in self.children if shape.name == table), None)
        else:
            found = self._child_models.get(table)
        if found is None:
            name = table if isinstance(table, str) else getattr(table, "__tablename__", table.__name__)
            owned = ", ".join(shape.name for shape in self.children) or "none"
            raise UserError(
                f"table {name!r} is not a child table of projection {self.name!r} (its child tables: {owned})",
                fix="write only to its own tables, or add it: Projection(..., children=[...]); another "
                "projection's table is written by that projection",
            )
        return found

    def _check_source_key(self) -> None:
        """A Kafka topic (a Kinesis stream) orders events only per partition (shard), that is per message (partition)
        key: a projection keyed by a payload field would fold one key's events from several partitions, in no order."""
        if isinstance(self.source, KafkaSource) and self.key.field is not None:
            raise UserError(
                f"projection {self.name!r} reads Kafka source {self.source.name!r} keyed by the field "
                f"{self.key.field!r}: a topic orders events only per message key",
                fix="key the projection by the stream (key='stream', the message key), or have producers key "
                "messages by that field",
            )
        if isinstance(self.source, KinesisSource) and self.key.field is not None:
            raise UserError(
                f"projection {self.name!r} reads Kinesis source {self.source.name!r} keyed by the field "
                f"{self.key.field!r}: a stream orders records only per partition key",
                fix="key the projection by the stream (key='stream', the partition key), or have producers use that "
                "field as the partition key",
            )

    def on(self, *event_types: str, reads: TableRef | Iterable[TableRef] = ()) -> Callable[[Handler], Handler]:
        """Register the decorated function as the handler of `event_types`.

        A handler `(row, event)` returns the key's new row. A handler `(row, event, children)` also gets the key's
        child rows: `children[Model].put(row)`, `.delete(child_key)`, `.clear()` write without reading anything;
        `.get(child_key)` and iterating read the stored child rows, loaded only for the child tables named in `reads`.
        """
        wanted = [reads] if isinstance(reads, (str, type)) else list(reads)
        read_names = frozenset(self.child(table).name for table in wanted)

        def register(handler: Handler) -> Handler:
            positional = _positional_parameters(handler)
            takes_children = positional >= 3 or (positional < 0 and bool(self.children))
            if takes_children and not self.children:
                raise UserError(
                    f"handler {getattr(handler, '__name__', handler)!r} of projection {self.name!r} takes a third "
                    "parameter (child rows), but the projection has no child tables",
                    fix="declare them with Projection(..., children=[...]), or take (row, event)",
                )
            if read_names and not takes_children:
                raise UserError(
                    f"handler {getattr(handler, '__name__', handler)!r} of projection {self.name!r} reads child "
                    "tables but takes no third parameter",
                    fix="take (row, event, children)",
                )
            for event_type in event_types:
                if event_type in self.handlers:
                    raise UserError(
                        f"projection {self.name!r} has two handlers for {event_type!r}",
                        fix="keep one of them",
                    )
                self.handlers[event_type] = handler
                self.takes_children[event_type] = takes_children
                self.reads[event_type] = read_names
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
        for child in self.children:  # (a projection without child tables adds nothing: its fingerprint stands)
            digest.update(f"child:{child.name}:{child.key_column}:{child.child_key}:{child.columns}".encode())
        if self.source is not None:  # (rehydrate's own store adds nothing: fingerprints made before sources stand)
            digest.update(self.source.encode() if isinstance(self.source, str) else self.source.identity().encode())
        return digest.hexdigest()[:16]

    def upcaster_fingerprints(self) -> list[str]:
        """The fingerprint of the upcasters this projection reads its events through (none: an empty list)."""
        return [self.upcasters.fingerprint] if self.upcasters else []

    def __repr__(self) -> str:
        return f"Projection({self.name!r}, version={self.version})"


def _positional_parameters(function: Callable[..., Any]) -> int:
    """How many positional arguments a handler takes (-1: any number, `*args`)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return 2
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return -1
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


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
        found = {
            p.source.name: p.source
            for p in self._by_name.values()
            if isinstance(p.source, Source | KafkaSource | KinesisSource)
        }
        return [found[name] for name in sorted(found)]


def _is_projection(value: object) -> bool:
    return isinstance(value, Projection)
