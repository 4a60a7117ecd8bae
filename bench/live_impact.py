"""What a rebuild costs live traffic: readers' latency and writers' throughput before, during, at and after a replay.

Usage:

    python bench/live_impact.py                           # 1,000,000 events; 3 rounds of 3 replays each
    python bench/live_impact.py --runs 5 --max-rate 50000 # the rate throttle at a rate of your choice
    python bench/live_impact.py --max-parallel 0          # no replay limited to one chunk at a time
    python bench/live_impact.py --events 200000 --runs 1 --before 5 --after 5   # a quick look
    python bench/live_impact.py --write-rate 0            # writers append as fast as they can
    python bench/live_impact.py --nice 19                 # workers and Temporal as if on machines of their own

What it does: starts Postgres (embedded, in a temporary folder, stopped and deleted at the end; or, with
REHYDRATE_DATABASE_URL, a new scratch database on that server, dropped at the end), a Temporal dev server (or uses
REHYDRATE_TEMPORAL_ADDRESS) and `--workers` `rehydrate worker` processes with tails on, serving `orders` of
`rehydrate.examples.order_lines` (the views `orders` and `order_lines`, swapped together). It imports `--events`
events of the demo's order history and builds generation 1, so that readers have something to read, and waits until
the tail applies a probe event. Then, for the whole measurement:

- **readers** (`--readers` connections, `--read-rate` queries/s over all of them, in turn): a point lookup of one
  order by a random key (`SELECT … FROM orders WHERE order_id = $1`), and a join, a random customer's orders with
  their lines (`orders JOIN order_lines … WHERE customer_id = $1`, through the index on `customer_id`). Every key asked
  for is in generation 1, and no later event removes a row of it: a lookup that finds no row, or a join that finds
  fewer rows than generation 1 had, is a reader failure (**empty**), as is any error;
- **writers** (`--writers` connections): `EventStore.append` of the demo's events to new streams, one event per
  transaction, `--write-rate` events/s over all writers (0: as fast as they go), which the tail applies to the active
  generation.

Each round replays `orders` three ways, in turn the first of a round: unthrottled; throttled to a rate (`replay start
--max-rate`: `--max-rate`, by default a quarter of the first unthrottled build's rate); and with `--max-parallel`
chunks at a time (default 1; 0: left out). Each replay's phases are times in its Temporal history: **before** is the
`--before` seconds before `replay start`; **build** from `replay start` until the swap window (planning, the chunks,
indexes, catch-up, the wait for ANALYZE); **swap** from `--swap-margin` seconds before the swap activity was scheduled
to as long after it completed; **after** the `--after` seconds following. For each phase: readers' p50/p99/max
latency (lookups and joins apart), queries, errors and empty results; writers' events/s, their append p99 and
errors. For each replay the ratios to its own "before": reader p99 during the build ÷ before, writer events/s
during the build ÷ before; over the rounds the median and the range of each, never the best.

For each replay it also prints the build's two parts apart (**chunks**, and **finish**: the indexes, the catch-up
and the wait for ANALYZE), and where the reads slower than twice the baseline's p99 fell in the chunks (their first
tenth, the middle, the last tenth, or between chunks).

Readers and writers share this process's event loop, and on a small machine every process shares its cores: the
latencies include waiting for a core. `--nice 19` runs the workers and the Temporal dev server at the lowest CPU
priority, so that they take what Postgres and the readers leave, as workers and Temporal on machines of their own
would (in production they do not share the database's cores). Prints the load average beside each replay. Exit
status 1 if any reader saw an error or an empty result. Everything it started is stopped at the end, on Ctrl-C and on
SIGTERM too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from common import percentile, renice_server, run_script, scratch_stack
from replay_speed import workers
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError

from rehydrate import EventStore, NewEvent
from rehydrate.core.database import create_pool, ensure_schema
from rehydrate.core.settings import Settings
from rehydrate.engine.importer import import_events
from rehydrate.examples import orders as demo
from rehydrate.examples.order_lines import orders
from rehydrate.models import ReplayInput
from rehydrate.models.names import tail_workflow_id
from rehydrate.starter import start_replay, wait_for_replay

MODULE = "rehydrate.examples.order_lines"
PROJECTION = orders
PHASES = ("before", "build", "swap", "after")
KINDS = ("lookup", "join")

LOOKUP = "SELECT order_id, status, lines, total_cents FROM public.orders WHERE order_id = $1"
JOIN = """SELECT o.order_id, o.status, l.sku, l.quantity, l.unit_price_cents
          FROM public.orders o JOIN public.order_lines l USING (order_id)
          WHERE o.customer_id = $1"""
CHECKPOINT = """SELECT checkpoint_xmin::text::bigint FROM rehydrate.generations
                WHERE projection = $1 AND state = 'active'"""
# What readers may expect: every order of generation 1, and each customer's rows of the join then.
ORDERS = "SELECT order_id FROM public.orders"
CUSTOMERS = """SELECT o.customer_id, count(*) FROM public.orders o JOIN public.order_lines l USING (order_id)
               GROUP BY o.customer_id"""


@dataclass
class Traffic:
    """What readers and writers did, as it happened (Unix times, so that they compare with Temporal's history)."""

    reads: list[tuple[float, str, float, str]] = field(default_factory=list)  # started, kind, ms, outcome
    writes: list[tuple[float, float]] = field(default_factory=list)  # committed, ms
    write_errors: list[float] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # the first errors, to show


@dataclass
class PhaseStats:
    seconds: float
    latency: dict[str, tuple[int, float, float, float]]  # kind → queries, p50, p99, max (ms)
    errors: int
    empty: int
    writes_per_second: float
    append_p99: float
    write_errors: int


@dataclass
class Outcome:
    label: str
    round: int
    phases: dict[str, PhaseStats]
    build_seconds: float  # the chunks: first scheduled to last completed
    applied: int
    swap_lock_ms: float
    load: str
    at_swap: str  # when the slowest queries of the swap window ran, against the swap and the new tables' ANALYZE
    in_chunks: str  # where the reads over twice the baseline's p99 fell in the chunks

    def ratio(self, of: Callable[[PhaseStats], float]) -> float:
        before = of(self.phases["before"])
        return of(self.phases["build"]) / before if before else float("nan")


def note(traffic: Traffic, what: str, error: BaseException) -> None:
    if len(traffic.messages) < 10:
        traffic.messages.append(f"{what}: {type(error).__name__}: {error}")


async def reader(
    url: str, index: int, args: argparse.Namespace, keys: list[str], customers: dict[str, int], traffic: Traffic
) -> None:
    """Lookups and joins in turn, at this reader's share of `--read-rate`, each on a random key known to exist."""
    rng = random.Random(index)
    buyers = list(customers)
    interval = args.readers / args.read_rate
    conn = await asyncpg.connect(url)
    try:
        next_at = time.perf_counter() + index * interval / args.readers  # staggered
        for n in itertools.count():
            wait = next_at - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            next_at = max(next_at + interval, time.perf_counter())  # behind: no burst to catch up
            kind = KINDS[n % 2]
            key = rng.choice(keys) if kind == "lookup" else rng.choice(buyers)
            began, clock = time.perf_counter(), time.time()
            try:
                rows = await conn.fetch(LOOKUP if kind == "lookup" else JOIN, key)
                expected = 1 if kind == "lookup" else customers[key]
                outcome = "ok" if len(rows) >= expected else "empty"
                if outcome == "empty":
                    note(traffic, f"{kind} {key}", RuntimeError(f"{len(rows)} row(s), expected {expected}"))
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
                outcome = "error"
                note(traffic, f"{kind} {key}", error)
                if conn.is_closed():
                    conn = await asyncpg.connect(url)
            traffic.reads.append((clock, kind, (time.perf_counter() - began) * 1000, outcome))
    finally:
        await conn.close()


async def writer(store: EventStore, index: int, args: argparse.Namespace, traffic: Traffic) -> None:
    """The demo's events appended to new streams, one per transaction, at this writer's share of `--write-rate`."""
    history = demo.generate(10_000_000, seed=100 + index)
    interval = args.writers / args.write_rate if args.write_rate else 0.0
    async with store.pool.acquire() as conn:
        next_at = time.perf_counter() + index * interval / args.writers
        while True:
            if interval:
                wait = next_at - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                next_at = max(next_at + interval, time.perf_counter() - 1.0)  # behind: catch up a second at most
            line = next(history)
            began = time.perf_counter()
            try:
                await store.append(
                    f"w{index}-{line['stream_id']}", [NewEvent(line["type"], line["data"])], connection=conn
                )
                traffic.writes.append((time.time(), (time.perf_counter() - began) * 1000))
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
                traffic.write_errors.append(time.time())
                note(traffic, "append", error)
                await asyncio.sleep(0.1)


async def milestones(
    client: Client, workflow_id: str, run_id: str | None, chunks: list[tuple[float, float]] | None = None
) -> dict[str, float]:
    """Unix times from the replay's history, over every run of it across continue-as-new: its chunks' first
    scheduling and last completion, the swap activity's scheduling and completion, the new tables' ANALYZE's
    completion; and into `chunks`, each chunk's start and completion."""
    times: dict[str, float] = {}
    scheduled: dict[int, str] = {}
    started: dict[int, float] = {}
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        run_id = None
        for event in history.events:
            at = event.event_time.ToMicroseconds() / 1e6
            kind = event.WhichOneof("attributes")
            if kind == "activity_task_scheduled_event_attributes":
                name = event.activity_task_scheduled_event_attributes.activity_type.name.removeprefix("rehydrate.")
                scheduled[event.event_id] = name
                if name == "apply_chunk":
                    times.setdefault("chunks_from", at)
                elif name == "swap":
                    times.setdefault("swap_from", at)
            elif kind == "activity_task_started_event_attributes":
                started[event.activity_task_started_event_attributes.scheduled_event_id] = at
            elif kind == "activity_task_completed_event_attributes":
                of = event.activity_task_completed_event_attributes.scheduled_event_id
                name = scheduled[of]
                if name == "apply_chunk":
                    times["chunks_to"] = at
                    if chunks is not None and of in started:
                        chunks.append((started[of], at))
                elif name == "swap":
                    times["swap_to"] = at
                elif name == "analyze_table":
                    times["analyzed"] = at
            elif kind == "workflow_execution_continued_as_new_event_attributes":
                run_id = event.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    return times


def phase_stats(traffic: Traffic, start: float, end: float) -> PhaseStats:
    reads = [r for r in traffic.reads if start <= r[0] < end]
    latency = {}
    for kind in KINDS:
        ms = sorted(r[2] for r in reads if r[1] == kind and r[3] != "error")
        latency[kind] = (len(ms), *(percentile(ms, p) for p in (50, 99)), ms[-1]) if ms else (0, *[float("nan")] * 3)
    appends = sorted(ms for at, ms in traffic.writes if start <= at < end)
    return PhaseStats(
        seconds=end - start,
        latency=latency,  # type: ignore[arg-type]
        errors=sum(r[3] == "error" for r in reads),
        empty=sum(r[3] == "empty" for r in reads),
        writes_per_second=len(appends) / (end - start),
        append_p99=percentile(appends, 99) if appends else float("nan"),
        write_errors=sum(start <= at < end for at in traffic.write_errors),
    )


def slowest_at_swap(traffic: Traffic, start: float, end: float, times: dict[str, float]) -> str:
    """The slowest lookup and join of the swap window, when each began against the swap's completion, and when the new
    tables' ANALYZE (which runs beside the catch-up) completed."""
    swapped = times["swap_to"]
    parts = []
    for kind in KINDS:
        reads = [r for r in traffic.reads if start <= r[0] < end and r[1] == kind]
        if reads:
            began, _, ms, _ = max(reads, key=lambda r: r[2])
            parts.append(f"slowest {kind} {ms:.0f} ms, began {(began - swapped) * 1000:+.0f} ms")
    analyzed = times.get("analyzed")
    if analyzed is not None:
        parts.append(f"ANALYZE done {(analyzed - swapped) * 1000:+.0f} ms")
    return "from the swap's completion: " + ", ".join(parts)


def slow_reads_in_chunks(traffic: Traffic, chunks: list[tuple[float, float]], slow_ms: float) -> str:
    """Where the reads slower than `slow_ms` that began while chunks ran fall in the chunk that was running (the
    latest started): its first tenth (the activity's start, its transaction's first fetch), the middle, or its last
    tenth (the rows' COPY and the commit); and how many slow reads began between chunks."""
    if not chunks:
        return "no chunk"
    chunks = sorted(chunks)
    first, last = chunks[0][0], max(end for _, end in chunks)
    places = {"first tenth": 0, "middle": 0, "last tenth": 0, "between chunks": 0}
    slow = [r for r in traffic.reads if first <= r[0] < last and r[2] >= slow_ms]
    for began, *_ in slow:
        running = [(start, end) for start, end in chunks if start <= began < end]
        if not running:
            places["between chunks"] += 1
            continue
        start, end = max(running)
        share = (began - start) / (end - start)
        places["first tenth" if share < 0.1 else "last tenth" if share >= 0.9 else "middle"] += 1
    return f"{len(slow)} reads ≥ {slow_ms:.1f} ms: " + ", ".join(f"{n} in the {k}" for k, n in places.items())


def load_average() -> str:
    return " ".join(f"{n:.1f}" for n in os.getloadavg())


async def measured_replay(
    args: argparse.Namespace,
    client: Client,
    settings: Settings,
    traffic: Traffic,
    label: str,
    round_: int,
    **tuning: Any,
) -> Outcome:
    """One replay with `--before` seconds of traffic ahead of it and `--after` after its swap window."""
    load_at_start = load_average()
    await asyncio.sleep(args.before)
    started = time.time()
    handle: WorkflowHandle[Any, Any] = await start_replay(client, settings, ReplayInput(PROJECTION.name, **tuning))
    try:
        result = await wait_for_replay(handle)
    except BaseException:
        with contextlib.suppress(RPCError):
            await handle.terminate("benchmark stopped")
        raise
    chunks: list[tuple[float, float]] = []
    times = await milestones(client, handle.id, handle.result_run_id, chunks)
    swap_from = max(started, times["swap_from"] - args.swap_margin)
    swap_to = times["swap_to"] + args.swap_margin
    end = swap_to + args.after
    await asyncio.sleep(max(0.0, end - time.time()))
    windows = {
        "before": (started - args.before, started),
        "build": (started, swap_from),
        "swap": (swap_from, swap_to),
        "after": (swap_to, end),
    }
    # The build's two parts, shown beside the phases (not in the summary): the chunks, and what follows them up to
    # the swap window (indexes, catch-up, the wait for ANALYZE).
    windows["chunks"] = (times["chunks_from"], times["chunks_to"])
    windows["finish"] = (times["chunks_to"], swap_from)
    before = phase_stats(traffic, *windows["before"])
    slow_ms = 2 * max(before.latency[kind][2] for kind in KINDS)
    return Outcome(
        in_chunks=slow_reads_in_chunks(traffic, chunks, slow_ms),
        at_swap=slowest_at_swap(traffic, swap_from, swap_to, times),
        label=label,
        round=round_,
        phases={name: phase_stats(traffic, *window) for name, window in windows.items()},
        build_seconds=times["chunks_to"] - times["chunks_from"],
        applied=result.events_applied,
        swap_lock_ms=result.swap_lock_ms,
        load=f"{load_at_start} → {load_average()}",
    )


def show(outcome: Outcome) -> None:
    print(
        f"round {outcome.round}, {outcome.label}: {outcome.applied:,} events; chunks {outcome.build_seconds:.1f} s "
        f"({outcome.applied / outcome.build_seconds:,.0f} events/s); swap lock {outcome.swap_lock_ms:.1f} ms; "
        f"load average {outcome.load}"
    )
    print(
        "  phase    secs | lookups   p50    p99    max | joins   p50    p99    max | errors empty | writes/s "
        "append p99 errors"
    )
    for name, s in outcome.phases.items():
        cells = " | ".join(
            f"{n:>{7 if kind == 'lookup' else 5},} {p50:5.1f} {p99:6.1f} {top:6.1f}"
            for kind, (n, p50, p99, top) in s.latency.items()
        )
        print(
            f"  {name:<6} {s.seconds:5.1f} | {cells} | {s.errors:>6} {s.empty:>5} | {s.writes_per_second:8,.0f} "
            f"{s.append_p99:7.1f} ms {s.write_errors:>6}"
        )
    print(f"  at the swap, {outcome.at_swap}")
    print(f"  during the chunks, {outcome.in_chunks}")
    lookup, join = (outcome.ratio(lambda s, k=kind: s.latency[k][2]) for kind in KINDS)  # type: ignore[misc]
    writes = outcome.ratio(lambda s: s.writes_per_second)
    print(f"  build ÷ before: lookup p99 {lookup:.2f}×, join p99 {join:.2f}×, writes/s {writes:.2f}×", flush=True)


def spread(values: list[float], form: str) -> str:
    s = sorted(values)
    return format(statistics.median(s), form) + (f" ({format(s[0], form)}–{format(s[-1], form)})" if len(s) > 1 else "")


def summary(outcomes: list[Outcome]) -> None:
    labels = list(dict.fromkeys(o.label for o in outcomes))
    rows: list[tuple[str, Callable[[Outcome], float], str]] = [
        ("chunks, events/s", lambda o: o.applied / o.build_seconds, ",.0f"),
        ("build phase, s", lambda o: o.phases["build"].seconds, ".1f"),
    ]
    for phase in PHASES:
        for kind in KINDS:
            rows.append((f"{kind} p99 {phase}, ms", lambda o, p=phase, k=kind: o.phases[p].latency[k][2], ".1f"))
    for kind in KINDS:
        rows.append((f"{kind} max at the swap, ms", lambda o, k=kind: o.phases["swap"].latency[k][3], ".1f"))
    rows += [
        ("lookup p99 build ÷ before", lambda o: o.ratio(lambda s: s.latency["lookup"][2]), ".2f"),
        ("join p99 build ÷ before", lambda o: o.ratio(lambda s: s.latency["join"][2]), ".2f"),
        ("writes/s before", lambda o: o.phases["before"].writes_per_second, ",.0f"),
        ("writes/s build ÷ before", lambda o: o.ratio(lambda s: s.writes_per_second), ".2f"),
        ("append p99 build ÷ before", lambda o: o.ratio(lambda s: s.append_p99), ".2f"),
        ("swap lock, ms", lambda o: o.swap_lock_ms, ".1f"),
    ]
    print()
    print(f"{'median (min–max) over the rounds':<34}" + "".join(f"{label:<34}" for label in labels))
    for name, of, form in rows:
        print(
            f"{name:<34}" + "".join(f"{spread([of(o) for o in outcomes if o.label == lb], form):<34}" for lb in labels)
        )
    for label in labels:
        mine = [o for o in outcomes if o.label == label]
        errors = sum(s.errors for o in mine for s in o.phases.values())
        empty = sum(s.empty for o in mine for s in o.phases.values())
        write_errors = sum(s.write_errors for o in mine for s in o.phases.values())
        print(f"{label}: reader errors {errors}, empty results {empty}, writer errors {write_errors}")


async def main(args: argparse.Namespace) -> int:
    async with scratch_stack() as (scratch, url, client):
        return await run(args, scratch, url, client)


async def run(args: argparse.Namespace, scratch: Path, url: str, client: Client) -> int:
    pool = await create_pool(url, max_size=args.writers + 2)
    tail: WorkflowHandle[Any, Any] | None = None
    traffic = Traffic()
    running: list[asyncio.Task[None]] = []
    outcomes: list[Outcome] = []
    try:
        async with pool.acquire() as conn:
            await ensure_schema(conn, "rehydrate")
        store = EventStore(pool)
        began = time.perf_counter()
        report = await import_events(store, enumerate(demo.generate(args.events), start=1))
        async with pool.acquire() as conn:
            await conn.execute("VACUUM ANALYZE rehydrate.events")
        print(f"imported {report.events:,} events in {time.perf_counter() - began:.1f} s", flush=True)
        if args.nice and not os.environ.get("REHYDRATE_TEMPORAL_ADDRESS"):
            port = int(client.service_client.config.target_host.rsplit(":", 1)[1])
            if not renice_server(port, args.nice):
                raise SystemExit(f"--nice: found no Temporal dev server on port {port}")
        async with workers(
            url,
            client,
            args.workers,
            scratch / "worker.log",
            projections=MODULE,
            extra={"REHYDRATE_TAILS": "true"},
            nice=args.nice,
        ) as (settings, _):
            tail = client.get_workflow_handle(tail_workflow_id(PROJECTION.name, settings.temporal_task_queue))
            first = await wait_for_replay(await start_replay(client, settings, ReplayInput(PROJECTION.name)))
            async with pool.acquire() as conn:
                keys = [row[0] for row in await conn.fetch(ORDERS)]
                customers = {row[0]: int(row[1]) for row in await conn.fetch(CUSTOMERS)}
                await wait_for_tail(store, conn)
            print(
                f"generation {first.generation}: {len(keys):,} orders, {len(customers):,} customers with lines; "
                f"tail running; load average {load_average()}",
                flush=True,
            )
            running += [
                asyncio.create_task(reader(url, i, args, keys, customers, traffic)) for i in range(args.readers)
            ]
            running += [asyncio.create_task(writer(store, i, args, traffic)) for i in range(args.writers)]
            await asyncio.sleep(args.warm_up)
            max_rate: float | None = args.max_rate
            kinds = ["unthrottled", "max-rate"] + (["max-parallel"] if args.max_parallel else [])
            for round_ in range(1, args.runs + 1):
                shift = (round_ - 1) % len(kinds)  # each in turn goes first; round 1 measures the unthrottled rate
                for kind in kinds[shift:] + kinds[:shift]:
                    if kind == "unthrottled":
                        outcome = await measured_replay(args, client, settings, traffic, kind, round_)
                        if max_rate is None:
                            max_rate = float(
                                round(args.throttle_fraction * outcome.applied / outcome.build_seconds, -2)
                            )
                    elif kind == "max-rate":
                        label = f"--max-rate {max_rate:.0f}"
                        outcome = await measured_replay(
                            args, client, settings, traffic, label, round_, max_rate=max_rate
                        )
                    else:
                        label = f"--max-parallel {args.max_parallel}"
                        outcome = await measured_replay(
                            args, client, settings, traffic, label, round_, max_parallel=args.max_parallel
                        )
                    outcomes.append(outcome)
                    show(outcome)
                    for task in running:
                        if task.done():
                            task.result()  # a reader or writer that died: its exception ends the run
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            running.clear()
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if tail is not None:
            with contextlib.suppress(RPCError):
                await tail.terminate("benchmark finished")  # after the workers stopped: no cancelled activity
        await pool.close()

    summary(outcomes)
    reads = len(traffic.reads)
    failed = sum(outcome != "ok" for _, _, _, outcome in traffic.reads)
    print(
        f"{args.events:,} events at the start; {os.cpu_count()} cores; {args.workers} worker processes at nice "
        f"{args.nice}; {args.readers} readers at {args.read_rate:,.0f} queries/s; {args.writers} writers at "
        + (f"{args.write_rate:,.0f} events/s" if args.write_rate else "full speed")
        + f"; {reads:,} queries in all, {failed} of them an error or empty; load average now {load_average()}"
    )
    for message in traffic.messages:
        print(f"  {message}")
    return 1 if failed else 0


async def wait_for_tail(store: EventStore, conn: asyncpg.Connection) -> None:
    """Until the tail applied a probe event: it started with generation 1's swap."""
    async with conn.transaction():
        await store.append("bench-probe", [NewEvent("OrderPlaced", {"customer_id": "probe"})], connection=conn)
        probe = int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint"))
    deadline = time.monotonic() + 60
    while (await conn.fetchval(CHECKPOINT, PROJECTION.name) or 0) <= probe:
        if time.monotonic() > deadline:
            raise RuntimeError("the tail did not start within 60 s")
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the history at the start")
    parser.add_argument("--runs", type=int, default=3, help="rounds, each an unthrottled and a throttled replay")
    parser.add_argument("--workers", type=int, default=2, help="rehydrate worker processes")
    parser.add_argument("--readers", type=int, default=4, help="reader connections")
    parser.add_argument("--read-rate", type=float, default=400.0, help="queries per second over all readers")
    parser.add_argument("--writers", type=int, default=2, help="writer connections")
    parser.add_argument("--write-rate", type=float, default=500.0, help="events/s over all writers; 0: full speed")
    parser.add_argument("--max-rate", type=float, default=None, help="the throttled replay's events/s")
    parser.add_argument(
        "--throttle-fraction",
        type=float,
        default=0.25,
        help="without --max-rate: this fraction of the first unthrottled replay's rate",
    )
    parser.add_argument(
        "--max-parallel",
        type=int,
        default=1,
        help="also a replay throttled to this many chunks at a time (0: none)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="CPU niceness of the workers and the Temporal dev server (19: they take what Postgres and the readers "
        "leave, as on machines of their own)",
    )
    parser.add_argument("--before", type=float, default=10.0, help="seconds of baseline before each replay")
    parser.add_argument("--after", type=float, default=10.0, help="seconds measured after each swap window")
    parser.add_argument("--swap-margin", type=float, default=1.0, help="the swap window: seconds either side")
    parser.add_argument("--warm-up", type=float, default=5.0, help="seconds of traffic before the first baseline")
    run_script(main, parser.parse_args())
