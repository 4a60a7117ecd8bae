"""A key's child rows as a handler sees them, and what the fold keeps of them until the rows are written.

Writes (`put`, `delete`, `clear`) are recorded without reading anything; reads (`get`, iterating) see the stored child
rows, loaded by the fold only for the child tables a handler names in `reads=`, with the writes of this fold laid
over them. A handler that returns None deletes its key: its child rows go with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rehydrate.core.errors import UserError
from rehydrate.engine.projections import Projection, Row, TableRef, TableShape


class ChildRowError(UserError):
    """A handler used its key's child rows wrongly (an unknown table, a row without its key, an undeclared read)."""


class ChildRows:
    """The child rows of one key in one child table."""

    __slots__ = ("changed", "cleared", "key", "readable", "shape", "stored")

    def __init__(self, shape: TableShape, key: Any, stored: dict[Any, Row] | None) -> None:
        self.shape = shape
        self.key = key
        self.changed: dict[Any, Row | None] = {}  # by child key: the new row, or None (deleted)
        self.cleared = False  # every stored child row of the key deleted
        self.stored = stored  # by child key, as stored; None: not loaded (the key may have stored child rows)
        self.readable = False  # whether the running handler named this table in reads=

    def put(self, row: Row) -> None:
        """Insert or replace the child row with this row's child key. Columns left out take their defaults; the
        projection's key column is filled in."""
        shape = self.shape
        if not isinstance(row, dict):
            raise ChildRowError(
                f"a child row of {shape.name!r} must be a dict, not {type(row).__name__}", fix="put a dict of columns"
            )
        unknown = row.keys() - shape.column_set
        if unknown:
            raise ChildRowError(
                f"child row of {shape.name!r} has unknown column(s) {sorted(unknown)}",
                fix=f"use only the table's columns: {', '.join(shape.columns)}",
            )
        parent = row.get(shape.key_column, self.key)
        if parent != self.key:
            raise ChildRowError(
                f"child row of {shape.name!r} sets {shape.key_column!r} to {parent!r}, but the event's key is "
                f"{self.key!r}",
                fix="a handler writes only the child rows of its own key; leave the column out",
            )
        row = {**shape.blank_row, **row, shape.key_column: self.key}
        child_key = shape.child_key_of(row)
        if child_key is None or (isinstance(child_key, tuple) and None in child_key):
            raise ChildRowError(
                f"child row of {shape.name!r} has no value for its key column(s) {', '.join(shape.child_key)}",
                fix="set the child's own key in every row you put",
            )
        self.changed[child_key] = row

    def delete(self, child_key: Any) -> None:
        """Delete the child row with this child key (a tuple when the child key has several columns), if any."""
        self.changed[self._child_key(child_key)] = None

    def clear(self) -> None:
        """Delete every child row of the key in this table."""
        self.cleared = True
        self.changed.clear()

    def get(self, child_key: Any, default: Row | None = None) -> Row | None:
        """The child row with this child key, or `default`."""
        self._check_readable("get")
        child_key = self._child_key(child_key)
        if child_key in self.changed:
            found = self.changed[child_key]
            return default if found is None else found
        if self.cleared or self.stored is None:
            return default
        return self.stored.get(child_key, default)

    def __iter__(self) -> Iterator[Row]:
        """Every child row of the key, as stored and as changed by this fold (stored order first)."""
        self._check_readable("iterate over")
        rows: dict[Any, Row | None] = {} if self.cleared or self.stored is None else dict(self.stored)
        rows.update(self.changed)
        return iter([row for row in rows.values() if row is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def _child_key(self, child_key: Any) -> Any:
        width = len(self.shape.child_key)
        if width > 1 and (not isinstance(child_key, tuple) or len(child_key) != width):
            raise ChildRowError(
                f"the child key of {self.shape.name!r} is ({', '.join(self.shape.child_key)}): {child_key!r} is not a "
                f"tuple of {width} values",
                fix="give the child key as a tuple in the order of those columns",
            )
        return child_key

    def _check_readable(self, what: str) -> None:
        if not self.readable:
            raise ChildRowError(
                f"the handler cannot {what} the child rows of {self.shape.name!r}: it did not name the table in reads=",
                fix=f"register it with .on(..., reads={self.shape.name!r}) so that the fold loads them",
            )


# The child rows a fold touched: by key, by child table name.
ChildState = dict[Any, dict[str, ChildRows]]


class Children:
    """The child rows of the event's key, by child table (model class or name): `children[OrderLine].put(...)`."""

    __slots__ = ("_key", "_projection", "_reads", "_state", "_stored_keys")

    def __init__(
        self, projection: Projection, key: Any, state: ChildState, stored_keys: set[Any], reads: frozenset[str]
    ) -> None:
        self._projection = projection
        self._key = key
        self._state = state
        self._stored_keys = stored_keys
        self._reads = reads

    def __getitem__(self, table: TableRef) -> ChildRows:
        try:
            shape = self._projection.child(table)
        except UserError as error:
            raise ChildRowError(error.message, fix=error.fix) from None
        rows = rows_of(self._state, shape, self._key, self._stored_keys)
        rows.readable = shape.name in self._reads
        return rows


def rows_of(state: ChildState, shape: TableShape, key: Any, stored_keys: set[Any]) -> ChildRows:
    """The key's ChildRows in a child table, made on first use: known empty when the key has no stored row."""
    by_table = state.get(key)
    if by_table is None:
        by_table = state[key] = {}
    rows = by_table.get(shape.name)
    if rows is None:
        rows = by_table[shape.name] = ChildRows(shape, key, None if key in stored_keys else {})
    return rows


def clear_all(projection: Projection, state: ChildState, key: Any, stored_keys: set[Any]) -> None:
    """The key was deleted: so are its child rows, in every child table."""
    for shape in projection.children:
        rows_of(state, shape, key, stored_keys).clear()
