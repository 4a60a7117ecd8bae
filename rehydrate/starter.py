"""Starts, watches and controls replays, verifies, tails and snapshot rebuilds through Temporal; the client side of
every run, shared by the CLI, schedules and programs that embed rehydrate.

Runs are addressed by their names in Temporal (workflow types, queries, updates), not through the workflow classes:
those import their activities and with them the engine, SQLAlchemy and asyncpg, which a command that only asks
Temporal (status, cancel, tune, a schedule's runs) never needs. What a function needs of the engine (the catalog, a
sandbox's schema) it imports itself."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.client import WorkflowExecutionStatus as Status
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.converter import value_to_type
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError

from rehydrate.core.errors import UserError
from rehydrate.core.limits import (
    MAX_LANES,
    MAX_PARALLEL,
    MAX_PARTITIONS,
    MAX_REPAIR_KEYS,
    MAX_SHOW,
    check_range,
    check_rate,
)
from rehydrate.models import (
    RepairInput,
    RepairResult,
    ReplayInput,
    ReplayProgress,
    ReplayResult,
    SnapshotRebuildInput,
    SnapshotRebuildProgress,
    SnapshotRebuildResult,
    VerifyInput,
    VerifyResult,
)
from rehydrate.models.names import (
    DRIFT,
    REPAIR,
    REPLAY,
    SNAPSHOT_REBUILD,
    VERIFY,
    repair_workflow_id,
    replay_workflow_id,
    snapshot_workflow_id,
    tail_workflow_id,
    verify_workflow_id,
)
from rehydrate.runs import latest_replay
from rehydrate.sources.events import parse_as_of

if TYPE_CHECKING:
    from rehydrate.core.settings import Settings
    from rehydrate.engine.aggregates import AggregateRegistry
    from rehydrate.engine.projections import Registry
    from rehydrate.workflows.replay import ReplayWorkflow
    from rehydrate.workflows.snapshots import SnapshotRebuildWorkflow
    from rehydrate.workflows.verify import VerifyWorkflow

_QUERY_TIMEOUT = timedelta(seconds=3)  # a replay's progress query, before status says no worker answers
_LIST_ATTEMPTS, _LIST_PAUSE = 3, 0.3  # looks at Temporal's list before a replay is said not to run


@dataclass
class ReplayStatus:
    workflow_id: str
    run_id: str | None
    status: str
    progress: ReplayProgress | None
    result: ReplayResult | None
    error: str | None
    unanswered: str | None = None  # why a running replay shows no progress: no worker answered its query


async def start_replay(
    client: Client,
    settings: Settings,
    input: ReplayInput,
    *,
    registry: Registry | None = None,
    task_queue: str | None = None,
    attach: bool = False,
) -> WorkflowHandle[ReplayWorkflow, ReplayResult]:
    """Start the projection's replay under its fixed workflow id.

    A second start while one runs is refused with a clear error, or, with `attach`, returns the running one.
    """
    check_replay_input(input, registry)
    queue = task_queue or settings.temporal_task_queue
    workflow_id = replay_workflow_id(input.projection, input.sandbox, queue)
    try:
        return await client.start_workflow(
            REPLAY,
            input,
            id=workflow_id,
            task_queue=queue,
            result_type=ReplayResult,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING if attach else WorkflowIDConflictPolicy.FAIL,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            static_summary=f"Replay of {input.projection}"
            + (f" into sandbox {input.sandbox}" if input.sandbox else ""),
        )
    except WorkflowAlreadyStartedError:
        where = f" into sandbox {input.sandbox!r}" if input.sandbox else ""
        raise UserError(
            f"a replay of {input.projection!r}{where} is already running (workflow {workflow_id})",
            fix=f"watch it with `rehydrate replay status {input.projection}` or stop it with "
            f"`rehydrate replay cancel {input.projection}`",
        ) from None


def check_replay_input(input: ReplayInput, registry: Registry | None = None) -> None:
    """Refuse an unknown projection (when a registry is given) or out-of-range tuning, before anything starts."""
    if registry is not None:
        registry.get(input.projection)
    _check_tuning(input)
    _check_point_in_time(input)


# A starter's clock may run behind the database's: an --as-of a little ahead of it is not a mistake.
AS_OF_SKEW = timedelta(minutes=5)


def _check_point_in_time(input: ReplayInput) -> None:
    """A cut-off history (--to-position, --as-of, a target mark) builds a read model that was never live: it
    goes into a sandbox only, never behind the live view."""
    if input.sandbox is not None:
        from rehydrate.engine.readmodels import sandbox_schema

        sandbox_schema(input.sandbox)
    limited = [
        name
        for name, value in (("--to-position", input.to_position), ("--as-of", input.as_of), ("mark", input.mark))
        if value is not None
    ]
    if limited and input.sandbox is None:
        raise UserError(
            f"{limited[0]} builds the read model as it was, which must never replace the live one",
            fix="add --sandbox LABEL to build it into a sandbox schema",
        )
    if input.to_position is not None and input.as_of is not None:
        raise UserError("--to-position and --as-of were both given", fix="give one of them")
    if input.to_position is not None and input.to_position < 0:
        raise UserError(f"--to-position {input.to_position} is negative", fix="give a global position (0 or more)")
    if input.as_of is not None and parse_as_of(input.as_of) > datetime.now(UTC) + AS_OF_SKEW:
        raise UserError(
            f"--as-of {input.as_of!r} is in the future",
            fix="give a time at or before now (leave out --as-of for the whole history)",
        )


def _check_tuning(input: ReplayInput) -> None:
    for name, high in (("lanes", MAX_LANES), ("chunk_size", None), ("max_parallel", MAX_PARALLEL)):
        value = getattr(input, name)
        if value is not None:
            check_range(name, value, 1, high)
    check_rate(input.max_rate)


async def wait_for_replay(
    handle: WorkflowHandle[ReplayWorkflow, ReplayResult],
    on_progress: Callable[[ReplayProgress], None] | None = None,
    interval: float = 0.5,
) -> ReplayResult:
    """Wait for the replay (across continue-as-new), reporting progress; a failure becomes one UserError."""
    return await _wait(handle, ReplayProgress, on_progress, interval, "replay")


R = TypeVar("R")
P = TypeVar("P")


async def _wait(
    handle: WorkflowHandle[Any, R],
    progress: type[P],
    on_progress: Callable[[P], None] | None,
    interval: float,
    what: str,
) -> R:
    result_task = asyncio.ensure_future(handle.result())
    try:
        while not result_task.done():
            if on_progress is not None:
                # A query fails between runs (continue-as-new) or before the first workflow task: skip it.
                with contextlib.suppress(RPCError):
                    on_progress(await handle.query("progress", result_type=progress))
            await asyncio.wait({result_task}, timeout=interval)
        return result_task.result()
    except WorkflowFailureError as error:
        raise UserError(f"{what} failed: {failure_cause(error)}") from None
    finally:
        result_task.cancel()


def failure_cause(error: WorkflowFailureError | WorkflowUpdateFailedError) -> str:
    """The one line that says why a run failed: the message at the bottom of its chain of causes; for an input the
    worker could not read (a start from the Web UI), every level's, which name the field and what it held."""
    chain: list[BaseException] = []
    cause: BaseException | None = error.cause
    while cause is not None:
        chain.append(cause)
        cause = getattr(cause, "cause", None)
    if not chain:
        return str(error)
    converting = [c for c in chain if isinstance(c, ApplicationError) and c.type == "TypeError"]
    if converting and converting[0] is chain[0]:
        parts = ": ".join(_CLASS.sub(r"\1", c.message) for c in converting)
        return f"the workflow's input does not fit its type: {parts}"
    return str(getattr(chain[-1], "message", None) or chain[-1])


