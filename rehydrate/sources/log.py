"""A log as a history: a source whose events live in partitions (Kafka's partitions, Kinesis's shards), each an ordered
sequence of offsets.

Order exists only inside a partition (a producer's key picks it), so a replay's lane is a partition and its checkpoint
the next offset to read, with the log's own cursor when an offset alone cannot say where to go on (a Kinesis shard's
position is the ordinal of its next record, its cursor the sequence number of the last one read). The target of a
build is each partition's end at plan time where the log knows it (Kafka's end offsets); where it does not (an open
Kinesis shard), the build reads up to the plan's time and the catch-up goes on from there. A catch-up or a tail moves
each lane to its partition's end of the moment. A partition may have parents (a resharded Kinesis stream's closed
shards): a key's records in a parent precede its records in the child, so a child's lane starts once its parents'
lanes are done. What the engine needs of such a source is here; `kafka` and `kinesis` implement it (imported only
when such a source is used, so that their clients stay optional dependencies).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rehydrate.core.errors import UserError
from rehydrate.sources.events import Event

# An event's position in a log: partition × 2**40 + offset, unique across the topic (dead letters are keyed by it).
OFFSET_BITS = 40


def log_position(partition: int, offset: int) -> int:
    return (partition << OFFSET_BITS) + offset


def partition_offset(position: int) -> tuple[int, int]:
    """The (partition, offset) of a log event's position."""
    return position >> OFFSET_BITS, position & ((1 << OFFSET_BITS) - 1)


@dataclass(frozen=True)
class PartitionRange:
    """What a partition holds: its first offset still kept, and its end (the offset after its last readable one; None
    when the log does not know it without reading: an open Kinesis shard). `name`: the partition's id in the log when
    its number is not (a Kinesis shard id); `parents`: the partitions read to their end before this one; `closed`: it
    takes no more records."""

    partition: int
    earliest: int
    end: int | None
    name: str | None = None
    parents: tuple[int, ...] = ()
    closed: bool = False


@dataclass
class LogRead:
    """What one read of a partition's range gave: its events in order, the offset to go on from with the log's cursor
    for it (None where the offset is enough: Kafka), and whether the range is read to its end: `end` reached, or
    (with no `end`) the partition's end, its tip or the `until` of the read."""

    events: list[Event]
    position: int
    cursor: str | None = None
    ended: bool = False


def history_problems(topic: str, ranges: Sequence[PartitionRange], cleanup_policy: str) -> list[str]:
    """Why the topic does not hold its whole history (empty: it does): retention deleted the start of a partition, or
    compaction keeps only each key's latest record."""
    problems = []
    truncated = [r for r in ranges if r.earliest > 0]
    if truncated:
        shown = ", ".join(f"{r.partition} (from offset {r.earliest})" for r in truncated[:8])
        problems.append(f"topic {topic!r} no longer holds the start of partition(s) {shown}: retention deleted it")
    if "compact" in cleanup_policy:
        problems.append(f"topic {topic!r} is compacted (cleanup.policy={cleanup_policy}): it keeps each key's latest")
    return problems


def check_lanes(
    name: str, ranges: Sequence[PartitionRange], lanes: Sequence[Mapping[str, Any]]
) -> dict[int, int | None]:
    """The end to read each lane of a generation up to now (None: the partition's tip), once sure that the log's
    partitions are still those its lanes were planned on; lanes whose partition is gone are left out (a Kinesis
    shard closed before the plan, read to its end, that retention has since removed)."""
    named = {r.name: r for r in ranges if r.name is not None}
    if not named and all(lane["partition_name"] is None for lane in lanes):
        check_partitions(name, len(ranges), len(lanes))
        return {lane["lane"]: r.end for r, lane in zip(ranges, lanes, strict=True)}
    planned = {lane["partition_name"] for lane in lanes}
    added = sorted(set(named) - planned)
    if added:
        raise UserError(
            f"source {name!r}: the stream has shard(s) {', '.join(added[:8])} that the generation was not planned "
            f"on: it was resharded since (its lanes are the shards {', '.join(sorted(map(str, planned))[:8])})",
            fix="a key's new records are in the new shards: rebuild the projection with a new replay",
        )
    return {lane["lane"]: named[lane["partition_name"]].end for lane in lanes if lane["partition_name"] in named}


