"""How long a repair takes: `rehydrate replay repair` of a hundred keys of a live read model of about 100,000 keys,
timed as a user runs it.

Usage:

    python bench/repair_speed.py --reuse                  # 1,000,000 events (111,934 keys), 100 keys, 5 rounds
    python bench/repair_speed.py --keys 1000 --runs 3 --reuse
    python bench/repair_speed.py --events 20000 --keys 20 --runs 2   # a quick look

The store is `replay_speed.py`'s (the demo's order history, kept in `.rehydrate-bench/` with `--reuse`); at the
default 1,000,000 events `order_summary` has 111,934 keys (orders placed and not archived), the read model's size
this measures. `order_summary` is replayed once from the own store (default lanes, 2 `rehydrate worker` processes,
tails off, as the other bench scripts start them) and its table checked against the ceiling's, row for row.

Then each round picks `--keys` keys of the read model at random (seeded by the round's number) and corrupts their
rows in the live read model with one UPDATE (`items = -1`), so the repair has real work. It times, each from the
start of the process to its exit, `rehydrate replay repair order_summary --keys-from FILE --json --dry-run` (which
must report every key as changed and change nothing), then the same without `--dry-run` (which must report every
key as changed and leave the whole table equal to the ceiling's again, row for row). Both are real CLI processes,
so their time includes the CLI's start and its Temporal connection; the Repair workflow's own span (start to close,
from Temporal) is printed beside it.

Prints the keys in the read model, the events, and for the dry runs and the repairs the median and the range
(min to max) of their seconds over the rounds, and keys/s (never the best run alone). Exit status 1 if a table
differs or a repair reports another count of changed keys.
Postgres: an embedded server kept in `.rehydrate-bench/pgdata` (stopped at the end), or the server of
REHYDRATE_DATABASE_URL. Temporal: a dev server started for the run, or REHYDRATE_TEMPORAL_ADDRESS. Everything it
started is stopped at the end, on Ctrl-C and on SIGTERM too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from common import postgres_server, run_script, stop_process, temporal, worker_env
from replay_speed import HOME, PROJECTION, build_store, ceiling, differences, replay, workers
from temporalio.client import Client

from rehydrate.core.settings import Settings
from rehydrate.models.names import repair_workflow_id

MODULE = "rehydrate.examples.orders"
KEYS_FILE = HOME / "repair-keys.txt"
CORRUPT = "UPDATE public.{table} SET items = -1 WHERE order_id = ANY($1::text[])"
CORRUPTED = "SELECT count(*) FROM public.{table} WHERE items = -1 AND order_id = ANY($1::text[])"


def start_cli(command: list[str], env: dict[str, str], out: Path, err: Path) -> subprocess.Popen[bytes]:
    """`command` with `env` added to this process's environment, its output and errors in files."""
    with out.open("wb") as stdout, err.open("wb") as stderr:
        return subprocess.Popen(
            command, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )


async def run_repair(env: dict[str, str], dry_run: bool, batch_size: int | None) -> tuple[float, dict[str, Any]]:
    """`rehydrate replay repair order_summary --keys-from KEYS_FILE --json` as a process of its own: the seconds
    from its start to its exit, and its JSON. The process is stopped if this is cancelled (Ctrl-C, SIGTERM)."""
    command = [sys.executable, "-m", "rehydrate", "replay", "repair", PROJECTION.name, "--keys-from", str(KEYS_FILE)]
    command += ["--json", *(["--dry-run"] if dry_run else [])]
    command += ["--batch-size", str(batch_size)] if batch_size else []
    out, err = HOME / "repair-cli.out", HOME / "repair-cli.err"
    began = time.perf_counter()
    process = start_cli(command, env, out, err)
    try:
        code = await asyncio.to_thread(process.wait)
        seconds = time.perf_counter() - began
    finally:
        await stop_process(process)  # once it exited, nothing to do
    if code != 0:
        output = await asyncio.to_thread(lambda: out.read_text() + err.read_text()[-4000:])
        raise RuntimeError(f"{' '.join(command[1:])} exited {code}:\n{output}")
    return seconds, orjson.loads(await asyncio.to_thread(out.read_bytes))


async def workflow_seconds(client: Client, task_queue: str) -> float:
    """The span of the last Repair workflow of the projection, start to close, from Temporal."""
    description = await client.get_workflow_handle(repair_workflow_id(PROJECTION.name, task_queue)).describe()
    if description.start_time is None or description.close_time is None:
        return float("nan")
    return (description.close_time - description.start_time).total_seconds()


def spread(seconds: list[float], keys: int) -> str:
    s = sorted(seconds)
    return (
        f"median {statistics.median(s):6.2f} s ({s[0]:.2f} to {s[-1]:.2f}), "
        f"{keys / statistics.median(s):>7,.0f} keys/s ({keys / s[-1]:,.0f} to {keys / s[0]:,.0f})"
    )


