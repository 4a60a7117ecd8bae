"""Periodic rebuilds and verifies on Temporal Schedules: create, list, describe, pause, unpause, trigger, delete.

A schedule starts the ordinary `Replay` workflow with `skip_if_running` (with `verify_only`, the `Verify` workflow,
which skips in the same way while a replay or another verify of the projection runs). Two guards keep one replay per
projection: the schedule's overlap policy SKIP (its own runs never overlap), and the replay's plan, which finds
a generation another workflow is building (a manual `replay start`, another schedule) and ends the scheduled
run successfully as "skipped: …". The fixed workflow id alone cannot do it: Temporal appends the scheduled time
to a scheduled workflow's id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleDescription,
    ScheduleHandle,
    ScheduleIntervalSpec,
    ScheduleListActionStartWorkflow,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    WorkflowFailureError,
)
from temporalio.client import WorkflowExecutionStatus as Status
from temporalio.service import RPCError, RPCStatusCode

from rehydrate.core.errors import UserError
from rehydrate.models import ReplayInput, ReplayResult, VerifyInput, VerifyResult
from rehydrate.models.names import REPLAY, VERIFY, scheduled_workflow_id
from rehydrate.starter import check_replay_input, check_verify_input, drift_of, failure_cause
from rehydrate.workflows.messages import clean_message, drift_message

if TYPE_CHECKING:
    from rehydrate.core.settings import Settings
    from rehydrate.engine.projections import Registry

MEMO_KEY = "rehydrate_projection"
SPEC_KEY = "rehydrate_spec"  # as the user wrote it: the server turns cron expressions into calendar specs
_EVERY = re.compile(r"(\d+)([dhms])")
_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


@dataclass
class RecentRun:
    workflow_id: str
    run_id: str
    started_at: datetime
    status: str
    outcome: str


@dataclass
class ScheduleView:
    name: str
    projection: str
    spec: str
    paused: bool
    note: str | None
    kind: str = "replay"  # or "verify" (created with --verify-only)
    next_runs: list[datetime] = field(default_factory=list)
    recent_runs: list[RecentRun] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    skipped_overlap: int = 0


def parse_every(text: str) -> timedelta:
    """`6h`, `90m`, `1d12h`, `30s` → a timedelta; anything else is a UserError."""
    cleaned = text.strip().lower()
    parts = _EVERY.findall(cleaned)
    if not parts or "".join(n + u for n, u in parts) != cleaned:
        raise UserError(f"--every {text!r} is not a duration", fix="write it like 6h, 30m, 1d or 1h30m")
    interval = timedelta()
    for number, unit in parts:
        interval += timedelta(**{_UNITS[unit]: int(number)})
    if interval < timedelta(minutes=1):
        raise UserError(f"--every {text!r} is shorter than a minute", fix="rebuild at most once a minute")
    return interval


def _kind(workflow_type: str | None) -> str:
    return "verify" if workflow_type == VERIFY else "replay"


def schedule_spec(cron: str | None, every: str | None) -> ScheduleSpec:
    """The schedule's times from exactly one of --cron and --every (Temporal checks the cron expression)."""
    if (cron is None) == (every is None):
        raise UserError(
            "a schedule needs exactly one of --cron and --every", fix="e.g. --every 6h or --cron '0 3 * * *'"
        )
    if cron is not None:
        return ScheduleSpec(cron_expressions=[cron])
    return ScheduleSpec(intervals=[ScheduleIntervalSpec(every=parse_every(every or ""))])


async def create_schedule(
    client: Client,
    settings: Settings,
    name: str,
    projection: str,
    *,
    cron: str | None = None,
    every: str | None = None,
    lanes: int | None = None,
    registry: Registry | None = None,
    verify_only: bool = False,
) -> ScheduleHandle:
    """Create schedule NAME that rebuilds PROJECTION (or, `verify_only`, verifies it: rebuilds it into a sandbox and
    compares) on a cron expression or every interval. `lanes` is the rebuild's, in both cases."""
    spec = schedule_spec(cron, every)
    action: ScheduleActionStartWorkflow
    if verify_only:
        verify_input = VerifyInput(projection, lanes=lanes, skip_if_running=True)
        check_verify_input(verify_input, registry)
        action = ScheduleActionStartWorkflow(
            VERIFY,
            verify_input,
            id=scheduled_workflow_id(projection, "verify", settings.temporal_task_queue),
            task_queue=settings.temporal_task_queue,
            static_summary=f"Scheduled verify of {projection} ({name})",
        )
    else:
        replay_input = ReplayInput(projection, lanes=lanes, skip_if_running=True)
        check_replay_input(replay_input, registry)
        action = ScheduleActionStartWorkflow(
            REPLAY,
            replay_input,
            id=scheduled_workflow_id(projection, "replay", settings.temporal_task_queue),
            task_queue=settings.temporal_task_queue,
            static_summary=f"Scheduled replay of {projection} ({name})",
        )
    try:
        return await client.create_schedule(
            name,
            Schedule(
                action=action,
                spec=spec,
                policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
                state=ScheduleState(note=f"{'verifies' if verify_only else 'rebuilds'} {projection}"),
            ),
            memo={MEMO_KEY: projection, SPEC_KEY: f"cron {cron}" if cron is not None else f"every {every}"},
        )
    except ScheduleAlreadyRunningError:
        raise UserError(
            f"a schedule named {name!r} already exists", fix="pick another name, or delete it first"
        ) from None
    except RPCError as error:
        if error.status == RPCStatusCode.INVALID_ARGUMENT:
            what = f"--cron {cron!r}" if cron is not None else f"--every {every!r}"
            raise UserError(f"Temporal refused the schedule: {error.message}", fix=f"check {what}") from None
        raise