_CLASS = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")  # "<class 'rehydrate.models.replay.ReplayInput'>": ReplayInput


async def replay_status(
    client: Client, projection: str, sandbox: str | None = None, *, task_queue: str | None = None
) -> ReplayStatus:
    """The projection's running replay (into `sandbox`; None: the live build), else its latest one, whoever
    started it and under whatever workflow id (on `task_queue`, when given)."""
    handle = await latest_replay(client, projection, sandbox, task_queue=task_queue)
    if handle is None:
        return ReplayStatus(replay_workflow_id(projection, sandbox, task_queue), None, "NEVER_RUN", None, None, None)
    typed = client.get_workflow_handle(handle.id, run_id=handle.run_id, result_type=ReplayResult)
    description = await typed.describe()
    status = description.status.name if description.status is not None else "UNKNOWN"
    progress = result = error = unanswered = None
    if description.status == Status.RUNNING:
        try:
            # A query is answered by a worker: with none polling, the server would hold it for its whole deadline.
            progress = await typed.query("progress", result_type=ReplayProgress, rpc_timeout=_QUERY_TIMEOUT)
        except RPCError:
            unanswered = (
                f"no worker answered within {_QUERY_TIMEOUT.total_seconds():g} s: is a `rehydrate worker` running on "
                f"task queue {description.task_queue!r}?"
            )
    elif description.status == Status.COMPLETED:
        result = await typed.result()
    elif description.status in (Status.FAILED, Status.TERMINATED, Status.TIMED_OUT, Status.CANCELED):
        try:
            await typed.result()
        except WorkflowFailureError as failure:
            error = f"replay failed: {failure_cause(failure)}"
    return ReplayStatus(handle.id, description.run_id, status, progress, result, error, unanswered)


