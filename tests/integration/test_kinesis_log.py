"""Reading a Kinesis stream as a history, against moto's server mode (an emulator of the Kinesis API): shards as lanes
in shard id order with their parents, one shard read slice by slice from its cursor exactly once and in order, a read
that stops at records that arrived after a time, events decoded from partition keys and data, the history guard and
`sources check`. boto3 is the client, as in production."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from rehydrate.core.errors import UserError
from rehydrate.sources.events import UndecodablePayload
from rehydrate.sources.inspection import check_log
from rehydrate.sources.kinesis import KinesisLog
from rehydrate.sources.log import LogRead, log_position
from rehydrate.sources.mapping import KinesisStream
from tests.helpers import kinesis


def _stream() -> str:
    return f"orders-{uuid.uuid4().hex[:8]}"


def _log(endpoint: str, mapping: KinesisStream) -> KinesisLog:
    return KinesisLog(kinesis.KinesisSource("orders", mapping, region=kinesis.REGION, endpoint_url=endpoint))


async def test_each_shard_is_read_once_in_order_slice_by_slice_from_its_cursor(kinesis_endpoint: str) -> None:
    stream = _stream()
    kinesis.create_stream(kinesis_endpoint, stream, 4)
    rng = random.Random(5)
    records = [(f"order-{rng.randrange(40)}", {"n": n, "type": rng.choice(["Placed", "Paid"])}) for n in range(400)]
    written = kinesis.put(kinesis_endpoint, stream, records)
    by_shard: dict[str, list[tuple[str, dict[str, object], str]]] = {}
    for (key, data), (shard, sequence) in zip(records, written, strict=True):
        assert isinstance(data, dict)
        by_shard.setdefault(shard, []).append((key, data, sequence))
    async with _log(kinesis_endpoint, KinesisStream(stream)) as log:
        ranges = await log.ranges()
        assert [(r.partition, r.earliest, r.end, r.parents, r.closed) for r in ranges] == [
            (lane, 0, None, (), False) for lane in range(4)
        ]
        assert [r.name for r in ranges] == sorted(s["ShardId"] for s in kinesis.shards(kinesis_endpoint, stream))
        keys_seen: dict[str, int] = {}
        async with log.reader() as reader:
            for r in ranges:
                events, at, cursor, ended = [], 0, None, False
                while not ended:
                    read = await reader.read_range(r.partition, at, None, 37, cursor=cursor, name=r.name)
                    assert len(read.events) <= 37
                    events += read.events
                    at, cursor, ended = read.position, read.cursor, read.ended
                want = by_shard.get(str(r.name), [])
                assert [(e.global_position, e.stream_id, e.data["n"], e.type, e.stream_version) for e in events] == [
                    (log_position(r.partition, n), key, data["n"], data["type"], n + 1)
                    for n, (key, data, _) in enumerate(want)
                ]
                assert (at, cursor) == (len(want), want[-1][2] if want else None)
                for event in events:
                    assert keys_seen.setdefault(event.stream_id, r.partition) == r.partition  # a key lives in one lane
            # An ordinal end stops the read there, whatever the limit; a range already read gives nothing.
            busiest = max(ranges, key=lambda r: len(by_shard.get(str(r.name), [])))
            first = await reader.read_range(busiest.partition, 0, 3, 1_000, name=busiest.name)
            assert (len(first.events), first.position, first.ended) == (3, 3, True)
            rest = await reader.read_range(busiest.partition, 3, 10, 1_000, cursor=first.cursor, name=busiest.name)
            assert [e.global_position for e in rest.events] == [
                log_position(busiest.partition, o) for o in range(3, 10)
            ]
            assert await reader.read_range(busiest.partition, 10, 10, 5, cursor=rest.cursor) == LogRead(
                [], 10, rest.cursor, True
            )


async def test_a_read_stops_before_records_that_arrived_after_until_and_goes_on_from_its_cursor(
    kinesis_endpoint: str,
) -> None:
    stream = _stream()
    kinesis.create_stream(kinesis_endpoint, stream, 1)
    kinesis.put(kinesis_endpoint, stream, [("k", {"n": n, "type": "Set"}) for n in range(10)])
    await asyncio.sleep(1.1)  # arrival times are the emulator's clock: a clear second apart
    cut = datetime.now(UTC)
    await asyncio.sleep(1.1)
    kinesis.put(kinesis_endpoint, stream, [("k", {"n": n, "type": "Set"}) for n in range(10, 15)])
    async with _log(kinesis_endpoint, KinesisStream(stream)) as log, log.reader() as reader:
        built = await reader.read_range(0, 0, None, 1_000, until=cut)
        assert ([e.data["n"] for e in built.events], built.position, built.ended) == (list(range(10)), 10, True)
        caught_up = await reader.read_range(0, built.position, None, 1_000, cursor=built.cursor)
        assert ([e.data["n"] for e in caught_up.events], caught_up.position) == (list(range(10, 15)), 15)
        assert caught_up.ended  # at the tip
        assert all(e.recorded_at.tzinfo is not None for e in built.events + caught_up.events)
        assert built.events[-1].recorded_at <= cut < caught_up.events[0].recorded_at
        tip = await reader.read_range(0, 15, None, 1_000, cursor=caught_up.cursor)
        assert (tip.events, tip.position, tip.cursor, tip.ended) == ([], 15, caught_up.cursor, True)


async def test_types_versions_and_times_come_from_the_record_and_a_bad_record_is_named(kinesis_endpoint: str) -> None:
    stream = _stream()
    kinesis.create_stream(kinesis_endpoint, stream, 1)
    kinesis.put(
        kinesis_endpoint,
        stream,
        [
            ("acct-1", {"kind": "Opened", "owner": "ann", "v": 7}),
            ("acct-1", {"kind": "Deposited", "amount": 5, "v": "8"}),
            ("acct-1", b"not json"),
            ("acct-1", {"amount": 5}),
            ("acct-1", {"kind": "Deposited", "v": -2}),
        ],
    )
    mapping = KinesisStream(stream, type_field="kind", version_field="v")
    async with _log(kinesis_endpoint, mapping) as log, log.reader() as reader:
        read = await reader.read_range(0, 0, None, 100)
    events = read.events
    assert [(e.type, e.stream_version, e.stream_id) for e in events[:2]] == [
        ("Opened", 7, "acct-1"),
        ("Deposited", 8, "acct-1"),
    ]
    assert events[1].data == {"kind": "Deposited", "amount": 5, "v": "8"}
    assert events[0].recorded_at.tzinfo is not None
    bad = [e.data for e in events[2:]]
    assert all(isinstance(data, UndecodablePayload) for data in bad)
    assert [(e.type, data.part) for e, data in zip(events[2:], bad, strict=True)] == [  # type: ignore[attr-defined]
        ("", "value"),
        ("", "type"),
        ("Deposited", "version"),
    ]
    assert "could not decode the data of record 2 of shard shardId-000000000000" in bad[0].problem  # type: ignore[attr-defined]
    assert "JSONDecodeError" in bad[0].problem  # type: ignore[attr-defined]
    assert "it has no type: no 'kind' field" in bad[1].problem  # type: ignore[attr-defined]


async def test_a_resharded_stream_names_each_shard_s_parents_and_which_are_closed(kinesis_endpoint: str) -> None:
    stream = _stream()
    kinesis.create_stream(kinesis_endpoint, stream, 2)
    kinesis.put(kinesis_endpoint, stream, [(f"k{n}", {"type": "Set"}) for n in range(20)])
    kinesis.split(kinesis_endpoint, stream, kinesis.shards(kinesis_endpoint, stream)[0])
    opened = kinesis.open_shards(kinesis_endpoint, stream)
    low = min(opened, key=lambda s: int(s["HashKeyRange"]["StartingHashKey"]))
    second = min((s for s in opened if s is not low), key=lambda s: int(s["HashKeyRange"]["StartingHashKey"]))
    kinesis.merge(kinesis_endpoint, stream, low, second)
    shards = kinesis.shards(kinesis_endpoint, stream)
    async with _log(kinesis_endpoint, KinesisStream(stream)) as log:
        ranges = await log.ranges()
    lane = {s["ShardId"]: n for n, s in enumerate(shards)}
    assert [r.name for r in ranges] == [s["ShardId"] for s in shards]
    for r, shard in zip(ranges, shards, strict=True):
        parents = tuple(lane[p] for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p)
        assert r.parents == parents and all(p < r.partition for p in parents)
        assert r.closed == ("EndingSequenceNumber" in shard["SequenceNumberRange"])
    assert sum(r.closed for r in ranges) == 3 and len(ranges) == 5
    merged = ranges[-1]
    assert len(merged.parents) == 2


async def test_an_old_stream_is_refused_as_a_history_unless_a_partial_one_is_accepted(tmp_path: Path) -> None:
    """moto started with its clock 30 hours back: a stream it makes now was made 30 hours ago by this clock, longer
    than its 24-hour retention."""
    with kinesis.moto_server(tmp_path / "moto.log", behind_hours=30) as endpoint:
        stream = _stream()
        kinesis.create_stream(endpoint, stream, 2)
        async with _log(endpoint, KinesisStream(stream)) as log:
            with pytest.raises(UserError, match=rf"stream '{stream}' was created .* retention period \(24 h\)") as no:
                await log.check_history()
            assert "--accept-partial-history" in (no.value.fix or "")
            ranges, problems = await log.check_history(accept_partial=True)
            assert len(ranges) == 2 and "may have expired" in problems[0]
    young = _stream()
    with kinesis.moto_server(tmp_path / "moto-2.log") as endpoint:
        kinesis.create_stream(endpoint, young, 1)
        async with _log(endpoint, KinesisStream(young)) as log:
            assert (await log.check_history())[1] == []


async def test_a_missing_stream_is_one_clear_error(kinesis_endpoint: str) -> None:
    with pytest.raises(UserError, match=r"stream 'no-such-stream' does not exist at http://127\.0\.0\.1"):
        async with _log(kinesis_endpoint, KinesisStream("no-such-stream")):
            pass


async def test_sources_check_names_shards_a_decoded_sample_and_what_is_wrong(kinesis_endpoint: str) -> None:
    stream = _stream()
    kinesis.create_stream(kinesis_endpoint, stream, 2)
    async with _log(kinesis_endpoint, KinesisStream(stream)) as log:
        empty = await check_log(log)
    assert empty.ok and empty.warnings == ["the stream holds no message yet: nothing to decode"]
    kinesis.put(
        kinesis_endpoint, stream, [("acct-1", {"type": "Opened", "owner": "ann"}), ("acct-2", {"type": "Deposited"})]
    )
    async with _log(kinesis_endpoint, KinesisStream(stream)) as log:
        found = await check_log(log)
    assert found.ok, found.problems
    assert found.holds[0].startswith("2 shard(s), 2 open: shardId-000000000000 (open), ")
    assert "no record can have expired" in found.holds[1]
    assert found.holds[2] == "2 sampled messages decode, of type(s) Deposited, Opened"
    kinesis.put(kinesis_endpoint, stream, [("acct-3", b"{broken"), ("acct-4", orjson.dumps({"n": 1}))])
    async with _log(kinesis_endpoint, KinesisStream(stream)) as log:
        found = await check_log(log)
    assert not found.ok
    assert [p for p in found.problems if "1 of 4 sampled values undecodable" in p and "JSONDecodeError" in p]
    assert [p for p in found.problems if "have no event type" in p]
