"""How fast a projection with a child table replays: rehydrate against the pure-SQL ceiling of its two tables.

Usage:

    python bench/child_tables_speed.py --reuse               # 1,000,000 events, 2 worker processes, 8 lanes, 3 runs
    python bench/child_tables_speed.py --runs 5 --lanes 4,8 --reuse
    python bench/child_tables_speed.py --events 20000 --runs 1   # a quick look

The store is `replay_speed.py`'s (the demo's order history, kept in `.rehydrate-bench/` with `--reuse`). The
projection is `orders` of `rehydrate.examples.order_lines`: the main table `orders` (one row per order) and the child
table `order_lines` (one row per product of an order), built in one generation and swapped together.

1. **ceiling**: both tables built by one hand-written statement (`INSERT … SELECT … GROUP BY`, the lines'
   aggregate shared by both tables, no Python in the loop), their secondary indexes built afterwards and both
   analyzed, as rehydrate does. It is timed once before the replays, and again right before and right after every
   replay: a replay is compared with the mean of the two beside it (this machine's speed drifts within minutes).
2. **rehydrate**: `--workers` real `rehydrate worker` processes serving `rehydrate.examples.order_lines` (lanes by
   stream range), a Temporal dev server (started as `rehydrate dev` starts one); for each lane count, `--runs` full
   replays of `orders` from `replay start` to the swap of both tables (the swap activity's completion in the
   replay's history). Both tables are compared with the ceiling's, row for row.

Like `order_summary`'s ceiling in `replay_speed.py`, the statement is the fastest formulation that holds for the
demo's histories, and row-for-row equality with the projection is what proves it on them: a status is derived from
which status events an order has (paid → shipped → delivered, or cancelled); a line's quantity is what its SKU's
`ItemAdded` events added minus what its `ItemRemoved` events took back, and the line exists when that is above 0
(the demo removes only a line it added, whole, after all additions, so the projection's rules never clamp: a removal
of a SKU without a line is ignored, one of at least the line's quantity deletes it); its price is the last
`ItemAdded`'s; an order's `total_cents` sums quantity × the event's price over its item events, `lines` counts its
lines, and `updated_at` is its last event's time (every handled event of a kept order changes the row). Orders with
an `OrderArchived` event, or without an `OrderPlaced` one, have no rows in either table.

Prints events/s of the ceiling and of each replay, the ratio of each replay to the ceiling beside it, and for each
lane count the median and the range (min to max) over the runs, never the best run; for each replay the CPU time each
process group used and its phases from its Temporal history. Exit status 1 if a table differs.
Postgres: an embedded server kept in `.rehydrate-bench/pgdata` (stopped at the end), or the server of
REHYDRATE_DATABASE_URL. Temporal: a dev server started for the run, or REHYDRATE_TEMPORAL_ADDRESS. Everything it
started is stopped at the end, on Ctrl-C and on SIGTERM too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import asyncpg
from common import cpu_seconds, cpu_used, peak_rss_mb, postgres_server, run_script, temporal
from replay_speed import HOME, build_store, differences, rate, replay, workers

from rehydrate.core.settings import RANGE_LANES
from rehydrate.engine.readmodels import create_index_sql, create_table_sql
from rehydrate.examples.order_lines import orders

MODULE = "rehydrate.examples.order_lines"
PROJECTION = orders
TYPES = PROJECTION.event_types or []
CEILINGS = {shape.name: f"bench.ceiling_{shape.name}" for shape in PROJECTION.tables}  # read-model table → ceiling's

ADDED = "CASE event_type WHEN 'ItemAdded' THEN 1 WHEN 'ItemRemoved' THEN -1 END * (payload ->> 'quantity')::int"

# Both tables in one statement. The item events' aggregate by (order, SKU) feeds the lines and the orders' `lines`
# and `total_cents`, so it is computed once (MATERIALIZED); the orders kept decide which lines are written. Faster
# here than one statement per table (which groups the item events twice) and than one pass grouping every event by
# (order, SKU) and rolling that up by order.
CEILING = f"""
WITH line AS MATERIALIZED (
    SELECT stream_id, payload ->> 'sku' AS sku, sum({ADDED}) AS quantity,
           sum({ADDED} * (payload ->> 'unit_price_cents')::int) AS cents,
           (max(ARRAY[global_position, (payload ->> 'unit_price_cents')::bigint])
               FILTER (WHERE event_type = 'ItemAdded'))[2] AS unit_price_cents
    FROM rehydrate.events
    WHERE event_type IN ('ItemAdded', 'ItemRemoved')
    GROUP BY stream_id, payload ->> 'sku'
), kept AS MATERIALIZED (
    SELECT stream_id,
           min(payload ->> 'customer_id') FILTER (WHERE event_type = 'OrderPlaced') AS customer_id,
           CASE WHEN bool_or(event_type = 'OrderCancelled') THEN 'cancelled'
                WHEN bool_or(event_type = 'OrderDelivered') THEN 'delivered'
                WHEN bool_or(event_type = 'OrderShipped') THEN 'shipped'
                WHEN bool_or(event_type = 'OrderPaid') THEN 'paid'
                ELSE 'placed' END AS status,
           max(recorded_at) AS updated_at
    FROM rehydrate.events
    WHERE event_type = ANY($1::text[])
    GROUP BY stream_id
    HAVING bool_or(event_type = 'OrderPlaced') AND NOT bool_or(event_type = 'OrderArchived')
), lines_written AS (
    INSERT INTO {CEILINGS["order_lines"]} (order_id, sku, quantity, unit_price_cents)
    SELECT stream_id, sku, quantity, unit_price_cents FROM line JOIN kept USING (stream_id) WHERE quantity > 0
)
INSERT INTO {CEILINGS["orders"]} (order_id, customer_id, status, lines, total_cents, updated_at)
SELECT stream_id, customer_id, status, coalesce(totals.lines, 0), coalesce(totals.cents, 0), updated_at
FROM kept
LEFT JOIN (SELECT stream_id, count(*) FILTER (WHERE quantity > 0) AS lines, sum(cents) AS cents
           FROM line GROUP BY stream_id) totals USING (stream_id)
