"""A Kafka source without a broker: the history guard over the ranges a broker reports (a partition whose start
retention deleted, and a compacted topic, are named; a whole history passes), positions, and declarations in
settings."""

from __future__ import annotations

import pytest

from rehydrate.core.errors import UserError
from rehydrate.sources.declaration import KafkaSource, sources_from_settings
from rehydrate.sources.log import PartitionRange, history_problems, log_position, partition_offset
from rehydrate.sources.mapping import KafkaTopic


def test_a_truncated_partition_and_a_compacted_topic_are_named() -> None:
    whole = [PartitionRange(0, 0, 10), PartitionRange(1, 0, 0)]
    assert history_problems("orders", whole, "delete") == []
    truncated = [PartitionRange(0, 0, 10), PartitionRange(1, 120, 400)]
    assert history_problems("orders", truncated, "delete") == [
        "topic 'orders' no longer holds the start of partition(s) 1 (from offset 120): retention deleted it"
    ]
    both = history_problems("orders", truncated, "compact,delete")
    assert len(both) == 2 and "is compacted (cleanup.policy=compact,delete)" in both[1]


def test_a_topic_without_a_way_to_read_types_is_refused() -> None:
    with pytest.raises(UserError, match="no way to read an event's type"):
        KafkaTopic("orders", type_header=None)
    with pytest.raises(UserError, match="names no topic"):
        KafkaTopic("")


def test_a_log_position_names_its_partition_and_offset() -> None:
    assert log_position(0, 17) == 17
    assert partition_offset(log_position(3, 123_456_789)) == (3, 123_456_789)
    assert log_position(1, 0) > log_position(0, 10**12)


def test_a_kafka_source_in_settings_reads_as_declared_and_misspellings_are_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = sources_from_settings(
        {"ledger": {"kind": "kafka", "bootstrap_servers": "k1:9092", "topic": "ledger", "version_header": "v"}}
    )
    assert found == {"ledger": KafkaSource("ledger", KafkaTopic("ledger", version_header="v"), "k1:9092")}
    assert found["ledger"].servers == "k1:9092"  # type: ignore[union-attr]
    monkeypatch.setenv("REHYDRATE_SOURCE_LEDGER_BOOTSTRAP_SERVERS", "k2:9092")
    assert found["ledger"].servers == "k2:9092"  # type: ignore[union-attr]
    with pytest.raises(UserError, match=r"unknown key\(s\) 'tpoic'") as misspelt:
        sources_from_settings({"ledger": {"kind": "kafka", "tpoic": "ledger"}})
    assert "topic" in (misspelt.value.fix or "")
    with pytest.raises(UserError, match="names no topic"):
        sources_from_settings({"ledger": {"kind": "kafka", "bootstrap_servers": "k1:9092"}})
    with pytest.raises(UserError, match="kind 'pulsar' is not table, kafka or kinesis"):
        sources_from_settings({"ledger": {"kind": "pulsar"}})
    monkeypatch.delenv("REHYDRATE_SOURCE_LEDGER_BOOTSTRAP_SERVERS")
    with pytest.raises(UserError, match="Kafka source 'ledger' names no brokers"):
        _ = KafkaSource("ledger", KafkaTopic("ledger")).servers


def test_the_brokers_are_not_part_of_a_projections_fingerprint_the_topic_is() -> None:
    a = KafkaSource("ledger", KafkaTopic("ledger"), "k1:9092")
    assert a.identity() == KafkaSource("ledger", KafkaTopic("ledger"), "k2:9092").identity()
    assert a.identity() != KafkaSource("ledger", KafkaTopic("ledger-v2"), "k1:9092").identity()
