"""A replay survives its worker process being killed in the middle of a chunk.

Worker A (a real `python -m rehydrate worker` process) is SIGKILLed while chunk transactions are open; worker B
takes over. The open transactions die with A's connections, Temporal retries the lost chunk attempts after
their heartbeat timeout, each retry continues from its lane's committed checkpoint, and the read models end
equal to the plain fold of the events with every event applied exactly once.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

from temporalio.client import Client

from rehydrate import EventStore
from rehydrate.core.settings import Settings
from rehydrate.engine.importer import import_events
from rehydrate.models import ReplayInput, ReplayProgress, ReplayResult
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.workflows import ReplayWorkflow
from tests.helpers import domain
from tests.helpers.workers import (
    chunk_transactions_open,
    forget_sticky_worker,
    kill_inside_chunks,
    kill_workers,
    lanes_locked_by,
    log_tail,
    retried_lanes,
    rolled_back,
    start_worker,
)

# Seconds for the whole scenario; it takes about 10 here.
TIME_LIMIT = 120.0


async def test_replay_survives_worker_kill_mid_chunk(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    history = domain.random_history(77, streams=60, events=6000)
    lines = ({"stream_id": stream, "type": event.type, "data": event.data} for stream, event in history)
    await import_events(store, enumerate(lines, start=1), source="crash test history")
    events = await domain.all_events(store)
    projections = [domain.accounts, domain.group_totals]
    handled = {p.name: sum(1 for e in events if e.type in p.handlers) for p in projections}

    logs = {"A": tmp_path / "worker-a.log", "B": tmp_path / "worker-b.log"}
    workers: dict[str, subprocess.Popen[bytes]] = {}

    async def scenario() -> tuple[list[ReplayResult], list[ReplayProgress], set[tuple[str, int]], set[tuple[str, int]]]:
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
            assert workers["A"].poll() is None, f"worker A exited early:\n{log_tail(logs['A'])}"
            assert time.monotonic() < deadline, "the replays never reached the middle of their build"
            progress = [await handle.query(ReplayWorkflow.progress) for handle in handles]
            assert all(p.phase in ("planning", "building") for p in progress), f"a replay finished early: {progress}"
            partial = all(p.phase == "building" and 0 < p.events_applied < p.events_total for p in progress)
            if (
                partial
                and await chunk_transactions_open(store.pool)
                and (killed := await kill_inside_chunks(workers["A"], store.pool))
            ):
                print(
                    f"killed worker A at {time.monotonic() - began:.1f} s: "
                    + ", ".join(f"{p.projection} {p.events_applied}/{p.events_total}" for p in progress)
                )
                break
            await asyncio.sleep(0.01)
        await asyncio.to_thread(workers["A"].wait)
        for handle in handles:
            await forget_sticky_worker(client, handle)
        assert await rolled_back(store.pool, killed), "a chunk A held open committed"
        died = await lanes_locked_by(store.pool, killed)
        workers["B"] = start_worker(settings, logs["B"])
        results = [await wait_for_replay(handle) for handle in handles]
        retried = set().union(*[await retried_lanes(client, handle) for handle in handles])
        print(
            f"both replays done at {time.monotonic() - began:.1f} s; chunks of {sorted(retried)} retried; runs "
            + ", ".join(str(r.runs) for r in results)
        )
        assert workers["B"].poll() is None, f"worker B exited:\n{log_tail(logs['B'])}"
        return results, progress, died, retried

    try:
        results, at_kill, died, retried = await asyncio.wait_for(scenario(), TIME_LIMIT)
    finally:
        await kill_workers(workers, logs)

    assert workers["A"].returncode == -signal.SIGKILL
    assert all(p.events_applied < p.events_total for p in at_kill)
    assert died and died <= retried, f"the chunks that died with worker A were retried: {died} in {retried}"
    for projection, result in zip(projections, results, strict=True):
        assert await domain.read_model(store.pool, projection) == domain.oracle(projection, events)
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
