"""How fast a replay is: rehydrate against the physical ceiling and against the usual hand-written script.

Usage:

    python bench/replay_speed.py                      # 1,000,000 events, 2 worker processes, lanes 1, 2, 4 and 8
    python bench/replay_speed.py --lanes 8 --runs 5 --reuse   # the default five times: median and range
    python bench/replay_speed.py --events 5000000     # the big one
    python bench/replay_speed.py --workers 1 --lanes 4 --script-sample 20000 --reuse

In one run, on one machine, over the same events (the demo's order domain, `rehydrate.examples.orders`,
deterministic: ~40 orders open at a time, so streams interleave):

1. **import**: writes the history as JSON Lines and times `rehydrate events import` of it (a real CLI process).
   With `--reuse` a store of the same size kept from an earlier run (in `.rehydrate-bench/`) is used instead.
2. **ceiling**: `order_summary` rebuilt by one hand-written `INSERT … SELECT … GROUP BY` (no Python in the
   loop), its secondary index built afterwards, as rehydrate does. Run before the usual script, and again right
   before and right after every replay: a replay is compared with the mean of the two beside it (this machine's
   speed drifts by a fifth within minutes, and a ceiling timed minutes away moved the ratio as much).
3. **usual script**: the loop people write: read the events in order, one INSERT/UPDATE/DELETE per event
   (asyncpg, prepared statements, a commit every 1,000 events), on the first `--script-sample` events,
   extrapolated.
4. **rehydrate**: `--workers` real `rehydrate worker` processes and a Temporal dev server (started as `rehydrate dev`
   starts one); for each lane count, a full replay from start to swap, with lanes over stream-id ranges (the
   default); then the most lanes again split by hash (`REHYDRATE_LANE_SPLIT=hash`). Each table is compared with
   the ceiling's, row for row. "To the swap" ends when the new generation went live (the swap activity's
   completion in the replay's history; the swap waits for the new generation's `ANALYZE`, begun beside the
   catch-up); the workflow's end is printed beside it.
5. **small replay**: a replay of a 1,000-event store from start to swap (median of 5).

Prints events/s for each, the ratios, and the workers' peak RSS (VmHWM); for each replay, the CPU time each process
group used and the replay's phases from its Temporal history. With `--runs N` each lane count is replayed N times
(in turn with the others) and the summary gives the median and the range of each, never the best run. Exit status 1
if a table differs.
Postgres: an embedded server kept in `.rehydrate-bench/pgdata` (stopped at the end), or the server of
REHYDRATE_DATABASE_URL (databases `rh_bench_*` are created on it). Temporal: a dev server started for the run,
or REHYDRATE_TEMPORAL_ADDRESS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson
from common import (  # bench/ is on sys.path: the script's folder
    cpu_seconds,
    cpu_used,
    create_database,
    peak_rss_mb,
    postgres_server,
    spawn_worker,
    stop_process,
    temporal,
    write_jsonl,
)
from temporalio.client import Client

from rehydrate import EventStore
from rehydrate.core.database import create_pool, ensure_schema
from rehydrate.core.settings import Settings
from rehydrate.core.temporal import quiet_exit
from rehydrate.engine.importer import import_events
from rehydrate.engine.readmodels import create_table_sql
from rehydrate.examples import orders
from rehydrate.models import ReplayInput
from rehydrate.starter import start_replay, wait_for_replay

HOME = Path(".rehydrate-bench")
PROJECTION = orders.order_summary
TYPES = PROJECTION.event_types or []
STATUS_TYPES = ("OrderPaid", "OrderShipped", "OrderDelivered", "OrderCancelled")

# The ceiling: the whole read model in one statement. The status is derived from which status events an order
# has (the demo's lifecycles are paid → shipped → delivered, or cancelled), the fastest honest formulation.
CEILING = """
INSERT INTO bench.{table} (order_id, customer_id, status, items, total_cents, paid_cents, updated_at)
SELECT stream_id,
       min(payload ->> 'customer_id') FILTER (WHERE event_type = 'OrderPlaced'),
       CASE WHEN bool_or(event_type = 'OrderCancelled') THEN 'cancelled'
            WHEN bool_or(event_type = 'OrderDelivered') THEN 'delivered'
            WHEN bool_or(event_type = 'OrderShipped') THEN 'shipped'
            WHEN bool_or(event_type = 'OrderPaid') THEN 'paid'
            ELSE 'placed' END,
       coalesce(sum(CASE event_type WHEN 'ItemAdded' THEN 1 WHEN 'ItemRemoved' THEN -1 END
                    * (payload ->> 'quantity')::int), 0),
       coalesce(sum(CASE event_type WHEN 'ItemAdded' THEN 1 WHEN 'ItemRemoved' THEN -1 END
                    * (payload ->> 'quantity')::int * (payload ->> 'unit_price_cents')::int), 0),
       coalesce(sum((payload ->> 'amount_cents')::int) FILTER (WHERE event_type = 'OrderPaid'), 0),
       max(recorded_at) AT TIME ZONE 'UTC'