def check_partitions(name: str, found: int, built_with: int) -> None:
    """Refuse a topic whose partition count is not the one a generation's lanes were planned on: keys have moved
    between partitions, so the lanes' offsets no longer say what was read."""
    if found != built_with:
        raise UserError(
            f"source {name!r}: the topic has {found} partition(s), the generation was built from {built_with}",
            fix="keys now map to other partitions: rebuild the projection with a new replay",
        )


class PartitionReader(ABC):
    """One reader of a log's partitions at a time (a chunk's, a catch-up's)."""

    @abstractmethod
    async def read_range(
        self,
        partition: int,
        start: int,
        end: int | None,
        limit: int,
        *,
        cursor: str | None = None,
        name: str | None = None,
        until: datetime | None = None,
    ) -> LogRead:
        """At most `limit` events of `partition` from offset `start` (and the log's `cursor` for it), below `end`, in
        offset order; the offset (and cursor) to go on from, `end` once the range is read. `end` None: up to the
        partition's end or its tip; `until`: a log without ends known at plan time (Kinesis) also stops at the first
        record of an open partition that arrived after it. `name`: the partition's id in the log, as planned."""


class LogSource(ABC):
    """A partitioned log that projections read: its name, what its partitions hold, readers of offset ranges."""

    name: str
    noun = "topic"  # what users call the log, in messages
    holds_whole_history = "every partition starts at offset 0, none is compacted"  # what `sources check` says of it

    @abstractmethod
    async def ranges(self) -> list[PartitionRange]:
        """Each partition's earliest offset and its end, as they are now."""

    @abstractmethod
    async def check_history(self, *, accept_partial: bool = False) -> tuple[list[PartitionRange], list[str]]:
        """The partitions' ranges, once sure the log holds its whole history; with `accept_partial`, also when it
        does not, and why not (a UserError otherwise)."""

    @abstractmethod
    async def close(self) -> None:
        """Close its connections."""

    @abstractmethod
    def reader(self) -> contextlib.AbstractAsyncContextManager[PartitionReader]:
        """A reader for one task; readers are not shared between concurrent tasks."""

    async def lag(self, lanes: Sequence[Mapping[str, Any]]) -> int | None:
        """The offsets the `lanes` (a generation's, in partition order) have still to read; None when the log cannot
        tell without reading (Kinesis)."""
        ranges = await self.ranges()
        return sum(max(0, (r.end or 0) - int(lane["position"])) for r, lane in zip(ranges, lanes, strict=False))

    async def read_keys(self, keys: Sequence[str], upto: Sequence[Mapping[str, Any]]) -> list[Event]:
        """Every event of the streams `keys` below each lane's position in `upto` (a generation's lanes, in partition
        order: a partition's parents come first), partition by partition, each in offset order. A key's partition is
        the producer's choice, so every partition is read (a repair, not a replay)."""
        wanted = set(keys)
        found: list[Event] = []
        async with self.reader() as reader:
            for lane in upto:
                at, end = 0, lane["position"]
                cursor: str | None = None
                while at < end:
                    read = await reader.read_range(
                        lane["lane"], at, end, 50_000, cursor=cursor, name=lane["partition_name"]
                    )
                    found += [e for e in read.events if e.stream_id in wanted]
                    if read.ended or (read.position == at and not read.events):
                        break
                    at, cursor = read.position, read.cursor
        return found

    async def batches(
        self,
        reader: PartitionReader,
        partition: int,
        start: int,
        end: int | None,
        limit: int,
        slice: int,
        *,
        cursor: str | None = None,
        name: str | None = None,
        until: datetime | None = None,
    ) -> AsyncIterator[LogRead]:
        """At most `limit` events of a partition's range, `slice` at a time, each read with the offset and cursor to go
        on from; the last one says whether the range is read to its end."""
        read = 0
        while read < limit:
            got = await reader.read_range(
                partition, start, end, min(slice, limit - read), cursor=cursor, name=name, until=until
            )
            read += len(got.events)
            start, cursor = got.position, got.cursor
            yield got
            if got.ended:
                return
