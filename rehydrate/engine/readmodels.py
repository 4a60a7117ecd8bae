"""The read models in Postgres: each generation's tables, the views readers query by the projection's plain table
names, and the sandbox schemas. Every statement on them is here.

Readers query each table of a projection by its plain name, which is a view over the active generation's table
(`<table>__g<N>`). The swap replaces every view of the projection in one short transaction, so a reader sees the old
generation or the new one, whole, in all its tables. A view (not a rename of tables) keeps the reader's name stable
for grants and for views of the user's own, and leaves the old generation's tables untouched for an instant rollback.

Statements here are built from a projection's table shape: every identifier in them was checked when the projection
was declared (`identifiers.check_identifier`) and is quoted again here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from rehydrate.core.errors import UserError
from rehydrate.core.identifiers import check_identifier, derived_name, qualified, quote
from rehydrate.core.limits import MAX_IDENTIFIER
from rehydrate.engine.projections import Projection, TableShape, physical_name
from rehydrate.models import Drift

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]
SANDBOX_PREFIX = "rehydrate_sandbox_"

_SCHEMA_EXISTS = "SELECT to_regnamespace($1) IS NOT NULL"
# Only when missing: CREATE SCHEMA checks the CREATE privilege on the database even when the schema exists, and a
# least-privilege worker has none.
_CREATE_SCHEMA = "CREATE SCHEMA IF NOT EXISTS {schema}"
_DROP_SCHEMA = "DROP SCHEMA IF EXISTS {schema} CASCADE"
_DROP_TABLE = "DROP TABLE IF EXISTS {table}"
_TABLE_EXISTS = "SELECT to_regclass($1) IS NOT NULL"
_CREATE_INDEX = "CREATE {unique}INDEX IF NOT EXISTS {name} ON {table} ({columns})"
_ANALYZE = "ANALYZE {table}"
_COUNT = "SELECT count(*) FROM {table}"
_STATEMENT_TIMEOUT = "SET LOCAL statement_timeout = '{milliseconds}ms'"
# The planner's row estimate (-1 before the first ANALYZE or VACUUM).
_ESTIMATE = "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)"
_RELATION_KIND = """SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = $1 AND c.relname = $2"""
# Readers queue behind the view's lock while a swap waits for it: the swap gives up quickly and retries.
_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '{milliseconds}ms'"
# Once a swap holds the view's lock, readers wait for its commit: a swapping worker that goes silent (frozen, or
# cut off from the server) must not keep them waiting beyond this bound (see `point_views`).
_IDLE_TIMEOUT = "SET LOCAL idle_in_transaction_session_timeout = '{milliseconds}ms'"
_REPLACE_VIEW = "CREATE OR REPLACE VIEW {view} AS SELECT {columns} FROM {table}"
_DROP_VIEW = "DROP VIEW {view}"
_CREATE_VIEW = "CREATE VIEW {view} AS SELECT {columns} FROM {table}"
_VIEW_CHANGE_FAILED = (asyncpg.InvalidTableDefinitionError, asyncpg.FeatureNotSupportedError)
# Keys whose rows differ between two tables of one shape: an md5 of each row's columns, joined on the key (see
# `_compare_sql`).
_COMPARE_ROWS = "SELECT t.{key}::text AS k, md5(ROW({columns})::text) AS h FROM {table} t"
# The rows of a generation's table, for the fold.
_ROWS_OF = "SELECT * FROM {table} WHERE {key} = ANY($1::{key_type}[])"
_DELETE_KEYS = "DELETE FROM {table} WHERE {key} = ANY($1::{key_type}[])"
# Keys as text cast to the key's type (not the column to text): the key's index finds them.
_DELETE_KEYS_AS_TEXT = "DELETE FROM {table} WHERE {key} = ANY($1::text[]::{key_type}[])"
_CAST_KEY = "SELECT $1::{key_type}"
# Child rows by (key, child key): the pairs come as one array per column.
_DELETE_CHILDREN = "DELETE FROM {table} WHERE ({columns}) IN (SELECT * FROM unnest({arrays}))"
# A child table compared per key: a hash of all its child rows, in child-key order.
_CHILD_HASHES = """SELECT t.{key}::text AS k, md5(string_agg(ROW({columns})::text, ',' ORDER BY {order})) AS h
    FROM {table} t GROUP BY t.{key}"""


def sandbox_schema(label: str) -> str:
    """The schema a sandbox build lives in: `rehydrate_sandbox_<label>`, for a plain-identifier label."""
    check_identifier(label, "sandbox label")
    if len(SANDBOX_PREFIX + label) > MAX_IDENTIFIER:
        raise UserError(
            f"sandbox label {label!r} is too long",
            fix=f"use at most {MAX_IDENTIFIER - len(SANDBOX_PREFIX)} characters",
        )
    return SANDBOX_PREFIX + label


def table_schema(read_schema: str, sandbox: str) -> str:
    """Where a generation's table lives: the read-model schema, or its sandbox's schema."""
    return sandbox_schema(sandbox) if sandbox else read_schema


def create_table_sql(shape: TableShape, schema: str, generation: int) -> str:
    """A generation's table, with its primary key but no secondary index (those come after the load). A child
    table's primary key starts with the projection's key column, so that it finds a key's child rows."""
    primary = (shape.key_column, *shape.child_key)
    clone = sa.Table(
        shape.physical_name(generation),
        sa.MetaData(),
        *(sa.Column(c.name, c.type, nullable=c.nullable and c.name not in primary) for c in shape.sa_table.columns),
        sa.PrimaryKeyConstraint(*primary),
        schema=schema,
    )
    return str(sa.schema.CreateTable(clone).compile(dialect=_DIALECT))


