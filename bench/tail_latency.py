"""How long until an appended event is in the read model: the tail's end-to-end latency under a steady load.

    python bench/tail_latency.py [--rate 300] [--seconds 20] [--writers 4]

Starts a Temporal dev server and Postgres (embedded in a temporary folder, or the server of
REHYDRATE_DATABASE_URL, in a new database), builds `order_summary` from a 20,000-event history, then appends
events at a steady rate from several writers while the tail runs. For each event it records its commit time and
transaction id; a sampler polls the active generation's checkpoint every 2 ms, and an event's latency is the
time from its commit until the checkpoint passes its transaction (rows and checkpoint commit together, so that is
when readers see it). Prints the percentiles and checks the read model against a plain fold of all events.
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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from temporalio.testing import WorkflowEnvironment

from rehydrate.database import create_pool, embedded_url, ensure_schema
from rehydrate.dev import quiet_exit, temporal_cli
from rehydrate.examples import orders
from rehydrate.importer import import_events
from rehydrate.models import ReplayInput
from rehydrate.projections import Projection, Registry
from rehydrate.settings import Settings
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.store import Event, EventStore, NewEvent
from rehydrate.worker import running_worker


def fold(projection: Projection, events: list[Event]) -> dict[Any, dict[str, Any]]:
    """The single-threaded reference: every event in position order through the handlers."""
    shape = projection.table
    rows: dict[Any, dict[str, Any] | None] = {}
    for event in events:
        handler = projection.handlers.get(event.type)
        if handler is None:
            continue
        key = projection.key_of(event)
        current = rows.get(key)
        new = handler(None if current is None else dict(current), event)
        rows[key] = None if new is None else {**shape.blank_row, shape.key_column: key, **new}
    return {key: row for key, row in rows.items() if row is not None}


async def main(rate: float, seconds: float, writers: int) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="rehydrate-bench-"))
    import os

    server_url = os.environ.get("REHYDRATE_DATABASE_URL") or await asyncio.to_thread(embedded_url, scratch)
    name = f"rh_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_cli())
    pool = await create_pool(url, max_size=writers + 4)
    try:
        async with pool.acquire() as conn:
            await ensure_schema(conn, "rehydrate")
        store = EventStore(pool)
        await import_events(store, enumerate(orders.generate(20_000), start=1))
        settings = Settings(
            database_url=url,
            temporal_address=env.client.service_client.config.target_host,
            temporal_task_queue=f"bench-{uuid.uuid4().hex[:6]}",
            data_dir=scratch,
            tails=True,
        )
        registry = Registry([orders.order_summary])
        async with running_worker(settings, registry, client=env.client):
            await wait_for_replay(await start_replay(env.client, settings, ReplayInput("order_summary")))
            commits: list[tuple[int, float]] = []
            samples: list[tuple[float, int]] = []
            stop = asyncio.Event()

            async def sampler() -> None:
                conn = await asyncpg.connect(url)
                try:
                    while not stop.is_set() or not commits or samples[-1][1] <= max(t for t, _ in commits):
                        checkpoint = await conn.fetchval(
                            """SELECT g.checkpoint_xmin::text::bigint FROM rehydrate.generations g
                               JOIN rehydrate.projections p ON p.active_generation = g.generation
                                AND p.name = g.projection WHERE g.projection = 'order_summary'"""
                        )
                        samples.append((time.perf_counter(), int(checkpoint)))
                        await asyncio.sleep(0.002)
                finally:
                    await conn.close()

            async def writer(index: int) -> None:
                interval = writers / rate
                history = orders.generate(2_000_000, seed=100 + index)
                conn = await asyncpg.connect(url)
                try:
                    next_at = time.perf_counter()
                    while not stop.is_set():
                        line = next(history)
                        event = NewEvent(line["type"], line["data"])
                        async with conn.transaction():
                            await store.append(f"w{index}-{line['stream_id']}", [event], connection=conn)
                            tx = int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint"))
                        commits.append((tx, time.perf_counter()))
                        next_at += interval
                        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                finally:
                    await conn.close()

            sampling = asyncio.create_task(sampler())
            started = time.perf_counter()
            tasks = [asyncio.create_task(writer(i)) for i in range(writers)]
            await asyncio.sleep(seconds)
            stop.set()
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - started
            await asyncio.wait_for(sampling, 60)

        latencies = []
        for tx, committed in commits:
            seen = next(at for at, checkpoint in samples if checkpoint > tx and at >= committed - 1)
            latencies.append(max(seen - committed, 0.0) * 1000)
        latencies.sort()

        def pct(p: float) -> float:
            return latencies[min(len(latencies) - 1, int(p * len(latencies)))]

        rows = await pool.fetch("SELECT * FROM order_summary")
        got = {row["order_id"]: dict(row) for row in rows}
        every = await pool.fetch(
            "SELECT global_position, stream_id, stream_version, event_type, schema_version, payload, metadata, "
            "recorded_at FROM rehydrate.events ORDER BY global_position"
        )
        expected = fold(orders.order_summary, [Event(*row) for row in every])
        print(
            f"appended {len(commits):,} events in {elapsed:.1f} s ({len(commits) / elapsed:,.0f} events/s, "
            f"{writers} writers, target {rate:,.0f}/s)"
        )
        print(
            f"latency commit → visible in the read model: p50 {pct(0.5):.0f} ms, p95 {pct(0.95):.0f} ms, "
            f"p99 {pct(0.99):.0f} ms, max {latencies[-1]:.0f} ms, mean {statistics.fmean(latencies):.0f} ms"
        )
        print(f"read model equals the single-threaded fold: {got == expected} ({len(got):,} rows)")
    finally:
        await pool.close()
        await env.shutdown()
        with contextlib.suppress(Exception):
            admin = await asyncpg.connect(server_url)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=300.0, help="events per second, over all writers")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to append")
    parser.add_argument("--writers", type=int, default=4, help="concurrent writers")
    args = parser.parse_args()
    asyncio.run(main(args.rate, args.seconds, args.writers))
    quiet_exit(0)
