"""The bulk snapshot rebuild's activities: plan the partitions, then fold and snapshot one chunk of streams at a time,
each chunk's snapshots and its partition's cursor in one transaction."""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from rehydrate.aggregates import AggregateRegistry
from rehydrate.errors import UserError
from rehydrate.identifiers import quote
from rehydrate.models import (
    PartitionState,
    SnapshotChunkInput,
    SnapshotChunkResult,
    SnapshotPlan,
    SnapshotPlanInput,
)
from rehydrate.settings import Settings
from rehydrate.snapshots import SnapshotStore
from rehydrate.store import EventStore


class SnapshotActivities:
    """Holds the worker's pool and aggregate types; each method is one activity."""

    def __init__(self, pool: asyncpg.Pool, aggregates: AggregateRegistry, settings: Settings) -> None:
        self.pool = pool
        self.aggregates = aggregates
        self.schema = settings.schema_name
        self.store = EventStore(pool, self.schema)
        self.snapshots = SnapshotStore(pool, self.schema)
        self.rebuilds = f"{quote(self.schema)}.snapshot_rebuilds"

    @activity.defn(name="rehydrate.plan_snapshots")
    async def plan_snapshots(self, input: SnapshotPlanInput) -> SnapshotPlan:
        """Create the rebuild's partition cursors (kept on retry) and count the aggregate type's streams."""
        try:
            aggregate = self.aggregates.get(input.aggregate_type)
            if not 1 <= input.partitions <= 256:
                raise UserError(f"partitions={input.partitions} is out of range", fix="use 1 to 256 partitions")
        except UserError as error:
            raise ApplicationError(str(error), type=type(error).__name__, non_retryable=True) from None
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"""INSERT INTO {self.rebuilds} (rebuild_id, aggregate_type, partition)
                    SELECT $1, $2, p FROM generate_series(0, $3 - 1) AS p
                    ON CONFLICT (rebuild_id, partition) DO NOTHING""",
                input.rebuild_id,
                input.aggregate_type,
                input.partitions,
            )
            rows = await conn.fetch(
                f"""SELECT partition, after_stream, streams_done, done FROM {self.rebuilds}
                    WHERE rebuild_id = $1 ORDER BY partition""",
                input.rebuild_id,
            )
            total = await self.store.count_streams(conn, prefix=aggregate.stream_prefix)
        return SnapshotPlan(total, [PartitionState(*row) for row in rows])

    @activity.defn(name="rehydrate.snapshot_chunk")
    async def snapshot_chunk(self, input: SnapshotChunkInput) -> SnapshotChunkResult:
        """Snapshot the partition's next `chunk_size` streams and move its cursor, in one transaction.

        A retry (after a crash between commit and acknowledgement, or a killed worker) starts from the committed
        cursor: a chunk done twice writes the same snapshots again, which changes nothing.
        """
        try:
            aggregate = self.aggregates.get(input.aggregate_type)
        except UserError as error:
            raise ApplicationError(str(error), type=type(error).__name__, non_retryable=True) from None
        async with self.pool.acquire() as conn, conn.transaction():
            # The row lock makes a retry wait for a zombie attempt of the same partition.
            cursor = await conn.fetchrow(
                f"""SELECT after_stream, streams_done, done FROM {self.rebuilds}
                    WHERE rebuild_id = $1 AND partition = $2 FOR UPDATE""",
                input.rebuild_id,
                input.partition,
            )
            if cursor is None:
                raise ApplicationError(
                    f"snapshot rebuild {input.rebuild_id} has no partition {input.partition}", non_retryable=True
                )
            if cursor["done"]:
                return SnapshotChunkResult(cursor["after_stream"], cursor["streams_done"], 0, True)
            streams = await self.store.streams_after(
                conn,
                prefix=aggregate.stream_prefix,
                after=cursor["after_stream"],
                limit=input.chunk_size,
                partition=input.partition,
                partitions=input.partitions,
            )
            activity.heartbeat(f"{len(streams)} streams after {cursor['after_stream']!r}")
            events = await self.store.read_streams_by_id(conn, streams)
            snapshots = []
            try:
                for stream_id, stream_events in groupby(events, key=_stream_of):
                    snapshots.append(aggregate.new(stream_id).fold(stream_events).to_snapshot())
            except UserError as error:
                raise ApplicationError(str(error), type=type(error).__name__, non_retryable=True) from None
            await self.snapshots.put(conn, snapshots)
            after = streams[-1] if streams else cursor["after_stream"]
            done_count = cursor["streams_done"] + len(streams)
            done = len(streams) < input.chunk_size
            await conn.execute(
                f"""UPDATE {self.rebuilds} SET after_stream = $3, streams_done = $4, done = $5, updated_at = now()
                    WHERE rebuild_id = $1 AND partition = $2""",
                input.rebuild_id,
                input.partition,
                after,
                done_count,
                done,
            )
        return SnapshotChunkResult(after, done_count, len(streams), done)

    def all(self) -> list[Callable[..., Any]]:
        return [self.plan_snapshots, self.snapshot_chunk]


def _stream_of(event: Any) -> str:
    return str(event.stream_id)
