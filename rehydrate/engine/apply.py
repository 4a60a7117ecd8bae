"""Folds a batch of events into a projection's rows and writes them to one generation's tables.

The caller owns the transaction: it writes its checkpoint in the same one, so a batch applied twice (a retry
after a crash between commit and acknowledgement) finds the checkpoint already past it and changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from rehydrate.core.errors import ProjectionError
from rehydrate.engine.catalog import Catalog
from rehydrate.engine.children import Children, ChildRowError, ChildState, clear_all, rows_of
from rehydrate.engine.projections import Projection, Row, TableShape
from rehydrate.engine.readmodels import GenerationTable, GenerationTables
from rehydrate.sources.events import Event, UndecodablePayload

_MISSING = object()


@dataclass(frozen=True, slots=True)
class Applied:
    events: int
    rows_written: int
    rows_deleted: int
    parked: int = 0


def _fail(projection: Projection, event: Event, problem: str, fix: str) -> ProjectionError:
    return ProjectionError(projection.name, event.global_position, event.stream_id, event.type, problem, fix)


@dataclass(frozen=True, slots=True)
class Parking:
    """Where a projection with on_error="park" keeps what it could not apply: the dead letters of a generation."""

    catalog: Catalog
    generation: int


# The events of a key parked by an earlier failure, each with its error (keys parked before: an empty list).
Parked = dict[Any, list[tuple[Event, str]]]
PARKED_AFTER = "parked: an earlier event of this key failed"


def fold(
    projection: Projection,
    events: Sequence[Event],
    state: dict[Any, Row | None],
    last: dict[Any, Event],
    parked: Parked | None = None,
    children: ChildState | None = None,
    stored_keys: set[Any] | None = None,
) -> int:
    """Apply `events` in order over the rows in `state` (by key; None: no row), in place. Records in `last` the
    last event that touched each key (to name it in an error); returns how many events a handler applied.

    A projection with child tables keeps its keys' child rows in `children`; `stored_keys` are the keys that have
    a stored row (only they may have stored child rows).

    With `parked` (a projection with on_error="park"), a handler's failure parks its key instead of raising: that
    event and every later event of the key go into `parked`, and the key is dropped from `last` (not written)."""
    handlers = projection.handlers
    key_field = projection.key.field
    key_column = projection.table.key_column
    strict = projection.strict
    ignored = projection.ignore
    blank = projection.table.blank_row
    width = len(blank)
    applied = 0
    upcast = projection.upcaster()
    has_children = bool(projection.children)
    child_state: ChildState = {} if children is None else children
    with_rows: set[Any] = set() if stored_keys is None else stored_keys
    takes_children, reads = projection.takes_children, projection.reads
    for event in events:
        undecodable = type(event.data) is UndecodablePayload
        if upcast is not None and not undecodable:
            event = upcast(event)  # the handler sees the event at its type's current version
        handler = handlers.get(event.type)
        # A payload that does not decode, and so says no type (a Kinesis record's type is a field of its data), may
        # be any event, handled or not: it fails like an undecodable event of a handled type instead of being passed
        # over.
        unreadable = undecodable and not event.type and event.data.part == "value"  # type: ignore[attr-defined]
        if handler is None and not unreadable:
            if strict and event.type not in ignored:
                if undecodable and not event.type:  # a message whose type could not be read: say why
                    raise _fail(
                        projection,
                        event,
                        event.data.problem,  # type: ignore[attr-defined]
                        "fix the producer, or the source's type_header/type_field, then replay",
                    )
                raise _fail(
                    projection,
                    event,
                    "no handler for this event type and the projection is strict",
                    f"add a handler with @{projection.name}.on({event.type!r}), or list it in ignore=",
                )
            continue
        if key_field is None:
            key = event.stream_id
        else:
            key = event.data.get(key_field, _MISSING)
            if key is _MISSING or key is None or isinstance(key, (dict, list)):
                raise _fail(
                    projection,
                    event,
                    f"the payload has no usable key field {key_field!r}",
                    "fix the event (or an upcaster), or key the projection by another field",
                )
        if parked is not None and key in parked:
            parked[key].append((event, PARKED_AFTER))
            continue
        previous = state.get(key)
        try:
            if undecodable:
                raise _fail(
                    projection,
                    event,
                    event.data.problem,  # type: ignore[attr-defined]
                    "fix the source's decoder (or the stored payload), then replay (or retry the dead letters)",
                )
            assert handler is not None
            try:
                if has_children and takes_children[event.type]:
                    row = handler(previous, event, Children(projection, key, child_state, with_rows, reads[event.type]))
                else:
                    row = handler(previous, event)
            except ChildRowError as error:
                raise _fail(projection, event, error.message, error.fix or "") from None
            except Exception as error:
                raise _fail(
                    projection,
                    event,
                    f"handler {getattr(handler, '__name__', handler)!r} raised {type(error).__name__}: {error}",
                    "fix the handler (or the event), then start the replay again",
                ) from error
            if row is not None:
                if not isinstance(row, dict):
                    raise _fail(
                        projection,
                        event,
                        f"handler returned {type(row).__name__}, not a dict or None",
                        "return the new row as a dict, or None to delete it",
                    )
                if len(row) < width:
                    # Columns a handler leaves out take their defaults, so the next handler sees every column.
                    row = {**blank, key_column: key, **row}
                current_key = row.get(key_column, _MISSING)
                if current_key is _MISSING:
                    row[key_column] = key
                elif current_key != key:
                    raise _fail(
                        projection,
                        event,
                        f"handler set {key_column!r} to {current_key!r}, but the event's key is {key!r}",
                        "a handler may not move a row to another key",
                    )
        except ProjectionError as failure:
            if parked is None:
                raise
            # The handler may have changed the row in place before it failed: this transaction writes nothing for
            # the key (its stored row stays as it was), and a retry rebuilds the key from its whole history.
            last.pop(key, None)
            parked[key] = [(event, failure.message)]
            continue
        if row is None and has_children:
            clear_all(projection, child_state, key, with_rows)
        state[key] = row
        last[key] = event
        applied += 1
    return applied


def _record(projection: Projection, shape: TableShape, row: Row, event: Event) -> tuple[Any, ...]:
    if len(row) == len(shape.columns):
        # The usual row: every column, nothing else (as many keys as columns, each column present).
        try:
            values = shape.values(row)
        except KeyError:
            pass
        else:
            if None not in shape.required_values(row):
                return values
    if len(row) > len(shape.columns) or not row.keys() <= shape.column_set:
        unknown = sorted(set(row) - set(shape.columns))
        raise _fail(
            projection,
            event,
            f"handler returned unknown column(s) {unknown} for table {shape.name!r}",
            f"return only the table's columns: {', '.join(shape.columns)}",
        )
    values = tuple(row.get(c) for c in shape.columns)
    for column in shape.required:
        if row.get(column) is None:
            raise _fail(
                projection,
                event,
                f"column {column!r} of table {shape.name!r} is required but the row has no value",
                "set it in the handler that creates the row, or give the column a default",
            )
    return values


class Folding:
    """The rows one transaction writes: events are folded in batch by batch (a batch's keys' stored rows are
    read when first met), and the rows written once at the end. Memory holds the touched rows, not the events.
    """

    def __init__(
        self,
        projection: Projection,
        tables: GenerationTables,
        parking: Parking | None = None,
        stored_keys: Iterable[Any] | None = None,
    ) -> None:
        """`stored_keys`, when the caller knows them: the only keys that may already have a row (or dead
        letters) in the table; the rest are new, so no lookup is needed. None: any key may."""
        self.tables = tables
        self.table = tables.main
        self.stored_keys = None if stored_keys is None else list(stored_keys)
        self.parking = parking
        # Parked keys (on_error="park"): loaded from the dead letters as keys are met; new entries written at the end.
        self.parked: Parked | None = {} if projection.on_error == "park" else None
        self.projection = projection
        self.state: dict[Any, Row | None] = {}
        self.children: ChildState = {}
        self.last: dict[Any, Event] = {}
        self.looked_up: set[Any] = set()
        self.stored: set[Any] = set()  # keys that have a row in the table: deleted before the new rows go in
        self.events = 0

    async def add(self, events: Sequence[Event]) -> None:
        """Fold `events` (in order, after every batch added before) into the rows."""
        if not events:
            return
        projection = self.projection
        shape = projection.table
        key_field = projection.key.field
        handled = projection.handlers
        looked_up = self.looked_up
        keys: list[Any] = []
        if self.stored_keys is not None:
            keys, self.stored_keys = self.stored_keys, []
        else:
            for event in events:
                if event.type not in handled:
                    continue
                key = event.stream_id if key_field is None else event.data.get(key_field)
                if key is not None and not isinstance(key, (dict, list)) and key not in looked_up:
                    looked_up.add(key)
                    keys.append(key)
        if keys:
            try:
                rows = await self.table.rows(keys)
            except (asyncpg.DataError, ValueError, TypeError) as error:
                # A key of the wrong type (say a number for a text column) would fail every retry the same way.
                raise await _name_bad_key(self.table, projection, events, error) from None
            for row in rows:
                key = row[shape.key_column]
                self.state[key] = dict(row)
                self.stored.add(key)
            if self.parked is not None and self.parking is not None:
                await self._load_parked(keys)
        if projection.children and self.stored:
            await self._load_children(events)
        self.events += fold(projection, events, self.state, self.last, self.parked, self.children, self.stored)

    async def _load_children(self, events: Sequence[Event]) -> None:
        """Load the stored child rows that this batch's handlers read (`reads=`), for its keys that have a stored
        row and whose child rows in that table are not loaded yet."""
        projection = self.projection
        reads, key_field = projection.reads, projection.key.field
        wanted: dict[str, list[Any]] = {}
        for event in events:
            tables = reads.get(event.type)
            if not tables:
                continue
            key = event.stream_id if key_field is None else event.data.get(key_field)
            if key not in self.stored:
                continue
            for name in tables:
                rows = self.children.get(key, {}).get(name)
                if rows is None or rows.stored is None:
                    wanted.setdefault(name, []).append(key)
        for name, keys in wanted.items():
            table = self.tables.child(name)
            shape = table.shape
            keys = list(dict.fromkeys(keys))
            found: dict[Any, dict[Any, Row]] = {key: {} for key in keys}
            for record in await table.rows(keys):
                row = dict(record)
                found[row[shape.key_column]][shape.child_key_of(row)] = row
            for key, stored in found.items():
                rows_of(self.children, shape, key, self.stored).stored = stored

    async def _load_parked(self, keys: list[Any]) -> None:
        """Keys parked by an earlier transaction of this generation stay parked: their events are parked too."""
        assert self.parked is not None and self.parking is not None
        by_text = {str(key): key for key in keys}
        found = await self.parking.catalog.parked_keys(self.projection.name, self.parking.generation, list(by_text))
        for key in found:
            self.parked.setdefault(by_text[key], [])

    async def write(self) -> Applied:
        """Replace the touched keys' rows (and child rows). Must run inside the caller's transaction."""
        projection, state, last = self.projection, self.state, self.last
        records = [
            _record(projection, projection.table, row, last[key])
            for key, row in state.items()
            if row is not None and key in last
        ]
        gone = [key for key in self.stored if key in last]
        if gone:
            await self.table.delete(gone)
        if records:
            try:
                async with self.table.conn.transaction():
                    await self.table.copy(records)
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, ValueError, TypeError) as error:
                raise await _name_bad_row(self.table, projection, self._rows_of(projection.table), error) from None
        for table in self.tables.children:
            await self._write_children(table)
        parked = await self._write_parked()
        return Applied(self.events, len(records), sum(1 for key in gone if state.get(key) is None), parked)

    def _rows_of(self, shape: TableShape) -> list[tuple[Row, Event]]:
        """The rows this fold writes to a table, each with the last event of its key."""
        last = self.last
        if not shape.is_child:
            return [(row, last[key]) for key, row in self.state.items() if row is not None and key in last]
        written = []
        for key, by_table in self.children.items():
            rows = by_table.get(shape.name)
            if rows is not None and key in last:
                written += [(row, last[key]) for row in rows.changed.values() if row is not None]
        return written

    async def _write_children(self, table: GenerationTable) -> None:
        """Delete the child rows the fold cleared or changed (of keys with stored rows), then COPY the new ones."""
        projection, shape, last, stored = self.projection, table.shape, self.last, self.stored
        cleared: list[Any] = []
        changed: list[tuple[Any, Any]] = []
        records: list[tuple[Any, ...]] = []
        for key, by_table in self.children.items():
            rows = by_table.get(shape.name)
            if rows is None or key not in last:
                continue
            if key in stored:
                if rows.cleared:
                    cleared.append(key)
                else:
                    changed += [(key, child_key) for child_key in rows.changed]
            new = [row for row in rows.changed.values() if row is not None]
            if new and self.state.get(key) is None:
                raise _fail(
                    projection,
                    last[key],
                    f"the handlers left child rows in {shape.name!r} for key {key!r}, which has no row in "
                    f"{projection.table.name!r}",
                    "a key's child rows live with its row: return a row for the key before putting child rows (a "
                    "handler that returns None deletes the key and its child rows)",
                )
            records += [_record(projection, shape, row, last[key]) for row in new]
        if cleared:
            await table.delete(cleared)
        if changed:
            await table.delete_children(changed)
        if records:
            try:
                async with table.conn.transaction():
                    await table.copy(records)
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, ValueError, TypeError) as error:
                raise await _name_bad_row(table, projection, self._rows_of(shape), error) from None

    async def _write_parked(self) -> int:
        """Store the events parked in this transaction; returns how many."""
        if not self.parked or self.parking is None:
            return 0
        letters = [
            (self.parking.generation, e.global_position, e.stream_id, e.stream_version, e.type, str(key), error)
            for key, entries in self.parked.items()
            for e, error in entries
        ]
        await self.parking.catalog.park(self.projection.name, letters)
        return len(letters)


async def apply_events(
    projection: Projection, tables: GenerationTables, events: Sequence[Event], parking: Parking | None = None
) -> Applied:
    """Fold `events` into a generation's tables. Must run inside the caller's transaction."""
    folding = Folding(projection, tables, parking)
    await folding.add(events)
    return await folding.write()


async def _name_bad_key(
    table: GenerationTable, projection: Projection, events: Sequence[Event], error: Exception
) -> ProjectionError:
    """The keys did not fit the key column: find the first event whose key does not (in savepoints)."""
    field = projection.key.field
    checked: set[Any] = set()
    for event in events:
        if event.type not in projection.handlers:
            continue
        key = event.stream_id if field is None else event.data.get(field)
        if key is None or isinstance(key, (dict, list)) or key in checked:
            continue
        checked.add(key)
        try:
            misfit = await _key_misfit(table, projection, event, key)
        except asyncpg.PostgresError:
            break  # the transaction is unusable (the first error was the server's): name the batch instead
        if misfit is not None:
            return misfit
    first = next(event for event in events if event.type in projection.handlers)
    return _fail(projection, first, f"the keys of this batch cannot be read: {error}", "check the key column's type")


async def _key_misfit(table: GenerationTable, projection: Projection, event: Event, key: Any) -> ProjectionError | None:
    """The failure naming `event` when its key does not fit the main table's key column (asked in a savepoint);
    None when it fits."""
    field = projection.key.field
    source = "the stream id" if field is None else f"field {field!r}"
    try:
        async with table.conn.transaction():
            await table.check_key(key)
    except (asyncpg.DataError, ValueError, TypeError) as key_error:
        return _fail(
            projection,
            event,
            f"its key {key!r} ({source}) does not fit the key column {projection.table.key_column!r} "
            f"({projection.table.key_sql_type}): {key_error}",
            "fix the event (or an upcaster), or give the key column a type that fits",
        )
    return None


async def _name_bad_row(
    table: GenerationTable, projection: Projection, rows: Sequence[tuple[Row, Event]], error: Exception
) -> ProjectionError:
    """A COPY failed: write the rows one by one (in savepoints) to find the event whose row is wrong. A key that
    does not fit the key column is named as such (a chunk that knows no key can have a row looks none up first)."""
    shape = table.shape
    for row, event in rows:
        try:
            async with table.conn.transaction():
                await table.copy([_record(projection, shape, row, event)])
                raise _Rollback
        except _Rollback:
            continue
        except Exception as row_error:
            if shape is projection.table:
                with contextlib.suppress(asyncpg.PostgresError):  # an unusable transaction: the row's error, then
                    misfit = await _key_misfit(table, projection, event, row.get(shape.key_column))
                    if misfit is not None:
                        return misfit
            return _fail(
                projection,
                event,
                f"its row cannot be stored in table {shape.name!r}: {row_error}",
                "return values of the column types the table declares",
            )
    return _fail(
        projection,
        rows[0][1],
        f"the rows of this batch cannot be stored in table {shape.name!r}: {error}",
        "return values of the column types the table declares",
    )


class _Rollback(Exception):
    pass
