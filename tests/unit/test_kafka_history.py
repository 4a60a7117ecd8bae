"""The history guard of a Kafka source, over the ranges a broker reports: a partition whose start retention deleted,
and a compacted topic, are named; a whole history passes."""

from __future__ import annotations

import pytest

from rehydrate.core.errors import UserError
from rehydrate.sources.kafka import KafkaTopic, PartitionRange, history_problems


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
