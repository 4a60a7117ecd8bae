"""A Kinesis API for the tests: moto's server mode (an emulator of AWS's APIs, from PyPI `moto[server]`) started as a
process on a free port; streams made, written, split and merged through boto3 as producers and operators do it.

What moto does not do as Kinesis does, and how the tests live with it:
- a PutRecords request's records land in the shards in request order (AWS does not promise that within a request;
  producers that need the order use PutRecord with SequenceNumberForOrdering, or the KPL): the tests rely on it;
- a split or a merge changes the shard list as Kinesis does (parents closed, children naming them), but records go on
  to the first shard that covers their hash, the closed parent included: children stay empty (a split puts the
  parent's records back into the parent with new sequence numbers, a merge copies its parents' records into the
  child): the tests check a resharded stream's lanes and the order in which they start, not records read from a
  child;
- iterators never expire, and nothing is throttled;
- no stream ages: a stream's creation time is the moment it was made, so the history guard's refusal is tested on a
  second moto server whose clock runs `hours` behind (`moto_server(..., behind_hours=...)`), where a stream made now
  is that old by the worker's clock.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import orjson

from rehydrate import Event, NewEvent
from rehydrate.engine.projections import Projection
from rehydrate.sources.declaration import KinesisSource
from rehydrate.sources.mapping import KinesisStream
from tests.helpers import legacy

REGION = "us-east-1"
# moto takes any credentials; the SDK wants some.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}

# A launcher that starts moto's server with its clock `behind` hours back (for the history guard): the clock moto's
# models read, nothing else of the server changed.
_BEHIND = """
import datetime, sys
from moto.core import utils
hours = float(sys.argv[1])
real = utils.utcnow
utils.utcnow = lambda: real() - datetime.timedelta(hours=hours)
import moto.kinesis.models as models
if hasattr(models, "utcnow"):
    models.utcnow = utils.utcnow
from moto.server import main
main(sys.argv[2:])
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def moto_server(log: Path, behind_hours: float = 0.0) -> Iterator[str]:
    """moto's server until the block ends, on a free port: its endpoint URL."""
    port = _free_port()
    if behind_hours:
        command = [sys.executable, "-c", _BEHIND, str(behind_hours), "-H", "127.0.0.1", "-p", str(port)]
    else:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **CREDENTIALS})
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"moto did not start:\n{log.read_text()[-2000:]}") from None
                    time.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def client(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "kinesis",
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


def create_stream(endpoint: str, stream: str, shards: int) -> None:
    kinesis = client(endpoint)
    kinesis.create_stream(StreamName=stream, ShardCount=shards)
    wait_active(endpoint, stream)


def wait_active(endpoint: str, stream: str) -> None:
    kinesis = client(endpoint)
    deadline = time.monotonic() + 30
    while kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
        if time.monotonic() > deadline:
            raise RuntimeError(f"stream {stream} did not become ACTIVE")
        time.sleep(0.05)


def shards(endpoint: str, stream: str) -> list[dict[str, Any]]:
    return sorted(client(endpoint).list_shards(StreamName=stream)["Shards"], key=lambda s: s["ShardId"])


def open_shards(endpoint: str, stream: str) -> list[dict[str, Any]]:
    return [s for s in shards(endpoint, stream) if "EndingSequenceNumber" not in s["SequenceNumberRange"]]


def split(endpoint: str, stream: str, shard: dict[str, Any]) -> None:
    """Split a shard in two halves of its hash key range."""
    low, high = int(shard["HashKeyRange"]["StartingHashKey"]), int(shard["HashKeyRange"]["EndingHashKey"])
    client(endpoint).split_shard(
        StreamName=stream, ShardToSplit=shard["ShardId"], NewStartingHashKey=str((low + high) // 2)
    )
    wait_active(endpoint, stream)


def merge(endpoint: str, stream: str, first: dict[str, Any], second: dict[str, Any]) -> None:
    """Merge two adjacent shards."""
    client(endpoint).merge_shards(
        StreamName=stream, ShardToMerge=first["ShardId"], AdjacentShardToMerge=second["ShardId"]
    )
    wait_active(endpoint, stream)


def put(endpoint: str, stream: str, records: Sequence[tuple[str, bytes | dict[str, Any]]]) -> list[tuple[str, str]]:
    """Write (partition key, data) records, 500 to a request, in order; returns each one's (shard id, sequence
    number)."""
    kinesis = client(endpoint)
    written: list[tuple[str, str]] = []
    for at in range(0, len(records), 500):
        batch = records[at : at + 500]
        response = kinesis.put_records(
            StreamName=stream,
            Records=[
                {"PartitionKey": key, "Data": data if isinstance(data, bytes) else orjson.dumps(data)}
                for key, data in batch
            ],
        )
        assert response.get("FailedRecordCount", 0) == 0, response
        written += [(r["ShardId"], r["SequenceNumber"]) for r in response["Records"]]
    return written


def payload(event: NewEvent) -> dict[str, Any]:
    """An event as a producer writes it to a stream: its type a field of the data."""
    return {**event.data, "type": event.type}


def write_history(endpoint: str, stream: str, history: Sequence[tuple[str, NewEvent]]) -> None:
    put(endpoint, stream, [(key, payload(event)) for key, event in history])


def as_events(history: Sequence[tuple[str, NewEvent]]) -> list[Event]:
    """The history in the order it was written, as the oracle folds it (the data as written, type field included)."""
    now = datetime.now(UTC)
    versions: dict[str, int] = {}
    events = []
    for n, (stream, event) in enumerate(history, 1):
        versions[stream] = versions.get(stream, 0) + 1
        events.append(Event(n, stream, versions[stream], event.type, 1, payload(event), {}, now))
    return events


def source(endpoint: str | None, stream: str) -> KinesisSource:
    return KinesisSource("ledger", KinesisStream(stream), region=REGION, endpoint_url=endpoint)


def accounts(endpoint: str | None, stream: str, on_error: str = "stop") -> Projection:
    """`domain.accounts`, reading the stream: partition keys are account streams, the field `type` the type. The
    endpoint: `endpoint`, else REHYDRATE_SOURCE_LEDGER_ENDPOINT_URL."""
    return legacy.accounts(read=source(endpoint, stream), on_error=on_error)
