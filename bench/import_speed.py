"""How fast `rehydrate events import` loads a JSON Lines history into an empty store.

Usage:

    python bench/import_speed.py                          # 1,000,000 events, 5 imports: median and range
    python bench/import_speed.py --runs 9 --events 250000
    python bench/import_speed.py --against ../other-checkout   # alternate with another rehydrate's import

The history is the demo's order domain (`rehydrate.examples.orders`, deterministic, as `bench/replay_speed.py`
writes it, in `.rehydrate-bench/`). Each run creates a fresh database and runs `rehydrate events import FILE --json`
as a user runs it (a real CLI process, stdout not a terminal); the import's own time (from the start of the import
to its commit, as the command reports it) and the command's (start-up and connecting included) are both printed,
with the CPU time the command and Postgres used. Every run's store is checked: as many events as lines, and each
stream's versions 1..n. With `--against DIR` (repeatable), runs alternate between this checkout's rehydrate and DIR's
(its `rehydrate/` package put first on PYTHONPATH), so that all see the same machine.
Postgres: an embedded server kept in `.rehydrate-bench/import-pgdata` (stopped at the end), or the server of
REHYDRATE_DATABASE_URL (databases `rh_import_*` are created on it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import orjson
from common import create_database, drop_database, postgres_server, processes, run_script, write_jsonl

HOME = Path(".rehydrate-bench").resolve()
PGDATA = HOME / "import-pgdata"


def postgres_cpu(pgdata: Path) -> float | None:
    """CPU seconds (user + system) the Postgres server in `pgdata` has used, its processes that ended included (their
    postmaster's children's times: a backend ends with its connection, before a look at /proc after the command could
    see it). None for a server elsewhere (REHYDRATE_DATABASE_URL)."""
    if os.environ.get("REHYDRATE_DATABASE_URL"):
        return None
    try:
        postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    ticks = 0
    for pid, _, fields in processes():
        if pid == postmaster:
            ticks += sum(int(field) for field in fields[11:15])
        elif int(fields[1]) == postmaster:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def checked(url: str, events: int) -> str:
    """'' when the store holds `events` events with every stream's versions 1..n, else what is wrong."""
    conn = await asyncpg.connect(url)
    try:
        count, bad = await conn.fetchrow(
            """SELECT count(*), count(*) FILTER (WHERE stream_version <> n) FROM (
                   SELECT stream_version, row_number() OVER (PARTITION BY stream_id ORDER BY global_position) AS n
                   FROM rehydrate.events) AS v"""
        )
    finally:
        await conn.close()
    if count != events:
        return f"{count:,} events stored, {events:,} expected"
    return f"{bad:,} events out of version order" if bad else ""


@dataclass
class Run:
    command: float  # seconds, start-up and connecting included
    own: float  # seconds, the import as the command reports it
    command_cpu: float  # user + system seconds of the command
    postgres_cpu: float | None  # of the embedded server (None: a server elsewhere)
    wrong: str  # what is wrong with the store afterwards ('' if nothing)


async def one_import(server_url: str, path: Path, events: int, code: Path | None) -> Run:
    """One import into a fresh database, by the rehydrate in `code` (None: this checkout's)."""
    name = "rh_import_run"
    url = await create_database(server_url, name)
    env = {**os.environ, "REHYDRATE_DATABASE_URL": url}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
    before, mine = postgres_cpu(PGDATA), os.times()
    began = time.perf_counter()
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "rehydrate", "events", "import", str(path), "--json"],
        env=env,
        cwd=code,  # `python -m` looks in the working directory before PYTHONPATH
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - began
    after, theirs = postgres_cpu(PGDATA), os.times()
    if done.returncode != 0:
        raise RuntimeError(f"import failed:\n{done.stdout}\n{done.stderr}")
    report = orjson.loads(done.stdout)
    command = theirs.children_user + theirs.children_system - mine.children_user - mine.children_system
    wrong = await checked(url, events)
    await drop_database(server_url, name)
    postgres = after - before if before is not None and after is not None else None
    return Run(seconds, report["seconds"], command, postgres, wrong)


def rates(label: str, events: int, seconds: list[float]) -> str:
    speeds = sorted(events / s for s in seconds)
    return f"{label:<34} median {statistics.median(speeds):>9,.0f} events/s ({speeds[0]:,.0f} to {speeds[-1]:,.0f})"


def cpu(label: str, seconds: list[float]) -> str:
    return f"{label:<34} median {statistics.median(seconds):>9.1f} s ({min(seconds):.1f} to {max(seconds):.1f})"


async def main(args: argparse.Namespace) -> int:
    await asyncio.to_thread(HOME.mkdir, exist_ok=True)
    path = HOME / f"orders-{args.events}.jsonl"
    print(f"writing {path} ...", flush=True)
    await asyncio.to_thread(write_jsonl, path, args.events)
    codes: list[tuple[str, Path | None]] = [("this checkout", None)]
    codes += [(str(other), other.resolve()) for other in args.against]
    results: dict[str, list[Run]] = {label: [] for label, _ in codes}
    loads: list[float] = []
    async with postgres_server(PGDATA, delete=False) as server_url:
        for number in range(args.runs):
            for label, code in codes:
                run = await one_import(server_url, path, args.events, code)
                results[label].append(run)
                loads.append(os.getloadavg()[0])
                postgres = "" if run.postgres_cpu is None else f", Postgres {run.postgres_cpu:.1f} s"
                print(
                    f"  run {number + 1} ({label}): import {args.events / run.own:,.0f} events/s ({run.own:.2f} s), "
                    f"command {run.command:.2f} s; CPU: command {run.command_cpu:.1f} s{postgres}; "
                    f"load average {loads[-1]:.2f}" + (f"; WRONG: {run.wrong}" if run.wrong else ""),
                    flush=True,
                )
    print()
    print(f"{args.events:,} events, {path.stat().st_size / 1e6:,.0f} MB of JSON Lines; {os.cpu_count()} cores")
    for label, runs in results.items():
        print(rates(f"{label}: the import", args.events, [run.own for run in runs]))
        print(rates(f"{label}: the command", args.events, [run.command for run in runs]))
        print(cpu(f"{label}: CPU of the command", [run.command_cpu for run in runs]))
        server = [run.postgres_cpu for run in runs if run.postgres_cpu is not None]
        if server:
            print(cpu(f"{label}: CPU of Postgres", server))
    print(f"load average (1 min) after each run: {min(loads):.1f} to {max(loads):.1f}")
    return 1 if any(run.wrong for runs in results.values() for run in runs) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the history")
    parser.add_argument("--runs", type=int, default=5, help="imports (of each checkout), each into a fresh store")
    parser.add_argument(
        "--against", type=Path, action="append", default=[], help="another checkout to alternate with (repeatable)"
    )
    run_script(main, parser.parse_args())