FROM rehydrate.events
WHERE event_type = ANY($1::text[])
GROUP BY stream_id
HAVING bool_or(event_type = 'OrderPlaced') AND NOT bool_or(event_type = 'OrderArchived')
"""

SCRIPT = {
    "OrderPlaced": """INSERT INTO bench.{table} (order_id, customer_id, status, items, total_cents, paid_cents,
                      updated_at) VALUES ($1, $2, 'placed', 0, 0, 0, $3 AT TIME ZONE 'UTC')""",
    "item": """UPDATE bench.{table} SET items = items + $2, total_cents = total_cents + $3,
               updated_at = $4 AT TIME ZONE 'UTC' WHERE order_id = $1""",
    "status": """UPDATE bench.{table} SET status = $2, paid_cents = paid_cents + $3,
                 updated_at = $4 AT TIME ZONE 'UTC' WHERE order_id = $1""",
    "OrderArchived": "DELETE FROM bench.{table} WHERE order_id = $1",
}


def rate(events: int, seconds: float) -> str:
    return f"{events / seconds:>10,.0f} events/s" if seconds > 0 else "n/a"


# -- the store ------------------------------------------------------------------------------------------


async def build_store(server_url: str, events: int, reuse: bool) -> tuple[str, float | None]:
    """The database holding `events` events; times the import unless an earlier run's store is reused."""
    name = f"rh_bench_{events}"
    if reuse:
        url = await create_database(server_url, name, replace=False)
        conn = await asyncpg.connect(url)
        try:
            count = await conn.fetchval(
                "SELECT count(*) FROM rehydrate.events WHERE to_regclass('rehydrate.events') IS NOT NULL"
            )
        except asyncpg.UndefinedTableError:
            count = 0
        finally:
            await conn.close()
        if count == events:
            print(f"reusing the store of {events:,} events in database {name}")
            return url, None
    url = await create_database(server_url, name)
    path = HOME / f"orders-{events}.jsonl"
    print(f"writing {path} ...", flush=True)
    await asyncio.to_thread(write_jsonl, path, events)
    env = {**os.environ, "REHYDRATE_DATABASE_URL": url}
    began = time.perf_counter()
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "rehydrate", "events", "import", str(path)],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"import failed:\n{done.stdout}\n{done.stderr}")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM ANALYZE rehydrate.events")
    finally:
        await conn.close()
    return url, seconds


# -- ceiling and script ------------------------------------------------------------------------------------


async def fresh_table(conn: asyncpg.Connection, table: str) -> None:
    await conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
    await conn.execute(f"DROP TABLE IF EXISTS bench.{table}")
    create = create_table_sql(PROJECTION.table, "bench", 0).replace(PROJECTION.table.physical_name(0), table)
    await conn.execute(create)


async def ceiling(conn: asyncpg.Connection) -> tuple[float, int, float]:
    """The ceiling's seconds, the events it read, and the CPU seconds Postgres' processes used for it."""
    await fresh_table(conn, "ceiling")
    cpu = cpu_seconds([])["postgres"]
    began = time.perf_counter()
    async with conn.transaction():
        await conn.execute(CEILING.format(table="ceiling"), TYPES)
        await conn.execute("CREATE INDEX ON bench.ceiling (customer_id)")
    await conn.execute("ANALYZE bench.ceiling")
    seconds = time.perf_counter() - began
    cpu = cpu_seconds([])["postgres"] - cpu
    events = await conn.fetchval("SELECT count(*) FROM rehydrate.events WHERE event_type = ANY($1::text[])", TYPES)
    return seconds, int(events), cpu