async def _require_running(handle: WorkflowHandle[Any, Any], what: str, name: str, verb: str) -> None:
    """Raise a UserError unless the workflow of `handle` (the `what` of `name`) is running."""
    try:
        description = await handle.describe()
    except RPCError:
        raise UserError(f"no {what} of {name!r} was ever started", fix="check the name") from None
    if description.status != Status.RUNNING:
        state = description.status.name.lower() if description.status else "unknown"
        raise UserError(f"the {what} of {name!r} is not running (it is {state})", fix=f"nothing to {verb}")


async def running_replay(
    client: Client, projection: str, verb: str, sandbox: str | None = None, *, task_queue: str | None = None
) -> WorkflowHandle[ReplayWorkflow, ReplayResult]:
    """The projection's running replay, whatever its workflow id; a UserError when none runs."""
    into, latest = f" into sandbox {sandbox!r}" if sandbox else "", ""
    for attempt in range(_LIST_ATTEMPTS):
        # Temporal's list is eventually consistent (the dev server rewrites a run's row on every search attribute
        # update), so one listing can miss a running run, or every run: the latest run's own description decides,
        # and a run that seems not to run, or not to exist, is looked for again before the answer is no.
        if attempt:
            await asyncio.sleep(_LIST_PAUSE)
        handle = await latest_replay(client, projection, sandbox, running=True, task_queue=task_queue)
        if handle is not None:
            return client.get_workflow_handle(handle.id, run_id=handle.run_id, result_type=ReplayResult)
        last = await latest_replay(client, projection, sandbox, task_queue=task_queue)
        if last is None:
            continue
        description = await last.describe()
        if description.status == Status.RUNNING:
            return client.get_workflow_handle(last.id, run_id=description.run_id, result_type=ReplayResult)
        state = description.status.name.lower() if description.status else "unknown"
        latest = f"the latest, {last.id}, is {state}"
    if not latest:
        raise UserError(f"no replay of {projection!r}{into} was ever started", fix=f"nothing to {verb}")
    raise UserError(
        f"no replay of {projection!r}{into} is running ({latest})",
        fix=f"nothing to {verb}; `rehydrate replay list {projection}` shows its runs",
    )


async def cancel_replay(
    client: Client, projection: str, sandbox: str | None = None, *, task_queue: str | None = None
) -> str:
    """Request cancellation of the running replay; the workflow drops its half-built generation and leaves the
    active one alone. Returns its workflow id."""
    handle = await running_replay(client, projection, "cancel", sandbox, task_queue=task_queue)
    await handle.cancel()
    return handle.id


