"""Rehydration figures: loading one long stream with and without a snapshot, and the bulk snapshot rebuild's throughput.

Usage:

    python bench/snapshots.py                              # 10,000-event stream; rebuild over the 250,000-event demo
    python bench/snapshots.py --stream-events 10000 --history 250000 --partitions 4 --chunk-size 500 --in-process

What it does: starts Postgres and a Temporal dev server (bench/common.py) (or uses
REHYDRATE_DATABASE_URL / REHYDRATE_TEMPORAL_ADDRESS), then

1. appends one `Order` stream (`rehydrate.examples.order_aggregate`) of `--stream-events` events: an OrderPlaced
   v1 (upcast to v2 on every read) and items added and removed, and times `Repository.load` (median of 7) from
   the events alone, and from a snapshot 25 events behind the head (what `snapshot_every=50` leaves on average);
   both loads must give the same state;
2. imports the demo's order history (`--history` events over ~`history/8.5` streams) and runs `rehydrate
   snapshots rebuild order` (the SnapshotRebuild workflow) on a worker in its own process (or, with
   `--in-process`, in this one), and prints streams/s; checks a sample of snapshots against plain loads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from common import (  # bench/ is on sys.path: the script's folder
    create_database,
    drop_database,
    postgres_server,
    spawn_worker,
    stop_process,
    temporal,
    worker_env,
)
from temporalio.client import Client

from rehydrate import EventStore, NewEvent
from rehydrate.core.database import create_pool, ensure_schema
from rehydrate.core.settings import Settings
from rehydrate.core.temporal import quiet_exit
from rehydrate.engine.aggregates import AggregateRegistry, Repository
from rehydrate.engine.importer import import_events
from rehydrate.engine.projections import Registry
from rehydrate.engine.snapshots import SnapshotStore
from rehydrate.examples import orders
from rehydrate.examples.order_aggregate import Order
from rehydrate.models import SnapshotRebuildInput
from rehydrate.starter import start_snapshot_rebuild, wait_for_snapshot_rebuild
from rehydrate.worker import running_worker

AGGREGATE_MODULE = "rehydrate.examples.order_aggregate"


async def timed_loads(repository: Repository[Order], stream: str, runs: int = 7) -> tuple[float, Order]:
    times = []
    order = None
    for _ in range(runs):
        began = time.perf_counter()
        order = await repository.load(stream)
        times.append(time.perf_counter() - began)
    assert order is not None
    return statistics.median(times), order


async def long_stream(store: EventStore, events: int) -> None:
    stream = "order-long"
    history = [NewEvent("OrderPlaced", {"order_id": stream, "customer_id": "c-1"}, schema_version=1)]
    for i in range(events - 1):
        # Five lines added, then the same five removed: the state stays small while the stream grows.
        cycle, j = divmod(i, 10)
        line = {"sku": f"sku-{cycle % 50}-{j % 5}", "quantity": 1 + j % 5, "unit_price_cents": 100 + cycle}
        history.append(NewEvent("ItemAdded" if j < 5 else "ItemRemoved", line))
    for start in range(0, events, 1000):
        await store.append(stream, history[start : start + 1000])
    cold = Repository(store, Order, use_snapshots=False)
    warm = Repository(store, Order)
    without, order = await timed_loads(cold, stream)
    assert order.version == events, order.version
    behind = await cold.load(stream, version=events - 25)
    await warm.snapshot(behind)
    with_snapshot, warm_order = await timed_loads(warm, stream)
    assert warm_order.model_dump() == order.model_dump() and warm_order.version == order.version
    print(
        f"load of a {events:,}-event stream: {without * 1000:.1f} ms from the events alone, "
        f"{with_snapshot * 1000:.1f} ms from a snapshot 25 events behind ({without / with_snapshot:.0f}x)"
    )


@contextlib.asynccontextmanager
async def worker(settings: Settings, client: Client, in_process: bool, log: Path) -> AsyncIterator[None]:
    if in_process:
        async with running_worker(settings, Registry(), client=client, aggregates=AggregateRegistry([Order])):
            yield
        return
    env = worker_env(settings, REHYDRATE_PROJECTIONS="", REHYDRATE_AGGREGATES=AGGREGATE_MODULE, REHYDRATE_TAILS="false")
    process = spawn_worker(env, log)
    try:
        yield
    finally:
        await stop_process(process)


async def bulk(args: argparse.Namespace, store: EventStore, settings: Settings, client: Client, log: Path) -> None:
    report = await import_events(store, enumerate(orders.generate(args.history), start=1), source="demo history")
    print(f"imported the demo history: {report.events:,} events in {report.streams:,} streams")
    input = SnapshotRebuildInput("order", partitions=args.partitions, chunk_size=args.chunk_size)
    async with worker(settings, client, args.in_process, log):
        began = time.perf_counter()
        result = await wait_for_snapshot_rebuild(await start_snapshot_rebuild(client, settings, input))
        wall = time.perf_counter() - began
    print(
        f"bulk snapshot rebuild of order: {result.streams:,} streams in {result.seconds:.1f} s "
        f"({result.streams_per_second:,.0f} streams/s from plan to end; {wall:.1f} s from start to result, "
        "worker start-up included) "
        f"({args.partitions} partitions, chunks of {args.chunk_size}, "
        f"worker {'in this process' if args.in_process else 'in its own process'})"
    )
    snapshots = await SnapshotStore(store.pool).all("order")
    cold = Repository(store, Order, use_snapshots=False)
    for snapshot in snapshots[:: max(len(snapshots) // 200, 1)]:
        assert (await cold.load(snapshot.stream_id)).to_snapshot() == snapshot, snapshot.stream_id
    print(f"a sample of {len(snapshots[:: max(len(snapshots) // 200, 1)])} snapshots equals plain loads")


async def main(args: argparse.Namespace) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="rehydrate-bench-"))
    try:
        async with postgres_server(scratch / "pgdata", delete=True) as server, temporal() as client:
            name = f"rh_bench_{uuid.uuid4().hex[:8]}"
            url = await create_database(server, name)
            settings = Settings(
                database_url=url,
                temporal_address=str(client.service_client.config.target_host),
                temporal_task_queue=f"rehydrate-bench-{uuid.uuid4().hex[:8]}",
                data_dir=scratch / "data",
                tails=False,
            )
            pool = await create_pool(url)
            try:
                async with pool.acquire() as conn:
                    await ensure_schema(conn, settings.schema_name)
                store = EventStore(pool, settings.schema_name)
                await long_stream(store, args.stream_events)
                await bulk(args, store, settings, client, scratch / "worker.log")
            finally:
                await pool.close()
                await drop_database(server, name)
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stream-events", type=int, default=10_000, help="events in the long stream")
    parser.add_argument("--history", type=int, default=250_000, help="events in the demo history for the rebuild")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the rebuild")
    parser.add_argument("--chunk-size", type=int, default=500, help="streams per chunk")
    parser.add_argument("--in-process", action="store_true", help="run the worker in this process")
    quiet_exit(asyncio.run(main(parser.parse_args())))
