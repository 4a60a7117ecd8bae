"""How fast a replay reads a Kinesis stream: the same events replayed from rehydrate's own store and from a stream, in
the same run. The stream is moto's server mode, an emulator of the Kinesis API: the figure is moto's, not AWS's.

Usage:

    python bench/kinesis_speed.py --events 100000 --reuse          # 4 shards, 3 rounds
    python bench/kinesis_speed.py --events 250000 --shards 8 --runs 5

The store is `replay_speed.py`'s (the demo's order history, kept in `.rehydrate-bench/` with `--reuse`). moto's server
is started for the run on a free port (its state in memory) and stopped at the end (on Ctrl-C and SIGTERM too), so the
stream is made anew each run: the store's events are put into a stream of `--shards` shards, in the store's order,
each keyed by its stream id (Kinesis's MD5 of the partition key picks the shard), the payload's JSON with the event
type and the stream version added as the fields `type` and `version`, 500 records to a PutRecords request, by
`--producers` threads at once (a stream's events always through the same one, in order: moto keeps a request's
order). Every shard is then counted (GetRecords to its tip) against the records put (an error if they differ). The
put rate is printed, apart from the comparison.

Each round replays `order_summary` once from each, in turn, each with 2 `rehydrate worker` processes started for it:
from the own store with the default lanes, and from the stream with `sourced_orders.py`'s `order_summary` over the
source `kinesis`, declared in settings (REHYDRATE_SOURCES, `kind = "kinesis"`), whose lanes are the shards. Every table
is checked against the ceiling's, row for row; the stream's without `updated_at` (a record's recorded-at is its arrival
time in the stream, not the store's).

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
import sys
import time
import zlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import orjson
from common import postgres_server, print_source_speeds, run_script, stop_process, temporal
from replay_speed import HOME, PROJECTION, build_store, ceiling, differences, rate, replay, workers

BENCH = Path(__file__).resolve().parent
SOURCE = "kinesis"
STREAM = "orders"
REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": REGION}
WINDOW = 50_000  # events read from the store and put at a time
EVENTS = "SELECT stream_id, stream_version, event_type, payload::text FROM rehydrate.events ORDER BY global_position"
COLUMNS = "order_id, customer_id, status, items, total_cents, paid_cents"  # order_summary but updated_at


def start_moto(port: int, log: Path) -> subprocess.Popen[bytes]:
    """moto's server (`python -m moto.server`) on `port`, its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **CREDENTIALS},
        )


@contextlib.asynccontextmanager
async def moto(log: Path) -> AsyncIterator[str]:
    """moto's server on a free port until the block ends: its endpoint URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = start_moto(port, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    output = await asyncio.to_thread(log.read_text, errors="replace")
                    raise RuntimeError(f"moto did not start:\n{output[-2000:]}") from None
                await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        await stop_process(server)


def client(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "kinesis",
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )


def put_all(endpoint: str, records: list[tuple[str, bytes]]) -> dict[str, int]:
    """One producer's records, 500 to a request, in order; the records each shard got."""
    kinesis = client(endpoint)
    got: dict[str, int] = {}
    for at in range(0, len(records), 500):
        response = kinesis.put_records(
            StreamName=STREAM, Records=[{"PartitionKey": key, "Data": data} for key, data in records[at : at + 500]]
        )
        if response.get("FailedRecordCount"):
            raise RuntimeError(f"PutRecords failed for {response['FailedRecordCount']} record(s)")
        for record in response["Records"]:
            got[record["ShardId"]] = got.get(record["ShardId"], 0) + 1
    return got


