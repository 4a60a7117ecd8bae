"""Reading a Kinesis data stream as a history: its shards, one shard's records from where a lane stands, and whether
the stream may have lost records to retention.

A stream orders records only within a shard (the partition key picks it), so a shard is a lane. A shard's sequence
numbers are decimal strings of up to 128 digits, wider than the `bigint` positions rehydrate checkpoints, so a lane's
position is the ordinal of the next record in its shard (records read so far, counted from the shard's start) and its
cursor the sequence number of the last record read, saved with the position in the chunk's transaction; a read goes on
with an `AFTER_SEQUENCE_NUMBER` iterator at the cursor (`TRIM_HORIZON` before the first record). A read never ends by
counting: it ends where Kinesis says the shard does (no next iterator: a closed shard read to its end), at the tip (no
record, and `MillisBehindLatest` 0), or at the first record of an open shard that arrived after `until` (a build's
plan time), left unread. An event's position is lane × 2**40 + ordinal.

Resharding closes a shard and opens children (`ParentShardId`, `AdjacentParentShardId`): a key's records in a parent
precede its records in a child, so ranges() names each shard's parents and the replay starts a child's lane once its
parents' lanes are done.

The client is boto3, called through `asyncio.to_thread`: the AWS SDK that users already configure (credentials chain,
regions, retries), and a client that is thread-safe. aiobotocore would await instead of taking a thread per call, but
it pins botocore to its own release and adds aiohttp; a replay makes a few calls per second per shard, each carrying up
to 10,000 records, so a thread per call costs nothing that matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import orjson
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

from rehydrate.core.errors import SourceUnavailable, UserError
from rehydrate.sources.declaration import KinesisSource
from rehydrate.sources.events import Event, UndecodablePayload
from rehydrate.sources.log import LogRead, LogSource, PartitionRange, PartitionReader, log_position
from rehydrate.sources.mapping import KinesisStream

_MAX_RECORDS = 10_000  # GetRecords returns at most this many records per call
_ITERATOR_SECONDS = 240.0  # shard iterators expire after 5 minutes: one older than this is taken afresh
_EMPTY_PAUSE_SECONDS = 0.2  # between reads that find nothing while behind the tip (GetRecords: 5 calls/s per shard)
_STALLED_SECONDS = 60.0  # behind the tip and nothing read for this long: an error (retried), not a wait for ever
_KEPT_ITERATORS = 256  # iterators kept per source and process for the next read from where a read stopped
_MAX_VERSION = 2**63 - 1
_UNAVAILABLE = {
    "ProvisionedThroughputExceededException",
    "LimitExceededException",
    "KMSThrottlingException",
    "InternalFailure",
    "InternalFailureException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "ThrottlingException",
    "RequestExpired",
}


class KinesisLog(LogSource):
    """The records of one stream, read shard by shard. Open it with `async with`, or `start` and `close`; each
    concurrent task takes a `reader()`."""

    noun = "stream"
    holds_whole_history = "the stream is younger than its retention period: no record can have expired"

    def __init__(self, source: KinesisSource) -> None:
        self.source = source
        self.name = source.name
        self.mapping: KinesisStream = source.stream
        self.stream = source.stream.stream
        self._client: Any = None
        self._closed: set[str] = set()  # shards seen closed (a closed shard stays closed)
        self._known: dict[int, str] = {}  # lane → shard id, as ranges() last listed them
        self._listed_at = -1e9  # when (monotonic) ranges() last listed the shards
        self._finished: set[tuple[str, str | None]] = set()  # (closed shard, cursor) read to the shard's end
        # Where reads stopped: (shard, cursor) → (the iterator that goes on from there, when it was taken).
        self._iterators: dict[tuple[str, str | None], tuple[str, float]] = {}

    async def __aenter__(self) -> KinesisLog:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def where(self) -> str:
        return self.source.endpoint or f"region {self.source.region_name or '(from the AWS configuration)'}"

    async def start(self) -> None:
        """Make the client and reach the stream (a UserError when it does not exist, SourceUnavailable when Kinesis
        does not answer)."""
        try:
            self._client = await asyncio.to_thread(self._make_client)
        except NoRegionError:
            raise self._no_region() from None
        await self.summary()

    def _make_client(self) -> Any:
        config = Config(
            retries={"max_attempts": 4, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=32,
        )
        return boto3.session.Session().client(
            "kinesis", region_name=self.source.region_name, endpoint_url=self.source.endpoint, config=config
        )

    def _no_region(self) -> UserError:
        variable = f"REHYDRATE_SOURCE_{self.name.upper()}_REGION"
        return UserError(
            f"Kinesis source {self.name!r} names no region", fix=f"set region, or {variable}, or AWS_DEFAULT_REGION"
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        self._iterators.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(client.close)

    async def call(self, operation: str, **params: Any) -> dict[str, Any]:
        """One Kinesis API call in a thread; its failures as rehydrate's errors (an expired iterator as itself)."""
        if self._client is None:
            raise RuntimeError("KinesisLog used before start()")
        try:
            response: dict[str, Any] = await asyncio.to_thread(getattr(self._client, operation), **params)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code == "ExpiredIteratorException":
                raise
            if code == "ResourceNotFoundException":
                raise UserError(
                    f"source {self.name!r}: stream {self.stream!r} does not exist at {self.where} "
                    f"({error.response.get('Error', {}).get('Message', '')})".replace(" ()", ""),
                    fix="check the stream's name and region in the source",
                ) from None
            if code in _UNAVAILABLE:
                raise SourceUnavailable(
                    f"source {self.name!r}: Kinesis at {self.where} is busy or unavailable ({code}); retried"
                ) from None
            message = f"{code}: {error.response.get('Error', {}).get('Message', '')}"
            if "Access" in code or "Unrecognized" in code or "Signature" in code or "Token" in code:
                message += (
                    "; check the worker's AWS credentials and that they allow kinesis:DescribeStreamSummary, "
                    "ListShards, GetShardIterator and GetRecords on the stream"
                )
            raise SourceUnavailable(
                f"source {self.name!r}: Kinesis at {self.where} refused {operation} on stream {self.stream!r} "
                f"({message})"
            ) from None
        except NoCredentialsError:
            raise UserError(
                f"Kinesis source {self.name!r}: no AWS credentials found",
                fix="give the worker credentials as the AWS SDK finds them (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile, or an instance or task role)",
            ) from None
        except NoRegionError:
            raise self._no_region() from None
        except BotoCoreError as error:
            raise SourceUnavailable(
                f"source {self.name!r}: Kinesis at {self.where} cannot be reached ({type(error).__name__}); check its "
                f"region or endpoint (REHYDRATE_SOURCE_{self.name.upper()}_REGION, _ENDPOINT_URL)"
            ) from None
        return response

    # -- what the stream holds --------------------------------------------------------------------------------

    async def summary(self) -> dict[str, Any]:
        """The stream's DescribeStreamSummary: status, creation time, retention."""
        response = await self.call("describe_stream_summary", StreamName=self.stream)
        return dict(response["StreamDescriptionSummary"])

    async def shards(self) -> list[dict[str, Any]]:
        """Every shard the stream lists (open ones, and closed ones until retention removes them), by shard id."""
        shards: list[dict[str, Any]] = []
        page = await self.call("list_shards", StreamName=self.stream)
        shards += page.get("Shards", [])
        while page.get("NextToken"):
            page = await self.call("list_shards", NextToken=page["NextToken"])
            shards += page.get("Shards", [])
        return sorted(shards, key=lambda shard: str(shard["ShardId"]))

    async def ranges(self) -> list[PartitionRange]:
        """Each shard as a lane, in shard id order (a child's id comes after its parents'): its ordinals start at 0,
        its end is not known without reading it; its parents, among the lanes; whether it is closed."""
        shards = await self.shards()
        lanes = {str(shard["ShardId"]): lane for lane, shard in enumerate(shards)}
        found = []
        for lane, shard in enumerate(shards):
            shard_id = str(shard["ShardId"])
            closed = shard.get("SequenceNumberRange", {}).get("EndingSequenceNumber") is not None
            if closed:
                self._closed.add(shard_id)
            parents = tuple(
                lanes[parent]
                for parent in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId"))
                if parent in lanes
            )
            found.append(PartitionRange(lane, 0, None, shard_id, parents, closed))
        self._known = {r.partition: str(r.name) for r in found}
        self._listed_at = time.monotonic()
        return found

    async def check_history(self, *, accept_partial: bool = False) -> tuple[list[PartitionRange], list[str]]:
        """The shards as lanes, once sure the stream may not have lost records to retention: it is younger than its
        retention period. Refused, whatever `accept_partial` says, while a reshard is under way (the stream is
        UPDATING): its shards are changing."""
        summary = await self.summary()
        status = str(summary.get("StreamStatus", "ACTIVE"))
        if status != "ACTIVE":
            raise UserError(
                f"source {self.name!r}: stream {self.stream!r} is {status} (a reshard or a change is under way)",
                fix="wait until it is ACTIVE, then start again",
            )
        created = _aware(summary["StreamCreationTimestamp"])
        retention = int(summary.get("RetentionPeriodHours", 24))
        problems = []
        if created + timedelta(hours=retention) < datetime.now(UTC):
            problems.append(
                f"stream {self.stream!r} was created {created:%Y-%m-%d %H:%M} UTC, longer ago than its retention "
                f"period ({retention} h): its oldest records may have expired"
            )
        if problems and not accept_partial:
            raise UserError(
                "; ".join(problems),
                fix="rebuild from a stream that still holds its whole history (keep it younger than its retention, "
                "which can be raised up to 8760 h), or accept a partial history explicitly (replay start "
                "--accept-partial-history)",
            )
        return await self.ranges(), problems

    async def lag(self, lanes: Sequence[Any]) -> int | None:
        """Unknown without reading: a shard's end is not an offset."""
        return None

    async def is_closed(self, shard: str) -> bool:
        """Whether a shard is closed, listing the shards again when the last listing is a minute old (a shard closes
        when a reshard begins, and stays closed)."""
        if shard not in self._closed and time.monotonic() - self._listed_at > 60:
            await self.ranges()
        return shard in self._closed

    async def shard_of(self, partition: int, name: str | None) -> str:
        """The shard id of a lane: as the plan recorded it, else as the stream lists it now."""
        if name is not None:
            return name
        if partition not in self._known:
            await self.ranges()
        if partition not in self._known:
            raise UserError(
                f"source {self.name!r}: stream {self.stream!r} has no shard {partition} (it has {len(self._known)})",
                fix="rebuild the projection with a new replay",
            )
        return self._known[partition]

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[PartitionReader]:
        yield _Reader(self)

    def keep_iterator(self, shard: str, cursor: str | None, iterator: str | None, taken: float) -> None:
        if iterator is None:
            return
        if len(self._iterators) >= _KEPT_ITERATORS:
            self._iterators.pop(next(iter(self._iterators)))
        self._iterators[(shard, cursor)] = (iterator, taken)

    def take_iterator(self, shard: str, cursor: str | None) -> tuple[str, float] | None:
        kept = self._iterators.pop((shard, cursor), None)
        if kept is None or time.monotonic() - kept[1] > _ITERATOR_SECONDS:
            return None
        return kept

    def events(self, lane: int, shard: str, ordinal: int, records: Sequence[dict[str, Any]]) -> list[Event]:
        """The events records read as, the first being the shard's record number `ordinal` (from 0)."""
        mapping = self.mapping
        type_field, version_field, decode, loads = (
            mapping.type_field,
            mapping.version_field,
            mapping.decode,
            orjson.loads,
        )
        events: list[Event] = []
        for number, record in enumerate(records, ordinal):
            data = record.get("Data") or b""
            try:
                payload = loads(data) if decode is None else decode(data, "")
                if not isinstance(payload, dict):
                    raise TypeError(f"it decoded to {type(payload).__name__}, not a JSON object")
            except Exception as error:  # a user's decoder: whatever it raises is named; parked or stopped on
                payload = UndecodablePayload(
                    f"source {self.name!r} could not decode the data of record {number} of shard {shard} "
                    f"(sequence number {record.get('SequenceNumber')}): {type(error).__name__}: {error}"
                )
            raw_type = payload.get(type_field)
            event_type = raw_type if isinstance(raw_type, str) else "" if raw_type is None else str(raw_type)
            version, problem, part = 0, None, "key"
            stream_id = str(record.get("PartitionKey", ""))
            if "\x00" in stream_id:  # Postgres text cannot hold it: shown escaped, as the stream id of the dead letter
                stream_id, problem = stream_id.replace("\x00", "\\x00"), "its partition key holds a NUL character"
            if version_field is not None and version_field in payload:
                raw = payload[version_field]
                text = str(raw)
                if isinstance(raw, int | str) and not isinstance(raw, bool) and text.isascii() and text.isdigit():
                    version = int(text)
                if problem is None and not 0 < version <= _MAX_VERSION:
                    problem, part = f"its {version_field!r} field {text[:30]!r} is not a version (1 and up)", "version"
            if problem is None and not event_type and type(payload) is not UndecodablePayload:
                problem, part = f"it has no type: no {type_field!r} field", "type"
            if problem is not None and type(payload) is not UndecodablePayload:
                payload = UndecodablePayload(
                    f"source {self.name!r}: record {number} of shard {shard} (sequence number "
                    f"{record.get('SequenceNumber')}) cannot be read as an event: {problem}",
                    part,
                )
            events.append(
                Event(
                    log_position(lane, number),
                    stream_id,
                    version if 0 < version <= _MAX_VERSION else number + 1,
                    event_type,
                    1,
                    payload,
                    {},
                    _arrived(record),
                )
            )
        return events