"""


def ceiling_ddl() -> tuple[list[str], list[str]]:
    """The ceiling's tables made as rehydrate makes a generation's (primary keys only), and their secondary
    indexes."""
    tables, indexes = [], []
    for shape in PROJECTION.tables:
        physical, name = shape.physical_name(0), CEILINGS[shape.name].removeprefix("bench.")
        tables.append(create_table_sql(shape, "bench", 0).replace(physical, name))
        indexes += [sql.replace(physical, name) for sql in create_index_sql(shape, "bench", 0)]
    return tables, indexes


async def ceiling(conn: asyncpg.Connection) -> tuple[float, int]:
    """Both tables rebuilt by the ceiling: its seconds, and the events of the projection's types."""
    tables, indexes = ceiling_ddl()
    await conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
    await conn.execute(f"DROP TABLE IF EXISTS {', '.join(CEILINGS.values())}")
    for sql in tables:
        await conn.execute(sql)
    began = time.perf_counter()
    async with conn.transaction():
        await conn.execute(CEILING, TYPES)
        for sql in indexes:
            await conn.execute(sql)
    for table in CEILINGS.values():
        await conn.execute(f"ANALYZE {table}")
    seconds = time.perf_counter() - began
    events = await conn.fetchval("SELECT count(*) FROM rehydrate.events WHERE event_type = ANY($1::text[])", TYPES)
    return seconds, int(events)


def spread(values: list[float], form: str) -> str:
    """The median, and the range when there are several."""
    s = sorted(values)
    median = format(statistics.median(s), form)
    return median + (f" ({format(s[0], form)} to {format(s[-1], form)})" if len(s) > 1 else "")


