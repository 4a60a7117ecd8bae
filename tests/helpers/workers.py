"""Worker processes for tests that kill and restart them: started as users start them, logging to a file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest, ResetStickyTaskQueueRequest
from temporalio.client import Client, WorkflowHandle

from rehydrate import Settings
from rehydrate.models import ChunkInput, ReplayInput
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.workflows import ReplayWorkflow

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def start_worker(settings: Settings, log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REHYDRATE_DATABASE_URL": str(settings.database_url),
        "REHYDRATE_TEMPORAL_ADDRESS": settings.temporal_address,
        "REHYDRATE_TEMPORAL_TASK_QUEUE": settings.temporal_task_queue,
        # tests.helpers.domain's projections with ~0.25 ms per event: see tests/helpers/slow_domain.py for why.
        "REHYDRATE_PROJECTIONS": "tests.helpers.slow_domain",
        "REHYDRATE_TAILS": "false",  # tests of the tail start their own
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **(extra_env or {}),
    }
    # Logs go to a file: a pipe that nobody reads would block the worker once its buffer is full.
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rehydrate", "worker"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def polling(client: Client, task_queue: str, worker: subprocess.Popen[bytes]) -> bool:
    """Whether worker process `worker` polls `task_queue` for activities (Temporal names it pid@host)."""
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
        )
    )
    return any(poller.identity.startswith(f"{worker.pid}@") for poller in response.pollers)


async def blocked_by(pool: asyncpg.Pool, blocker: asyncpg.Connection) -> bool:
    """Whether a session waits for a lock that `blocker` holds (a test holding a step inside its statement)."""
    pid = blocker.get_server_pid()
    return bool(await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid))


async def chunk_transactions_open(pool: asyncpg.Pool, cursors: str = "lane_checkpoints") -> int:
    """Open transactions that locked a cursor row (FOR UPDATE) of table `cursors` or wrote it: chunks between start
    and commit (a replay's lane checkpoints, or a snapshot rebuild's partitions: `snapshot_rebuilds`)."""
    return int(
        await pool.fetchval(
            """SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
               WHERE c.relname = $1 AND l.mode IN ('RowShareLock', 'RowExclusiveLock')
                 AND l.granted AND l.pid <> pg_backend_pid()""",
            cursors,
        )
    )


async def kill_inside_chunks(
    worker: subprocess.Popen[bytes], pool: asyncpg.Pool, cursors: str = "lane_checkpoints"
) -> list[str]:
    """SIGKILL `worker` while it holds chunk transactions open (they locked a row of table `cursors`): the ids of
    those transactions, which can now only roll back; or [] when it held none, and it goes on (see `kill_frozen`).
    Only sessions idle in their transaction count: one running a statement may be running its COMMIT."""
    held = await kill_frozen(worker, lambda: _idle_chunk_transactions(pool, cursors))
    return sorted(xid for xid, _ in held or ())


async def kill_frozen(worker: subprocess.Popen[bytes], look: Callable[[], Awaitable[T]]) -> T | None:
    """SIGKILL `worker` if, frozen, `look` finds the same thing twice in a row (see `frozen`): that thing, or None (the
    worker goes on)."""
    try:
        async with frozen([worker], look) as found:
            if found:
                worker.send_signal(signal.SIGKILL)
            return found
    except BaseException:
        worker.send_signal(signal.SIGKILL)
        raise


@contextlib.asynccontextmanager
async def frozen(workers: list[subprocess.Popen[bytes]], look: Callable[[], Awaitable[T]]) -> AsyncIterator[T | None]:
    """Freeze `workers` (SIGSTOP) and yield what `look` finds twice in a row, or None; they go on (SIGCONT) when the
    block ends. Frozen, a worker cannot commit what `look` saw before the block acts on it; the second look, 50 ms
    on, lets Postgres act on what the workers sent just before they froze."""
    for worker in workers:
        worker.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(0.05)
        found = await look()
        await asyncio.sleep(0.05)
        yield found if found and found == await look() else None
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGCONT)


async def _idle_chunk_transactions(pool: asyncpg.Pool, cursors: str) -> set[tuple[str, Any]]:
    """(Transaction id, when its session went idle) of the sessions idle inside a chunk's transaction."""
    rows = await pool.fetch(
        """SELECT DISTINCT a.backend_xid::text, a.state_change
           FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid JOIN pg_class c ON c.oid = l.relation
           WHERE c.relname = $1 AND l.mode IN ('RowShareLock', 'RowExclusiveLock') AND l.granted
             AND a.state = 'idle in transaction' AND a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()""",
        cursors,
    )
    return {(row[0], row[1]) for row in rows}


async def rolled_back(pool: asyncpg.Pool, xids: list[str]) -> bool:
    """Whether the transactions `xids` (32-bit ids, as pg_stat_activity shows them) all ended without committing;
    waits until none is still in progress. (The tests' clusters are in their first transaction id epoch, so the
    32-bit id is the full one.)"""
    while True:
        states = [
            row[0]
            for row in await pool.fetch("SELECT pg_xact_status(xid::xid8) FROM unnest($1::text[]) AS x(xid)", xids)
        ]
        if "in progress" not in states:
            return all(state == "aborted" for state in states)
        await asyncio.sleep(0.01)


