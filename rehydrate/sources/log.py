"""A log as a history: a source whose events live in partitions (Kafka's), each an ordered sequence of offsets.

Order exists only inside a partition (a producer's key picks it), so a replay's lane is a partition and its checkpoint
the next offset to read; the target of a build is each partition's end at plan time, and a catch-up or a tail moves
each lane to its partition's end of the moment. What the engine needs of such a source is here; `kafka` implements
it (imported only when a Kafka source is used, so that aiokafka stays an optional dependency).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

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
    """What a partition holds: its first offset still kept, and its end (the offset after its last readable one)."""

    partition: int
    earliest: int
    end: int


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
    async def read_range(self, partition: int, start: int, end: int, limit: int) -> tuple[list[Event], int]:
        """At most `limit` events of `partition` from offset `start`, below `end`, in offset order; and the offset to
        go on from (`end` once the range is read)."""


class LogSource(ABC):
    """A partitioned log that projections read: its name, what its partitions hold, readers of offset ranges."""

    name: str

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

    async def read_keys(
        self, keys: Sequence[str], upto: Sequence[int], starts: Sequence[int] | None = None
    ) -> list[Event]:
        """Every event of the streams `keys` below each partition's offset in `upto`, partition by partition, each in
        offset order. A key's partition is the producer's choice, so every partition is read (a repair, not a
        replay)."""
        wanted = set(keys)
        found: list[Event] = []
        async with self.reader() as reader:
            for partition, end in enumerate(upto):
                at = 0 if starts is None else starts[partition]
                while at < end:
                    events, at = await reader.read_range(partition, at, end, 50_000)
                    found += [e for e in events if e.stream_id in wanted]
        return found

    async def batches(
        self, reader: PartitionReader, partition: int, start: int, end: int, limit: int, slice: int
    ) -> AsyncIterator[tuple[list[Event], int]]:
        """At most `limit` events of a partition's range, `slice` at a time, each with the offset to go on from."""
        read = 0
        position = start
        while position < end and read < limit:
            events, position = await reader.read_range(partition, position, end, min(slice, limit - read))
            read += len(events)
            yield events, position
