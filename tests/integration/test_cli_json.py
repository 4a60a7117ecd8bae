"""Every command a script may call prints JSON with --json. A walk of the whole command tree finds each command;
each is run for real (a subprocess against this test's Postgres and Temporal, with a worker) and what it prints is
parsed. A command added without --json, or without a run here, fails the walk."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import typer
from temporalio.client import Client

from rehydrate import EventStore
from rehydrate.cli import app
from rehydrate.core.settings import Settings
from rehydrate.engine.aggregates import AggregateRegistry
from rehydrate.starter import snapshot_rebuild_status
from rehydrate.worker import running_worker
from tests.helpers import domain, legacy, versioned
from tests.helpers.cli import rehydrate
from tests.helpers.slow_aggregates import SlowAccount
from tests.helpers.waiting import eventually

# Commands with no --json, and why.
NO_JSON = {
    ("dev",): "runs until stopped, logging as it goes (REHYDRATE_LOG_FORMAT=json for JSON logs)",
    ("worker",): "runs until stopped, logging as it goes (REHYDRATE_LOG_FORMAT=json for JSON logs)",
    ("db", "psql"): "an interactive psql session (psql's own options choose its output)",
}
# Commands with --json that are run with it elsewhere, and where.
RUN_ELSEWHERE = {
    ("demo",): "test_dev.py: the demo starts its own Temporal and Postgres",
    ("sandboxes",): "a hidden alias of `sandbox list`, which runs here",
}


def leaves() -> dict[tuple[str, ...], Any]:
    """Every command of `rehydrate`, by its path."""
    found: dict[tuple[str, ...], Any] = {}

    def walk(command: Any, path: tuple[str, ...]) -> None:
        children = getattr(command, "commands", None)
        if children is None:
            found[path] = command
            return
        for name, child in children.items():
            walk(child, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


def test_every_command_has_json_or_a_reason() -> None:
    missing = [
        " ".join(path)
        for path, command in leaves().items()
        if path not in NO_JSON and not any("--json" in param.opts for param in command.params)
    ]
    assert missing == [], f"commands without --json: {missing}"


async def run_json(
    settings: Settings,
    tmp_path: Path,
    ran: set[tuple[str, ...]],
    *args: str,
    exit_code: int = 0,
    env: dict[str, str] | None = None,
) -> Any:
    """Run `rehydrate ARGS --json`: it must exit with `exit_code` and print one JSON document, which is returned."""
    done = await rehydrate(settings, tmp_path, *args, "--json", **(env or {}))
    assert done.code == exit_code, done
    try:
        value = orjson.loads(done.stdout)
    except orjson.JSONDecodeError as error:
        raise AssertionError(f"not JSON: {error}\n{done}") from None
    path = tuple(word for word in args if not word.startswith("-"))
    command = next(p for p in sorted(leaves(), key=len, reverse=True) if path[: len(p)] == p)
    ran.add(command)
    return value


async def test_every_command_prints_json_that_parses(
    settings: Settings, tmp_path: Path, store: EventStore, pool: asyncpg.Pool
) -> None:
    ran: set[tuple[str, ...]] = set()

    async def j(*args: str, exit_code: int = 0, env: dict[str, str] | None = None) -> Any:
        return await run_json(settings, tmp_path, ran, *args, exit_code=exit_code, env=env)

    history = tmp_path / "history.jsonl"
    history.write_bytes(
        b"\n".join(
            orjson.dumps({"stream_id": stream, "type": event.type, "data": event.data})
            for stream, event in domain.random_history(91, streams=30, events=400)
        )
    )
    role = f"rh_json_{uuid.uuid4().hex[:8]}"
    await pool.execute(f'CREATE ROLE "{role}"')
    try:
        assert (await j("db", "init"))["ready"] is True
        # Commands that do not depend on each other, run at once (here and below).
        url, granted = await asyncio.gather(j("db", "url"), j("db", "grants", role, "--apply"))
        assert "url" in url and granted["applied"] is True
        assert (await j("events", "import", str(history)))["events"] == 400
        # Exit 1: the history has a type no projection handles ("Audited"); the JSON says which.
        checked, plan = await asyncio.gather(j("events", "check", exit_code=1), j("replay", "plan", "accounts"))
        assert [row["event_type"] for row in checked if not row["ok"]] == ["Audited"]
        assert plan["events"] > 0

        # A team's own table, declared as a source in settings: checked, prepared, checked again.
        await pool.execute(legacy.CREATE)
        await legacy.write(pool, domain.random_history(92, streams=5, events=40))
        declared = {"REHYDRATE_SOURCES": orjson.dumps({"legacy": legacy.DECLARED}).decode()}
        listed_sources, unprepared = await asyncio.gather(
            j("sources", "list", env=declared), j("sources", "check", "legacy", exit_code=1, env=declared)
        )
        assert [s["name"] for s in listed_sources] == ["rehydrate", "legacy"]
        assert "has no column 'rehydrate_tx'" in unprepared["problems"][0], unprepared
        assert (await j("sources", "prepare", "legacy", env=declared))["applied"] is True
        assert (await j("sources", "check", "legacy", env=declared))["ok"] is True

        async with running_worker(settings, domain.registry()):
            assert (await j("replay", "start", "accounts", "--wait"))["generation"] == 1
            assert (await j("replay", "start", "accounts", "--wait"))["generation"] == 2
            # Commands that only read, run at once.
            status, runs, generations, projections = await asyncio.gather(
                j("replay", "status", "accounts"),
                j("replay", "list", "accounts"),
                j("generations", "accounts"),
                j("projections"),
            )
            assert status["status"] == "COMPLETED"
            assert [run["started_by"] for run in runs] == ["cli", "cli"]
            assert [g["generation"] for g in generations] == [2, 1]
            listed = {p["name"]: p for p in projections}
            assert listed["accounts"]["active_generation"] == 2 and listed["accounts"]["rows_exact"] is True
            assert (await j("rollback", "accounts"))["to_generation"] == 1
            assert (await j("verify", "accounts"))["differing"] == 0
            repaired = await j("replay", "repair", "accounts", "--key", "acct-1", "--dry-run")
            assert (repaired["dry_run"], repaired["keys"], repaired["changed"]) == (True, 1, 0)
            assert (await j("replay", "start", "accounts", "--sandbox", "s1", "--wait"))["sandbox"] == "s1"
            assert [s["label"] for s in await j("sandbox", "list")] == ["s1"]
            assert (await j("sandbox", "drop", "s1"))["builds_dropped"] == 1
            assert (await j("tail", "start", "accounts"))["tail"] == "started"
            assert (await j("tail", "stop", "accounts"))["tail"] == "stopped"
            dead_letters, retried = await asyncio.gather(
                j("dead-letters", "list", "accounts"), j("dead-letters", "retry", "accounts")
            )
            assert dead_letters == [] and retried["keys_retried"] == 0

            # A replay slow enough (one event per chunk, one chunk at a time) to be paused, tuned and cancelled.
            started = await j(
                "replay", "start", "group_totals", "--lanes", "1", "--chunk-size", "1", "--max-parallel", "1"
            )
            assert (await j("replay", "pause", "group_totals"))["workflow_id"] == started["workflow_id"]
            assert (await j("replay", "tune", "group_totals", "--max-parallel", "2"))["previous_max_parallel"] == 1
            assert (await j("replay", "resume", "group_totals"))["requested"] == "resume"
            assert (await j("replay", "cancel", "group_totals"))["requested"] == "cancel"

            assert (await j("schedule", "create", "nightly", "--projection", "accounts", "--every", "1d"))[
                "does"
            ] == "replay"
            schedules, nightly = await asyncio.gather(j("schedule", "list"), j("schedule", "describe", "nightly"))
            assert [s["name"] for s in schedules] == ["nightly"]
            assert nightly["paused"] is False
            assert (await j("schedule", "pause", "nightly"))["state"] == "paused"
            assert (await j("schedule", "unpause", "nightly"))["state"] == "unpaused"
            assert (await j("schedule", "trigger", "nightly"))["state"] == "triggered"
            assert (await j("schedule", "delete", "nightly"))["state"] == "deleted"
    finally:
        await pool.execute(f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')

    missing = set(leaves()) - ran - set(NO_JSON) - set(RUN_ELSEWHERE) - SNAPSHOT_COMMANDS
    assert missing == set(), f"commands never run with --json: {sorted(missing)}"


SNAPSHOT_COMMANDS = {("snapshots", "rebuild"), ("snapshots", "status"), ("snapshots", "cancel")}


async def test_snapshot_commands_print_json_that_parses(
    settings: Settings, tmp_path: Path, store: EventStore, client: Client
) -> None:
    ran: set[tuple[str, ...]] = set()
    env = {"REHYDRATE_AGGREGATES": "tests.helpers.slow_aggregates"}
    await versioned.load_history(store, 5, streams=200, events=2000)
    async with running_worker(settings, domain.registry(), aggregates=AggregateRegistry([SlowAccount])):
        # One stream per chunk, one partition: long enough to be asked about and cancelled.
        args = ("snapshots", "rebuild", "slow_account", "--partitions", "1", "--chunk-size", "1")
        assert "workflow_id" in await run_json(settings, tmp_path, ran, *args, env=env)
        status = await run_json(settings, tmp_path, ran, "snapshots", "status", "slow_account", env=env)
        assert status["status"] == "RUNNING", status
        assert "workflow_id" in await run_json(settings, tmp_path, ran, "snapshots", "cancel", "slow_account", env=env)

        async def ended() -> bool:  # the worker acts on the cancel; the next test may rebuild this type again
            return (await snapshot_rebuild_status(client, "slow_account", settings.temporal_task_queue))[0] != "RUNNING"

        await eventually(ended, within=30)
    assert ran == SNAPSHOT_COMMANDS