async def usual_script(conn: asyncpg.Connection, sample: int) -> tuple[float, int]:
    await fresh_table(conn, "script")
    await conn.execute("CREATE INDEX ON bench.script (customer_id)")
    statements = {kind: await conn.prepare(sql.format(table="script")) for kind, sql in SCRIPT.items()}
    reader = await conn.prepare(
        """SELECT stream_id, event_type, payload, recorded_at FROM rehydrate.events
           WHERE event_type = ANY($1::text[]) ORDER BY global_position LIMIT $2"""
    )
    done = 0
    began = time.perf_counter()
    rows = await reader.fetch(TYPES, sample)
    for start in range(0, len(rows), 1_000):
        async with conn.transaction():
            for stream_id, event_type, data, at in rows[start : start + 1_000]:
                if event_type == "OrderPlaced":
                    await statements["OrderPlaced"].fetch(stream_id, data["customer_id"], at)
                elif event_type in ("ItemAdded", "ItemRemoved"):
                    sign = 1 if event_type == "ItemAdded" else -1
                    quantity = sign * data["quantity"]
                    await statements["item"].fetch(stream_id, quantity, quantity * data["unit_price_cents"], at)
                elif event_type in STATUS_TYPES:
                    status = event_type.removeprefix("Order").lower()
                    await statements["status"].fetch(stream_id, status, data.get("amount_cents", 0), at)
                else:
                    await statements["OrderArchived"].fetch(stream_id)
                done += 1
    return time.perf_counter() - began, done


async def differences(conn: asyncpg.Connection, table: str, ceiling: str = "bench.ceiling") -> int:
    """Rows of the read model `table` not in the `ceiling` table, and the other way round (duplicates counted)."""
    return int(
        await conn.fetchval(
            f"""SELECT count(*) FROM (
                    (SELECT * FROM public.{table} EXCEPT ALL SELECT * FROM {ceiling})
                    UNION ALL
                    (SELECT * FROM {ceiling} EXCEPT ALL SELECT * FROM public.{table})) d"""
        )
    )


# -- rehydrate ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def workers(
    url: str,
    client: Client,
    count: int,
    log: Path,
    split: str = "range",
    activities: int | None = None,
    projections: str = "rehydrate.examples.orders",
    extra: dict[str, str] | None = None,
    nice: int = 0,
) -> AsyncIterator[tuple[Settings, list[int]]]:
    """`count` worker processes on a task queue of their own, serving the projections of the module `projections`
    (`extra`: more of their environment), at CPU niceness `nice`."""
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    settings = Settings(
        database_url=url,
        temporal_address=client.service_client.config.target_host,
        temporal_task_queue=queue,
        projections=[projections],
        tails=False,
    )
    env = {
        "REHYDRATE_DATABASE_URL": url,
        "REHYDRATE_TEMPORAL_ADDRESS": settings.temporal_address,
        "REHYDRATE_TEMPORAL_TASK_QUEUE": queue,
        "REHYDRATE_PROJECTIONS": projections,
        "REHYDRATE_TAILS": "false",
        "REHYDRATE_LANE_SPLIT": split,
        **({"REHYDRATE_MAX_CONCURRENT_ACTIVITIES": str(activities)} if activities else {}),
        **(extra or {}),
    }
    processes = [spawn_worker(env, log, nice) for _ in range(count)]
    try:
        await asyncio.sleep(3)  # let them connect and poll
        yield settings, [p.pid for p in processes]
    except BaseException:
        print(f"--- worker log ---\n{(await asyncio.to_thread(log.read_text, errors='replace'))[-4000:]}")
        raise
    finally:
        await asyncio.gather(*(stop_process(p) for p in processes))


async def replay(
    client: Client,
    settings: Settings,
    lanes: int | None,
    chunk_size: int | None = None,
    projection: str = PROJECTION.name,
) -> tuple[float, float, int, str]:
    """A replay of `projection`: seconds from `replay start` to the swap (which waits for the new generation's
    ANALYZE, begun beside the catch-up) and to the workflow's end, events applied, where its time went."""
    began, clock = time.perf_counter(), time.time()
    started = await start_replay(client, settings, ReplayInput(projection, lanes=lanes, chunk_size=chunk_size))
    result = await wait_for_replay(started)
    took = time.perf_counter() - began
    spent, swapped_at = await phases(client, started.id, started.result_run_id)
    return swapped_at - clock, took, result.events_applied, spent


