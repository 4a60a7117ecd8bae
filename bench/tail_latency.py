"""How long until an appended event is in the read model: the tail's end-to-end latency under a steady load.

Usage:

    python bench/tail_latency.py                  # 300 events/s for 20 s, 4 writers, a worker process
    python bench/tail_latency.py --rate 800       # a heavier load
    python bench/tail_latency.py --in-process     # the worker in this process (rehydrate.worker.running_worker)
    python bench/tail_latency.py --rate 300 --seconds 20 --writers 4 --history 20000 --sample-ms 2

What it does: starts Postgres (embedded, in a temporary folder, stopped and deleted at the end; or, with
REHYDRATE_DATABASE_URL, a new scratch database on that server, dropped at the end) and a Temporal dev server (or
uses REHYDRATE_TEMPORAL_ADDRESS), runs a rehydrate worker with tails on, builds `order_summary` (the demo
projection of `rehydrate.examples.orders`) from a small history and waits until its tail applies a probe event.
Then several writers append events at a steady rate, one event per transaction, each recording its transaction
id and the time its commit returned. A sampler reads the active generation's `checkpoint_xmin` every few ms; an
event's latency is from its commit until the first sample whose checkpoint is past its transaction id. The tail
commits a batch's rows and its checkpoint in one transaction, so that is when readers see the event.

Prints the latency percentiles, the events/s achieved, how often the checkpoint moved, and whether the read
model equals a single-threaded fold of all events through the projection's handlers (exit status 1 if not).

By default the worker runs in a process of its own, as in production. With `--in-process` the tail shares this
process's event loop (and core) with the writers and the sampler, so their contention is part of its latency.
On a small machine the figures move a lot with other load: compare runs made under the same conditions.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from common import percentile, scratch_stack, spawn_worker, stop_process, worker_env
from temporalio.client import Client
from temporalio.service import RPCError

from rehydrate import Event, EventStore, NewEvent
from rehydrate.core.database import create_pool, ensure_schema
from rehydrate.core.settings import Settings
from rehydrate.core.temporal import quiet_exit
from rehydrate.engine.importer import import_events
from rehydrate.engine.projections import Projection, Registry
from rehydrate.examples import orders
from rehydrate.models import ReplayInput
from rehydrate.models.names import tail_workflow_id
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.worker import running_worker

PROJECTION = orders.order_summary
PROJECTION_MODULE = "rehydrate.examples.orders"
CHECKPOINT = """SELECT checkpoint_xmin::text::bigint FROM rehydrate.generations
                WHERE projection = $1 AND state = 'active'"""
APPLIED = "SELECT events_applied FROM rehydrate.generations WHERE projection = $1 AND state = 'active'"


def fold(projection: Projection, events: list[Event]) -> dict[Any, dict[str, Any]]:
    """The single-threaded reference: every event in position order through the handlers."""
    shape = projection.table
    rows: dict[Any, dict[str, Any] | None] = {}
    for event in sorted(events, key=lambda e: e.global_position):
        handler = projection.handlers.get(event.type)
        if handler is None:
            continue
        key = projection.key_of(event)
        current = rows.get(key)
        new = handler(None if current is None else dict(current), event)
        rows[key] = None if new is None else {**shape.blank_row, shape.key_column: key, **new}
    return {key: row for key, row in rows.items() if row is not None}


@contextlib.asynccontextmanager
async def worker(settings: Settings, client: Client, in_process: bool, log: Path) -> AsyncIterator[None]:
    """A rehydrate worker with tails on: in this process, or `python -m rehydrate worker` in another."""
    if in_process:
        async with running_worker(settings, Registry([PROJECTION]), client=client):
            yield
        return
    env = worker_env(settings, REHYDRATE_PROJECTIONS=PROJECTION_MODULE, REHYDRATE_TAILS="true")
    process = spawn_worker(env, log)
    try:
        yield
    finally:
        await stop_process(process)


async def wait_for_checkpoint(conn: asyncpg.Connection, past: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        checkpoint = await conn.fetchval(CHECKPOINT, PROJECTION.name)
        if checkpoint is not None and checkpoint > past:
            return True
        await asyncio.sleep(0.01)
    return False


async def main(args: argparse.Namespace) -> int:
    async with scratch_stack() as (scratch, url, client):
        return await run(args, scratch, url, client)


async def run(args: argparse.Namespace, scratch: Path, url: str, client: Client) -> int:
    pool = await create_pool(url, max_size=args.writers + 4)
    try:
        async with pool.acquire() as conn:
            await ensure_schema(conn, "rehydrate")
        store = EventStore(pool)
        began = time.perf_counter()
        await import_events(store, enumerate(orders.generate(args.history), start=1))
        settings = Settings(
            database_url=url,
            temporal_address=client.service_client.config.target_host,
            temporal_task_queue=f"bench-{uuid.uuid4().hex[:6]}",
            data_dir=scratch,
            projections=[PROJECTION_MODULE],
            tails=True,
        )
        # A task queue of its own: its tail's workflow id starts with it, so no other tail is in the way.
        tail = client.get_workflow_handle(tail_workflow_id(PROJECTION.name, settings.temporal_task_queue))
        log = scratch / "worker.log"
        try:
            async with worker(settings, client, args.in_process, log):
                return await measure(args, client, store, settings, url, began)
        except BaseException:
            if log.exists():
                print(f"--- worker log ---\n{log.read_text(errors='replace')[-4000:]}")
            raise
        finally:
            with contextlib.suppress(RPCError):
                await tail.terminate("benchmark finished")  # after the worker stopped: no cancelled activity
    finally:
        await pool.close()


async def measure(
    args: argparse.Namespace, client: Client, store: EventStore, settings: Settings, url: str, began: float
) -> int:
    result = await wait_for_replay(await start_replay(client, settings, ReplayInput(PROJECTION.name)))
    sampler_conn = await asyncpg.connect(url)
    try:
        # Warm-up: the swap started the tail; wait until it has applied a probe event.
        async with store.pool.acquire() as conn, conn.transaction():
            await store.append("bench-probe", [NewEvent("OrderPlaced", {"customer_id": "probe"})], connection=conn)
            probe = int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint"))
        if not await wait_for_checkpoint(sampler_conn, probe, 60):
            raise RuntimeError("the tail did not start within 60 s")
        print(
            f"built {PROJECTION.name} generation {result.generation} from {args.history:,} events; "
            f"tail running ({time.perf_counter() - began:.1f} s of set-up)"
        )

        commits: list[tuple[int, float]] = []  # (transaction id, commit returned)
        samples_t: list[float] = []  # when the sampler first saw each new checkpoint
        samples_cp: list[int] = []  # ... and that checkpoint (increasing)
        sample_count = 0
        stop = asyncio.Event()
        last_tx: int | None = None  # set once the writers have stopped: the sampler runs until the tail passes it

        async def writer(index: int) -> None:
            interval = args.writers / args.rate
            history = orders.generate(10_000_000, seed=100 + index)
            conn = await asyncpg.connect(url)
            try:
                next_at = time.perf_counter() + index * interval / args.writers  # staggered
                while not stop.is_set():
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                    line = next(history)
                    async with conn.transaction():
                        await store.append(
                            f"w{index}-{line['stream_id']}", [NewEvent(line["type"], line["data"])], connection=conn
                        )
                        tx = int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint"))
                    commits.append((tx, time.perf_counter()))
                    next_at += interval
            finally:
                await conn.close()

        async def sampler() -> None:
            nonlocal sample_count
            last = -1
            while True:
                checkpoint = int(await sampler_conn.fetchval(CHECKPOINT, PROJECTION.name))
                now = time.perf_counter()
                sample_count += 1
                if checkpoint > last:
                    samples_t.append(now)
                    samples_cp.append(checkpoint)
                    last = checkpoint
                if last_tx is not None and last > last_tx:
                    return
                await asyncio.sleep(args.sample_ms / 1000)

        applied_before = await store.pool.fetchval(APPLIED, PROJECTION.name)
        sampling = asyncio.create_task(sampler())
        started = time.perf_counter()
        writers = [asyncio.create_task(writer(i)) for i in range(args.writers)]
        await asyncio.sleep(args.seconds)
        stop.set()
        await asyncio.gather(*writers)
        elapsed = time.perf_counter() - started
        last_tx = max((tx for tx, _ in commits), default=probe)
        try:
            await asyncio.wait_for(sampling, 120)
        except TimeoutError:
            print("the tail did not catch up within 120 s of the last append")
            return 1
        drained = samples_t[-1] - started - elapsed

        latencies = sorted(
            max(0.0, samples_t[bisect.bisect_right(samples_cp, tx)] - committed) * 1000 for tx, committed in commits
        )
        applied = await store.pool.fetchval(APPLIED, PROJECTION.name) - applied_before
        rows = await store.pool.fetch(f'SELECT * FROM public."{PROJECTION.table.name}"')
        got = {row[PROJECTION.table.key_column]: dict(row) for row in rows}
        every = await store.pool.fetch(
            "SELECT global_position, stream_id, stream_version, event_type, schema_version, payload, metadata, "
            "recorded_at FROM rehydrate.events ORDER BY global_position"
        )
        expected = fold(PROJECTION, [Event(*row) for row in every])
    finally:
        await sampler_conn.close()

    where = "in-process worker" if args.in_process else "worker process"
    print(
        f"appended {len(commits):,} events in {elapsed:.1f} s: {len(commits) / elapsed:,.0f} events/s achieved "
        f"(target {args.rate:,.0f}/s, {args.writers} writers, one event per transaction, {where})"
    )
    print(
        f"latency commit -> visible in the read model: p50 {percentile(latencies, 50):.0f} ms, "
        f"p95 {percentile(latencies, 95):.0f} ms, p99 {percentile(latencies, 99):.0f} ms, "
        f"max {latencies[-1]:.0f} ms, mean {statistics.fmean(latencies):.0f} ms"
    )
    print(
        f"tail: applied {applied:,} events; its checkpoint was seen to advance {len(samples_t):,} times "
        f"(~{applied / max(len(samples_t), 1):.1f} events each); caught up {drained * 1000:.0f} ms after the last "
        f"append; checkpoint sampled {sample_count:,} times (every ~{args.sample_ms:g} ms + a query)"
    )
    equal = got == expected
    print(f"read model equals the single-threaded fold: {equal} ({len(got):,} rows, {len(every):,} events)")
    return 0 if equal else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=300.0, help="events per second, over all writers")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to append")
    parser.add_argument("--writers", type=int, default=4, help="concurrent writers, one connection each")
    parser.add_argument("--history", type=int, default=20_000, help="events in the initial history")
    parser.add_argument("--sample-ms", type=float, default=2.0, help="checkpoint sampling interval")
    parser.add_argument("--in-process", action="store_true", help="run the worker in this process")
    code = asyncio.run(main(parser.parse_args()))
    quiet_exit(code)
