"""Reading a Kafka topic as a history, against a real Kafka-protocol broker (tansu): each partition's range, one
partition's offsets read chunk by chunk exactly once and in order, events decoded from keys, headers and values, and
the history guard. aiokafka is the client, as in production."""

from __future__ import annotations

import random
import uuid

import orjson
import pytest

from rehydrate.core.errors import SourceUnavailable, UserError
from rehydrate.sources.declaration import KafkaSource
from rehydrate.sources.events import UndecodablePayload
from rehydrate.sources.inspection import check_log
from rehydrate.sources.kafka import KafkaLog
from rehydrate.sources.log import LogRead, log_position
from rehydrate.sources.mapping import KafkaTopic
from tests.helpers import kafka


def _topic() -> str:
    return f"orders-{uuid.uuid4().hex[:8]}"


def _log(bootstrap: str, mapping: KafkaTopic, name: str) -> KafkaLog:
    return KafkaLog(KafkaSource(name, mapping, bootstrap))


async def test_each_partition_is_read_once_in_offset_order_chunk_by_chunk(kafka_bootstrap: str) -> None:
    topic = _topic()
    await kafka.create_topic(kafka_bootstrap, topic, 4)
    rng = random.Random(5)
    messages = [
        (f"order-{rng.randrange(40)}", {"n": n}, {"event_type": rng.choice(["Placed", "Paid"])}) for n in range(400)
    ]
    written = await kafka.produce(kafka_bootstrap, topic, messages)
    async with _log(kafka_bootstrap, KafkaTopic(topic), "orders") as log:
        ranges = await log.ranges()
        assert [(r.partition, r.earliest, r.end) for r in ranges] == [(p, 0, len(written.get(p, []))) for p in range(4)]
        keys_seen: dict[str, int] = {}
        async with log.reader() as reader:
            for r in ranges:
                read, at = [], 0
                while at < r.end:
                    got = await reader.read_range(r.partition, at, r.end, 37)
                    events, at = got.events, got.position
                    assert len(events) <= 37
                    read += events
                assert [(e.global_position, e.stream_id, e.data["n"], e.type) for e in read] == [
                    (log_position(r.partition, offset), key, orjson.loads(value)["n"], headers["event_type"])
                    for offset, key, value, headers in written.get(r.partition, [])
                ]
                for event in read:
                    assert keys_seen.setdefault(event.stream_id, r.partition) == r.partition  # a key lives in one lane
            # A range ending inside the partition stops at its end, whatever the limit.
            busiest = max(ranges, key=lambda r: r.end)
            got = await reader.read_range(busiest.partition, 3, 10, 1_000)
            middle, at = got.events, got.position
            assert got.ended and got.cursor is None
            assert ([e.global_position for e in middle], at) == (
                [log_position(busiest.partition, o) for o in range(3, 10)],
                10,
            )
            assert await reader.read_range(busiest.partition, 10, 10, 5) == LogRead([], 10, None, True)


async def test_types_versions_and_times_come_from_the_message_and_a_bad_value_is_named(kafka_bootstrap: str) -> None:
    topic = _topic()
    await kafka.create_topic(kafka_bootstrap, topic, 1)
    await kafka.produce(
        kafka_bootstrap,
        topic,
        [
            ("acct-1", {"kind": "Opened", "owner": "ann"}, {"version": "1"}),
            ("acct-1", {"kind": "Deposited", "amount": 5}, {"event_type": "Deposited", "version": "2"}),
            ("acct-1", b"not json", {"event_type": "Deposited", "version": "3"}),
        ],
    )
    mapping = KafkaTopic(topic, type_field="kind", version_header="version")
    async with _log(kafka_bootstrap, mapping, "accounts") as log, log.reader() as reader:
        got = await reader.read_range(0, 0, 3, 100)
        events, at = got.events, got.position
    assert at == 3
    assert [(e.type, e.stream_version, e.stream_id) for e in events] == [
        ("Opened", 1, "acct-1"),
        ("Deposited", 2, "acct-1"),
        ("Deposited", 3, "acct-1"),
    ]
    assert events[1].data == {"kind": "Deposited", "amount": 5}
    assert all(e.recorded_at.tzinfo is not None for e in events)
    assert events[0].recorded_at <= events[2].recorded_at
    assert isinstance(events[2].data, UndecodablePayload)
    assert "could not decode the value at partition 0, offset 2: JSONDecodeError" in events[2].data.problem


