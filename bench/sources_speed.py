"""How fast a replay reads a team's own events table: the same events replayed from rehydrate's own store, from a
mapped table in the same database, from a mapped table in another database, and from py-eventsourcing's table.

Usage:

    python bench/sources_speed.py --reuse                 # 1,000,000 events, 3 rounds
    python bench/sources_speed.py --events 250000 --runs 5

The store is `replay_speed.py`'s (the demo's order history, kept in `.rehydrate-bench/` with `--reuse`). Its events
are copied, once, into `legacy.order_events`: other column names, a `jsonb` payload, the transaction ids in an `xid8`
column `tx` (as `rehydrate sources prepare` adds one), a primary key on the position, an index on (tx, id) and a
unique (stream, version); the same table is copied into a second database on the same server. Workers for each are
`rehydrate worker` processes serving `sourced_orders.py`'s `order_summary`, which names the source, declared in
settings (REHYDRATE_SOURCES). The events are also stored as py-eventsourcing's application stores them (see
`es_orders.py`: the library's table, each state made and, when read, decoded by the application's mapper). Each
round replays `order_summary` once from each source, in turn (default lanes, 2 worker processes started for each
replay), and checks every table against the ceiling's, row for row.

Prints, for each source, the median events/s and the range, and the median ratio to the own store's replay in the
same round. Exit status 1 if a table differs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import es_orders
import orjson
from common import create_database, postgres_server, print_source_speeds, temporal
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


async def copy_eventsourcing(url: str, events: int) -> None:
    """py-eventsourcing's `orders_events` in `url` (made by the library), holding the store's events as the
    application's mapper stores them (kept once made), and `bench.es_ids`: each order's id beside its stream's uuid."""
    app = await asyncio.to_thread(es_orders.application, url)
    conn = await asyncpg.connect(url)
    try:
        await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=orjson.dumps, decoder=orjson.loads)
        if await conn.fetchval("SELECT count(*) FROM orders_events") == events:
            return
        await conn.execute("TRUNCATE orders_events")
        print(f"storing {events:,} events as py-eventsourcing's application does, into orders_events ...")
        columns = ["originator_id", "originator_version", "topic", "state", "notification_id"]
        async with conn.transaction():
            cursor = conn.cursor(
                "SELECT global_position, stream_id, stream_version, event_type, payload, recorded_at "
                "FROM rehydrate.events ORDER BY global_position"
            )
            batch: list[tuple[object, ...]] = []
            async for row in cursor:
                batch.append(es_orders.stored(app, row))
                if len(batch) == 50_000:
                    await conn.copy_records_to_table("orders_events", records=batch, columns=columns)
                    batch = []
            if batch:
                await conn.copy_records_to_table("orders_events", records=batch, columns=columns)
        await conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
        await conn.execute("DROP TABLE IF EXISTS bench.es_ids")
        await conn.execute("CREATE TABLE bench.es_ids (order_id text PRIMARY KEY, originator text NOT NULL UNIQUE)")
        ids = [row[0] for row in await conn.fetch("SELECT DISTINCT stream_id FROM rehydrate.events")]
        await conn.copy_records_to_table(
            "es_ids", schema_name="bench", records=[(i, str(es_orders.originator_id(i))) for i in ids]
        )
        await conn.execute("VACUUM ANALYZE orders_events")
    finally:
        await conn.close()
        await asyncio.to_thread(app.close)


async def rekeyed_differences(conn: asyncpg.Connection, table: str) -> int:
    """Rows that differ from the ceiling's once each stream's uuid is read back as its order id."""
    async with conn.transaction():
        await conn.execute(f"CREATE TEMP TABLE rekeyed ON COMMIT DROP AS SELECT * FROM public.{table}")
        await conn.execute(
            "UPDATE rekeyed r SET order_id = m.order_id FROM bench.es_ids m WHERE r.order_id = m.originator"
        )
        return int(
            await conn.fetchval(
                """SELECT count(*) FROM ((SELECT * FROM rekeyed EXCEPT ALL SELECT * FROM bench.ceiling)
                    UNION ALL (SELECT * FROM bench.ceiling EXCEPT ALL SELECT * FROM rekeyed)) d"""
            )
        )


async def main(args: argparse.Namespace) -> int:
    await asyncio.to_thread(HOME.mkdir, exist_ok=True)
    async with postgres_server(HOME / "pgdata", delete=False) as server_url, temporal() as client:
        url, _ = await build_store(server_url, args.events, args.reuse)
        other = await create_database(server_url, f"rh_bench_{args.events}_other", replace=False)
        await copy_table(url, url, args.events)
        await copy_table(url, other, args.events)
        await copy_eventsourcing(url, args.events)
        conn = await asyncpg.connect(url)
        try:
            await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=orjson.dumps, decoder=orjson.loads)
            _, events, _ = await ceiling(conn)
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
                "py-eventsourcing's table": ("es_orders", {"REHYDRATE_BENCH_ES_URL": url}),
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
                    check = rekeyed_differences if module == "es_orders" else differences
                    differ = await check(conn, PROJECTION.table.name)
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
    print_source_speeds(speeds, ratios)
    return 1 if wrong else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the store")
    parser.add_argument("--workers", type=int, default=2, help="rehydrate worker processes")
    parser.add_argument("--runs", type=int, default=3, help="rounds (the summary: median, range)")
    parser.add_argument("--reuse", action="store_true", help="reuse a store of the same size from an earlier run")
    quiet_exit(asyncio.run(main(parser.parse_args())))
