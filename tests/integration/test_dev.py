"""The dev loop on one machine: `rehydrate dev` and `demo` stop what they start (on Ctrl-C and on SIGTERM, unless
kept; `dev --stop` stops what was kept), a command that only reads never starts a server, every shell of a project
knows the same projections, and `rehydrate dev` restarts its worker when a projection's code changes.

Each test runs the real command with its own data dir (the embedded Postgres in it) and a Temporal dev server on a
free port of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest

from rehydrate import EventStore, NewEvent, create_pool
from rehydrate.core import embedded
from tests.helpers.cli import REPO
from tests.helpers.ports import free_port

COUNTING = """
from sqlmodel import Field, SQLModel

from rehydrate import Event, Projection, Row


class Count(SQLModel, table=True):
    __tablename__ = "event_count"
    stream_id: str = Field(primary_key=True)
    n: int = 0


counts = Projection("counts", version=1, table=Count)


@counts.on("Opened", "Deposited")
def counted(row: Row | None, event: Event) -> Row:
    return {"n": (row or {}).get("n", 0) + STEP}
"""


def stack_env(data_dir: Path, port: int) -> dict[str, str]:
    """A user's shell with nothing of rehydrate set but where the stack lives (no database URL: embedded)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REHYDRATE_", "TEMPORAL_"))}
    env.update(
        REHYDRATE_DATA_DIR=str(data_dir),
        REHYDRATE_TEMPORAL_ADDRESS=f"127.0.0.1:{port}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    return env


def start(cwd: Path, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rehydrate", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def run(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "rehydrate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def text_of(log: Path) -> str:
    return log.read_text(errors="replace")


async def wait_for(log: Path, text: str, *, count: int = 1, within: float = 90.0) -> None:
    deadline = time.monotonic() + within
    while text_of(log).count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} did not appear {count} time(s) in {log}:\n{text_of(log)[-3000:]}")
        await asyncio.sleep(0.2)


def stack_pids(data_dir: Path) -> dict[str, int]:
    """The dev server's and the embedded Postgres's pids, from their pid files."""
    pids = {"temporal": int((data_dir / "temporal.pid").read_text())}
    pids["postgres"] = int((embedded.pgdata(data_dir) / "postmaster.pid").read_text().split()[0])
    return pids


def worker_of(dev: subprocess.Popen[bytes]) -> int:
    """The pid of the `rehydrate worker` process `rehydrate dev` runs."""
    (worker,) = [c.pid for c in psutil.Process(dev.pid).children() if "worker" in c.cmdline()]
    return worker


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def stopped(process: subprocess.Popen[bytes], sig: signal.Signals) -> int:
    process.send_signal(sig)
    return await asyncio.to_thread(process.wait, 90)


async def until_gone(pids: list[int], within: float = 30.0) -> list[int]:
    deadline = time.monotonic() + within
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_dev_stops_its_temporal_postgres_and_worker_when_told_to(tmp_path: Path, sig: signal.Signals) -> None:
    env = stack_env(tmp_path / "data", free_port())
    log = tmp_path / "dev.log"
    dev = start(tmp_path, env, log, "dev")
    try:
        await wait_for(log, "worker on task queue")
        started = sorted({*stack_pids(tmp_path / "data").values(), worker_of(dev)})
        assert len(started) == 3 and all(alive(pid) for pid in started), started
        assert await stopped(dev, sig) == 0, text_of(log)
        assert await until_gone(started) == [], text_of(log)
        assert embedded.running_url(tmp_path / "data") is None
    finally:
        if dev.poll() is None:
            dev.kill()


async def test_a_kept_stack_keeps_running_until_dev_stop(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "data", free_port())
    log = tmp_path / "dev.log"
    dev = start(tmp_path, env, log, "dev", "--keep")
    await wait_for(log, "worker on task queue")
    pids = stack_pids(tmp_path / "data")
    worker = worker_of(dev)
    assert await stopped(dev, signal.SIGTERM) == 0
    assert await until_gone([worker]) == []
    assert all(alive(pid) for pid in pids.values()), pids
    done = await run(tmp_path, env, "dev", "--stop")
    assert done.returncode == 0 and "stopped the Temporal dev server" in done.stdout, done
    assert await until_gone(list(pids.values())) == []
    again = await run(tmp_path, env, "dev", "--stop")
    assert again.returncode == 0 and "was running" in again.stdout, again


async def test_a_command_that_reads_never_starts_the_embedded_postgres(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "data", free_port())
    commands = (["projections"], ["generations", "order_summary"], ["db", "url"], ["events", "check"])
    for done in await asyncio.gather(*(run(tmp_path, env, *command) for command in commands)):
        assert done.returncode == 1, done
        assert "the embedded Postgres in" in done.stderr and "is not running" in done.stderr, done
        assert "fix: start it with `rehydrate dev`" in done.stderr, done
    assert not (tmp_path / "data" / "pgdata").exists()


async def test_the_demo_stops_what_it_started_unless_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = stack_env(data, free_port())
    done = await run(tmp_path, env, "demo", "--events", "2000")
    assert done.returncode == 0, done
    assert "rehydrate db psql" in done.stdout and "rehydrate dev" in done.stdout, done
    assert "localhost" not in done.stdout.split("Next:")[0], "no link that is dead once the demo has stopped"
    assert embedded.running_url(data) is None and not (data / "temporal.pid").exists()
    kept = await run(tmp_path, env, "demo", "--events", "2000", "--keep", "--json")
    assert kept.returncode == 0 and "rehydrate dev --stop" in kept.stderr, kept
    results = orjson.loads(kept.stdout)  # with --json, stdout is the replays' results and nothing else
    assert sorted(r["projection"] for r in results) == ["customer_stats", "order_summary"], kept
    assert all(r["generation"] == 2 and r["events_applied"] > 0 for r in results), kept
    pids = stack_pids(data)
    assert all(alive(pid) for pid in pids.values())
    queried = await run(tmp_path, env, "db", "psql", "-c", "SELECT count(*) FROM order_summary")
    assert queried.returncode == 0 and "(1 row)" in queried.stdout, queried
    assert (await run(tmp_path, env, "dev", "--stop")).returncode == 0
    assert await until_gone(list(pids.values())) == []


async def test_every_shell_of_a_project_knows_its_projections_and_dev_reloads_a_changed_handler(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "counting").mkdir(parents=True)
    (project / "counting" / "__init__.py").write_text("")
    module = project / "counting" / "projections.py"
    module.write_text(COUNTING.replace("STEP", "1"))
    (project / "rehydrate.toml").write_text('projections = ["counting.projections"]\n')
    env = stack_env(tmp_path / "data", free_port())
    log = tmp_path / "dev.log"
    dev = start(project, env, log, "dev")
    try:
        await wait_for(log, "worker on task queue")
        assert "Projections: counts (from rehydrate.toml)" in text_of(log)
        url = orjson.loads((await run(project, env, "db", "url", "--json", "--show-password")).stdout)["url"]
        pool = await create_pool(url)
        try:
            store = EventStore(pool)
            for n in range(20):
                await store.append(f"acct-{n % 4}", [NewEvent("Opened" if n < 4 else "Deposited", {"amount": n})])

            # A second shell, in the project, with nothing set: the same projections as dev's worker.
            unknown = await run(project, env, "replay", "start", "nope")
            assert unknown.returncode == 1 and "counting.projections, named by rehydrate.toml" in unknown.stderr
            first = await run(project, env, "replay", "start", "counts", "--wait")
            assert first.returncode == 0, first
            rows = {r["stream_id"]: r["n"] for r in await pool.fetch("SELECT * FROM event_count")}
            assert rows == {f"acct-{n}": 5 for n in range(4)}
            listed = await run(project, env, "projections", "--json")
            (counts,) = [p for p in orjson.loads(listed.stdout) if p["name"] == "counts"]
            assert counts["registered"] and not counts["stale"], listed

            module.write_text(COUNTING.replace("STEP", "2"))  # the handler changes: the worker restarts
            await wait_for(log, "restarting the worker")
            await wait_for(log, "worker on task queue", count=2)
            listed = await run(project, env, "projections", "--json")
            (counts,) = [p for p in orjson.loads(listed.stdout) if p["name"] == "counts"]
            assert counts["stale"], listed
            second = await run(project, env, "replay", "start", "counts", "--wait")
            assert second.returncode == 0, second
            rows = {r["stream_id"]: r["n"] for r in await pool.fetch("SELECT * FROM event_count")}
            assert rows == {f"acct-{n}": 10 for n in range(4)}
        finally:
            await pool.close()
        assert await stopped(dev, signal.SIGTERM) == 0
    finally:
        if dev.poll() is None:
            dev.kill()