async def test_a_compacted_topic_is_refused_as_a_history_unless_a_partial_one_is_accepted(kafka_bootstrap: str) -> None:
    topic = _topic()
    await kafka.create_topic(kafka_bootstrap, topic, 2, **{"cleanup.policy": "compact"})
    await kafka.produce(kafka_bootstrap, topic, [("k", {"n": 1}, {"event_type": "Set"})])
    async with _log(kafka_bootstrap, KafkaTopic(topic), "settings") as log:
        with pytest.raises(UserError, match=r"is compacted \(cleanup.policy=compact\)") as refused:
            await log.check_history()
        assert "retention.ms=-1, cleanup.policy=delete" in (refused.value.fix or "")
        ranges, problems = await log.check_history(accept_partial=True)
        assert sum(r.end for r in ranges) == 1 and "is compacted" in problems[0]
    plain = _topic()
    await kafka.create_topic(kafka_bootstrap, plain, 2)
    async with _log(kafka_bootstrap, KafkaTopic(plain), "orders") as log:
        assert [r.end for r in (await log.check_history())[0]] == [0, 0]


async def test_a_missing_topic_and_an_unreachable_broker_are_one_clear_error_each(kafka_bootstrap: str) -> None:
    async with _log(kafka_bootstrap, KafkaTopic("no-such-topic"), "orders") as log:
        with pytest.raises(UserError, match="topic 'no-such-topic' does not exist"):
            await log.ranges()
    with pytest.raises(SourceUnavailable, match=r"source 'orders': Kafka at 127.0.0.1:1 cannot be reached"):
        async with _log("127.0.0.1:1", KafkaTopic("orders"), "orders"):
            pass


async def test_sources_check_names_partitions_a_decoded_sample_and_what_is_wrong(kafka_bootstrap: str) -> None:
    topic = _topic()
    await kafka.create_topic(kafka_bootstrap, topic, 2)
    await kafka.produce(
        kafka_bootstrap,
        topic,
        [
            ("acct-1", {"owner": "ann"}, {"event_type": "Opened"}),
            ("acct-2", {"amount": 5}, {"event_type": "Deposited"}),
        ],
    )
    async with _log(kafka_bootstrap, KafkaTopic(topic), "ledger") as log:
        found = await check_log(log)
    assert found.ok, found.problems
    assert found.holds[0].startswith("2 partition(s), 2 offset(s) held: 0: 0..")
    assert "it holds its whole history" in found.holds[1]
    assert found.holds[2] == "2 sampled messages decode, of type(s) Deposited, Opened"
    await kafka.produce(kafka_bootstrap, topic, [("acct-3", b"{broken", {}), ("", {"n": 1}, {"event_type": "Noted"})])
    async with _log(kafka_bootstrap, KafkaTopic(topic), "ledger") as log:
        found = await check_log(log)
    assert not found.ok
    assert [p for p in found.problems if "1 of 4 sampled values undecodable" in p and "JSONDecodeError" in p]
    assert [p for p in found.problems if "1 of 4 sampled messages have no event type" in p]
    assert [p for p in found.problems if "1 of 4 sampled messages have no key" in p]


async def test_an_empty_topic_is_checked_and_its_readers_close_cleanly(kafka_bootstrap: str) -> None:
    """A reader that never had to fetch (every range empty) takes no consumer, and every consumer stops cleanly."""
    topic = _topic()
    await kafka.create_topic(kafka_bootstrap, topic, 2)
    log = _log(kafka_bootstrap, KafkaTopic(topic), "ledger")
    await log.start()
    try:
        found = await check_log(log)
        async with log.reader() as reader:
            assert await reader.read_range(1, 0, 0, 10) == LogRead([], 0, None, True)
    finally:
        await log.close()
    assert found.ok and found.warnings == ["the topic holds no message yet: nothing to decode"]