async def phases(client: Client, workflow_id: str, run_id: str | None) -> tuple[str, float]:
    """Each activity type's span in the replay's history (first scheduled to last completed, over every run of it
    across continue-as-new), how busy the chunks kept the workers' slots while the build lasted, and when (Unix
    time, the server's clock: the same machine's) the swap completed."""
    swapped_at = 0.0
    spans: dict[str, list[float]] = {}
    chunk_seconds = 0.0
    scheduled: dict[int, str] = {}
    started_at: dict[int, float] = {}
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        run_id = None
        for event in history.events:
            at = event.event_time.ToDatetime().timestamp()
            kind = event.WhichOneof("attributes")
            if kind == "activity_task_scheduled_event_attributes":
                name = event.activity_task_scheduled_event_attributes.activity_type.name.removeprefix("rehydrate.")
                scheduled[event.event_id] = name
                spans.setdefault(name, [at, at])[1] = at
            elif kind == "activity_task_started_event_attributes":
                started_at[event.event_id] = at
            elif kind == "activity_task_completed_event_attributes":
                done = event.activity_task_completed_event_attributes
                name = scheduled[done.scheduled_event_id]
                spans[name][1] = at
                if name == "apply_chunk":
                    chunk_seconds += at - started_at[done.started_event_id]
                elif name == "swap":
                    swapped_at = event.event_time.ToMicroseconds() / 1e6
            elif kind == "workflow_execution_continued_as_new_event_attributes":
                run_id = event.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    ms = {name: (end - start) * 1000 for name, (start, end) in spans.items()}
    build = ms.get("apply_chunk", 0.0)
    parts = [f"plan {ms.get('plan_replay', 0):.0f} ms", f"build {build:,.0f} ms"]
    swap = ms.get("catch_up", 0) + ms.get("swap", 0)
    parts += [
        f"indexes {ms.get('index_tables', ms.get('finish_tables', 0)):.0f} ms",  # finish_tables: ANALYZE too
        f"ANALYZE {ms.get('analyze_table', 0):.0f} ms beside the catch-up; catch-up + swap {swap:.0f} ms",
    ]
    busy = f"; chunks ran {chunk_seconds * 1000 / build:.1f} at a time on average" if build else ""
    return ", ".join(parts) + busy, swapped_at


async def small_replays(server_url: str, client: Client, runs: int) -> list[float]:
    url = await create_database(server_url, "rh_bench_small")
    pool = await create_pool(url)
    try:
        async with pool.acquire() as conn:
            await ensure_schema(conn, "rehydrate")
        await import_events(EventStore(pool), enumerate(orders.generate(1_000), start=1))
    finally:
        await pool.close()
    seconds = []
    async with workers(url, client, 1, HOME / "small-worker.log") as (settings, _):
        for _ in range(runs):
            to_swap, _, _, _ = await replay(client, settings, settings.lanes)
            seconds.append(to_swap)
    return seconds


