"""The snapshots table: the newest state of an aggregate per stream, beside the events it was folded from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from rehydrate.core.identifiers import check_identifier, quote


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An aggregate's state after `stream_version` events, and what wrote it (state version, code fingerprint)."""

    stream_id: str
    aggregate_type: str
    stream_version: int
    state: dict[str, Any]
    state_version: int
    fingerprint: str


_COLUMNS = "stream_id, aggregate_type, stream_version, state, state_version, fingerprint"
_GET = "SELECT " + _COLUMNS + " FROM {snapshots} WHERE stream_id = $1 AND aggregate_type = $2"
# A snapshot replaces its stream's unless that one is newer and written by the same code.
_PUT = """INSERT INTO {snapshots} (stream_id, aggregate_type, stream_version, state, state_version, fingerprint)
    SELECT s, a, v, st::jsonb, sv, f
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::int[], $6::text[]) AS u(s, a, v, st, sv, f)
    ON CONFLICT (stream_id, aggregate_type) DO UPDATE
    SET stream_version = excluded.stream_version, state = excluded.state,
        state_version = excluded.state_version, fingerprint = excluded.fingerprint, created_at = now()
    WHERE snapshots.stream_version <= excluded.stream_version
       OR snapshots.state_version <> excluded.state_version
       OR snapshots.fingerprint <> excluded.fingerprint"""
_ALL = "SELECT " + _COLUMNS + " FROM {snapshots} WHERE aggregate_type = $1 ORDER BY stream_id"


class SnapshotStore:
    """Reads and writes snapshots; one row per (stream, aggregate type), replaced by newer ones."""

    def __init__(self, pool: asyncpg.Pool, schema: str = "rehydrate") -> None:
        self.pool = pool
        self.table = f"{quote(check_identifier(schema, 'schema name'))}.snapshots"

    async def get(self, stream_id: str, aggregate_type: str) -> Snapshot | None:
        row = await self.pool.fetchrow(_GET.format(snapshots=self.table), stream_id, aggregate_type)
        return None if row is None else Snapshot(*row)

    async def put(self, conn: asyncpg.Connection, snapshots: Sequence[Snapshot]) -> None:
        """Write snapshots, each replacing its stream's unless that one is newer and written by the same code."""
        if not snapshots:
            return
        await conn.execute(
            _PUT.format(snapshots=self.table),
            [s.stream_id for s in snapshots],
            [s.aggregate_type for s in snapshots],
            [s.stream_version for s in snapshots],
            # JSON as text, so that a caller's own connection needs no codec.
            [orjson.dumps(s.state).decode() for s in snapshots],
            [s.state_version for s in snapshots],
            [s.fingerprint for s in snapshots],
        )

    async def all(self, aggregate_type: str) -> list[Snapshot]:
        rows = await self.pool.fetch(_ALL.format(snapshots=self.table), aggregate_type)
        return [Snapshot(*row) for row in rows]
