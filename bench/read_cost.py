"""What one event costs a worker and Postgres: CPU per event of reading the whole store as a lane reads it (one range
read, stream by stream; or, with --hash N, each of N hash lanes chunk by chunk) and folding it into `order_summary`,
in this process and in the Postgres backend serving it.

    python bench/read_cost.py                      # over replay_speed's store of 1,000,000 events (build it first)
    python bench/read_cost.py --runs 9 --against ../other-checkout
    python bench/read_cost.py --hash 8             # 8 hash lanes, chunks of 100,000 events, as a replay reads them

The worker's side is this process's CPU time with the worker's garbage-collector settings; the server's is its
backend's (from /proc: Linux, a local server). No rows are written: replay_speed times a whole replay. With --against,
runs alternate with another checkout's rehydrate (a process each), so that both see the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from common import postgres_server, run_script, with_database  # bench/ is on sys.path: the script's folder

HOME = Path(".rehydrate-bench")


def backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CHUNK = 100_000  # a replay's default chunk size


async def hash_lanes(store: Any, conn: asyncpg.Connection, lanes: int, types: Any, key: Any) -> AsyncIterator[Any]:
    """Every event of each of `lanes` hash lanes, read chunk by chunk (a savepoint each) as a replay's chunks read
    them."""
    for lane in range(lanes):
        position, fetched = 0, CHUNK
        while fetched == CHUNK:
            async with conn.transaction():
                fetched = 0
                batches = store.read_lane(
                    conn, after_position=position, mark=2**62, types=types, key=key, lane=lane, lanes=lanes, limit=CHUNK
                )
                async for batch in batches:
                    fetched += len(batch)
                    position = batch[-1].global_position
                    yield batch


async def one_read(url: str, lanes: int | None) -> tuple[float, float]:
    """(this process's, the backend's) CPU µs per event of one read and fold of the whole store: stream by stream,
    or (`lanes`) by hash lanes."""
    from rehydrate.cli import tune_gc
    from rehydrate.engine.apply import fold
    from rehydrate.examples import orders
    from rehydrate.sources.store import EventStore

    tune_gc()
    projection = orders.order_summary
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    assert pool is not None
    try:
        store = EventStore(pool)
        async with pool.acquire() as conn, conn.transaction():  # the hash lanes' chunks: a savepoint each
            pid = conn.get_server_pid()
            server, began = backend_cpu(pid), time.process_time()
            state: dict[Any, Any] = {}
            events = 0
            types, key = projection.event_types, projection.key
            batches = (
                store.read_streams(conn, low=None, high=None, after=None, mark=2**62, types=types, limit=2**62)
                if lanes is None
                else hash_lanes(store, conn, lanes, types, key)
            )
            async for batch in batches:
                events += len(batch)
                fold(projection, batch, state, {})
            client = time.process_time() - began
            server = backend_cpu(pid) - server
    finally:
        await pool.close()
    return client / events * 1e6, server / events * 1e6


async def stored_events(url: str) -> int:
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        return 0
    try:
        return int(await conn.fetchval("SELECT count(*) FROM rehydrate.events"))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


def measured(url: str, checkout: Path | None, lanes: int | None) -> tuple[float, float]:
    """One read in a fresh process of `checkout`'s rehydrate (None: this one's)."""
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout.resolve())
    command = [sys.executable, __file__, "--one", url, *(["--hash", str(lanes)] if lanes else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    client, server = done.stdout.split()
    return float(client), float(server)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} µs ({min(values):.2f}–{max(values):.2f})"


async def main(args: argparse.Namespace) -> int:
    if args.one:
        client, server = await one_read(args.one, args.hash)
        print(f"{client} {server}")
        return 0
    async with postgres_server(HOME / "pgdata", delete=False) as server_url:
        url = with_database(server_url, f"rh_bench_{args.events}")
        count = await stored_events(url)
        if count != args.events:
            print(f"no store of {args.events:,} events: run python bench/replay_speed.py --events {args.events} first")
            return 1
        sides: dict[str, Path | None] = {"this checkout": None}
        if args.against:
            sides[str(args.against)] = args.against
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        for run in range(args.runs):
            for name, checkout in sides.items():
                results[name].append(await asyncio.to_thread(measured, url, checkout, args.hash))
                worker, backend = results[name][-1]
                print(f"run {run + 1}, {name}: worker {worker:.2f} µs, Postgres {backend:.2f} µs per event")
        print(f"\nCPU per event over {args.events:,} events, median (range) of {args.runs} runs:")
        for name, runs in results.items():
            worker, backend = [r[0] for r in runs], [r[1] for r in runs]
            print(f"  {name}: worker {summary(worker)}, Postgres {summary(backend)}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="the store's size (replay_speed's --events)")
    parser.add_argument("--runs", type=int, default=5, help="reads of each checkout")
    parser.add_argument("--against", type=Path, help="another checkout to alternate with")
    parser.add_argument("--hash", type=int, metavar="LANES", help="read by this many hash lanes, chunk by chunk")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one read of this database's store, in this process
    run_script(main, parser.parse_args())