# -- main ----------------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    await asyncio.to_thread(HOME.mkdir, exist_ok=True)
    async with postgres_server(HOME / "pgdata", delete=False) as server_url, temporal() as client:
        url, import_seconds = await build_store(server_url, args.events, args.reuse)
        conn = await asyncpg.connect(url)
        try:
            await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=orjson.dumps, decoder=orjson.loads)
            await conn.fetchval("SELECT count(*) FROM rehydrate.events")  # warm the cache
            first, events, first_cpu = await ceiling(conn)
            script_seconds, script_events = await usual_script(conn, args.script_sample)
            ceilings, ceiling_cpu = [first], [first_cpu]  # seconds and CPU seconds, each run of it
            print(f"events of order_summary's types: {events:,}", flush=True)
            # (label, seconds to the swap, events, rows wrong, the ceiling's seconds beside it, its CPU share)
            results: list[tuple[str, float, int, int, float, float]] = []
            rss: list[float] = []
            runs = [("range", lanes) for lanes in args.lanes]
            if max(args.lanes) > 1:
                runs.append(("hash", max(args.lanes)))
            for split in ("range", "hash"):
                lane_counts = [lanes for kind, lanes in runs if kind == split]
                if not lane_counts:
                    continue
                async with workers(
                    url, client, args.workers, HOME / "worker.log", split, args.activities_per_worker
                ) as (settings, pids):
                    for lanes in [n for _ in range(args.runs) for n in lane_counts]:
                        seconds, _, cpu = await ceiling(conn)
                        ceilings.append(seconds)
                        ceiling_cpu.append(cpu)
                        before = cpu_seconds(pids)
                        took, to_end, applied, spent = await replay(client, settings, lanes, args.chunk_size)
                        now = cpu_seconds(pids)
                        used = cpu_used(before, now)
                        replay_cpu = sum(now[part] - before[part] for part in ("workers", "postgres", "temporal"))
                        wrong = await differences(conn, PROJECTION.table.name)
                        after, _, after_cpu = await ceiling(conn)
                        beside = (ceilings[-1] + after) / 2
                        cpu_share = (ceiling_cpu[-1] + after_cpu) / 2 / replay_cpu
                        ceilings.append(after)
                        ceiling_cpu.append(after_cpu)
                        label = f"{lanes} lane(s) by {split}"
                        results.append((label, took, applied, wrong, beside, cpu_share))
                        print(
                            f"  replay, {label}: {took:.2f} s to the swap, {rate(applied, took)}, rows wrong: {wrong}; "
                            f"the workflow ended {to_end - took:.2f} s later ({rate(applied, to_end).strip()}, "
                            f"{(applied / to_end) / (events / beside):.0%} of the ceiling beside it); ceiling before "
                            f"and after it: {rate(events, ceilings[-2]).strip()}, {rate(events, after).strip()}"
                        )
                        print(
                            f"    CPU time during it: {used} (this script: not counted); the ceiling beside it used "
                            f"{cpu_share:.0%} of the CPU time of the workers, Postgres and Temporal"
                        )
                        print(f"    its history: {spent}")
                    rss += [peak_rss_mb(pid) for pid in pids]
        finally:
            await conn.close()
        small = await small_replays(server_url, client, 5)

    ceiling_seconds = statistics.median(ceilings)
    script_rate = script_events / script_seconds
    print()
    print(f"{args.events:,} events in the store; order_summary reads {events:,}; {os.cpu_count()} cores")
    if import_seconds is not None:
        print(f"import (rehydrate events import) {import_seconds:7.1f} s  {rate(args.events, import_seconds)}")
    print(
        f"ceiling (INSERT…SELECT…GROUP BY)  {ceiling_seconds:7.1f} s  {rate(events, ceiling_seconds)}  (median of "
        f"{len(ceilings)} runs, {rate(events, max(ceilings)).strip()} to {rate(events, min(ceilings)).strip()}); "
        f"Postgres' CPU {statistics.median(ceiling_cpu):.2f} s ({min(ceiling_cpu):.2f} to {max(ceiling_cpu):.2f})"
    )
    print(
        f"usual script (per-event UPDATE)   {script_seconds:7.1f} s  {rate(script_events, script_seconds)}"
        f"  (on {script_events:,} events)"
    )
    for label in dict.fromkeys(label for label, *_ in results):  # in the order they ran
        mine = [
            (applied / took, (applied / took) / (events / beside), wrong, cpu_share)
            for name, took, applied, wrong, beside, cpu_share in results
            if name == label
        ]
        speeds = sorted(speed for speed, *_ in mine)
        shares = sorted(share for _, share, *_ in mine)
        cpu_shares = sorted(cpu_share for *_, cpu_share in mine)
        spread = f" (runs: {len(mine)}, {speeds[0]:,.0f} to {speeds[-1]:,.0f})" if len(mine) > 1 else ""
        share_spread = f" ({shares[0]:.0%} to {shares[-1]:.0%})" if len(mine) > 1 else ""
        cpu_spread = f" ({cpu_shares[0]:.0%} to {cpu_shares[-1]:.0%})" if len(mine) > 1 else ""
        print(
            f"rehydrate, {label:<17} median {statistics.median(speeds):>10,.0f} events/s{spread}"
            f"  = {statistics.median(shares):4.0%} of the ceiling beside it{share_spread}, "
            f"{statistics.median(speeds) / script_rate:5.1f}x the script, rows wrong {sum(w for _, _, w, _ in mine)}; "
            f"CPU: the ceiling's is {statistics.median(cpu_shares):.0%} of the replay's{cpu_spread}"
        )
    print(f"{args.workers} worker process(es); peak RSS of each: {', '.join(f'{mb:.0f} MB' for mb in rss)}")
    print(
        f"replay of 1,000 events, start to swap: median {statistics.median(small):.2f} s (runs: "
        f"{', '.join(f'{s:.2f}' for s in small)})"
    )
    return 1 if any(wrong for _, _, _, wrong, *_ in results) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the store")
    parser.add_argument("--workers", type=int, default=2, help="rehydrate worker processes")
    parser.add_argument(
        "--lanes", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2, 4, 8], help="lane counts, e.g. 1,2,4"
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="events per chunk (default: the setting's)")
    parser.add_argument(
        "--activities-per-worker", type=int, default=None, help="chunks a worker runs at once (default: the setting's)"
    )
    parser.add_argument("--script-sample", type=int, default=20_000, help="events the usual script applies")
    parser.add_argument("--reuse", action="store_true", help="reuse a store of the same size from an earlier run")
    parser.add_argument("--runs", type=int, default=1, help="replays of each lane count (the summary: median, range)")
    quiet_exit(asyncio.run(main(parser.parse_args())))