async def rounds(
    args: argparse.Namespace, conn: asyncpg.Connection, client: Client, settings: Settings
) -> tuple[int, dict[str, tuple[list[float], list[float]]]]:
    """The rounds: corrupt, dry run, repair, each checked. Returns the wrong results and, for the dry runs and the
    repairs, the seconds of the CLI processes and of their workflows."""
    table = PROJECTION.table.name
    env = worker_env(settings, REHYDRATE_PROJECTIONS=MODULE, REHYDRATE_TAILS="false")
    all_keys = [row[0] for row in await conn.fetch(f"SELECT order_id FROM public.{table} ORDER BY order_id")]
    if args.keys > len(all_keys):
        raise SystemExit(f"--keys {args.keys:,}: the read model has only {len(all_keys):,} keys")
    seconds: dict[str, tuple[list[float], list[float]]] = {"dry run": ([], []), "repair": ([], [])}
    wrong = 0
    for round_ in range(1, args.runs + 1):
        keys = random.Random(round_).sample(all_keys, args.keys)
        await asyncio.to_thread(KEYS_FILE.write_text, "".join(f"{key}\n" for key in keys))
        updated = await conn.execute(CORRUPT.format(table=table), keys)
        if updated != f"UPDATE {len(keys)}":
            raise RuntimeError(f"corrupting {len(keys)} rows: {updated}")
        for kind, dry_run in (("dry run", True), ("repair", False)):
            took, result = await run_repair(env, dry_run, args.batch_size)
            span = await workflow_seconds(client, settings.temporal_task_queue)
            seconds[kind][0].append(took)
            seconds[kind][1].append(span)
            differ = await differences(conn, table)
            problems = []
            if result["changed"] != len(keys) or result["dry_run"] != dry_run:
                problems.append(f"it reported {result['changed']:,} keys changed (dry run: {result['dry_run']})")
            if dry_run:
                still = await conn.fetchval(CORRUPTED.format(table=table), keys)
                if still != len(keys) or differ != 2 * len(keys):  # a corrupted row and the ceiling's unlike it
                    problems.append(f"it changed rows: {still:,} of {len(keys):,} still corrupt, {differ:,} differ")
            elif differ:
                problems.append(f"{differ:,} rows differ from the ceiling's")
            wrong += bool(problems)
            print(
                f"  round {round_}, {kind + ':':<8} {took:.2f} s (its workflow {span:.2f} s), "
                f"{'would change' if dry_run else 'changed'} {result['changed']:,} of {result['keys']:,} keys, "
                f"{result['events']:,} events folded in {result['batches']} batch(es), rows unlike the ceiling's "
                f"(either side): {differ:,}" + ("; WRONG: " + "; ".join(problems) if problems else ""),
                flush=True,
            )
    return wrong, seconds


async def main(args: argparse.Namespace) -> int:
    await asyncio.to_thread(HOME.mkdir, exist_ok=True)
    async with postgres_server(HOME / "pgdata", delete=False) as server_url, temporal() as client:
        url, _ = await build_store(server_url, args.events, args.reuse)
        conn = await asyncpg.connect(url)
        try:
            _, events, _ = await ceiling(conn)
            async with workers(url, client, args.workers, HOME / "repair-worker.log", projections=MODULE) as (
                settings,
                _,
            ):
                took, _, applied, _ = await replay(client, settings, None)
                differ = await differences(conn, PROJECTION.table.name)
                rows = await conn.fetchval(f"SELECT count(*) FROM public.{PROJECTION.table.name}")
                print(
                    f"replayed {PROJECTION.name}: {applied:,} events in {took:.2f} s, {rows:,} keys, "
                    f"rows unlike the ceiling's: {differ:,}",
                    flush=True,
                )
                if differ:
                    return 1
                wrong, seconds = await rounds(args, conn, client, settings)
        finally:
            await conn.close()
    print()
    print(
        f"{args.events:,} events in the store; order_summary reads {events:,}; {rows:,} keys in the read model; "
        f"{os.cpu_count()} cores; {args.workers} worker processes; {args.runs} rounds of {args.keys:,} keys"
        + (f", {args.batch_size:,} per batch" if args.batch_size else "")
    )
    for kind, (cli, spans) in seconds.items():
        print(f"{kind + ', the CLI process':<30} {spread(cli, args.keys)}")
        print(f"{'  of it, the Repair workflow':<30} {spread(spans, args.keys)}")
    return 1 if wrong else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the store (1,000,000: 111,934 keys)")
    parser.add_argument("--keys", type=int, default=100, help="keys repaired each round")
    parser.add_argument("--batch-size", type=int, default=None, help="keys per transaction (default: the CLI's)")
    parser.add_argument("--workers", type=int, default=2, help="rehydrate worker processes")
    parser.add_argument("--runs", type=int, default=5, help="rounds (the summary: median, range)")
    parser.add_argument("--reuse", action="store_true", help="reuse a store of the same size from an earlier run")
    run_script(main, parser.parse_args())
