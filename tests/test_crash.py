"""A replay survives its worker process being killed in the middle of a chunk.

Worker A (a real `python -m rehydrate worker` process) is SIGKILLed while chunk transactions are open; worker B
takes over. The open transactions die with A's connections, Temporal retries the lost chunk attempts after
their heartbeat timeout, each retry continues from its lane's committed checkpoint, and the read models end
equal to the plain fold of the events with every event applied exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
from temporalio.api.enums.v1 import EventType, TimeoutType
from temporalio.client import Client, WorkflowHandle

from rehydrate.importer import import_events
from rehydrate.models import ReplayInput, ReplayProgress, ReplayResult
from rehydrate.settings import Settings
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.store import EventStore
from rehydrate.workflows import ReplayWorkflow
from tests import support

REPO = Path(__file__).resolve().parent.parent
# Seconds for the whole scenario; it takes about 20 here, half of it waiting out the 10 s workflow task timeout
# of the workflow task that A held when it died (Temporal then hands the workflow to B).
TIME_LIMIT = 120.0


def start_worker(settings: Settings, log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REHYDRATE_DATABASE_URL": str(settings.database_url),
        "REHYDRATE_TEMPORAL_ADDRESS": settings.temporal_address,
        "REHYDRATE_TEMPORAL_TASK_QUEUE": settings.temporal_task_queue,
        # tests.support's projections with ~0.25 ms per event: see tests/slow_support.py for why.
        "REHYDRATE_PROJECTIONS": "tests.slow_support",
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


async def chunk_transactions_open(pool: asyncpg.Pool) -> int:
    """Open transactions that locked a lane checkpoint (FOR UPDATE) or wrote it: chunks between start and commit."""
    return int(
        await pool.fetchval(
            """SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
               WHERE c.relname = 'lane_checkpoints' AND l.mode IN ('RowShareLock', 'RowExclusiveLock')
                 AND l.granted AND l.pid <> pg_backend_pid()"""
        )
    )


async def chunk_retries_after_heartbeat_timeout(client: Client, handle: WorkflowHandle) -> int:  # type: ignore[type-arg]
    """Chunk activities that completed on a later attempt after a heartbeat timeout, over every run of the replay."""
    run_id: str | None = handle.first_execution_run_id or handle.result_run_id
    retried = 0
    while run_id:
        history = await client.get_workflow_handle(handle.id, run_id=run_id).fetch_history()
        activity_type: dict[int, str] = {}
        run_id = None
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                activity_type[event.event_id] = event.activity_task_scheduled_event_attributes.activity_type.name
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                started = event.activity_task_started_event_attributes
                if (
                    activity_type.get(started.scheduled_event_id) == "rehydrate.apply_chunk"
                    and started.attempt > 1
                    and started.last_failure.timeout_failure_info.timeout_type == TimeoutType.TIMEOUT_TYPE_HEARTBEAT
                ):
                    retried += 1
            elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
                run_id = event.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    return retried


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def test_replay_survives_worker_kill_mid_chunk(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    history = support.random_history(77, streams=60, events=6000)
    lines = ({"stream_id": stream, "type": event.type, "data": event.data} for stream, event in history)
    await import_events(store, enumerate(lines, start=1), source="crash test history")
    events = await support.all_events(store)
    projections = [support.accounts, support.group_totals]
    handled = {p.name: sum(1 for e in events if e.type in p.handlers) for p in projections}

    logs = {"A": tmp_path / "worker-a.log", "B": tmp_path / "worker-b.log"}
    workers: dict[str, subprocess.Popen[bytes]] = {}

    async def scenario() -> tuple[list[ReplayResult], list[ReplayProgress], int]:
        began = time.monotonic()
        workers["A"] = start_worker(settings, logs["A"])
        # Both projections at once on worker A; chunks of 100 events over 3 lanes (~50 chunks per replay); a
        # short heartbeat timeout so the killed attempts are retried within seconds.
        handles = [
            await start_replay(
                client,
                settings,
                ReplayInput(p.name, lanes=3, chunk_size=100, max_parallel=3, heartbeat_timeout_seconds=2),
            )
            for p in projections
        ]
        # Kill A once both replays have applied some events but not all, while chunk transactions are open.
        deadline = time.monotonic() + 60
        while True:
            assert workers["A"].poll() is None, f"worker A exited early:\n{_tail(logs['A'])}"
            assert time.monotonic() < deadline, "the replays never reached the middle of their build"
            progress = [await handle.query(ReplayWorkflow.progress) for handle in handles]
            assert all(p.phase in ("planning", "building") for p in progress), f"a replay finished early: {progress}"
            partial = all(p.phase == "building" and 0 < p.events_applied < p.events_total for p in progress)
            if partial and await chunk_transactions_open(store.pool):
                workers["A"].send_signal(signal.SIGKILL)
                print(
                    f"killed worker A at {time.monotonic() - began:.1f} s: "
                    + ", ".join(f"{p.projection} {p.events_applied}/{p.events_total}" for p in progress)
                )
                break
            await asyncio.sleep(0.01)
        await asyncio.to_thread(workers["A"].wait)
        workers["B"] = start_worker(settings, logs["B"])
        results = [await wait_for_replay(handle) for handle in handles]
        retries = sum([await chunk_retries_after_heartbeat_timeout(client, handle) for handle in handles])
        print(
            f"both replays done at {time.monotonic() - began:.1f} s; {retries} chunk attempts retried; runs "
            + ", ".join(str(r.runs) for r in results)
        )
        assert workers["B"].poll() is None, f"worker B exited:\n{_tail(logs['B'])}"
        return results, progress, retries

    try:
        results, at_kill, retries = await asyncio.wait_for(scenario(), TIME_LIMIT)
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.kill()
            await asyncio.to_thread(worker.wait)
        for name, log in logs.items():
            print(f"--- worker {name} ---\n{_tail(log)}")  # shown by pytest when the test fails

    assert workers["A"].returncode == -signal.SIGKILL
    assert all(p.events_applied < p.events_total for p in at_kill)
    assert retries >= 1, "a chunk attempt that was running on worker A was retried on worker B"
    for projection, result in zip(projections, results, strict=True):
        assert await support.read_model(store.pool, projection) == support.oracle(projection, events)
        lanes_applied = await store.pool.fetchval(
            """SELECT sum(events_applied) FROM rehydrate.lane_checkpoints
               WHERE projection = $1 AND generation = $2""",
            projection.name,
            result.generation,
        )
        # No event applied twice (or skipped): the checkpoints count each handled event exactly once.
        assert lanes_applied == handled[projection.name]
        assert result.events_applied == handled[projection.name] and result.caught_up == 0
        assert result.runs >= 1
