"""How soon a replay goes on after a worker is SIGKILLed in the middle of a chunk, with the default heartbeat timeout.

Usage:

    python bench/recovery.py                              # 1,000,000 events, 2 worker processes, 4 lanes, 5 kills
    python bench/recovery.py --events 2000000 --reuse     # a build of over 15 s on 2 busy cores
    python bench/recovery.py --runs 10 --no-baseline --history   # kills only, each with its history

In one run, on one machine, over the demo's order history (`replay_speed.py`'s store, kept in `.rehydrate-bench/`
with `--reuse`):

1. **ceiling**: `order_summary` built once by `replay_speed.py`'s hand-written statement; every replay's table is
   compared with it, row for row.
2. `--workers` real `rehydrate worker` processes and a Temporal dev server (started as `rehydrate dev` starts one).
   Each round replays `order_summary` with the default settings (heartbeat timeout, chunk size, retries) except
   `--lanes` (4: one chunk per worker slot, so each lane runs its chunks back to back and the build lasts):
   a. unless `--no-baseline`, once without a fault, for the time to the swap;
   b. once with a kill: at a random moment (`--seed`) 0.5–4 s after the build's first chunk committed, as soon as a
      worker's database session is idle inside a chunk's transaction (it holds a lane checkpoint's row lock), that
      worker is frozen (SIGSTOP); if 50 ms later the same transactions are still open, it is SIGKILLed (frozen, it
      cannot have committed them meanwhile), else resumed and watched again. A replacement worker process is
      started right away, as an orchestrator restarts a pod.
   One kill per replay, so that each gap is measured alone.

The **gap** is the time from the kill until every lane unfinished at the kill has committed a chunk again (its
`lane_checkpoints` row's position moved), as the fault suite defines recovery. Beside it, from the replay's pending
activities in Temporal, for each chunk the killed worker was running: its last heartbeat, when its retry was due, when
a worker started it (the chunk "picked up") and which, and when it committed;
and the replay's workflow tasks that timed out with the dead worker (one it had started waits out the workflow task
timeout, 10 s; one on its sticky queue moves to the shared queue after 3 s). `--history` prints the replay's history
around each gap.

Prints each kill, then the median and the range (min to max) of the gaps, of the pick-ups and of the time to the swap
with and without a kill, never the best run, with the machine's load average. Exit status 1 if a read model differs
from the ceiling or a killed chunk was picked up by another worker more than 10 s after the kill (the gap adds the
time the chunk takes to run again from the lane's checkpoint, which grows with the chunk size).
Postgres: an embedded server kept in `.rehydrate-bench/pgdata` (stopped at the end), or the server of
REHYDRATE_DATABASE_URL. Temporal: a dev server started for the run, or REHYDRATE_TEMPORAL_ADDRESS. Each worker's
database sessions carry its name as `application_name` (to tell whose transaction is open); nothing else differs
from a plain `rehydrate worker`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from math import nan
from pathlib import Path
from typing import Any

import asyncpg
from common import postgres_server, run_script, spawn_worker, stop_process, temporal
from google.protobuf.timestamp_pb2 import Timestamp
from replay_speed import HOME, PROJECTION, build_store, ceiling, differences, phases, replay
from temporalio.api.enums.v1 import PendingActivityState, TimeoutType
from temporalio.client import Client, WorkflowHandle

from rehydrate.core.settings import Settings
from rehydrate.core.temporal import workers_polling
from rehydrate.models import ReplayInput
from rehydrate.starter import start_replay, wait_for_replay

KILL_AFTER = (0.5, 4.0)  # seconds after the build's first commit, at random: a kill's delay
GOAL = 10.0  # seconds: a killed worker's chunks run again on another worker within this, under the default settings
MODULE = "rehydrate.examples.orders"
NAME = "rehydrate-bench-worker-"  # application_name prefix of the workers' database sessions

LANES = """
SELECT g.state, c.lane, c.position, c.events_applied, c.done
FROM rehydrate.generations g LEFT JOIN rehydrate.lane_checkpoints c USING (projection, generation)
WHERE g.projection = $1 AND g.generation = (SELECT max(generation) FROM rehydrate.generations WHERE projection = $1)
"""
APPLIED = """
SELECT coalesce(sum(events_applied), 0) FROM rehydrate.lane_checkpoints
WHERE projection = $1 AND generation = (SELECT max(generation) FROM rehydrate.generations WHERE projection = $1)
"""
# Sessions idle inside a chunk's transaction: they hold a lane checkpoint's row lock (tests/helpers/workers.py). Only
# idle ones count: a session running a statement may be running its COMMIT.
IN_CHUNK = """
SELECT DISTINCT a.application_name, a.backend_xid::text AS xid, a.state_change
FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid JOIN pg_class c ON c.oid = l.relation
WHERE l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND c.relname = 'lane_checkpoints' AND l.mode IN ('RowShareLock', 'RowExclusiveLock') AND l.granted
  AND a.state = 'idle in transaction' AND a.backend_xid IS NOT NULL AND a.application_name LIKE $1