async def list_schedules(client: Client) -> list[ScheduleView]:
    """rehydrate's schedules (those carrying the projection memo), by name; Temporal's list is eventually consistent."""
    views: list[ScheduleView] = []
    async for entry in await client.list_schedules():
        projection = await entry.memo_value(MEMO_KEY, None)
        if projection is None:
            continue
        action = entry.schedule.action if entry.schedule else None
        views.append(
            ScheduleView(
                name=entry.id,
                projection=str(projection),
                spec=str(await entry.memo_value(SPEC_KEY, "")),
                paused=bool(entry.schedule and entry.schedule.state.paused),
                note=entry.schedule.state.note if entry.schedule else None,
                kind=_kind(action.workflow if isinstance(action, ScheduleListActionStartWorkflow) else None),
                next_runs=list(entry.info.next_action_times[:3]) if entry.info else [],
            )
        )
    return sorted(views, key=lambda view: view.name)


async def describe_schedule(client: Client, name: str) -> ScheduleView:
    """Next runs, and the recent runs with their outcome: the new generation, skipped, or the failure (a verify's:
    no drift, the keys that differ, skipped, or the failure)."""
    description = await _describe(client, name)
    info = description.info
    scheduled = description.schedule.action
    view = ScheduleView(
        name=name,
        projection=str(await description.memo_value(MEMO_KEY, "")),
        spec=str(await description.memo_value(SPEC_KEY, "")),
        paused=description.schedule.state.paused,
        note=description.schedule.state.note,
        kind=_kind(scheduled.workflow if isinstance(scheduled, ScheduleActionStartWorkflow) else None),
        next_runs=list(info.next_action_times[:5]),
        running=[r.workflow_id for r in info.running_actions if isinstance(r, ScheduleActionExecutionStartWorkflow)],
        skipped_overlap=info.num_actions_skipped_overlap,
    )
    for action in info.recent_actions:
        run = action.action
        if isinstance(run, ScheduleActionExecutionStartWorkflow):
            status, outcome = await _outcome(client, run.workflow_id, run.first_execution_run_id, view.kind)
            view.recent_runs.append(
                RecentRun(run.workflow_id, run.first_execution_run_id, action.started_at, status, outcome)
            )
    return view


async def _outcome(client: Client, workflow_id: str, run_id: str, kind: str) -> tuple[str, str]:
    # first_execution_run_id: following it reaches the last run of a replay that continued as new.
    result_type = VerifyResult if kind == "verify" else ReplayResult
    handle = client.get_workflow_handle(workflow_id, first_execution_run_id=run_id, result_type=result_type)
    try:
        status = (await handle.describe()).status
    except RPCError:
        return "UNKNOWN", "no longer in Temporal's history (retention)"
    if status == Status.RUNNING:
        return "RUNNING", "running"
    try:
        result = await handle.result()
    except WorkflowFailureError as failure:
        drift = drift_of(failure)  # a verify that found drift: its own line, with the count and the first keys
        message = drift_message(drift) if drift is not None else failure_cause(failure)  # shown after "failed: "
        return status.name if status else "FAILED", message
    if isinstance(result, VerifyResult):
        return "COMPLETED", result.skipped or clean_message(result)
    if result.skipped:
        return "COMPLETED", result.skipped
    return "COMPLETED", (
        f"generation {result.generation} active: {result.events_applied:,} events in {result.seconds:.1f} s, "
        f"{result.rows:,} rows"
    )


async def pause_schedule(client: Client, name: str, note: str | None = None) -> None:
    await _describe(client, name)
    await client.get_schedule_handle(name).pause(note=note or "paused with `rehydrate schedule pause`")


async def unpause_schedule(client: Client, name: str) -> None:
    await _describe(client, name)
    await client.get_schedule_handle(name).unpause(note="unpaused with `rehydrate schedule unpause`")


async def trigger_schedule(client: Client, name: str) -> None:
    """Run the schedule's replay now (skipped, and shown so, if a replay of the projection is running)."""
    await _describe(client, name)
    await client.get_schedule_handle(name).trigger()


async def delete_schedule(client: Client, name: str) -> None:
    """Delete the schedule; a replay it started goes on to the end."""
    await _describe(client, name)
    await client.get_schedule_handle(name).delete()


async def _describe(client: Client, name: str) -> ScheduleDescription:
    try:
        description = await client.get_schedule_handle(name).describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            raise UserError(f"no schedule named {name!r}", fix="see `rehydrate schedule list`") from None
        raise
    if await description.memo_value(MEMO_KEY, None) is None:
        raise UserError(f"schedule {name!r} is not one of rehydrate's", fix="manage it with the `temporal` CLI")
    return description