def create_index_sql(shape: TableShape, schema: str, generation: int) -> list[str]:
    """The secondary indexes of a generation's table (its model's indexes and unique columns)."""
    physical = shape.physical_name(generation)
    indexes: list[tuple[list[str], bool]] = [
        ([c.name for c in index.columns], bool(index.unique)) for index in shape.sa_table.indexes
    ]
    indexes += [([c.name], bool(c.unique)) for c in shape.sa_table.columns if c.unique and not c.index]
    return [
        _CREATE_INDEX.format(
            unique="UNIQUE " if unique else "",
            name=quote(derived_name(physical, "_" + "_".join(columns) + "_idx")),
            table=qualified(schema, physical),
            columns=", ".join(quote(c) for c in columns),
        )
        for columns, unique in indexes
    ]


class ReadModels:
    """The read models of one schema (the read-model schema, or a sandbox's), on one connection."""

    def __init__(self, conn: asyncpg.Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema

    def table(self, shape: TableShape, physical: str) -> GenerationTable:
        return GenerationTable(self.conn, self.schema, physical, shape)

    def tables(self, projection: Projection, generation: int, main: str | None = None) -> GenerationTables:
        """Every table of one generation of `projection` (`main`: its main table's name, when recorded)."""
        return GenerationTables(
            self.table(projection.table, main or projection.table.physical_name(generation)),
            tuple(self.table(shape, shape.physical_name(generation)) for shape in projection.children),
        )

    async def create_tables(self, projection: Projection, generation: int) -> None:
        for shape in projection.tables:
            await self.create_table(shape, generation)

    async def create_all_indexes(self, projection: Projection, generation: int) -> None:
        for shape in projection.tables:
            await self.create_indexes(shape, generation)

    async def drop_tables(self, main: str, children: Sequence[str], generation: int) -> None:
        """Drop a generation's tables: its main table and the child tables named `children`."""
        await self.drop_table(main)
        for name in children:
            await self.drop_table(physical_name(name, generation))

    async def point_views(
        self,
        projection: Projection,
        generation: int,
        main: str,
        *,
        lock_timeout_ms: int | None = None,
        idle_timeout_ms: int | None = None,
    ) -> None:
        """Point the views of every table of `projection` at `generation`'s tables, in the caller's transaction.

        With `idle_timeout_ms`, Postgres ends the session if, from here to its commit, the transaction sits idle that
        long between two statements: the views' locks, which every reader queues behind, are then never held for
        longer by a worker that stopped talking (the rest of the transaction is a few short statements)."""
        if idle_timeout_ms is not None:
            await self.conn.execute(_IDLE_TIMEOUT.format(milliseconds=int(idle_timeout_ms)))
        if lock_timeout_ms is not None:
            await self.conn.execute(_LOCK_TIMEOUT.format(milliseconds=int(lock_timeout_ms)))
        await self.point_view(projection.table, main)
        for shape in projection.children:
            await self.point_view(shape, shape.physical_name(generation))

    async def ensure_schema(self) -> None:
        if not await self.conn.fetchval(_SCHEMA_EXISTS, self.schema):
            await self.conn.execute(_CREATE_SCHEMA.format(schema=quote(self.schema)))

    async def drop_schema(self) -> None:
        await self.conn.execute(_DROP_SCHEMA.format(schema=quote(self.schema)))

    async def schema_exists(self) -> bool:
        return bool(await self.conn.fetchval(_SCHEMA_EXISTS, self.schema))

    async def create_table(self, shape: TableShape, generation: int) -> None:
        """A generation's table, new: one left by an earlier attempt at the same number is dropped first."""
        await self.drop_table(shape.physical_name(generation))
        await self.conn.execute(create_table_sql(shape, self.schema, generation))

    async def create_indexes(self, shape: TableShape, generation: int) -> None:
        for statement in create_index_sql(shape, self.schema, generation):
            await self.conn.execute(statement)

    async def analyze(self, physical: str) -> None:
        """Gather the planner's statistics of a table. ANALYZE blocks neither readers nor writers, so it may run
        beside the catch-up and the swap; a table dropped meanwhile (a cancelled replay) is left alone."""
        with contextlib.suppress(asyncpg.UndefinedTableError):
            await self.conn.execute(_ANALYZE.format(table=qualified(self.schema, physical)))

    async def count_rows(self, physical: str) -> int:
        return int(await self.conn.fetchval(_COUNT.format(table=qualified(self.schema, physical))))

    async def live_rows(self, physical: str, *, within_ms: int = 2_000) -> tuple[int | None, bool]:
        """The table's rows now, and whether that is an exact count: counted when that takes under `within_ms`,
        else the planner's estimate (as of the last ANALYZE); (None, False) when the table is gone."""
        table = qualified(self.schema, physical)
        try:
            async with self.conn.transaction():
                await self.conn.execute(_STATEMENT_TIMEOUT.format(milliseconds=int(within_ms)))
                return int(await self.conn.fetchval(_COUNT.format(table=table))), True
        except asyncpg.QueryCanceledError:
            estimate = await self.conn.fetchval(_ESTIMATE, table)
            return (int(estimate) if estimate is not None and estimate >= 0 else None), False
        except asyncpg.UndefinedTableError:
            return None, False

    async def table_exists(self, physical: str) -> bool:
        return bool(await self.conn.fetchval(_TABLE_EXISTS, qualified(self.schema, physical)))

    async def drop_table(self, physical: str) -> None:
        await self.conn.execute(_DROP_TABLE.format(table=qualified(self.schema, physical)))

    async def point_view(self, shape: TableShape, physical: str, *, lock_timeout_ms: int | None = None) -> None:
        """Point the view named like the projection's table at `physical`; with `lock_timeout_ms`, give up after that
        long when readers hold it (asyncpg's LockNotAvailableError). Inside the caller's transaction."""
        if lock_timeout_ms is not None:
            await self.conn.execute(_LOCK_TIMEOUT.format(milliseconds=int(lock_timeout_ms)))
        kind = await self.conn.fetchval(_RELATION_KIND, self.schema, shape.name)
        if kind is not None and kind not in (b"v", "v"):
            raise UserError(
                f"{self.schema}.{shape.name} exists and is not a view managed by rehydrate",
                fix="rename or drop that table; rehydrate serves the read model under this name as a view",
            )
        parts = {
            "view": qualified(self.schema, shape.name),
            "columns": ", ".join(quote(c) for c in shape.columns),
            "table": qualified(self.schema, physical),
        }
        try:
            async with self.conn.transaction():
                await self.conn.execute(_REPLACE_VIEW.format(**parts))
        except _VIEW_CHANGE_FAILED:
            # The columns changed shape (a new projection version): the view must be recreated, still inside
            # the swap's transaction, so readers never find it missing.
            try:
                await self.conn.execute(_DROP_VIEW.format(**parts))
            except asyncpg.DependentObjectsStillExistError as error:
                raise UserError(
                    f"the columns of {self.schema}.{shape.name} changed and other objects depend on it: {error}",
                    fix="drop or adapt the dependent views, then start the replay again",
                ) from None
            await self.conn.execute(_CREATE_VIEW.format(**parts))

    async def compare(
        self,
        projection: Projection,
        live: GenerationTables,
        rebuilt: GenerationTables,
        show: int,
    ) -> tuple[int, list[Drift], int, int]:
        """Keys whose rows differ between the tables `live` and `rebuilt` (in any table: a child table's rows are
        compared per key): (count, the first `show` in key order as Drift, live rows, rebuilt rows of the main
        table)."""
        main = projection.table
        parts = [
            _COMPARE_ROWS.format(
                key=quote(main.key_column),
                columns=", ".join(f"t.{quote(c)}" for c in main.columns),
                table=live.main.qualified,
            ),
            _COMPARE_ROWS.format(
                key=quote(main.key_column),
                columns=", ".join(f"t.{quote(c)}" for c in main.columns),
                table=rebuilt.main.qualified,
            ),
        ]
        children = []
        for mine, theirs in zip(live.children, rebuilt.children, strict=True):
            shape = mine.shape
            common = {
                "key": quote(shape.key_column),
                "columns": ", ".join(f"t.{quote(c)}" for c in shape.columns),
                "order": ", ".join(f"t.{quote(c)}" for c in shape.child_key),
            }
            children.append(
                (
                    _CHILD_HASHES.format(table=mine.qualified, **common),
                    _CHILD_HASHES.format(table=theirs.qualified, **common),
                )
            )
        rows = await self.conn.fetch(_compare_sql(parts[0], parts[1], children), max(show, 1))
        if not rows:
            return 0, [], await self.count_rows(live.main.physical), await rebuilt.main.count()
        first = [
            Drift(r["k"], "missing in live" if r["no_live"] else "missing in rebuild" if r["no_rebuilt"] else "differs")
            for r in rows[:show]
        ]
        return int(rows[0]["n"]), first, int(rows[0]["live_rows"]), int(rows[0]["rebuilt_rows"])


def _compare_sql(live: str, rebuilt: str, children: Sequence[tuple[str, str]]) -> str:
    """Keys that differ: the main table's rows by key (a key missing on one side is named so), then each child
    table's rows hashed per key; a key counts once however many tables it differs in."""
    ctes = [f"l AS ({live})", f"r AS ({rebuilt})"]
    diffs = [
        "SELECT coalesce(l.k, r.k) AS k, l.h IS NULL AS no_live, r.h IS NULL AS no_rebuilt "
        "FROM l FULL OUTER JOIN r ON l.k = r.k WHERE l.h IS DISTINCT FROM r.h"
    ]
    for number, (mine, theirs) in enumerate(children):
        ctes += [f"l{number} AS ({mine})", f"r{number} AS ({theirs})"]
        diffs.append(
            f"SELECT coalesce(l{number}.k, r{number}.k), false, false FROM l{number} FULL OUTER JOIN r{number} "
            f"ON l{number}.k = r{number}.k WHERE l{number}.h IS DISTINCT FROM r{number}.h"
        )
    union = " UNION ALL ".join(diffs)
    return f"""WITH {", ".join(ctes)},
         d AS (SELECT k, bool_or(no_live) AS no_live, bool_or(no_rebuilt) AS no_rebuilt FROM ({union}) u GROUP BY k)
    SELECT k, no_live, no_rebuilt, count(*) OVER () AS n,
           (SELECT count(*) FROM l) AS live_rows, (SELECT count(*) FROM r) AS rebuilt_rows
    FROM d ORDER BY k LIMIT $1"""


class GenerationTables:
    """The tables of one generation: its main table, then its child tables in the projection's order."""

    def __init__(self, main: GenerationTable, children: tuple[GenerationTable, ...] = ()) -> None:
        self.main = main
        self.children = children
        self.all = (main, *children)
        self._by_name = {table.shape.name: table for table in children}

    def child(self, name: str) -> GenerationTable:
        return self._by_name[name]

    async def delete_as_text(self, keys: Sequence[str]) -> None:
        """Delete the rows (and child rows) whose key, as text, is one of `keys`."""
        for table in self.all:
            await table.delete_as_text(keys)


class GenerationTable:
    """The rows of one generation's table: what the fold reads, deletes and writes."""

    def __init__(self, conn: asyncpg.Connection, schema: str, physical: str, shape: TableShape) -> None:
        self.conn = conn
        self.schema = schema
        self.physical = physical
        self.shape = shape
        parts = {"table": qualified(schema, physical), "key": quote(shape.key_column), "key_type": shape.key_sql_type}
        self._rows_of = _ROWS_OF.format(**parts)
        self._delete = _DELETE_KEYS.format(**parts)
        self._delete_as_text = _DELETE_KEYS_AS_TEXT.format(**parts)
        self._cast = _CAST_KEY.format(**parts)
        self.qualified = parts["table"]
        if shape.is_child:
            columns = (shape.key_column, *shape.child_key)
            types = (shape.key_sql_type, *shape.child_key_sql_types)
            self._delete_children = _DELETE_CHILDREN.format(
                table=parts["table"],
                columns=", ".join(quote(c) for c in columns),
                arrays=", ".join(f"${n}::{t}[]" for n, t in enumerate(types, 1)),
            )

    async def rows(self, keys: Sequence[Any]) -> list[asyncpg.Record]:
        """The stored rows of `keys` (raises asyncpg's DataError, or ValueError/TypeError, on a key of the wrong
        type)."""
        return list(await self.conn.fetch(self._rows_of, keys))

    async def delete(self, keys: Sequence[Any]) -> None:
        await self.conn.execute(self._delete, keys)

    async def delete_as_text(self, keys: Sequence[str]) -> None:
        """Delete the rows whose key, as text, is one of `keys` (dead letters keep keys as text)."""
        await self.conn.execute(self._delete_as_text, list(keys))

    async def delete_children(self, pairs: Sequence[tuple[Any, Any]]) -> None:
        """Delete a child table's rows by (key, child key); a child key of several columns is a tuple."""
        if len(self.shape.child_key) == 1:
            columns = [[key for key, _ in pairs], [child for _, child in pairs]]
        else:
            columns = [[key for key, _ in pairs], *map(list, zip(*(child for _, child in pairs), strict=True))]
        await self.conn.execute(self._delete_children, *columns)

    async def count(self) -> int:
        return int(await self.conn.fetchval(_COUNT.format(table=self.qualified)))

    async def copy(self, records: Sequence[tuple[Any, ...]]) -> None:
        """Write rows (values in the shape's column order) through binary COPY."""
        await self.conn.copy_records_to_table(
            self.physical, schema_name=self.schema, columns=list(self.shape.columns), records=records
        )

    async def check_key(self, key: Any) -> None:
        """Raise what Postgres raises when `key` does not fit the key column."""
        await self.conn.fetchval(self._cast, key)