async def signal_replay(client: Client, projection: str, signal: str, *, task_queue: str | None = None) -> str:
    """Send `pause` or `resume` to the projection's running replay, whoever started it; its workflow id."""
    handle = await running_replay(client, projection, signal, task_queue=task_queue)
    await handle.signal(signal)
    return handle.id


async def tune_replay(client: Client, projection: str, max_parallel: int, *, task_queue: str | None = None) -> int:
    """Move the running replay's window to `max_parallel` chunks at once (update `set_max_parallel`), from its
    next chunks on; returns the previous bound."""
    _check_tuning(ReplayInput(projection, max_parallel=max_parallel))
    previous: int = await _tune(client, projection, "set_max_parallel", "max_parallel", max_parallel, task_queue)
    return previous


async def throttle_replay(
    client: Client, projection: str, max_rate: float | None, *, task_queue: str | None = None
) -> float | None:
    """Limit the running replay to `max_rate` events per second (None: no limit) from its next chunk on (update
    `set_max_rate`); returns the previous limit."""
    check_rate(max_rate)
    previous: float | None = await _tune(client, projection, "set_max_rate", "max_rate", max_rate, task_queue)
    return previous


async def _tune(client: Client, projection: str, update: str, name: str, value: Any, task_queue: str | None) -> Any:
    """Send a tuning update to the projection's running replay; its refusal is a UserError naming the value."""
    handle = await running_replay(client, projection, "tune", task_queue=task_queue)
    try:
        return await handle.execute_update(update, value)
    except WorkflowUpdateFailedError as error:
        raise UserError(
            f"the replay of {projection!r} refused {name}={value}: {failure_cause(error)}",
            fix="try again once it has planned",
        ) from None


async def start_tail(client: Client, pool: Any, settings: Settings, projection: str) -> str:
    """Enable and start a projection's tail (it must have an active generation)."""
    from rehydrate.activities.tail import ensure_tail
    from rehydrate.engine.catalog import Catalog

    async with pool.acquire() as conn:
        if not await Catalog(conn, settings.schema_name).set_tail(projection, enabled=True):
            raise UserError(
                f"projection {projection!r} has no active generation to keep current",
                fix=f"build one first: `rehydrate replay start {projection}`",
            )
    return await ensure_tail(client, projection, settings.temporal_task_queue)


async def stop_tail(
    client: Client, pool: Any, settings: Settings, projection: str, *, wait_seconds: float = 15.0
) -> str:
    """Disable a projection's tail and cancel its workflow; workers will not start it again until `tail start`.

    Returns once the workflow has ended (at most `wait_seconds`; without a worker it ends when one starts): after
    that no batch is applied, and a `tail start` starts a new run instead of attaching to the one being cancelled.
    """
    from rehydrate.engine.catalog import Catalog

    async with pool.acquire() as conn:
        if not await Catalog(conn, settings.schema_name).set_tail(projection, enabled=False):
            raise UserError(f"projection {projection!r} was never built", fix="check the projection name")
    workflow_id = tail_workflow_id(projection, settings.temporal_task_queue)
    handle = client.get_workflow_handle(workflow_id)
    with contextlib.suppress(RPCError):
        if (await handle.describe()).status == Status.RUNNING:
            await handle.cancel()
            # The workflow waits for its activity to acknowledge the cancel, so its end means no batch runs.
            with contextlib.suppress(WorkflowFailureError, asyncio.TimeoutError):
                await asyncio.wait_for(handle.result(), wait_seconds)
    return workflow_id


async def tail_state(client: Client, projection: str, task_queue: str) -> tuple[str, str | None]:
    """The tail workflow's status (RUNNING, FAILED, CANCELED, …, or NOT_STARTED) and its failure, if any."""
    handle = client.get_workflow_handle(tail_workflow_id(projection, task_queue))
    try:
        description = await handle.describe()
    except RPCError:
        return "NOT_STARTED", None
    status = description.status.name if description.status is not None else "UNKNOWN"
    error = None
    if description.status == Status.FAILED:
        try:
            await handle.result()
        except WorkflowFailureError as failure:
            error = failure_cause(failure)
    return status, error


