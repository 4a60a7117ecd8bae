"""Worker processes for tests that kill and restart them: started as users start them, logging to a file."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
from temporalio.api.enums.v1 import EventType, TimeoutType
from temporalio.client import Client, WorkflowHandle

from rehydrate import Settings
from rehydrate.models import ReplayInput
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.workflows import ReplayWorkflow

REPO = Path(__file__).resolve().parents[2]


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


async def retries_after_heartbeat_timeout(
    client: Client, handle: WorkflowHandle[Any, Any], activity_type: str | None = None
) -> int:
    """Activities (of `activity_type`, or any) that started again after a heartbeat timeout, over every run of the
    workflow (it may have continued as new)."""
    run_id: str | None = handle.first_execution_run_id or handle.result_run_id
    retried = 0
    while run_id:
        history = await client.get_workflow_handle(handle.id, run_id=run_id).fetch_history()
        types: dict[int, str] = {}
        run_id = None
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                types[event.event_id] = event.activity_task_scheduled_event_attributes.activity_type.name
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                started = event.activity_task_started_event_attributes
                if (
                    activity_type in (None, types.get(started.scheduled_event_id))
                    and started.attempt > 1
                    and started.last_failure.timeout_failure_info.timeout_type == TimeoutType.TIMEOUT_TYPE_HEARTBEAT
                ):
                    retried += 1
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
) -> int:
    """Worker process A, and the replay `input` on it; A SIGKILLed in the middle of a chunk (the build partly
    applied, a chunk's transaction open); worker B started; the replay waited for. Returns the chunk attempts
    retried after a heartbeat timeout (at least one: the chunk A was running)."""
    workers["A"] = start_worker(settings, logs["A"], env)
    handle = await start_replay(client, settings, input)
    deadline = time.monotonic() + 60
    while True:
        assert workers["A"].poll() is None, f"worker A exited early:\n{log_tail(logs['A'])}"
        assert time.monotonic() < deadline, "the replay never reached the middle of its build"
        progress = await handle.query(ReplayWorkflow.progress)
        assert progress.phase in ("planning", "building"), f"the replay finished early: {progress}"
        partial = progress.phase == "building" and 0 < progress.events_applied < progress.events_total
        if partial and await chunk_transactions_open(pool):
            workers["A"].send_signal(signal.SIGKILL)
            break
        await asyncio.sleep(0.01)
    await asyncio.to_thread(workers["A"].wait)
    workers["B"] = start_worker(settings, logs["B"], env)
    await wait_for_replay(handle)
    return await retries_after_heartbeat_timeout(client, handle, "rehydrate.apply_chunk")
