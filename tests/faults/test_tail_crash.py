"""A tail survives its worker process being killed in the middle of a batch: nothing lost, nothing doubled.

Worker A (a real `python -m rehydrate worker` process, with slow handlers) runs the tails of both test projections
while a writer appends a steady stream of events. A is SIGKILLed while a tail batch is folding its events, that is
inside the batch's transaction after it has read the delta and locked the generation; the test then proves that
this transaction never committed. Worker B takes the tail activity over when its 2 s heartbeat times out and goes
on from the last committed checkpoint, while the writer goes on for a while. Once B has caught up, both read models
equal the plain fold of every event and each active generation has counted each handled event exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError

from rehydrate import EventStore
from rehydrate.core.settings import Settings
from rehydrate.models import ReplayInput, TailInput
from rehydrate.models.names import tail_workflow_id
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.worker import running_worker
from rehydrate.workflows import TailWorkflow
from tests.helpers import domain
from tests.helpers.waiting import eventually
from tests.helpers.workers import kill_frozen, log_tail, start_worker

# Bound on the whole scenario; it takes about 15 s here.
TIME_LIMIT = 45.0
# Per event in worker A and B (tests/helpers/slow_domain.py): a full batch of 100 folds for ~100 ms, a wide target for
# the kill, and still far inside the 2 s heartbeat timeout (the fold blocks the worker's event loop).
EVENT_COST_SECONDS = "0.001"
BATCH_SIZE = 100


async def batch_in_fold(pool: asyncpg.Pool, projections: list[str]) -> asyncpg.Record | None:
    """A session that holds a projection's tail lock and sits idle in its transaction right after reading the
    read model's current rows: a tail batch folding a non-empty delta in Python, before it writes anything.

    (Every tail poll takes the lock, even with nothing new; only a batch with handled events reads rows.)"""
    return await pool.fetchrow(
        """SELECT a.pid, a.backend_xid::text AS xid, p.name AS projection
           FROM pg_stat_activity a
           JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           JOIN unnest($1::text[]) AS p(name)
             ON ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended('rehydrate.tail:' || p.name, 0)
           WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
             AND a.state = 'idle in transaction' AND a.backend_xid IS NOT NULL
             AND a.query LIKE 'SELECT * FROM %'
           LIMIT 1""",
        projections,
    )


async def checkpoints(pool: asyncpg.Pool) -> dict[str, tuple[int, int, str]]:
    """Per projection: its active generation, checkpoint, and the xmin of that generation's row (the id of the
    transaction that last updated it)."""
    rows = await pool.fetch(
        """SELECT g.projection, g.generation, g.checkpoint_xmin::text::bigint, g.xmin::text
           FROM rehydrate.generations g JOIN rehydrate.projections p
             ON p.name = g.projection AND p.active_generation = g.generation"""
    )
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


async def differences(store: EventStore) -> dict[str, list[Any]]:
    """Per projection, the keys on which the read model differs from the oracle (empty: equal)."""
    events = await domain.all_events(store)
    out: dict[str, list[Any]] = {}
    for projection in domain.registry():
        got = await domain.read_model(store.pool, projection)
        want = domain.oracle(projection, events)
        wrong = sorted(key for key in got.keys() | want.keys() if got.get(key) != want.get(key))
        if wrong:
            out[projection.name] = wrong
    return out


async def test_tail_survives_a_worker_kill_mid_batch_without_losing_or_doubling_events(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = domain.random_history(61, streams=50, events=20_000)
    built, backlog, stream = history[:300], history[300:700], iter(history[700:])
    registry = domain.registry()
    names = [projection.name for projection in registry]

    # An active generation of both projections, built by an in-process worker that runs no tails.
    await domain.append_all(store, built)
    async with running_worker(settings, registry, client=client):
        for name in names:
            await wait_for_replay(await start_replay(client, settings, ReplayInput(name)))
    built_at = await checkpoints(store.pool)
    # The tails, started before any worker could start them with the default 20 s heartbeat timeout (workers
    # attach to a running tail: USE_EXISTING).
    for name in names:
        await client.start_workflow(
            TailWorkflow.run,
            TailInput(name, batch_size=BATCH_SIZE, poll_seconds=0.2, heartbeat_timeout_seconds=2),
            id=tail_workflow_id(name, settings.temporal_task_queue),
            task_queue=settings.temporal_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
    # A backlog, so that worker A's first batches are full ones (long folds to kill in).
    await domain.append_all(store, backlog)

    stop = asyncio.Event()
    appended = 0

    async def writer() -> None:
        # One event per transaction, ~250 events/s, until stopped.
        nonlocal appended
        for name, event in stream:
            if stop.is_set():
                return
            await store.append(name, [event])
            appended += 1
            await asyncio.sleep(0.002)
        raise AssertionError("the writer ran out of history")

    # The workers (REHYDRATE_TAILS=false, see tests/helpers/workers.py) start no tails: they run the ones started above.
    monkeypatch.setenv("REHYDRATE_TEST_EVENT_COST", EVENT_COST_SECONDS)
    logs = {"A": tmp_path / "worker-a.log", "B": tmp_path / "worker-b.log"}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    writing = asyncio.create_task(writer())

    async def scenario() -> tuple[asyncpg.Record, dict[str, tuple[int, int, str]], float]:
        began = time.monotonic()
        workers["A"] = start_worker(settings, logs["A"])
        # Kill A once it has committed a batch and while another is folding.
        while True:
            assert workers["A"].poll() is None, f"worker A exited early:\n{log_tail(logs['A'])}"
            assert not writing.done(), "the writer failed"
            now = await checkpoints(store.pool)
            moved = any(now[name][1] > built_at[name][1] for name in names)
            victim = await batch_in_fold(store.pool, names) if moved else None
            if victim is not None and (
                victim := await kill_frozen(workers["A"], lambda: batch_in_fold(store.pool, names))
            ):
                break
            await asyncio.sleep(0.002)
        killed_at = time.monotonic() - began
        assert await asyncio.to_thread(workers["A"].wait, 10) == -signal.SIGKILL
        while await store.pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", victim["pid"]):
            await asyncio.sleep(0.01)  # Postgres ends A's sessions (and rolls back their transactions)
        at_kill = await checkpoints(store.pool)

        workers["B"] = start_worker(settings, logs["B"])

        async def b_committed() -> bool:  # after the heartbeat timeout (2 s) and a retry (1 s); the writer goes on
            now = await checkpoints(store.pool)
            return all(now[name][1] > at_kill[name][1] for name in names)

        await eventually(b_committed)
        stop.set()
        await writing
        deadline = time.monotonic() + 20
        while wrong := await differences(store):
            assert workers["B"].poll() is None, f"worker B exited:\n{log_tail(logs['B'])}"
            assert time.monotonic() < deadline, f"the tail did not catch up after the crash: {wrong}"
            await asyncio.sleep(0.2)
        print(
            f"killed worker A at {killed_at:.1f} s inside a batch of {victim['projection']}; "
            f"{appended} events appended during the test; caught up at {time.monotonic() - began:.1f} s"
        )
        return victim, at_kill, killed_at

    try:
        victim, at_kill, _ = await asyncio.wait_for(scenario(), TIME_LIMIT)
        # Who runs the tails now: B, on a retry after A's attempt timed out on its heartbeat.
        for name in names:
            description = await client.get_workflow_handle(
                tail_workflow_id(name, settings.temporal_task_queue)
            ).describe()
            (pending,) = description.raw_description.pending_activities
            assert pending.attempt >= 2, (name, pending)
            assert pending.last_worker_identity.startswith(f"{workers['B'].pid}@"), (name, pending)
    finally:
        stop.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(writing, 5)
        for worker in workers.values():
            if worker.poll() is None:
                worker.kill()
            await asyncio.to_thread(worker.wait)
        for name in names:
            with contextlib.suppress(RPCError):
                await client.get_workflow_handle(tail_workflow_id(name, settings.temporal_task_queue)).terminate(
                    "test finished"
                )
        for label, log in logs.items():
            print(f"--- worker {label} ---\n{log_tail(log)}")  # shown by pytest when the test fails

    # The batch A was folding never committed: the generation's row was last updated by another transaction.
    _, _, last_writer = at_kill[victim["projection"]]
    assert last_writer != victim["xid"], "the kill landed after the batch committed"
    # A had committed batches before the kill, B committed more after it.
    final = await checkpoints(store.pool)
    for name in names:
        assert final[name][0] == built_at[name][0]  # the same generation throughout
        assert built_at[name][1] <= at_kill[name][1] < final[name][1]
    assert any(at_kill[name][1] > built_at[name][1] for name in names)

    # Nothing lost, nothing doubled: the read models equal the fold (group_total.members counts every Opened
    # exactly once), and each generation counted each handled event exactly once.
    events = await domain.all_events(store)
    assert len(events) > len(built) + len(backlog)
    for projection in registry:
        assert await domain.read_model(store.pool, projection) == domain.oracle(projection, events)
        handled = sum(1 for event in events if event.type in projection.handlers)
        applied = await store.pool.fetchval(
            "SELECT events_applied FROM rehydrate.generations WHERE projection = $1 AND generation = $2",
            projection.name,
            final[projection.name][0],
        )
        assert applied == handled, projection.name
    members = sum(row["members"] for row in (await domain.read_model(store.pool, domain.group_totals)).values())
    assert members == sum(1 for event in events if event.type == "Opened")