"""

# A workflow task lost with the killed worker: one it had started times out after the workflow's task timeout
# (Temporal's default, 10 s); one put on its sticky queue moves to the shared queue after the workers' sticky
# schedule-to-start timeout (3 s).
TASK_TIMEOUTS = {
    TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE: "the killed worker had started",
    TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_START: "waiting on the killed worker's sticky queue",
}

Lanes = dict[int, tuple[int, bool]]  # lane: (position, done)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def spread(values: list[float], unit: str = " s") -> str:
    s = sorted(values)
    return f"{statistics.median(s):.2f}{unit} ({s[0]:.2f} to {s[-1]:.2f}, runs: {len(s)})" if s else "n/a"


class Workers:
    """Worker processes on a task queue of their own, each named in its database sessions (`application_name`)."""

    def __init__(self, url: str, client: Client, log: Path) -> None:
        self.url, self.log = url, log
        queue = f"bench-{uuid.uuid4().hex[:6]}"
        self.settings = Settings(
            database_url=url,
            temporal_address=client.service_client.config.target_host,
            temporal_task_queue=queue,
            projections=[MODULE],
            tails=False,
        )
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.started = 0

    def start(self) -> str:
        name = f"{NAME}{self.started}"
        self.started += 1
        # asyncpg passes a URL's other query parameters to the server as settings.
        named = f"{self.url}{'&' if '?' in self.url else '?'}application_name={name}"
        env = {
            "REHYDRATE_DATABASE_URL": named,
            "REHYDRATE_TEMPORAL_ADDRESS": self.settings.temporal_address,
            "REHYDRATE_TEMPORAL_TASK_QUEUE": self.settings.temporal_task_queue,
            "REHYDRATE_PROJECTIONS": MODULE,
            "REHYDRATE_TAILS": "false",
        }
        self.running[name] = spawn_worker(env, self.log)
        return name

    def identity(self, name: str) -> str:
        return f"{self.running[name].pid}@{socket.gethostname()}"  # as Temporal names a worker by default

    async def stop(self) -> None:
        await asyncio.gather(*(stop_process(p) for p in self.running.values()))


@dataclass
class Kill:
    worker: str
    lanes_held: list[int]  # lanes whose chunk transaction died with the worker
    unfinished: Lanes  # lanes unfinished at the kill, and where they were
    replacement: str
    at: float  # Unix time of the SIGKILL
    gap: float | None = None
    swap: float = 0.0  # seconds from replay start to the swap
    wrong: int = 0
    chunks: dict[str, dict[str, Any]] = field(default_factory=dict)  # activity id: what Temporal said of it
    task_timeouts: list[tuple[float, str]] = field(default_factory=list)  # workflow tasks lost with the worker


async def lanes_now(conn: asyncpg.Connection) -> tuple[str | None, Lanes]:
    rows = await conn.fetch(LANES, PROJECTION.name)
    if not rows:
        return None, {}
    return rows[0]["state"], {r["lane"]: (r["position"], r["done"]) for r in rows if r["lane"] is not None}


async def kill_in_chunk(conn: asyncpg.Connection, workers: Workers) -> Kill | None:
    """SIGKILL the worker whose session is idle inside a chunk's transaction, if frozen it still is 50 ms later,
    and start a replacement; None when no worker held one (the one looked at is resumed)."""
    if not await mid_build(conn):
        return None
    rows = await conn.fetch(IN_CHUNK, NAME + "%")
    if not rows:
        return None
    name = rows[0]["application_name"]
    victim = workers.running[name]
    victim.send_signal(signal.SIGSTOP)
    try:
        # Postgres first acts on what the worker sent just before it froze; then the same open transactions twice.
        await asyncio.sleep(0.05)
        held = {(r["xid"], r["state_change"]) for r in await conn.fetch(IN_CHUNK, name)}
        await asyncio.sleep(0.05)
        if held and held == {(r["xid"], r["state_change"]) for r in await conn.fetch(IN_CHUNK, name)}:
            xids = sorted(xid for xid, _ in held)
            locked = await conn.fetch(
                "SELECT lane FROM rehydrate.lane_checkpoints WHERE projection = $1 AND xmax::text = ANY($2)",
                PROJECTION.name,
                xids,
            )
            _, lanes = await lanes_now(conn)
            victim.send_signal(signal.SIGKILL)
            at = time.time()
            replacement = workers.start()  # the orchestrator's, right away
            unfinished = {lane: was for lane, was in lanes.items() if not was[1]}
            return Kill(name, sorted(r["lane"] for r in locked), unfinished, replacement, at)
    except BaseException:
        victim.send_signal(signal.SIGKILL)
        raise
    victim.send_signal(signal.SIGCONT)
    return None


async def watch(conn: asyncpg.Connection, handle: WorkflowHandle[Any, Any], workers: Workers, kill: Kill) -> None:
    """Until every lane unfinished at the kill committed a chunk again (`kill.gap`), and until each chunk the killed
    worker ran was started again by another worker (`kill.chunks`, from the replay's pending activities)."""
    names = {workers.identity(name): name for name in workers.running}
    for activity in await pending(handle):
        started = activity.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        if started and names.get(activity.last_worker_identity) == kill.worker:
            beat = (
                activity.last_heartbeat_time if activity.HasField("last_heartbeat_time") else activity.last_started_time
            )
            kill.chunks[activity.activity_id] = {"heartbeat": seconds(beat) - kill.at, "attempt": activity.attempt}
    deadline = time.monotonic() + 120
    polls = 0
    while kill.gap is None or any("started" not in seen for seen in kill.chunks.values()):
        assert time.monotonic() < deadline, "no recovery within 120 s"
        if kill.gap is None:
            state, lanes = await lanes_now(conn)
            if state != "building" or all(lanes.get(lane) != was for lane, was in kill.unfinished.items()):
                kill.gap = time.time() - kill.at
        if polls % 5 == 0:  # the pending activities every 100 ms
            now = {activity.activity_id: activity for activity in await pending(handle)}
            for activity_id, seen in kill.chunks.items():
                activity = now.get(activity_id)
                if "started" in seen:
                    continue
                if activity is None:  # completed between two looks
                    seen["started"] = None
                elif activity.attempt > seen["attempt"]:
                    if activity.HasField("next_attempt_schedule_time"):
                        seen["due"] = seconds(activity.next_attempt_schedule_time) - kill.at
                    if activity.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED:
                        seen["started"] = seconds(activity.last_started_time) - kill.at
                        seen["by"] = names.get(activity.last_worker_identity, activity.last_worker_identity)
        polls += 1
        await asyncio.sleep(0.02)


async def pending(handle: WorkflowHandle[Any, Any]) -> list[Any]:
    """The pending activities of the replay's latest run."""
    return list((await handle.describe()).raw_description.pending_activities)


def seconds(at: Timestamp) -> float:
    return at.ToMicroseconds() / 1e6


async def mid_build(conn: asyncpg.Connection) -> bool:
    """Building, with events applied and lanes unfinished."""
    state, lanes = await lanes_now(conn)
    return (
        state == "building"
        and bool(await conn.fetchval(APPLIED, PROJECTION.name))
        and not all(done for _, done in lanes.values())
    )


async def killed_replay(
    client: Client, conn: asyncpg.Connection, workers: Workers, lanes: int, delay: float, history: bool
) -> Kill:
    """A replay with a kill `delay` seconds after its first chunk committed (at the next chunk transaction open)."""
    began = time.time()
    started = await start_replay(client, workers.settings, ReplayInput(PROJECTION.name, lanes=lanes))
    handle = client.get_workflow_handle(started.id)  # its latest run, should it continue as new
    ended = asyncio.ensure_future(wait_for_replay(started))
    try:
        while not await mid_build(conn):
            if ended.done():
                ended.result()
                raise SystemExit("the build ended before it was seen in the middle: give it more --events")
            await asyncio.sleep(0.01)
        # Not at once: right after the first commits the replay's workflow task is in flight, which a kill then
        # would catch more often than a kill at a random moment does.
        await asyncio.sleep(delay)
        while (kill := await kill_in_chunk(conn, workers)) is None:
            if ended.done():
                ended.result()
                raise SystemExit("the build ended before a worker was caught inside a chunk: give it more --events")
            await asyncio.sleep(0.005)
        await watch(conn, handle, workers, kill)
        await ended
    finally:
        ended.cancel()
    _, swapped_at = await phases(client, started.id, started.result_run_id)
    kill.swap = swapped_at - began
    kill.wrong = await differences(conn, PROJECTION.table.name)
    lines = await read_history(client, started.id, kill)
    if history:
        print("\n".join(lines))
    return kill


async def read_history(client: Client, workflow_id: str, kill: Kill) -> list[str]:
    """From the replay's history: each killed chunk's lane and when its retry completed (into `kill.chunks`), the
    replay's workflow tasks that timed out after the kill (`kill.task_timeouts`); and the history
    from a second before the kill to a second after the gap closed, in seconds from the kill."""
    lines, names, ids = [], {}, {}
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        at = seconds(event.event_time) - kill.at
        kind = event.WhichOneof("attributes") or ""
        detail = ""
        if kind == "activity_task_scheduled_event_attributes":
            scheduled = event.activity_task_scheduled_event_attributes
            summary = event.user_metadata.summary.data.decode().strip('"') if event.HasField("user_metadata") else ""
            names[event.event_id] = f"{scheduled.activity_type.name.removeprefix('rehydrate.')} ({summary})"
            ids[event.event_id] = scheduled.activity_id
            detail = names[event.event_id]
            if scheduled.activity_id in kill.chunks:
                kill.chunks[scheduled.activity_id]["lane"] = summary.split(" after")[0]
        elif kind == "activity_task_started_event_attributes":
            started = event.activity_task_started_event_attributes
            detail = f"{names.get(started.scheduled_event_id)} attempt {started.attempt} by {started.identity}"
        elif kind == "activity_task_completed_event_attributes":
            completed = event.activity_task_completed_event_attributes.scheduled_event_id
            detail = str(names.get(completed))
            if ids.get(completed) in kill.chunks:
                kill.chunks[ids[completed]]["committed"] = at
        elif kind == "workflow_task_started_event_attributes":
            detail = f"by {event.workflow_task_started_event_attributes.identity}"
        elif kind == "workflow_task_scheduled_event_attributes":
            detail = f"on {event.workflow_task_scheduled_event_attributes.task_queue.name}"
        elif kind == "workflow_task_timed_out_event_attributes":
            timeout = event.workflow_task_timed_out_event_attributes.timeout_type
            detail = TimeoutType.Name(timeout)
            if at > 0:
                kill.task_timeouts.append((at, TASK_TIMEOUTS.get(timeout, detail)))
        if -1 < at < (kill.gap or 0) + 1:
            lines.append(f"      {at:+7.2f} s  {kind.removesuffix('_event_attributes')} {detail}")
    return lines


def described(kill: Kill) -> str:
    """What Temporal said of each chunk the killed worker ran, in seconds from the kill."""
    parts = []
    for seen in sorted(kill.chunks.values(), key=lambda seen: str(seen.get("lane"))):
        if seen.get("started") is None:
            parts.append(f"{seen.get('lane')}: its chunk completed before its retry was seen")
            continue
        by = "the replacement" if seen["by"] == kill.replacement else "the other worker"
        parts.append(
            f"{seen.get('lane')}: last heartbeat {seen['heartbeat']:+.2f} s, retry due {seen.get('due', nan):+.2f} s, "
            f"started {seen['started']:+.2f} s on {by}, committed {seen.get('committed', nan):+.2f} s"
        )
    parts += [f"the replay's workflow task {what} timed out at {at:+.2f} s" for at, what in kill.task_timeouts]
    return "\n      ".join(parts)


async def main(args: argparse.Namespace) -> int:
    await asyncio.to_thread(HOME.mkdir, exist_ok=True)
    print(f"load average at the start: {load()}", flush=True)
    kills: list[Kill] = []
    rng = random.Random(args.seed)
    baselines: list[float] = []
    async with postgres_server(HOME / "pgdata", delete=False) as server_url, temporal() as client:
        url, _ = await build_store(server_url, args.events, args.reuse)
        conn = await asyncpg.connect(url)
        workers = Workers(url, client, HOME / "recovery-worker.log")
        try:
            await ceiling(conn)
            for _ in range(args.workers):
                workers.start()
            deadline = time.monotonic() + 60
            while await workers_polling(client, workers.settings.temporal_task_queue) < args.workers:
                assert time.monotonic() < deadline, f"the workers never polled; see {workers.log}"
                await asyncio.sleep(0.2)
            for run in range(1, args.runs + 1):
                if not args.no_baseline:
                    to_swap, _, _, spent = await replay(client, workers.settings, args.lanes)
                    wrong = await differences(conn, PROJECTION.table.name)
                    baselines.append(to_swap)
                    print(f"run {run}, no kill: {to_swap:.2f} s to the swap, rows wrong: {wrong}; {spent}", flush=True)
                    if wrong:
                        return 1
                delay = rng.uniform(*KILL_AFTER)
                kill = await killed_replay(client, conn, workers, args.lanes, delay, args.history)
                kills.append(kill)
                print(
                    f"run {run}, kill: {kill.worker} SIGKILLed, idle in the open chunk transaction(s) of lane(s) "
                    f"{kill.lanes_held}; lanes unfinished at the kill: {sorted(kill.unfinished)}; "
                    f"gap {kill.gap or 0:.2f} s; "
                    f"{kill.swap:.2f} s to the swap; rows wrong: {kill.wrong}; load {load()}\n      " + described(kill),
                    flush=True,
                )
        finally:
            await workers.stop()
            await conn.close()

    gaps = [k.gap for k in kills if k.gap is not None]
    pickups = [seen["started"] for k in kills for seen in k.chunks.values() if seen.get("started") is not None]
    wrong = sum(k.wrong for k in kills)
    print()
    print(
        f"{args.events:,} events in the store; {args.workers} worker processes, {args.lanes} lanes, default chunk size "
        f"and heartbeat timeout; {os.cpu_count()} cores; load average at the end: {load()}"
    )
    print(f"gap, kill to every unfinished lane committed again:  median {spread(gaps)}")
    print(f"a killed chunk started again on another worker:     median {spread(pickups)}")
    print(f"to the swap, with a kill:                            median {spread([k.swap for k in kills])}")
    if baselines:
        print(f"to the swap, without:                                median {spread(baselines)}")
    print(f"rows wrong: {wrong}")
    return 1 if wrong or not pickups or max(pickups) > GOAL else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the store")
    parser.add_argument("--workers", type=int, default=2, help="rehydrate worker processes")
    parser.add_argument("--lanes", type=int, default=4, help="lanes of each replay")
    parser.add_argument("--runs", type=int, default=5, help="replays with a kill (one kill each)")
    parser.add_argument("--no-baseline", action="store_true", help="no replay without a kill before each")
    parser.add_argument("--seed", type=int, default=1, help="of the kills' random moments")
    parser.add_argument("--history", action="store_true", help="print each kill's replay history around the gap")
    parser.add_argument("--reuse", action="store_true", help="reuse a store of the same size from an earlier run")
    run_script(main, parser.parse_args())
