"""How fast a replay reads a team's own events table: the same events replayed from rehydrate's own store, from a
mapped table in the same database, and from a mapped table in another database.

Usage:

    python bench/sources_speed.py --reuse                 # 1,000,000 events, 3 rounds
    python bench/sources_speed.py --events 250000 --runs 5

The store is `replay_speed.py`'s (the demo's order history, kept in `.rehydrate-bench/` with `--reuse`). Its events
are copied, once, into `legacy.order_events`: other column names, a `jsonb` payload, the transaction ids in an `xid8`
column `tx` (as `rehydrate sources prepare` adds one), a primary key on the position, an index on (tx, id) and a
unique (stream, version); the same table is copied into a second database on the same server. Workers for each are
`rehydrate worker` processes serving `sourced_orders.py`'s `order_summary`, which names the source, declared in
settings (REHYDRATE_SOURCES). Each round replays `order_summary` once from each source, in turn (default lanes,
2 worker processes started for each replay), and checks every table against the ceiling's, row for row.

Prints, for each source, the median events/s and the range, and the median ratio to the own store's replay in the
same round. Exit status 1 if a table differs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import orjson
from common import create_database, postgres_server, temporal
from replay_speed import HOME, PROJECTION, build_store, ceiling, differences, rate, replay, workers

from rehydrate.core.temporal import quiet_exit

BENCH = Path(__file__).resolve().parent
COPY = """
CREATE SCHEMA IF NOT EXISTS legacy;
CREATE TABLE legacy.order_events (
    id bigint PRIMARY KEY, aggregate text NOT NULL, seq bigint NOT NULL, kind text NOT NULL, body jsonb NOT NULL,
    meta jsonb NOT NULL, created timestamptz NOT NULL, tx xid8 NOT NULL DEFAULT pg_current_xact_id(),
    UNIQUE (aggregate, seq));
"""
INDEX = "CREATE INDEX IF NOT EXISTS order_events_tx_id_idx ON legacy.order_events (tx, id)"
COLUMNS = "global_position, stream_id, stream_version, event_type, payload, metadata, recorded_at, tx_id"


def mapping(url: str | None) -> dict[str, object]:
    return {
        "table": "legacy.order_events",
        "position": "id",
        "stream_id": "aggregate",
        "stream_version": "seq",
        "event_type": "kind",
        "payload": "body",
        "payload_format": "jsonb",
        "metadata": "meta",
        "recorded_at": "created",
        "order": "transaction",
        "transaction": "tx",
        **({"url": url} if url else {}),
    }


async def copy_table(source_url: str, target_url: str, events: int) -> None:
    """`legacy.order_events` in `target_url`, holding the events of `source_url`'s own store (kept once made)."""
    target = await asyncpg.connect(target_url)
    try:
        if await target.fetchval("SELECT to_regclass('legacy.order_events') IS NOT NULL"):
            if await target.fetchval("SELECT count(*) FROM legacy.order_events") == events:
                await target.execute(INDEX)
                await target.execute("ANALYZE legacy.order_events")
                return
            await target.execute("DROP TABLE legacy.order_events")
        await target.execute(COPY)
        source = await asyncpg.connect(source_url)
        try:
            print(f"copying {events:,} events into legacy.order_events of {urlsplit(target_url).path[1:]} ...")
            async with source.transaction():
                cursor = source.cursor(f"SELECT {COLUMNS} FROM rehydrate.events ORDER BY global_position")
                batch: list[asyncpg.Record] = []
                async for row in cursor:
                    batch.append(row)
                    if len(batch) == 50_000:
                        await target.copy_records_to_table("order_events", schema_name="legacy", records=batch)
                        batch = []
                if batch:
                    await target.copy_records_to_table("order_events", schema_name="legacy", records=batch)
        finally:
            await source.close()
        await target.execute(INDEX)
        await target.execute("VACUUM ANALYZE legacy.order_events")
    finally:
        await target.close()


async def main(args: argparse.Namespace) -> int:
    await asyncio.to_thread(HOME.mkdir, exist_ok=True)
    async with postgres_server(HOME / "pgdata", delete=False) as server_url, temporal() as client:
        url, _ = await build_store(server_url, args.events, args.reuse)
        other = await create_database(server_url, f"rh_bench_{args.events}_other", replace=False)
        await copy_table(url, url, args.events)
        await copy_table(url, other, args.events)
        conn = await asyncpg.connect(url)
        try:
            await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=orjson.dumps, decoder=orjson.loads)
            _, events = await ceiling(conn)
            kinds = {
                "own store (rehydrate.events)": ("rehydrate.examples.orders", {}),
                "mapped table, same database": (
                    "sourced_orders",
                    {"REHYDRATE_SOURCES": orjson.dumps({"legacy": mapping(None)}).decode()},
                ),
                "mapped table, other database": (
                    "sourced_orders",
                    {"REHYDRATE_SOURCES": orjson.dumps({"legacy": mapping(other)}).decode()},
                ),
            }
            speeds: dict[str, list[float]] = {kind: [] for kind in kinds}
            ratios: dict[str, list[float]] = {kind: [] for kind in kinds}
            wrong = 0
            for round_ in range(1, args.runs + 1):
                for kind, (module, extra) in kinds.items():
                    env = {"REHYDRATE_BENCH_SOURCE": "legacy", "PYTHONPATH": str(BENCH), **extra}
                    async with workers(
                        url, client, args.workers, HOME / "sources-worker.log", projections=module, extra=env
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
    for kind in speeds:
        s, r = sorted(speeds[kind]), sorted(ratios[kind])
        print(
            f"{kind:<30} median {statistics.median(s):>9,.0f} events/s ({s[0]:,.0f} to {s[-1]:,.0f})  "
            f"= {statistics.median(r):4.0%} of the own store in the same round ({r[0]:.0%} to {r[-1]:.0%})"
        )
    return 1 if wrong else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the store")
    parser.add_argument("--workers", type=int, default=2, help="rehydrate worker processes")
    parser.add_argument("--runs", type=int, default=3, help="rounds (the summary: median, range)")
    parser.add_argument("--reuse", action="store_true", help="reuse a store of the same size from an earlier run")
    quiet_exit(asyncio.run(main(parser.parse_args())))
