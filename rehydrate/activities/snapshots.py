"""The bulk snapshot rebuild's activities: plan the partitions, then fold and snapshot one chunk of streams at a time,
each chunk's snapshots and its partition's cursor in one transaction."""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from rehydrate.activities._common import Activities, user_errors_fail_the_run
from rehydrate.core.limits import MAX_PARTITIONS, check_range
from rehydrate.core.settings import Settings
from rehydrate.engine.aggregates import AggregateRegistry
from rehydrate.engine.catalog import Catalog
from rehydrate.engine.snapshots import SnapshotStore
from rehydrate.models import (
    PartitionState,
    SnapshotChunkInput,
    SnapshotChunkResult,
    SnapshotPlan,
    SnapshotPlanInput,
)
from rehydrate.sources.events import Event


class SnapshotActivities(Activities):
    """The bulk snapshot rebuild's activities, with the worker's aggregate types."""

    def __init__(self, pool: asyncpg.Pool, aggregates: AggregateRegistry, settings: Settings) -> None:
        super().__init__(pool, settings)
        self.aggregates = aggregates
        self.snapshots = SnapshotStore(pool, settings.schema_name)

    @activity.defn(name="rehydrate.plan_snapshots")
    @user_errors_fail_the_run
    async def plan_snapshots(self, input: SnapshotPlanInput) -> SnapshotPlan:
        """Create the rebuild's partition cursors (kept on retry) and count the aggregate type's streams."""
        aggregate = self.aggregates.get(input.aggregate_type)
        check_range("partitions", input.partitions, 1, MAX_PARTITIONS)
        async with self.connection() as conn, conn.transaction():
            rows = await Catalog(conn, self.settings.schema_name).start_partitions(
                input.rebuild_id, input.aggregate_type, input.partitions
            )
            source = await self.sources.of(aggregate.event_source)
            async with source.reading(conn) as reading:
                total = await source.count_streams(reading, prefix=aggregate.stream_prefix)
        return SnapshotPlan(total, [PartitionState(*row) for row in rows])

    @activity.defn(name="rehydrate.snapshot_chunk")
    @user_errors_fail_the_run
    async def snapshot_chunk(self, input: SnapshotChunkInput) -> SnapshotChunkResult:
        """Snapshot the partition's next `chunk_size` streams and move its cursor, in one transaction.

        A retry (after a crash between commit and acknowledgement, or a killed worker) starts from the committed
        cursor: a chunk done twice writes the same snapshots again, which changes nothing.
        """
        aggregate = self.aggregates.get(input.aggregate_type)
        async with self.connection() as conn, conn.transaction():
            catalog = Catalog(conn, self.settings.schema_name)
            cursor = await catalog.lock_partition(input.rebuild_id, input.partition)
            if cursor is None:
                raise ApplicationError(
                    f"snapshot rebuild {input.rebuild_id} has no partition {input.partition}", non_retryable=True
                )
            if cursor["done"]:
                return SnapshotChunkResult(cursor["after_stream"], cursor["streams_done"], 0, True)
            source = await self.sources.of(aggregate.event_source)
            async with source.reading(conn) as reading:
                streams = await source.streams_after(
                    reading,
                    prefix=aggregate.stream_prefix,
                    after=cursor["after_stream"],
                    limit=input.chunk_size,
                    partition=input.partition,
                    partitions=input.partitions,
                )
                activity.heartbeat(f"{len(streams)} streams after {cursor['after_stream']!r}")
                events = await source.read_streams_by_id(reading, streams)
            snapshots = [
                aggregate.new(stream_id).fold(stream_events).to_snapshot()
                for stream_id, stream_events in groupby(events, key=_stream_of)
            ]
            await self.snapshots.put(conn, snapshots)
            after = streams[-1] if streams else cursor["after_stream"]
            done_count = cursor["streams_done"] + len(streams)
            done = len(streams) < input.chunk_size
            await catalog.save_partition(
                input.rebuild_id, input.partition, after_stream=after, streams_done=done_count, done=done
            )
        return SnapshotChunkResult(after, done_count, len(streams), done)

    def all(self) -> list[Callable[..., Any]]:
        return [self.plan_snapshots, self.snapshot_chunk]


def _stream_of(event: Event) -> str:
    return event.stream_id