async def _start_once(
    client: Client,
    workflow: str,
    input: Any,
    result_type: type[R],
    *,
    workflow_id: str,
    task_queue: str,
    summary: str,
    refusal: UserError,
) -> WorkflowHandle[Any, R]:
    """Start a workflow under its fixed id; `refusal` is raised while one with that id runs."""
    try:
        return await client.start_workflow(
            workflow,
            input,
            id=workflow_id,
            task_queue=task_queue,
            result_type=result_type,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            static_summary=summary,
        )
    except WorkflowAlreadyStartedError:
        raise refusal from None


# -- verify ---------------------------------------------------------------------------------------------------


async def start_verify(
    client: Client,
    settings: Settings,
    input: VerifyInput,
    *,
    registry: Registry | None = None,
    task_queue: str | None = None,
) -> WorkflowHandle[VerifyWorkflow, VerifyResult]:
    """Start the projection's verify under its fixed workflow id; a second one while it runs is refused."""
    check_verify_input(input, registry)
    queue = task_queue or settings.temporal_task_queue
    workflow_id = verify_workflow_id(input.projection, queue)
    return await _start_once(
        client,
        VERIFY,
        input,
        VerifyResult,
        workflow_id=workflow_id,
        task_queue=queue,
        summary=f"Verify of {input.projection}",
        refusal=UserError(
            f"a verify of {input.projection!r} is already running (workflow {workflow_id})",
            fix="wait for it to finish",
        ),
    )


async def verify(
    client: Client,
    settings: Settings,
    projection: str,
    *,
    keep: bool = False,
    show: int = 5,
    registry: Registry | None = None,
) -> VerifyResult:
    """Rebuild `projection` into a sandbox at the live generation's checkpoint and compare the two, key by key: the
    `Verify` workflow, started under its fixed id and waited for. Drift is a result here (`differing`), not an
    error; a failed verify is a UserError."""
    handle = await start_verify(client, settings, VerifyInput(projection, keep=keep, show=show), registry=registry)
    return await wait_for_verify(handle)


def check_verify_input(input: VerifyInput, registry: Registry | None = None) -> None:
    """Refuse an unknown projection (when a registry is given) or out-of-range tuning, before anything starts."""
    check_replay_input(
        ReplayInput(input.projection, lanes=input.lanes, chunk_size=input.chunk_size, max_parallel=input.max_parallel),
        registry,
    )
    check_range("show", input.show, 0, MAX_SHOW)


async def wait_for_verify(handle: WorkflowHandle[VerifyWorkflow, VerifyResult]) -> VerifyResult:
    """The verify's result, drift included (a run with drift fails with the result as its error's details); any
    other failure becomes one UserError."""
    try:
        return await handle.result()
    except WorkflowFailureError as error:
        drift = drift_of(error)
        if drift is not None:
            return drift
        raise UserError(f"verify failed: {failure_cause(error)}") from None


def drift_of(error: WorkflowFailureError) -> VerifyResult | None:
    """The result a verify that found drift carries in its failure, or None for any other failure."""
    cause = error.cause
    if isinstance(cause, ApplicationError) and cause.type == DRIFT and cause.details:
        result: VerifyResult = value_to_type(VerifyResult, cause.details[0])
        return result
    return None


# -- repair ------------------------------------------------------------------------------------------------


