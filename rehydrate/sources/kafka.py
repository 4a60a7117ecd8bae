"""Reading a Kafka topic as a history: its partitions, what each holds from its beginning to its end, one partition's
offset range as events, and whether the topic still holds its whole history.

A topic is a history only in part. Order exists per partition (a producer's key picks the partition), so a
partition is a lane and an offset is its position; the end of a partition is the first offset a `read_committed`
consumer cannot read yet (the last stable offset: a transaction still open, or aborted, never reaches a read model).
Offsets are not consecutive (transaction markers, compacted records), so a range `[start, end)` is read until the
consumer's position reaches `end`, never by counting records. Nothing here commits a consumer group's offsets: where
a read stopped is the caller's to keep (with the rows it wrote).

The client is aiokafka: asyncio-native like the rest of rehydrate's I/O, so a chunk awaits Kafka and Postgres on one
event loop; confluent-kafka reads faster through librdkafka but offers no asyncio consumer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from rehydrate.core.errors import UserError
from rehydrate.sources.events import Event, UndecodablePayload

# A value decoder: the message's value (bytes) and its event type → the JSON object handlers see.
Decoder = Callable[[bytes, str], dict[str, Any]]

_FETCH_WAIT_MS = 500  # how long one fetch waits for records that must be there (below the end taken before)
_STALLED_MS = 30_000  # no progress for this long below a known end: an error (retried), not a wait for ever


@dataclass(frozen=True)
class KafkaTopic:
    """A topic and how each of its messages reads as an event: the key is the stream id, the value the payload (JSON,
    or `decode`), the timestamp the recorded-at; the event type comes from a header or a payload field, the stream
    version from a header when the producer writes one (else the offset orders a stream)."""

    topic: str
    type_header: str | None = "event_type"
    type_field: str | None = None  # used when the message has no type header
    version_header: str | None = None
    decode: Decoder | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.topic:
            raise UserError("a Kafka source names no topic", fix="give topic=")
        if self.type_header is None and self.type_field is None:
            raise UserError(
                f"topic {self.topic!r}: no way to read an event's type", fix="give type_header= or type_field="
            )


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


class KafkaLog:
    """The messages of one topic, read by offset ranges. `bootstrap_servers` is what aiokafka takes
    ("host:port[,host:port]"). Open it with `async with`, or `start` and `close`."""

    def __init__(self, bootstrap_servers: str, topic: KafkaTopic, name: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.mapping = topic
        self.name = name
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> KafkaLog:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=None,  # no consumer group: offsets are kept with the rows, never committed to Kafka
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="none",  # a position that no longer exists is an error, not a silent jump
        )
        try:
            await consumer.start()
        except KafkaError as error:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise UserError(
                f"source {self.name!r}: Kafka at {self.bootstrap_servers} cannot be reached ({type(error).__name__})",
                fix="check the source's bootstrap servers and that the broker runs",
            ) from None
        self._consumer = consumer

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("KafkaLog used before start()")
        return self._consumer

    # -- what the topic holds ---------------------------------------------------------------------------------

    async def partitions(self) -> list[int]:
        """The topic's partitions, in order; a UserError when the topic does not exist."""
        await self.consumer.topics()  # fetches the cluster's metadata afresh
        partitions = self.consumer.partitions_for_topic(self.mapping.topic)
        if not partitions:
            raise UserError(
                f"source {self.name!r}: topic {self.mapping.topic!r} does not exist at {self.bootstrap_servers}",
                fix="check the topic's name in the source",
            )
        return sorted(partitions)

    async def ranges(self) -> list[PartitionRange]:
        """Each partition's earliest offset and its end, as a `read_committed` consumer sees them now."""
        tps = [TopicPartition(self.mapping.topic, p) for p in await self.partitions()]
        earliest = await self.consumer.beginning_offsets(tps)
        ends = await self.consumer.end_offsets(tps)
        return [PartitionRange(tp.partition, int(earliest[tp]), int(ends[tp])) for tp in tps]

    async def cleanup_policy(self) -> str:
        """The topic's cleanup.policy ("delete" when the broker does not say)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
        await admin.start()
        try:
            responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, self.mapping.topic)])
        finally:
            await admin.close()
        for response in responses:
            for resource in response.resources:
                for entry in resource[4]:
                    if entry[0] == "cleanup.policy":
                        return str(entry[1])
        return "delete"

    async def check_history(self, *, accept_partial: bool = False) -> list[PartitionRange]:
        """The partitions' ranges, once sure the topic holds its whole history (or `accept_partial`): a rebuild from
        a truncated or compacted topic would be a read model of part of the history, silently."""
        ranges = await self.ranges()
        problems = history_problems(self.mapping.topic, ranges, await self.cleanup_policy())
        if problems and not accept_partial:
            raise UserError(
                "; ".join(problems),
                fix="rebuild from a topic that keeps its whole history (retention.ms=-1, cleanup.policy=delete), or "
                "accept a partial history explicitly",
            )
        return ranges

    # -- reading ------------------------------------------------------------------------------------------------

    async def read_range(self, partition: int, start: int, end: int, limit: int) -> tuple[list[Event], int]:
        """At most `limit` events of `partition` from offset `start`, below `end`, in offset order; and the offset to
        go on from (`end` once the range is read). Stops when the position reaches `end`, whatever the offsets
        between (transaction markers and compacted records take offsets and hold no event)."""
        if start >= end:
            return [], start
        tp = TopicPartition(self.mapping.topic, partition)
        consumer = self.consumer
        consumer.assign([tp])
        consumer.seek(tp, start)
        events: list[Event] = []
        position, idle = start, 0
        while position < end and len(events) < limit:
            batch = await consumer.getmany(tp, timeout_ms=_FETCH_WAIT_MS, max_records=limit - len(events))
            records = batch.get(tp, [])
            for record in records:
                if record.offset >= end:
                    return events, end
                events.append(self._event(record))
                position = record.offset + 1
            if records:
                idle = 0
                continue
            moved = await consumer.position(tp)  # past offsets that hold no event (markers, aborted records)
            idle = 0 if moved > position else idle + 1
            position = max(position, moved)
            if idle * _FETCH_WAIT_MS >= _STALLED_MS:
                raise UserError(
                    f"source {self.name!r}: partition {partition} of {self.mapping.topic!r} gave nothing from offset "
                    f"{position} for {_STALLED_MS // 1000} s, below its end {end}",
                    fix="check the broker; the read goes on from this offset when retried",
                )
        return events, min(position, end)

    def _event(self, record: Any) -> Event:
        headers = {key: value for key, value in record.headers or ()}
        stream = record.key.decode() if record.key is not None else ""
        payload: dict[str, Any]
        event_type = _text(headers.get(self.mapping.type_header)) if self.mapping.type_header else None
        try:
            value = record.value if record.value is not None else b"{}"
            if self.mapping.decode is not None:
                payload = self.mapping.decode(value, event_type or "")
            else:
                payload = orjson.loads(value)
            if not isinstance(payload, dict):
                raise TypeError(f"it decoded to {type(payload).__name__}, not a JSON object")
        except Exception as error:  # a user's decoder: whatever it raises is named, and the event parked or stopped on
            payload = UndecodablePayload(
                f"source {self.name!r} could not decode the value at partition {record.partition}, offset "
                f"{record.offset}: {type(error).__name__}: {error}"
            )
        if event_type is None and self.mapping.type_field is not None:
            event_type = str(payload.get(self.mapping.type_field, ""))
        version_text = _text(headers.get(self.mapping.version_header)) if self.mapping.version_header else None
        version = int(version_text) if version_text and version_text.isdigit() else record.offset
        at = datetime.fromtimestamp(record.timestamp / 1000, UTC)
        return Event(record.offset, stream, version, event_type or "", 1, payload, {}, at)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode(errors="replace")