async def produce(url: str, endpoint: str, shards: int, producers: int) -> tuple[int, float]:
    """The store's events put into a new stream; checks that every shard holds what was put into it. Returns the
    events and the seconds spent putting (the store's reads left out)."""
    kinesis = client(endpoint)
    kinesis.create_stream(StreamName=STREAM, ShardCount=shards)
    while kinesis.describe_stream_summary(StreamName=STREAM)["StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
        await asyncio.sleep(0.1)
    put: dict[str, int] = {}
    seconds = 0.0
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            cursor = await conn.cursor(EVENTS)
            with ThreadPoolExecutor(producers) as pool:
                while rows := await cursor.fetch(WINDOW):
                    lanes: list[list[tuple[str, bytes]]] = [[] for _ in range(producers)]
                    for stream, version, event_type, payload in rows:
                        data = orjson.dumps({**orjson.loads(payload), "type": event_type, "version": version})
                        lanes[zlib.crc32(stream.encode()) % producers].append((stream, data))
                    began = time.perf_counter()
                    loop = asyncio.get_running_loop()
                    puts = (loop.run_in_executor(pool, put_all, endpoint, lane) for lane in lanes)
                    done = await asyncio.gather(*puts)
                    seconds += time.perf_counter() - began
                    for got in done:
                        for shard, count in got.items():
                            put[shard] = put.get(shard, 0) + count
    finally:
        await conn.close()
    await asyncio.to_thread(check_shards, endpoint, put)
    return sum(put.values()), seconds


def check_shards(endpoint: str, put: dict[str, int]) -> None:
    """Each shard holds, read from its start to its tip, the records put into it: no record lost or doubled."""
    kinesis = client(endpoint)
    wrong = []
    for shard in kinesis.list_shards(StreamName=STREAM)["Shards"]:
        shard_id = shard["ShardId"]
        iterator = kinesis.get_shard_iterator(StreamName=STREAM, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON")
        iterator, held = iterator["ShardIterator"], 0
        while iterator:
            response = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
            held += len(response["Records"])
            if not response["Records"] and response.get("MillisBehindLatest", 0) == 0:
                break
            iterator = response.get("NextShardIterator")
        if held != put.get(shard_id, 0):
            wrong.append(f"{shard_id}: {held:,} records held, {put.get(shard_id, 0):,} put")
    if wrong:
        raise RuntimeError("the stream does not hold what was put: " + "; ".join(wrong))


async def differences_but_time(conn: asyncpg.Connection, table: str) -> int:
    """`differences`, without the rows' `updated_at`."""
    return int(
        await conn.fetchval(
            f"""SELECT count(*) FROM (
                    (SELECT {COLUMNS} FROM public.{table} EXCEPT ALL SELECT {COLUMNS} FROM bench.ceiling)
                    UNION ALL
                    (SELECT {COLUMNS} FROM bench.ceiling EXCEPT ALL SELECT {COLUMNS} FROM public.{table})) d"""
        )
    )


async def main(args: argparse.Namespace) -> int:
    await asyncio.to_thread(HOME.mkdir, exist_ok=True)
    for variable, value in CREDENTIALS.items():
        os.environ.setdefault(variable, value)
    async with (
        postgres_server(HOME / "pgdata", delete=False) as server_url,
        temporal() as client_,
        moto(HOME / "moto.log") as endpoint,
    ):
        url, _ = await build_store(server_url, args.events, args.reuse)
        print(f"putting {args.events:,} events into stream {STREAM!r} ({args.shards} shards) ...", flush=True)
        produced, produce_seconds = await produce(url, endpoint, args.shards, args.producers)
        source = {
            "kind": "kinesis",
            "stream": STREAM,
            "region": REGION,
            "endpoint_url": endpoint,
            "version_field": "version",
        }
        conn = await asyncpg.connect(url)
        try:
            _, events, _ = await ceiling(conn)
            own = "own store (rehydrate.events)"
            kinds = {
                own: ("rehydrate.examples.orders", {}),
                f"Kinesis stream ({args.shards} shards, moto)": (
                    "sourced_orders",
                    {
                        "REHYDRATE_BENCH_SOURCE": SOURCE,
                        "REHYDRATE_SOURCES": orjson.dumps({SOURCE: source}).decode(),
                        **CREDENTIALS,
                    },
                ),
            }
            speeds: dict[str, list[float]] = {kind: [] for kind in kinds}
            ratios: dict[str, list[float]] = {kind: [] for kind in kinds}
            wrong = 0
            for round_ in range(1, args.runs + 1):
                for kind, (module, extra) in kinds.items():
                    env = {"PYTHONPATH": str(BENCH), **extra}
                    async with workers(
                        url, client_, args.workers, HOME / "kinesis-worker.log", projections=module, extra=env
                    ) as (settings, _):
                        took, _, applied, _ = await replay(client_, settings, None)
                    table = PROJECTION.table.name
                    differ = await (differences(conn, table) if kind == own else differences_but_time(conn, table))
                    wrong += differ
                    speeds[kind].append(applied / took)
                    print(f"  round {round_}, {kind}: {took:.2f} s, {rate(applied, took)}, rows wrong: {differ}")
                base = speeds[own][-1]
                for kind in kinds:
                    ratios[kind].append(speeds[kind][-1] / base)
        finally:
            await conn.close()
    print()
    print(
        f"{args.events:,} events in the store; order_summary reads {events:,}; {os.cpu_count()} cores; "
        f"{args.workers} worker processes; {args.runs} rounds"
    )
    print(
        f"put into the stream (not compared): {produced:,} events in {produce_seconds:.1f} s, "
        f"{rate(produced, produce_seconds).strip()}, {args.producers} producers"
    )
    print_source_speeds(speeds, ratios)
    return 1 if wrong else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events in the store")
    parser.add_argument("--shards", type=int, default=4, help="shards of the stream (the Kinesis replay's lanes)")
    parser.add_argument(
        "--producers", type=int, default=1, help="threads putting records at once (moto does not lock a shard)"
    )
    parser.add_argument("--workers", type=int, default=2, help="rehydrate worker processes")
    parser.add_argument("--runs", type=int, default=3, help="rounds (the summary: median, range)")
    parser.add_argument("--reuse", action="store_true", help="reuse a store of the same size from an earlier run")
    run_script(main, parser.parse_args())