async def repair(
    client: Client,
    settings: Settings,
    input: RepairInput,
    *,
    registry: Registry | None = None,
    task_queue: str | None = None,
) -> RepairResult:
    """Rebuild the rows of `input.keys` of the live read model in place: the `Repair` workflow, started under its
    fixed id (one repair per projection at a time) and waited for; a failure is a UserError."""
    check_replay_input(ReplayInput(input.projection), registry)
    if not input.keys:
        raise UserError("no key to repair", fix="give --key KEY (or --keys-from FILE)")
    if len(input.keys) > MAX_REPAIR_KEYS:
        raise UserError(
            f"{len(input.keys):,} keys to repair: one repair takes at most {MAX_REPAIR_KEYS:,} (its workflow input)",
            fix="split the keys over several repairs, or replay the projection",
        )
    check_range("batch_size", input.batch_size, 1)
    check_range("show", input.show, 0, MAX_SHOW)
    queue = task_queue or settings.temporal_task_queue
    workflow_id = repair_workflow_id(input.projection, queue)
    handle = await _start_once(
        client,
        REPAIR,
        input,
        RepairResult,
        workflow_id=workflow_id,
        task_queue=queue,
        summary=f"Repair of {len(set(input.keys))} key(s) of {input.projection}"
        + (" (dry run)" if input.dry_run else ""),
        refusal=UserError(
            f"a repair of {input.projection!r} is already running (workflow {workflow_id})",
            fix="wait for it to finish",
        ),
    )
    try:
        return await handle.result()
    except WorkflowFailureError as error:
        raise UserError(f"repair failed: {failure_cause(error)}") from None


# -- bulk snapshot rebuilds -------------------------------------------------------------------------------


async def start_snapshot_rebuild(
    client: Client,
    settings: Settings,
    input: SnapshotRebuildInput,
    *,
    aggregates: AggregateRegistry | None = None,
    task_queue: str | None = None,
) -> WorkflowHandle[SnapshotRebuildWorkflow, SnapshotRebuildResult]:
    """Start the aggregate type's snapshot rebuild under its fixed workflow id; a second start is refused."""
    if aggregates is not None:
        aggregates.get(input.aggregate_type)
    check_range("partitions", input.partitions, 1, MAX_PARTITIONS)
    check_range("chunk_size", input.chunk_size, 1)
    queue = task_queue or settings.temporal_task_queue
    workflow_id = snapshot_workflow_id(input.aggregate_type, queue)
    return await _start_once(
        client,
        SNAPSHOT_REBUILD,
        input,
        SnapshotRebuildResult,
        workflow_id=workflow_id,
        task_queue=queue,
        summary=f"Snapshots of {input.aggregate_type}",
        refusal=UserError(
            f"a snapshot rebuild of {input.aggregate_type!r} is already running (workflow {workflow_id})",
            fix=f"watch it with `rehydrate snapshots status {input.aggregate_type}` or stop it with "
            f"`rehydrate snapshots cancel {input.aggregate_type}`",
        ),
    )


async def wait_for_snapshot_rebuild(
    handle: WorkflowHandle[SnapshotRebuildWorkflow, SnapshotRebuildResult],
    on_progress: Callable[[SnapshotRebuildProgress], None] | None = None,
    interval: float = 0.5,
) -> SnapshotRebuildResult:
    """Wait for the rebuild (across continue-as-new), reporting progress; a failure becomes one UserError."""
    return await _wait(handle, SnapshotRebuildProgress, on_progress, interval, "snapshot rebuild")


async def snapshot_rebuild_status(
    client: Client, aggregate_type: str, task_queue: str | None = None
) -> tuple[str, SnapshotRebuildProgress | None]:
    """The rebuild workflow's status (RUNNING, COMPLETED, …, or NEVER_RUN) and its progress while it runs."""
    handle = client.get_workflow_handle(snapshot_workflow_id(aggregate_type, task_queue))
    try:
        description = await handle.describe()
    except RPCError:
        return "NEVER_RUN", None
    progress = None
    if description.status == Status.RUNNING:
        with contextlib.suppress(RPCError):
            progress = await handle.query("progress", result_type=SnapshotRebuildProgress)
    return (description.status.name if description.status else "UNKNOWN"), progress


async def cancel_snapshot_rebuild(client: Client, aggregate_type: str, task_queue: str | None = None) -> str:
    """Request cancellation; the snapshots already written stay (each one is valid on its own)."""
    workflow_id = snapshot_workflow_id(aggregate_type, task_queue)
    handle = client.get_workflow_handle(workflow_id)
    await _require_running(handle, "snapshot rebuild", aggregate_type, "cancel")
    await handle.cancel()
    return workflow_id