def _aware(at: datetime | float) -> datetime:
    """A timestamp as the SDK gives it (a datetime, naive when an emulator leaves out the zone) in UTC."""
    if isinstance(at, int | float):
        return datetime.fromtimestamp(at, UTC)
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


class _Reader(PartitionReader):
    """Reads shards by iterator: a read that goes on from where the last one stopped reuses its iterator."""

    def __init__(self, log: KinesisLog) -> None:
        self.log = log

    async def _iterator(self, shard: str, cursor: str | None) -> tuple[str, float]:
        log = self.log
        kept = log.take_iterator(shard, cursor)
        if kept is not None:
            return kept
        params: dict[str, Any] = {"StreamName": log.stream, "ShardId": shard}
        if cursor is None:
            params["ShardIteratorType"] = "TRIM_HORIZON"
        else:
            params["ShardIteratorType"] = "AFTER_SEQUENCE_NUMBER"
            params["StartingSequenceNumber"] = cursor
        response = await log.call("get_shard_iterator", **params)
        return str(response["ShardIterator"]), time.monotonic()

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
        """From the record after `cursor` (ordinal `start`) to the ordinal `end`, the shard's end or its tip; an open
        shard's records that arrived after `until` are left (a closed shard is read to its end whatever their times:
        its children wait for it)."""
        if end is not None and start >= end:
            return LogRead([], start, cursor, True)
        log = self.log
        shard = await log.shard_of(partition, name)
        if (shard, cursor) in log._finished:  # a closed shard read to its end holds nothing more, ever
            return LogRead([], start, cursor, True)
        # A closed shard is read to its end whatever its records' times: its children wait for it.
        cut = None if until is None or await log.is_closed(shard) else _aware(until)
        iterator, taken = await self._iterator(shard, cursor)
        events: list[Event] = []
        position, ended, idle_since = start, False, time.monotonic()
        while len(events) < limit and not ended:
            want = min(_MAX_RECORDS, limit - len(events), _MAX_RECORDS if end is None else end - position)
            try:
                response = await log.call("get_records", ShardIterator=iterator, Limit=want)
            except ClientError:  # the iterator expired (a read that waited long): a new one from the cursor
                iterator, taken = await self._iterator(shard, cursor)
                continue
            records = response.get("Records", [])
            if cut is not None:
                late = next((i for i, r in enumerate(records) if _arrived(r) > cut), None)
                if late is not None:  # this record and the next arrived after the plan: the catch-up's
                    if late:
                        events += log.events(partition, shard, position, records[:late])
                        position, cursor = position + late, str(records[late - 1]["SequenceNumber"])
                    return LogRead(events, position, cursor, True)  # the iterator is past the cut: not kept
            if records:
                events += log.events(partition, shard, position, records)
                position, cursor = position + len(records), str(records[-1]["SequenceNumber"])
                idle_since = time.monotonic()
            following = response.get("NextShardIterator")
            if following is None:  # a closed shard read to its end
                log._closed.add(shard)
                log._finished.add((shard, cursor))
                return LogRead(events, position, cursor, True)
            iterator, taken = str(following), time.monotonic()
            if end is not None and position >= end:
                ended = True
            elif not records:
                if response.get("MillisBehindLatest", 0) == 0:  # at the tip: nothing more for now
                    ended = True
                elif time.monotonic() - idle_since > _STALLED_SECONDS:
                    raise SourceUnavailable(
                        f"source {log.name!r}: shard {shard} of {log.stream!r} gave nothing after sequence number "
                        f"{cursor} for {_STALLED_SECONDS:.0f} s while behind its tip (retried)"
                    )
                else:
                    await asyncio.sleep(_EMPTY_PAUSE_SECONDS)
        log.keep_iterator(shard, cursor, iterator, taken)
        return LogRead(events, position, cursor, ended)


def _arrived(record: dict[str, Any]) -> datetime:
    at = record.get("ApproximateArrivalTimestamp")
    return datetime.fromtimestamp(0, UTC) if at is None else _aware(at)