async def main(args: argparse.Namespace) -> int:
    await asyncio.to_thread(HOME.mkdir, exist_ok=True)
    async with postgres_server(HOME / "pgdata", delete=False) as server_url, temporal() as client:
        url, _ = await build_store(server_url, args.events, args.reuse)
        conn = await asyncpg.connect(url)
        try:
            await conn.fetchval("SELECT count(*) FROM rehydrate.events")  # warm the cache
            first, events = await ceiling(conn)
            ceilings = [first]
            rows = {table: await conn.fetchval(f"SELECT count(*) FROM {c}") for table, c in CEILINGS.items()}
            print(
                f"events of the types {PROJECTION.name} handles: {events:,}; the ceiling's rows: "
                + ", ".join(f"{table} {n:,}" for table, n in rows.items()),
                flush=True,
            )
            results: dict[int, list[tuple[float, float]]] = {lanes: [] for lanes in args.lanes}  # events/s, ratio
            wrong = 0
            async with workers(url, client, args.workers, HOME / "child-tables-worker.log", projections=MODULE) as (
                settings,
                pids,
            ):
                for round_ in range(1, args.runs + 1):
                    for lanes in args.lanes:
                        ceilings.append((await ceiling(conn))[0])
                        before = cpu_seconds(pids)
                        took, to_end, applied, spent = await replay(
                            client, settings, lanes, args.chunk_size, projection=PROJECTION.name
                        )
                        used = cpu_used(before, cpu_seconds(pids))
                        differ = {table: await differences(conn, table, c) for table, c in CEILINGS.items()}
                        wrong += sum(differ.values())
                        after, _ = await ceiling(conn)
                        beside = (ceilings[-1] + after) / 2
                        ceilings.append(after)
                        speed = applied / took
                        results[lanes].append((speed, speed / (events / beside)))
                        print(
                            f"  run {round_}, {lanes} lane(s): {took:.2f} s to the swap, {rate(applied, took)}, "
                            f"{speed / (events / beside):.0%} of the ceiling beside it (before and after it: "
                            f"{rate(events, ceilings[-2]).strip()}, {rate(events, after).strip()}); the workflow "
                            f"ended {to_end - took:.2f} s later; rows wrong: "
                            + ", ".join(f"{table} {n:,}" for table, n in differ.items()),
                            flush=True,
                        )
                        print(f"    CPU time during it: {used} (this script: not counted)")
                        print(f"    its history: {spent}")
                rss = [peak_rss_mb(pid) for pid in pids]
        finally:
            await conn.close()

    print()
    print(
        f"{args.events:,} events in the store; {PROJECTION.name} reads {events:,}; "
        + ", ".join(f"{table} {n:,} rows" for table, n in rows.items())
        + f"; {os.cpu_count()} cores; {args.workers} worker processes; {args.runs} run(s) of each lane count"
    )
    print(
        f"ceiling (INSERT…SELECT…GROUP BY, both tables)  median {spread([events / s for s in ceilings], ',.0f')} "
        f"events/s over {len(ceilings)} timings"
    )
    for lanes, mine in results.items():
        print(
            f"rehydrate, {lanes} lane(s) by stream range     median {spread([s for s, _ in mine], ',.0f')} events/s"
            f"  = {spread([r for _, r in mine], '.0%')} of the ceiling beside it"
        )
    print(f"rows wrong: {wrong:,}; worker peak RSS: {', '.join(f'{mb:.0f} MB' for mb in rss)}")
    return 1 if wrong else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the store")
    parser.add_argument("--workers", type=int, default=2, help="rehydrate worker processes")
    parser.add_argument(
        "--lanes",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[RANGE_LANES],
        help=f"lane counts, e.g. 4,8 (default: {RANGE_LANES}, a replay's default)",
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="events per chunk (default: the setting's)")
    parser.add_argument("--runs", type=int, default=3, help="replays of each lane count (the summary: median, range)")
    parser.add_argument("--reuse", action="store_true", help="reuse a store of the same size from an earlier run")
    run_script(main, parser.parse_args())
