"""Scheduled rebuilds on Temporal Schedules: lifecycle, the triggered replay swaps, overlap is skipped and shown."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from temporalio.client import Client, WorkflowFailureError

from rehydrate import EventStore, NewEvent, schedules
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.models import ReplayInput
from rehydrate.models.names import scheduled_workflow_id
from rehydrate.schedules import ScheduleView
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.worker import running_worker
from rehydrate.workflows import ReplayWorkflow
from tests.helpers import domain
from tests.helpers.waiting import paused_replay, poll_until


def finished(count: int) -> Callable[[ScheduleView], bool]:
    return lambda view: len(view.recent_runs) >= count and all(r.status != "RUNNING" for r in view.recent_runs)


async def test_schedule_lifecycle_trigger_swaps_overlap_is_skipped_pause_and_delete(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(21, streams=20, events=300))
    name = f"accounts-nightly-{uuid.uuid4().hex[:6]}"
    registry = domain.registry()
    async with running_worker(settings, registry, client=client):
        await schedules.create_schedule(client, settings, name, "accounts", every="6h", lanes=2, registry=registry)
        view = await schedules.describe_schedule(client, name)
        assert (view.projection, view.spec, view.paused) == ("accounts", "every 6h", False)
        assert view.next_runs and view.next_runs[0] - view.next_runs[-1] <= timedelta(0)

        # Trigger: the scheduled replay builds generation 1 and swaps it in.
        await schedules.trigger_schedule(client, name)
        view = await poll_until(lambda: schedules.describe_schedule(client, name), finished(1))
        [first] = view.recent_runs
        events = await domain.all_events(store)
        handled = sum(1 for event in events if event.type in domain.accounts.event_types)
        assert first.status == "COMPLETED", first
        assert first.outcome.startswith(f"generation 1 active: {handled} events"), first
        assert first.workflow_id.startswith(scheduled_workflow_id("accounts", "replay", settings.temporal_task_queue))
        assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, events)

        # Overlap: a manual replay is building (paused, so it stays so); the scheduled run skips and says why.
        manual = await paused_replay(client, settings, store, "accounts")
        await schedules.trigger_schedule(client, name)
        view = await poll_until(lambda: schedules.describe_schedule(client, name), finished(2))
        skipped = view.recent_runs[-1]
        assert (skipped.status, skipped.outcome) == (
            "COMPLETED",
            f"skipped: accounts is already being rebuilt by {manual.id}",
        )
        generations = await store.pool.fetchval("SELECT count(*) FROM rehydrate.generations")
        assert generations == 2, "the skipped run made no generation"
        await manual.signal(ReplayWorkflow.resume)
        assert (await wait_for_replay(manual)).generation == 2

        # Pause, list, unpause, delete.
        await schedules.pause_schedule(client, name)
        assert (await schedules.describe_schedule(client, name)).paused
        listed = await poll_until(
            lambda: schedules.list_schedules(client), lambda views: any(v.name == name and v.paused for v in views)
        )
        assert [(v.projection, v.spec) for v in listed if v.name == name] == [("accounts", "every 6h")]
        await schedules.unpause_schedule(client, name)
        assert not (await schedules.describe_schedule(client, name)).paused
        await schedules.delete_schedule(client, name)
        with pytest.raises(UserError, match="no schedule named"):
            await schedules.describe_schedule(client, name)


async def test_schedule_overlap_between_its_own_runs_is_skipped_by_temporal(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(22, streams=10, events=100))
    name = f"accounts-cron-{uuid.uuid4().hex[:6]}"
    # No worker yet: the first triggered run stays running, so the second trigger overlaps it.
    await schedules.create_schedule(client, settings, name, "accounts", cron="0 3 * * *")
    try:
        await schedules.trigger_schedule(client, name)
        await poll_until(lambda: schedules.describe_schedule(client, name), lambda v: len(v.running) == 1)
        await schedules.trigger_schedule(client, name)
        view = await poll_until(lambda: schedules.describe_schedule(client, name), lambda v: v.skipped_overlap >= 1)
        assert (view.skipped_overlap, len(view.running), view.spec) == (1, 1, "cron 0 3 * * *")
        async with running_worker(settings, domain.registry(), client=client):
            view = await poll_until(lambda: schedules.describe_schedule(client, name), finished(1))
        assert [r.outcome.split(":")[0] for r in view.recent_runs] == ["generation 1 active"]
    finally:
        await schedules.delete_schedule(client, name)


async def test_verify_schedule_shows_no_drift_then_the_drifted_keys_and_skips_while_a_replay_builds(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(23, streams=20, events=300))
    name = f"accounts-verify-{uuid.uuid4().hex[:6]}"
    registry = domain.registry()
    async with running_worker(settings, registry, client=client):
        await wait_for_replay(await start_replay(client, settings, ReplayInput("accounts")))
        await schedules.create_schedule(
            client, settings, name, "accounts", every="6h", lanes=2, registry=registry, verify_only=True
        )
        view = await schedules.describe_schedule(client, name)
        assert (view.projection, view.kind, view.spec, view.note) == (
            "accounts",
            "verify",
            "every 6h",
            "verifies accounts",
        )

        await schedules.trigger_schedule(client, name)
        view = await poll_until(lambda: schedules.describe_schedule(client, name), finished(1))
        [clean] = view.recent_runs
        rows = len(await domain.read_model(store.pool, domain.accounts))
        assert clean.status == "COMPLETED", clean
        assert clean.outcome.startswith("no drift: generation 1 of accounts equals a rebuild at mark"), clean
        assert clean.outcome.endswith(f"({rows} rows)"), clean
        queue = settings.temporal_task_queue
        assert clean.workflow_id.startswith(scheduled_workflow_id("accounts", "verify", queue))
        assert clean.workflow_id.startswith(f"{queue}-scheduled-verify-accounts-")

        # A row changed behind rehydrate's back: the next run ends as drift, naming the count and the key.
        victim = await store.pool.fetchval("SELECT min(account_id) FROM public.account__g1")
        await store.pool.execute("UPDATE public.account__g1 SET balance = -1 WHERE account_id = $1", victim)
        await schedules.trigger_schedule(client, name)
        view = await poll_until(lambda: schedules.describe_schedule(client, name), finished(2))
        drift = view.recent_runs[-1]
        assert drift.status == "FAILED", drift
        assert drift.outcome.startswith("drift: 1 key(s) of accounts differ between generation 1"), drift
        assert drift.outcome.endswith(f"; first: {victim} (differs)"), drift

        # A replay of the projection is building: the scheduled verify skips and says why.
        manual = await paused_replay(client, settings, store, "accounts")
        await schedules.trigger_schedule(client, name)
        view = await poll_until(lambda: schedules.describe_schedule(client, name), finished(3))
        skipped = view.recent_runs[-1]
        assert (skipped.status, skipped.outcome) == (
            "COMPLETED",
            f"skipped: accounts is being rebuilt by {manual.id}; the next verify checks the generation it swaps in",
        )
        await manual.cancel()  # and wait for it: a replay left running would hold the fixed id for later tests
        with pytest.raises(WorkflowFailureError):
            await manual.result()
        listed = await poll_until(
            lambda: schedules.list_schedules(client), lambda views: any(v.name == name for v in views)
        )
        assert [(v.projection, v.kind) for v in listed if v.name == name] == [("accounts", "verify")]
        await schedules.delete_schedule(client, name)


async def test_schedule_bad_input_is_refused_before_anything_is_created(client: Client, settings: Settings) -> None:
    registry = domain.registry()
    cases: list[tuple[dict[str, str | None], str]] = [
        ({"every": "soon"}, "is not a duration"),
        ({"every": "10s"}, "shorter than a minute"),
        ({}, "exactly one of --cron and --every"),
        ({"every": "1h", "cron": "0 * * * *"}, "exactly one of --cron and --every"),
        ({"cron": "every tuesday-ish"}, "Temporal refused the schedule"),
    ]
    for options, message in cases:
        with pytest.raises(UserError, match=message):
            await schedules.create_schedule(client, settings, "bad", "accounts", registry=registry, **options)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="nope"):
        await schedules.create_schedule(client, settings, "bad", "nope", every="1h", registry=registry)
    with pytest.raises(UserError, match="nope"):
        await schedules.create_schedule(
            client, settings, "bad", "nope", every="1h", registry=registry, verify_only=True
        )
    with pytest.raises(UserError, match="lanes=0 is out of range"):
        await schedules.create_schedule(client, settings, "bad", "accounts", every="1h", lanes=0, verify_only=True)
    with pytest.raises(UserError, match="no schedule named"):
        await schedules.trigger_schedule(client, "never-created")
    assert schedules.parse_every("1d12h") == timedelta(days=1, hours=12)


async def test_schedule_commands_create_describe_list_pause_delete(settings: Settings, tmp_path: Path) -> None:
    from tests.helpers.cli import rehydrate

    name = f"cli-{uuid.uuid4().hex[:6]}"
    created = await rehydrate(
        settings, tmp_path, "schedule", "create", name, "--projection", "accounts", "--every", "6h"
    )
    assert created.code == 0, created
    assert f"schedule {name} rebuilds accounts (every 6h)" in created.stdout
    described = await rehydrate(settings, tmp_path, "schedule", "describe", name, "--json")
    assert described.code == 0, described
    view = orjson.loads(described.stdout)
    assert (view["projection"], view["spec"], view["paused"], len(view["next_runs"])) == (
        "accounts",
        "every 6h",
        False,
        5,
    )
    assert (await rehydrate(settings, tmp_path, "schedule", "pause", name)).stdout.strip() == f"schedule {name}: paused"
    listed = await poll_until(
        lambda: rehydrate(settings, tmp_path, "schedule", "list", "--json"),
        lambda run: any(v["name"] == name and v["paused"] for v in orjson.loads(run.stdout)),
    )
    assert [v["projection"] for v in orjson.loads(listed.stdout) if v["name"] == name] == ["accounts"]
    assert (await rehydrate(settings, tmp_path, "schedule", "delete", name)).code == 0
    gone = await rehydrate(settings, tmp_path, "schedule", "trigger", name)
    assert (gone.code, gone.stderr.splitlines()[0]) == (1, f"error: no schedule named {name!r}"), gone
    twice = await rehydrate(settings, tmp_path, "schedule", "create", "x", "--projection", "nope", "--every", "1h")
    assert twice.code == 1 and "nope" in twice.stderr, twice

    verifies = f"cli-verify-{uuid.uuid4().hex[:6]}"
    created = await rehydrate(
        settings, tmp_path, "schedule", "create", verifies, "-p", "accounts", "--every", "1d", "--verify-only"
    )
    assert created.code == 0, created
    assert f"schedule {verifies} verifies accounts (every 1d)" in created.stdout
    described = await rehydrate(settings, tmp_path, "schedule", "describe", verifies)
    assert described.stdout.startswith(f"{verifies}: verifies accounts every 1d, active"), described
    listed = await poll_until(
        lambda: rehydrate(settings, tmp_path, "schedule", "list", "--json"),
        lambda run: any(v["name"] == verifies for v in orjson.loads(run.stdout)),
    )
    assert [v["kind"] for v in orjson.loads(listed.stdout) if v["name"] == verifies] == ["verify"]
    assert (await rehydrate(settings, tmp_path, "schedule", "delete", verifies)).code == 0
    bad = await rehydrate(
        settings,
        tmp_path,
        "schedule",
        "create",
        "y",
        "-p",
        "accounts",
        "--every",
        "1h",
        "--verify-only",
        "--lanes",
        "0",
    )
    assert (bad.code, bad.stderr.splitlines()[0]) == (1, "error: lanes=0 is out of range"), bad


async def test_a_failed_scheduled_replay_shows_its_cause_once(
    client: Client, settings: Settings, store: EventStore
) -> None:
    """`describe` prints a run as "<status>: <outcome>": a failed run's outcome is the cause alone."""
    await store.append("acct-1", [NewEvent("Opened", {"owner": "o"}), NewEvent("Deposited", {"amount": "x"})])
    name = f"accounts-failing-{uuid.uuid4().hex[:6]}"
    registry = domain.registry()
    async with running_worker(settings, registry, client=client):
        await schedules.create_schedule(client, settings, name, "accounts", every="6h", registry=registry)
        try:
            await schedules.trigger_schedule(client, name)
            view = await poll_until(lambda: schedules.describe_schedule(client, name), finished(1))
        finally:
            await schedules.delete_schedule(client, name)
    [run] = view.recent_runs
    assert run.status == "FAILED", run
    assert "handler 'moved' raised TypeError" in run.outcome, run
    assert not run.outcome.lower().startswith("failed"), run