async def lanes_locked_by(pool: asyncpg.Pool, xids: list[str]) -> set[tuple[str, int]]:
    """(Projection, lane) of the lane checkpoints that the transactions `xids` locked (their rows' xmax)."""
    rows = await pool.fetch(
        "SELECT projection, lane FROM rehydrate.lane_checkpoints WHERE xmax::text = ANY($1)",
        xids,
    )
    return {(row[0], row[1]) for row in rows}


async def forget_sticky_worker(client: Client, handle: WorkflowHandle[Any, Any]) -> None:
    """Tell Temporal that the worker which had the workflow cached is gone, as an operator may: its next workflow
    task goes to every worker of the task queue at once, instead of waiting 10 s (the SDK's sticky schedule-to-start
    timeout) on the dead worker's own queue. What the tests prove (the retried chunks and the read model) is the
    same either way; the wait is Temporal's timer, not rehydrate's code."""
    await client.workflow_service.reset_sticky_task_queue(
        ResetStickyTaskQueueRequest(namespace=client.namespace, execution=WorkflowExecution(workflow_id=handle.id))
    )


async def retried_lanes(client: Client, handle: WorkflowHandle[Any, Any]) -> set[tuple[str, int]]:
    """(Projection, lane) of the replay's chunks that completed on a later attempt than their first (retried for
    whatever reason: a heartbeat timeout, then maybe a failure of the retry), over every run of the workflow."""
    return {
        (chunk.projection, chunk.lane)
        for chunk in await _retried(client, handle, "rehydrate.apply_chunk", ChunkInput)
        if isinstance(chunk, ChunkInput)
    }


async def retried_attempts(client: Client, handle: WorkflowHandle[Any, Any], activity_type: str) -> int:
    """Activities of `activity_type` that completed on a later attempt than their first, over every run."""
    return len(await _retried(client, handle, activity_type, None))


async def _retried(
    client: Client, handle: WorkflowHandle[Any, Any], activity_type: str, input_type: type | None
) -> list[Any]:
    """The inputs (decoded as `input_type`, or None) of the activities of `activity_type` that completed on a later
    attempt than their first, over every run of the workflow (it may have continued as new)."""
    run_id: str | None = handle.first_execution_run_id or handle.result_run_id
    retried: list[Any] = []
    while run_id:
        history = await client.get_workflow_handle(handle.id, run_id=run_id).fetch_history()
        scheduled: dict[int, Any] = {}
        run_id = None
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                attributes = event.activity_task_scheduled_event_attributes
                if attributes.activity_type.name == activity_type:
                    scheduled[event.event_id] = (
                        (await client.data_converter.decode(attributes.input.payloads, [input_type]))[0]
                        if input_type
                        else None
                    )
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                started = event.activity_task_started_event_attributes
                if started.scheduled_event_id in scheduled and started.attempt > 1:
                    retried.append(scheduled[started.scheduled_event_id])
            elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
                run_id = event.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    return retried


async def kill_workers(workers: dict[str, subprocess.Popen[bytes]], logs: dict[str, Path]) -> None:
    """Kill the workers still running, wait for every one, and print each log's tail (pytest shows it on failure)."""
    for worker in workers.values():
        if worker.poll() is None:
            worker.kill()
        await asyncio.to_thread(worker.wait)
    for name, log in logs.items():
        print(f"--- worker {name} ---\n{log_tail(log)}")


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def replay_killing_a_worker_mid_chunk(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    input: ReplayInput,
    workers: dict[str, subprocess.Popen[bytes]],
    logs: dict[str, Path],
    env: dict[str, str],
    *,
    total_known: bool = True,
) -> tuple[set[int], set[int]]:
    """Worker process A, and the replay `input` on it; A SIGKILLed in the middle of a chunk (the build partly
    applied, a chunk's transaction open); worker B started; the replay waited for. Returns the lanes whose chunk
    died with A (their transactions rolled back) and the lanes with a chunk retried: the first are in the second.
    `total_known` False: the plan could not count the events (a Kinesis stream), so any applied is partly."""
    workers["A"] = start_worker(settings, logs["A"], env)
    handle = await start_replay(client, settings, input)
    deadline = time.monotonic() + 60
    while True:
        assert workers["A"].poll() is None, f"worker A exited early:\n{log_tail(logs['A'])}"
        assert time.monotonic() < deadline, "the replay never reached the middle of its build"
        progress = await handle.query(ReplayWorkflow.progress)
        assert progress.phase in ("planning", "building"), f"the replay finished early: {progress}"
        partial = progress.phase == "building" and progress.events_applied > 0
        partial = partial and (progress.events_applied < progress.events_total or not total_known)
        if partial and await chunk_transactions_open(pool) and (killed := await kill_inside_chunks(workers["A"], pool)):
            break
        await asyncio.sleep(0.01)
    await asyncio.to_thread(workers["A"].wait)
    await forget_sticky_worker(client, handle)
    assert await rolled_back(pool, killed), "a chunk A held open committed"
    died = {lane for _, lane in await lanes_locked_by(pool, killed)}
    workers["B"] = start_worker(settings, logs["B"], env)
    await wait_for_replay(handle)
    return died, {lane for _, lane in await retried_lanes(client, handle)}
