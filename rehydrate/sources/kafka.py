"""Reading a Kafka topic as a history: its partitions, what each holds from its beginning to its end, one partition's
offset range as events, and whether the topic still holds its whole history.

A topic is a history only in part. Order exists per partition (a producer's key picks the partition), so a
partition is a lane and an offset is its position; the end of a partition is the first offset a `read_committed`
consumer cannot read yet (the last stable offset: a transaction still open, or aborted, never reaches a read model).
Offsets are not consecutive (transaction markers, compacted records), so a range `[start, end)` is read until the
consumer's position reaches `end`, never by counting records. Nothing here commits a consumer group's offsets: where
a read stopped is the caller's to keep (with the rows it wrote). An event's position is partition × 2**40 + offset.

The client is aiokafka: asyncio-native like the rest of rehydrate's I/O, so a chunk awaits Kafka and Postgres on one
event loop; confluent-kafka reads faster through librdkafka but offers no asyncio consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, OffsetOutOfRangeError

from rehydrate.core.errors import SourceUnavailable, UserError
from rehydrate.sources.declaration import KafkaSource
from rehydrate.sources.events import Event, UndecodablePayload
from rehydrate.sources.log import LogRead, LogSource, PartitionRange, PartitionReader, history_problems, log_position
from rehydrate.sources.mapping import KafkaTopic

_FETCH_WAIT_MS = 500  # how long one fetch waits for records that must be there (below the end taken before)
_STALLED_MS = 30_000  # no progress for this long below a known end: an error (retried), not a wait for ever
_IDLE_CONSUMERS = 8  # consumers kept open for the next reader, per source and process


class KafkaLog(LogSource):
    """The messages of one topic, read by offset ranges. Open it with `async with`, or `start` and `close`; each
    concurrent task takes a `reader()` (a consumer of its own, kept open for the next task)."""

    def __init__(self, source: KafkaSource) -> None:
        self.source = source
        self.name = source.name
        self.mapping: KafkaTopic = source.topic
        self.bootstrap_servers = source.servers
        self._idle: list[AIOKafkaConsumer] = []
        self._meta: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> KafkaLog:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect (a UserError naming the brokers when they cannot be reached)."""
        self._meta = await self._consumer()

    async def close(self) -> None:
        consumers, self._idle = self._idle, []
        if self._meta is not None:
            consumers.append(self._meta)
            self._meta = None
        for consumer in consumers:
            await _stop(consumer)

    async def _consumer(self) -> AIOKafkaConsumer:
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
            raise SourceUnavailable(
                f"source {self.name!r}: Kafka at {self.bootstrap_servers} cannot be reached ({type(error).__name__}); "
                f"check its bootstrap servers (or REHYDRATE_SOURCE_{self.name.upper()}_BOOTSTRAP_SERVERS) and that "
                "the broker runs"
            ) from None
        return consumer

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._meta is None:
            raise RuntimeError("KafkaLog used before start()")
        return self._meta

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[PartitionReader]:
        reader = _Reader(self)
        healthy = False
        try:
            yield reader
            healthy = True
        finally:
            consumer = reader.taken
            if consumer is None:
                pass
            elif healthy and len(self._idle) < _IDLE_CONSUMERS and self._meta is not None:
                self._idle.append(consumer)  # the next read assigns its own partition
            else:  # a read that failed may leave the consumer mid-fetch: a fresh one next time
                await _stop(consumer)

    # -- what the topic holds ---------------------------------------------------------------------------------

    async def partitions(self) -> list[int]:
        """The topic's partitions, in order; a UserError when the topic does not exist."""
        try:
            await self.consumer.topics()  # fetches the cluster's metadata afresh
        except KafkaError as error:
            raise SourceUnavailable(
                f"source {self.name!r}: Kafka at {self.bootstrap_servers} does not answer ({type(error).__name__})"
            ) from None
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

    async def check_history(self, *, accept_partial: bool = False) -> tuple[list[PartitionRange], list[str]]:
        """The partitions' ranges, once sure the topic holds its whole history, and (with `accept_partial`) why it
        does not: a rebuild from a truncated or compacted topic would be a read model of part of the history."""
        ranges = await self.ranges()
        problems = history_problems(self.mapping.topic, ranges, await self.cleanup_policy())
        if problems and not accept_partial:
            raise UserError(
                "; ".join(problems),
                fix="rebuild from a topic that keeps its whole history (retention.ms=-1, cleanup.policy=delete), or "
                "accept a partial history explicitly (replay start --accept-partial-history)",
            )
        return ranges, problems

    def events(self, records: Sequence[Any]) -> list[Event]:
        """The events messages read as: one loop, the headers it needs looked up, a timestamp's datetime made once
        for the messages that share it (a producer's batch does)."""
        mapping = self.mapping
        type_header, version_header, type_field = mapping.type_header, mapping.version_header, mapping.type_field
        decode, loads = mapping.decode, orjson.loads
        events: list[Event] = []
        last_ms, at = -1, datetime.fromtimestamp(0, UTC)
        for record in records:
            event_type = version_text = None
            for key, raw in record.headers or ():
                if key == type_header:
                    event_type = raw.decode(errors="replace")
                elif key == version_header:
                    version_text = raw.decode(errors="replace")
            value = record.value if record.value is not None else b"{}"
            try:
                payload = loads(value) if decode is None else decode(value, event_type or "")
                if not isinstance(payload, dict):
                    raise TypeError(f"it decoded to {type(payload).__name__}, not a JSON object")
            except Exception as error:  # a user's decoder: whatever it raises is named; parked or stopped on
                payload = UndecodablePayload(
                    f"source {self.name!r} could not decode the value at partition {record.partition}, offset "
                    f"{record.offset}: {type(error).__name__}: {error}"
                )
            if event_type is None and type_field is not None:
                event_type = str(payload.get(type_field, ""))
            # A version a producer wrote (ASCII digits); else the offset, which orders the partition's messages too.
            version = int(version_text) if version_text and version_text.isascii() and version_text.isdigit() else 0
            stream_id, problem = _stream_id(record.key)
            part = "key"
            if problem is None and version > _MAX_VERSION:
                problem, part = f"its {version_header} header {(version_text or '')[:30]!r} is out of range", "version"
            if problem is None and not event_type:
                problem, part = f"it has no type: no {type_header!r} header", "type"
                problem += f" and no {type_field!r} field" if type_field else ""
                event_type = ""
            if problem is not None and type(payload) is not UndecodablePayload:
                # Parked or stopped on where its type has a handler; a strict projection names it too.
                payload = UndecodablePayload(
                    f"source {self.name!r}: the message at partition {record.partition}, offset {record.offset} "
                    f"cannot be read as an event: {problem}",
                    part,
                )
            if record.timestamp != last_ms:
                last_ms, at = record.timestamp, datetime.fromtimestamp(record.timestamp / 1000, UTC)
            events.append(
                Event(
                    log_position(record.partition, record.offset),
                    stream_id,
                    version if 0 < version <= _MAX_VERSION else record.offset + 1,
                    event_type or "",
                    1,
                    payload,
                    {},
                    at,
                )
            )
        return events


