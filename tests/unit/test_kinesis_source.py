"""A Kinesis source without a stream: declarations in settings and in code, what is part of a projection's
fingerprint, and a generation's lanes checked against the shards a stream lists (a reshard is refused, a closed shard
that retention removed is not)."""

from __future__ import annotations

import pytest

from rehydrate.core.errors import UserError
from rehydrate.engine.projections import Projection
from rehydrate.sources.declaration import KinesisSource, sources_from_settings
from rehydrate.sources.log import PartitionRange, check_lanes
from rehydrate.sources.mapping import KinesisStream
from tests.helpers import domain


def test_a_kinesis_source_in_settings_reads_as_declared_and_misspellings_are_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = sources_from_settings(
        {"ledger": {"kind": "kinesis", "stream": "ledger", "region": "eu-west-1", "version_field": "v"}}
    )
    assert found == {"ledger": KinesisSource("ledger", KinesisStream("ledger", version_field="v"), "eu-west-1")}
    source = found["ledger"]
    assert isinstance(source, KinesisSource)
    assert (source.region_name, source.endpoint) == ("eu-west-1", None)
    monkeypatch.setenv("REHYDRATE_SOURCE_LEDGER_REGION", "us-east-2")
    monkeypatch.setenv("REHYDRATE_SOURCE_LEDGER_ENDPOINT_URL", "http://localhost:4566")
    assert (source.region_name, source.endpoint) == ("us-east-2", "http://localhost:4566")
    with pytest.raises(UserError, match=r"unknown key\(s\) 'steam'") as misspelt:
        sources_from_settings({"ledger": {"kind": "kinesis", "steam": "ledger"}})
    assert "stream" in (misspelt.value.fix or "") and "endpoint_url" in (misspelt.value.fix or "")
    with pytest.raises(UserError, match="names no stream"):
        sources_from_settings({"ledger": {"kind": "kinesis", "region": "eu-west-1"}})
    with pytest.raises(UserError, match="no way to read an event's type"):
        sources_from_settings({"ledger": {"kind": "kinesis", "stream": "ledger", "type_field": ""}})


def test_where_the_stream_is_is_not_part_of_a_projections_fingerprint_the_stream_is() -> None:
    a = KinesisSource("ledger", KinesisStream("ledger"), "eu-west-1")
    assert a.identity() == KinesisSource("ledger", KinesisStream("ledger"), "us-east-1", "http://x").identity()
    assert a.identity() != KinesisSource("ledger", KinesisStream("ledger-v2"), "eu-west-1").identity()
    assert a.identity() != KinesisSource("ledger", KinesisStream("ledger", type_field="kind"), "eu-west-1").identity()


def test_a_projection_keyed_by_a_payload_field_is_refused_over_a_stream() -> None:
    source = KinesisSource("ledger", KinesisStream("ledger"), "eu-west-1")
    with pytest.raises(UserError, match="a stream orders records only per partition key"):
        Projection("totals", version=1, table=domain.GroupTotal, key="group", source=source)


def _lane(number: int, shard: str | None) -> dict[str, object]:
    return {"lane": number, "partition_name": shard}


def test_a_generations_lanes_are_checked_against_the_shards_listed_now() -> None:
    planned = [_lane(0, "shardId-0"), _lane(1, "shardId-1"), _lane(2, "shardId-2")]
    listed = [PartitionRange(n, 0, None, f"shardId-{n}") for n in range(3)]
    assert check_lanes("ledger", listed, planned) == {0: None, 1: None, 2: None}
    # A closed shard (read to its end before its children began) that retention removed: its lane is left out.
    assert check_lanes("ledger", listed[1:], planned) == {1: None, 2: None}
    resharded = [*listed, PartitionRange(3, 0, None, "shardId-3", (1,))]
    with pytest.raises(UserError, match=r"shard\(s\) shardId-3 that the generation was not planned on") as error:
        check_lanes("ledger", resharded, planned)
    assert "new replay" in (error.value.fix or "")
    # A topic's partitions: by count, each up to its end.
    topic = [PartitionRange(0, 0, 5), PartitionRange(1, 0, 7)]
    assert check_lanes("orders", topic, [_lane(0, None), _lane(1, None)]) == {0: 5, 1: 7}
    with pytest.raises(UserError, match=r"the topic has 2 partition\(s\), the generation was built from 3"):
        check_lanes("orders", topic, [_lane(0, None), _lane(1, None), _lane(2, None)])
