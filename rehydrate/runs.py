"""A projection's replays as Temporal lists them, however they were started (the CLI, a schedule, a verify, the Web
UI, a program) and under whatever workflow id: each replay names its projection and sandbox in its memo."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from temporalio.client import Client, WorkflowExecution, WorkflowHandle
from temporalio.client import WorkflowExecutionStatus as Status
from temporalio.service import RPCError

from rehydrate.models.names import REPLAY, id_prefix, replay_workflow_id, scheduled_workflow_id, verify_label

ANY_SANDBOX = "*"  # `sandbox=ANY_SANDBOX`: live builds and sandbox builds alike
_SCANNED = 2_000  # replay executions looked at, newest first, before giving up on older ones


@dataclass
class ReplayRun:
    """One replay run as Temporal lists it."""

    workflow_id: str
    run_id: str
    status: str  # RUNNING, COMPLETED, FAILED, CANCELED, TERMINATED, TIMED_OUT
    started_at: datetime | None
    closed_at: datetime | None
    started_by: str  # cli, schedule, verify, other (the Web UI or a program)
    sandbox: str | None = None


def started_by(workflow_id: str, projection: str, task_queue: str | None = None) -> str:
    """Who started a replay on `task_queue`, read off its workflow id: the CLI and the starter use fixed ids,
    schedules a prefix, a verify its sandbox label; anything else was started from the Web UI or by a program."""
    q = task_queue
    if workflow_id.startswith(scheduled_workflow_id(projection, "replay", q) + "-") or workflow_id.startswith(
        scheduled_workflow_id(projection, "verify", q) + "-"
    ):
        return "schedule"
    if workflow_id == replay_workflow_id(projection, verify_label(projection), q):
        return "verify"
    if workflow_id == replay_workflow_id(projection, None, q) or _sandbox_of(workflow_id, projection, q) is not None:
        return "cli"
    return "other"


async def _names(execution: WorkflowExecution) -> tuple[str | None, str | None]:
    memo = await execution.memo()
    return memo.get("projection"), memo.get("sandbox")


def _is_of(workflow_id: str, projection: str, sandbox: str | None, task_queue: str | None) -> bool:
    """Runs that carry no memo (started before replays wrote it, or not yet picked up by a worker) are known by the
    workflow ids the CLI and schedules give them."""
    q = task_queue
    live = workflow_id == replay_workflow_id(projection, None, q) or workflow_id.startswith(
        scheduled_workflow_id(projection, "replay", q) + "-"
    )
    if sandbox is None:
        return live
    if sandbox == ANY_SANDBOX:
        return live or _sandbox_of(workflow_id, projection, q) is not None
    return workflow_id == replay_workflow_id(projection, sandbox, q)


async def replay_runs(
    client: Client,
    projection: str,
    *,
    sandbox: str | None = ANY_SANDBOX,
    running: bool = False,
    limit: int = 20,
    task_queue: str | None = None,
) -> list[ReplayRun]:
    """The projection's replays, newest first (at most `limit`): into `sandbox` (None: live builds only;
    ANY_SANDBOX: all), only the running ones with `running`, only those on `task_queue` when given (the queue
    tells apart two installations that share a namespace). A replay that continued as new is listed once, as its
    latest run."""
    query = f"WorkflowType = '{REPLAY}'" + (" AND ExecutionStatus = 'Running'" if running else "")
    if task_queue is not None:
        query += f" AND TaskQueue = '{_quoted(task_queue)}'"
    found: list[ReplayRun] = []
    continued: dict[str, tuple[WorkflowExecution, str | None]] = {}
    scanned = 0
    async for execution in client.list_workflows(query, page_size=200):
        scanned += 1
        if scanned > _SCANNED:
            break
        named, label = await _names(execution)
        if named is None:
            if not _is_of(execution.id, projection, sandbox, execution.task_queue):
                continue
            label = _sandbox_of(execution.id, projection, execution.task_queue)
        elif named != projection or (sandbox != ANY_SANDBOX and label != sandbox):
            continue
        if execution.status == Status.CONTINUED_AS_NEW:
            continued.setdefault(execution.id, (execution, label))
            continue
        found.append(_run(execution, projection, label))
    # A run that continued as new whose successor the list does not show yet (it is written a moment later): the
    # chain's latest run, as Temporal describes it, stands for it.
    listed = {run.workflow_id for run in found}
    for workflow_id, (execution, label) in continued.items():
        if workflow_id in listed:
            continue
        try:
            latest = await client.get_workflow_handle(workflow_id).describe()
        except RPCError:
            continue
        if not running or latest.status == Status.RUNNING:
            found.append(_run(latest, projection, label, execution.task_queue))
    found.sort(key=lambda run: (run.status != "RUNNING", -(run.started_at.timestamp() if run.started_at else 0)))
    return found[:limit]


def _run(execution: WorkflowExecution, projection: str, label: str | None, task_queue: str | None = None) -> ReplayRun:
    queue = task_queue or execution.task_queue
    return ReplayRun(
        workflow_id=execution.id,
        run_id=execution.run_id,
        status=execution.status.name if execution.status is not None else "UNKNOWN",
        started_at=execution.start_time,
        closed_at=execution.close_time,
        started_by=started_by(execution.id, projection, queue),
        sandbox=label,
    )


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _sandbox_of(workflow_id: str, projection: str, task_queue: str | None) -> str | None:
    prefix, suffix = f"{id_prefix(task_queue)}-sandbox-", f"-{projection}"
    if workflow_id.startswith(prefix) and workflow_id.endswith(suffix):
        return workflow_id[len(prefix) : -len(suffix)]
    return None


async def latest_replay(
    client: Client,
    projection: str,
    sandbox: str | None = None,
    *,
    running: bool = False,
    task_queue: str | None = None,
) -> WorkflowHandle[Any, Any] | None:
    """A handle on the projection's running replay (into `sandbox`; None: the live build), else, unless `running`,
    on its latest one; None when there is none. Found by Temporal's list, whatever the workflow id; a run the list
    does not show yet (just started) is found by the CLI's fixed id."""
    runs = await replay_runs(client, projection, sandbox=sandbox, running=running, limit=1, task_queue=task_queue)
    if runs and runs[0].status == "RUNNING":
        return client.get_workflow_handle(runs[0].workflow_id, run_id=runs[0].run_id)
    fixed = client.get_workflow_handle(replay_workflow_id(projection, sandbox, task_queue))
    try:
        description = await fixed.describe()
    except RPCError:
        description = None
    if description is not None and description.status == Status.RUNNING:
        return client.get_workflow_handle(fixed.id, run_id=description.run_id)
    if running:
        return None
    if runs:
        return client.get_workflow_handle(runs[0].workflow_id, run_id=runs[0].run_id)
    return None if description is None else client.get_workflow_handle(fixed.id, run_id=description.run_id)
