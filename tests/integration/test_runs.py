"""`replay status|list|pause|resume|cancel` find a projection's replay however it was started: from the Web UI (any
workflow id), by a schedule (Temporal's id), or by the CLI; and a paused replay is shown as paused."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
from temporalio.client import Client, WorkflowHandle

from rehydrate import EventStore, schedules
from rehydrate.core.settings import Settings
from rehydrate.models import ReplayProgress
from rehydrate.models.names import scheduled_workflow_id
from rehydrate.runs import replay_runs
from rehydrate.starter import replay_status
from rehydrate.worker import running_worker
from rehydrate.workflows import ReplayWorkflow
from tests.helpers import domain
from tests.helpers.cli import rehydrate
from tests.helpers.waiting import eventually

SLOW = {"lanes": 1, "chunk_size": 1, "max_parallel": 1}  # one event a chunk: a replay that lasts


async def listed(client: Client, settings: Settings, workflow_id: str) -> bool:
    runs = await replay_runs(client, "accounts", running=True, task_queue=settings.temporal_task_queue)
    return any(run.workflow_id == workflow_id for run in runs)


async def progress(handle: WorkflowHandle[ReplayWorkflow, object]) -> ReplayProgress:
    return await handle.query(ReplayWorkflow.progress)


async def test_a_replay_started_from_the_web_ui_is_found_paused_shown_as_paused_and_cancelled(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    await domain.import_all(store, domain.random_history(12, events=1500))
    async with running_worker(settings, domain.registry(), client=client):
        ui_id = f"ui-{uuid.uuid4().hex[:8]}"
        await client.start_workflow(
            "Replay", {"projection": "accounts", **SLOW}, id=ui_id, task_queue=settings.temporal_task_queue
        )
        handle = client.get_workflow_handle_for(ReplayWorkflow.run, ui_id)
        await eventually(lambda: listed(client, settings, ui_id))

        listing = await rehydrate(settings, tmp_path, "replay", "list", "accounts")
        assert listing.code == 0 and ui_id in listing.stdout and "running" in listing.stdout, listing
        assert "other" in listing.stdout, listing  # who started it: not the CLI, not a schedule

        paused = await rehydrate(settings, tmp_path, "replay", "pause", "accounts", "--json")
        assert paused.code == 0 and orjson.loads(paused.stdout)["workflow_id"] == ui_id, paused
        await eventually(lambda: _paused(handle))
        status = await rehydrate(settings, tmp_path, "replay", "status", "accounts")
        assert status.code == 0 and "accounts: running" in status.stdout and ui_id in status.stdout, status
        assert "paused, generation 1:" in status.stdout and "ETA" not in status.stdout, status

        resumed = await rehydrate(settings, tmp_path, "replay", "resume", "accounts", "--json")
        assert resumed.code == 0 and orjson.loads(resumed.stdout)["workflow_id"] == ui_id, resumed
        cancelled = await rehydrate(settings, tmp_path, "replay", "cancel", "accounts", "--json")
        assert cancelled.code == 0 and orjson.loads(cancelled.stdout)["workflow_id"] == ui_id, cancelled
        await eventually(lambda: _ended(client, settings))
    found = await replay_status(client, "accounts", task_queue=settings.temporal_task_queue)
    assert (found.workflow_id, found.status) == (ui_id, "CANCELED")
    again = await rehydrate(settings, tmp_path, "replay", "cancel", "accounts")
    assert again.code == 1 and "no replay of 'accounts' is running" in again.stderr, again
    assert f"the latest, {ui_id}, is canceled" in again.stderr, again


async def _paused(handle: WorkflowHandle[ReplayWorkflow, object]) -> bool:
    return (await progress(handle)).paused


async def _ended(client: Client, settings: Settings) -> bool:
    runs = await replay_runs(client, "accounts", running=True, task_queue=settings.temporal_task_queue)
    return runs == []


async def test_a_replay_started_by_a_schedule_is_found_and_cancelled(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    """No worker runs when the schedule fires: the run has not named its projection in its memo yet, and is found by
    the workflow id the schedule gave it."""
    await domain.append_all(store, domain.random_history(13, events=400))
    name = f"rebuild-{uuid.uuid4().hex[:6]}"
    await schedules.create_schedule(client, settings, name, "accounts", every="1d", lanes=1)
    try:
        await schedules.trigger_schedule(client, name)

        async def scheduled_run() -> bool:
            runs = await replay_runs(client, "accounts", running=True, task_queue=settings.temporal_task_queue)
            return any(run.started_by == "schedule" for run in runs)

        await eventually(scheduled_run)
        status = await rehydrate(settings, tmp_path, "replay", "status", "accounts", "--json")
        assert status.code == 0, status
        shown = orjson.loads(status.stdout)
        assert shown["status"] == "RUNNING", shown
        assert shown["workflow_id"].startswith(
            scheduled_workflow_id("accounts", "replay", settings.temporal_task_queue) + "-"
        ), shown
        assert "no worker answered within 3 s" in shown["unanswered"], shown  # and said at once, not after 30 s
        cancelled = await rehydrate(settings, tmp_path, "replay", "cancel", "accounts", "--json")
        assert orjson.loads(cancelled.stdout)["workflow_id"] == shown["workflow_id"], cancelled
        async with running_worker(settings, domain.registry(), client=client):
            await eventually(lambda: _ended(client, settings))
    finally:
        await schedules.delete_schedule(client, name)
    runs = await replay_runs(client, "accounts", task_queue=settings.temporal_task_queue)
    assert [(run.workflow_id, run.started_by, run.status) for run in runs] == [
        (shown["workflow_id"], "schedule", "CANCELED")
    ]