_MAX_VERSION = 2**63 - 1


def _stream_id(key: bytes | None) -> tuple[str, str | None]:
    """A message's stream id, read from its key, and why it cannot be one (None: it can). Without a key a producer
    spreads a stream's messages over partitions, where their order is lost."""
    if not key:
        return "", "it has no key: a producer must key each message by its stream id"
    try:
        text, problem = key.decode(), None
    except UnicodeDecodeError:
        text, problem = key.decode(errors="backslashreplace"), "its key is not UTF-8 text"
    if "\x00" in text:  # Postgres text cannot hold it: shown escaped, as the stream id of the dead letter
        text, problem = text.replace("\x00", "\\x00"), problem or "its key holds a NUL character"
    return text, problem


class _Reader(PartitionReader):
    """A consumer of the log's, taken at the first read that needs one."""

    def __init__(self, log: KafkaLog) -> None:
        self.log = log
        self.taken: AIOKafkaConsumer | None = None
        # Where the consumer goes on from, when a read left it there: the next read of that offset neither assigns
        # nor seeks, so the records the consumer fetched ahead are kept (a chunk reads its range slice by slice).
        self._next: tuple[TopicPartition, int] | None = None

    async def _consumer(self) -> AIOKafkaConsumer:
        if self.taken is None:
            log = self.log
            self.taken = log._idle.pop() if log._idle else await log._consumer()
        return self.taken

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
        """Stops when the position reaches `end`, whatever the offsets between (transaction markers and compacted
        records take offsets and hold no event). An offset says where to go on: no cursor; a partition's end is known,
        so `until` is not needed."""
        if end is None:
            raise ValueError("a Kafka partition is read up to an end offset")
        events, position = await self._read(partition, start, end, limit)
        return LogRead(events, position, None, position >= end)

    async def _read(self, partition: int, start: int, end: int, limit: int) -> tuple[list[Event], int]:
        if start >= end:
            return [], start
        log = self.log
        tp = TopicPartition(log.mapping.topic, partition)
        consumer = await self._consumer()
        if self._next is None or self._next[0] != tp:
            consumer.assign([tp])
        if self._next != (tp, start):
            consumer.seek(tp, start)
        self._next = None  # unknown until this read ends well
        events: list[Event] = []
        position, idle = start, 0
        try:
            while position < end and len(events) < limit:
                batch = await consumer.getmany(tp, timeout_ms=_FETCH_WAIT_MS, max_records=limit - len(events))
                records = batch.get(tp, [])
                if records and records[-1].offset >= end:
                    # The consumer is past `end`: the next read seeks.
                    events += log.events([r for r in records if r.offset < end])
                    return events, end
                if records:
                    events += log.events(records)
                    position = records[-1].offset + 1
                    idle = 0
                    continue
                moved = await consumer.position(tp)  # past offsets that hold no event (markers, aborted records)
                idle = 0 if moved > position else idle + 1
                position = max(position, moved)
                if idle * _FETCH_WAIT_MS >= _STALLED_MS:
                    raise SourceUnavailable(
                        f"source {log.name!r}: partition {partition} of {log.mapping.topic!r} gave nothing from "
                        f"offset {position} for {_STALLED_MS // 1000} s, below its end {end} (retried)"
                    )
        except OffsetOutOfRangeError:
            raise UserError(
                f"source {log.name!r}: partition {partition} of {log.mapping.topic!r} no longer holds offset "
                f"{position} (retention deleted it, or the topic was made anew)",
                fix="the history this read model was built from is gone: rebuild from a topic that keeps it",
            ) from None
        except KafkaError as error:
            raise SourceUnavailable(
                f"source {log.name!r}: reading partition {partition} of {log.mapping.topic!r} from offset {position} "
                f"failed ({type(error).__name__}: {error}); retried from the lane's checkpoint"
            ) from None
        if position <= end:
            self._next = (tp, position)
        return events, min(position, end)


async def _stop(consumer: AIOKafkaConsumer) -> None:
    """Stop a consumer, whatever state it is in. aiokafka lets out the CancelledError of its own background task when
    a consumer that never fetched is stopped: swallowed, unless this task is the one being cancelled."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:
        pass
