"""Repair selected keys in place: the rows of a few keys of the active generation rebuilt from their whole history,
with the projection's current code, without a replay.

A batch of keys is one transaction under the projection's lock, so the tail waits for it and goes on from the same
checkpoint: the repair reads each key's events up to that checkpoint (the same events a build at that checkpoint
reads), folds them into a temporary table, compares the result with the live rows, and (unless a dry run) replaces
the keys' rows and dead letters. Readers see a batch's keys all before or all after.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from rehydrate.core.errors import UserError
from rehydrate.core.identifiers import quote
from rehydrate.engine.apply import Parking, apply_events
from rehydrate.engine.generations import Generations, check_tables
from rehydrate.engine.projections import Projection
from rehydrate.engine.readmodels import GenerationTable, GenerationTables
from rehydrate.models import Drift
from rehydrate.sources.events import Event
from rehydrate.sources.log import LogSource

_SCRATCH = "rh_repair"  # the temporary tables a batch is folded into: rh_repair_0 (the main table), rh_repair_1, …
_CREATE_SCRATCH = "CREATE TEMP TABLE {scratch} (LIKE {live} INCLUDING DEFAULTS) ON COMMIT DROP"
# Keys as text, cast to the key column's type (so that its index serves), and back: each key as Postgres writes it.
_CANONICAL = "SELECT k::text FROM unnest($1::text[]::{key_type}[]) AS k"
_ROWS_AS_TEXT = """SELECT {key}::text AS rh_key, * FROM {table} WHERE {key} = ANY($1::text[]::{key_type}[])
    ORDER BY {order}"""
_MOVE_IN = """INSERT INTO {live} ({columns}) SELECT {columns} FROM {scratch}
    WHERE {key} = ANY($1::text[]::{key_type}[])"""


@dataclass
class Repaired:
    """What a batch of keys came to: the keys whose rows changed (or would, in a dry run), the first of them, and the
    events folded."""

    generation: int
    keys: int  # the distinct keys asked, as the key column writes them
    changed: int
    events: int
    first: list[Drift] = field(default_factory=list)
    stale: bool = False  # the live generation was built from other code than the one the keys were rebuilt with


class _DryRun(Exception):
    def __init__(self, repaired: Repaired) -> None:
        self.repaired = repaired


async def repair_keys(
    generations: Generations, projection: Projection, keys: Sequence[str], *, dry_run: bool = False, show: int = 10
) -> Repaired:
    """Rebuild the rows of `keys` (as text) in the active generation from their whole history, in one transaction;
    with `dry_run`, say what would change and change nothing. A key with neither events nor a row is refused
    (nothing changed), naming it."""
    keys = sorted(set(keys))
    if not keys:
        raise UserError("no key to repair", fix="give --key KEY (or --keys-from FILE)")
    conn = generations.conn
    catalog = generations.catalog
    keys = await _canonical(conn, projection, keys)  # before the transaction: a bad key's error would end it
    try:
        async with conn.transaction():
            await catalog.lock_projection(projection.name)
            generation = await catalog.active_generation(projection.name)
            row = await catalog.lock_generation(projection.name, generation)
            built = await catalog.generation(projection.name, generation)
            if built["version"] != projection.version:
                raise UserError(
                    f"generation {generation} of {projection.name!r} is version {built['version']}, the code is "
                    f"version {projection.version}: its table may have another shape",
                    fix=f"rebuild it with `rehydrate replay start {projection.name}`",
                )
            check_tables(projection, generation, row)
            live = generations.read_models().tables(projection, generation, row["physical_table"])
            events = await _events_of(generations, projection, generation, row["checkpoint"], keys)
            before = await _rows(conn, live, keys)
            found = {_key_of(projection, e) for e in events if e.type in projection.handlers} | set(before)
            unknown = [k for k in keys if k not in found]
            if unknown:
                raise UserError(
                    f"projection {projection.name!r} has no row and no event for key(s) "
                    f"{', '.join(map(repr, unknown[:10]))}{' …' if len(unknown) > 10 else ''}",
                    fix="check the keys (as the read model's key column shows them); nothing was repaired",
                )
            scratch = await _scratch(conn, live)
            await catalog.forget_dead_letters(projection.name, generation, keys)
            await apply_events(projection, scratch, events, Parking(catalog, generation))
            after = await _rows(conn, scratch, keys)
            differing = [k for k in keys if before.get(k) != after.get(k)]
            repaired = Repaired(
                generation,
                len(keys),
                len(differing),
                len(events),
                [Drift(k, _problem(before, after, k)) for k in differing[:show]],
                stale=built["fingerprint"] != projection.fingerprint,
            )
            if dry_run:
                raise _DryRun(repaired)
            if differing:
                await live.delete_as_text(differing)
                for table, folded in zip(live.all, scratch.all, strict=True):
                    statement = _MOVE_IN.format(
                        live=table.qualified,
                        columns=", ".join(quote(c) for c in table.shape.columns),
                        scratch=folded.physical,
                        key=quote(table.shape.key_column),
                        key_type=table.shape.key_sql_type,
                    )
                    await conn.execute(statement, differing)
            return repaired
    except _DryRun as done:
        return done.repaired


async def _canonical(conn: asyncpg.Connection, projection: Projection, keys: Sequence[str]) -> list[str]:
    """The keys as the key column writes them (" 42" and "042" are the key 42); a key that is not of the column's
    type is refused, naming it."""
    key_type = projection.table.key_sql_type
    try:
        return sorted(set(await conn.fetchval(f"SELECT array({_CANONICAL.format(key_type=key_type)})", list(keys))))
    except asyncpg.DataError:
        bad = []
        for key in keys:
            try:
                await conn.fetchval(f"SELECT $1::text::{key_type}", key)
            except asyncpg.DataError:
                bad.append(key)
        raise UserError(
            f"key(s) {', '.join(map(repr, bad[:10]))} of {projection.name!r} are not {key_type} values",
            fix=f"give keys as {projection.table.key_column} holds them; nothing was repaired",
        ) from None


async def _events_of(
    generations: Generations, projection: Projection, generation: int, checkpoint: int, keys: Sequence[str]
) -> list[Event]:
    """The keys' events below the generation's checkpoint (a log's: below each lane's offset)."""
    source = await generations.sources.any(projection.event_source)
    if isinstance(source, LogSource):
        return await source.read_keys(keys, await generations.catalog.log_lanes(projection.name, generation))
    async with source.reading(generations.conn) as reading:
        return await source.read_keys(
            reading, key=projection.key, keys=keys, mark=checkpoint, types=projection.event_types
        )


def _key_of(projection: Projection, event: Event) -> str:
    return str(event.stream_id if projection.key.field is None else event.data.get(projection.key.field))


async def _scratch(conn: asyncpg.Connection, live: GenerationTables) -> GenerationTables:
    """Empty temporary tables shaped like `live`'s, dropped at commit: where the keys are folded from nothing."""
    scratch = []
    for number, table in enumerate(live.all):
        name = f"{_SCRATCH}_{number}"
        await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{name}")
        await conn.execute(_CREATE_SCRATCH.format(scratch=name, live=table.qualified))
        scratch.append(GenerationTable(conn, "pg_temp", name, table.shape))
    return GenerationTables(scratch[0], tuple(scratch[1:]))


async def _rows(conn: asyncpg.Connection, tables: GenerationTables, keys: Sequence[str]) -> dict[str, Any]:
    """The keys' rows (as text keys): each key's row, then its child rows in child-key order, table by table."""
    found: dict[str, Any] = {}
    for number, table in enumerate(tables.all):
        shape = table.shape
        statement = _ROWS_AS_TEXT.format(
            key=quote(shape.key_column),
            table=table.qualified,
            key_type=shape.key_sql_type,
            order=", ".join(quote(c) for c in (shape.key_column, *shape.child_key)),
        )
        for record in await conn.fetch(statement, list(keys)):
            values = dict(record)
            key = values.pop("rh_key")
            if number == 0:
                found[key] = [values]
            elif key in found:
                found[key].append((shape.name, values))
    return found


def _problem(before: dict[str, Any], after: dict[str, Any], key: str) -> str:
    if key not in before:
        return "missing in live"
    if key not in after:
        return "missing in rebuild"
    return "differs"
