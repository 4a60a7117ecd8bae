"""The fault suite: replays over a large history while real processes break, checked row for row.

Each test runs `python -m rehydrate worker` processes against a real Postgres and a real Temporal server, injects
one kind of fault several times while a replay of `tests.helpers.domain.accounts` runs, and then proves the result:
the read model equals the oracle fold row for row, and the generation counted each handled event exactly once
(its `events_applied` equals the number of events the projection handles; a lost event or a doubled one would
show there, and in the rows: `history` and `changes` are order- and count-sensitive).

Each test writes its figures (faults injected, replays completed, rows compared, rows wrong, events lost or
doubled, the slowest recovery) as one JSON line to $REHYDRATE_FAULT_REPORT, or to fault-report.jsonl in pytest's
base temporary directory; `bench/fault_report.py` runs this file and prints them as a table.

Recovery is the time from a fault until every lane that was unfinished at the fault has committed a chunk again
(or, for a fault in the swap, until the new generation is active): it includes the heartbeat timeout of a lost
chunk attempt, the retry's back-off, the workflow task moving to a live worker and reconnecting to the server.

Size: FAULT_EVENTS events (100,000 by default) over 3,000 streams; about 82,000 of them are handled by the
projection. The workers add 100 µs per event (tests/helpers/slow_domain.py), which stretches a build to ~10 s here:
long enough for five SIGKILLs 0.2–1 s apart inside one build. The other tests, whose faults come back to back or
not in the build at all, halve the cost (SHORT_BUILD_ENV). The build's length comes from the cost per event, not
from the history's size: a larger history would only make loading it, and the oracle's fold and the check, longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError

from rehydrate import ConcurrencyError, Event, EventStore, NewEvent
from rehydrate.core.database import create_pool, ensure_schema
from rehydrate.core.settings import Settings
from rehydrate.devstack import DEV_SERVER_TUNING, DevServer, start_temporal
from rehydrate.engine.projections import Projection
from rehydrate.models import ReplayInput, ReplayResult, TailInput
from rehydrate.models.names import replay_workflow_id, tail_workflow_id
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.workflows import ReplayWorkflow, TailWorkflow
from tests.helpers import domain
from tests.helpers.faults import Figures, PrivatePostgres
from tests.helpers.ports import free_port
from tests.helpers.workers import chunk_transactions_open, log_tail, rolled_back, start_worker

pytestmark = pytest.mark.slow

FAULT_EVENTS = int(os.environ.get("REHYDRATE_FAULT_EVENTS", "100000"))
STREAMS = 3_000
PROJECTION = domain.accounts
# Chunks of 1,000 events over 4 lanes: ~80 chunks per replay, each a transaction of ~0.1 s (most of it folding).
REPLAY = {"lanes": 4, "chunk_size": 1_000, "max_parallel": 4, "heartbeat_timeout_seconds": 2.0}
# The workers fold with tests.helpers.slow_domain: the domain's handlers plus a sleep of 100 µs per event, which
# stretches a build from ~2 s to ~10 s here, so that five SIGKILLs land inside one build (see the module docstring).
WORKER_ENV = {"REHYDRATE_PROJECTIONS": "tests.helpers.slow_domain", "REHYDRATE_TEST_EVENT_COST": "0.0001"}
# 50 µs per event, a build of ~5 s: enough for faults that come back to back (two restarts, five cuts 0.3 s apart),
# or for a build that is only waited for (a rebuild whose swap is the target, a replay with writers beside it).
SHORT_BUILD_ENV = {**WORKER_ENV, "REHYDRATE_TEST_EVENT_COST": "0.00005"}
# How long a stopped Temporal server stays down: its workers and clients meet refused connections meanwhile.
TEMPORAL_DOWN_SECONDS = 1.0
# Bound on any single recovery; a test fails rather than hang.
RECOVERY_LIMIT = 60.0


# -- the history and the check ------------------------------------------------------------------------------


@functools.cache
def history() -> list[tuple[str, NewEvent]]:
    return domain.random_history(8080, streams=STREAMS, events=FAULT_EVENTS)


async def load_history(store: EventStore) -> None:
    await domain.import_all(store, history())


async def check(pool: asyncpg.Pool, figures: Figures, generation: int, projection: Projection = PROJECTION) -> None:
    """Compare `projection`'s read model with the oracle over every event in the store, row for row, and the
    generation's count of applied events with the number of handled events; add the outcome to `figures`."""
    rows = await pool.fetch(
        "SELECT global_position, stream_id, stream_version, event_type, schema_version, payload, metadata, "
        "recorded_at FROM rehydrate.events ORDER BY global_position"
    )
    events = [Event(*row) for row in rows]
    want = domain.oracle(projection, events)
    got = await domain.read_model(pool, projection)
    keys = got.keys() | want.keys()
    figures.rows_compared += len(keys)
    figures.rows_wrong += sum(1 for key in keys if got.get(key) != want.get(key))
    handled = sum(1 for event in events if event.type in projection.handlers)
    applied = await pool.fetchval(
        "SELECT events_applied FROM rehydrate.generations WHERE projection = $1 AND generation = $2",
        projection.name,
        generation,
    )
    figures.events_lost_or_doubled += abs(int(applied) - handled)
    figures.replays_completed += 1


def assert_exact(figures: Figures) -> None:
    assert figures.rows_compared > 0
    assert figures.rows_wrong == 0, figures
    assert figures.events_lost_or_doubled == 0, figures


# -- watching a replay from outside -------------------------------------------------------------------------


class Probe:
    """One connection of the test's own that comes back after the server went away (it polls through faults)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: asyncpg.Connection | None = None

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record] | None:
        """The rows, or None while the server cannot answer."""
        try:
            if self.conn is None or self.conn.is_closed():
                self.conn = await asyncpg.connect(self.url, timeout=2)
            return list(await self.conn.fetch(query, *args))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self.conn = None
            return None

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()


Lanes = dict[int, tuple[int, int, bool]]


async def build_state(probe: Probe) -> tuple[str | None, Lanes]:
    """The newest generation's state and its lanes (position, events applied, done)."""
    rows = await probe.fetch(
        """SELECT g.state, c.lane, c.position, c.events_applied, c.done
           FROM rehydrate.generations g
           LEFT JOIN rehydrate.lane_checkpoints c USING (projection, generation)
           WHERE g.projection = $1
             AND g.generation = (SELECT max(generation) FROM rehydrate.generations WHERE projection = $1)""",
        PROJECTION.name,
    )
    if not rows:
        return None, {}
    return rows[0]["state"], {r["lane"]: (r["position"], r["events_applied"], r["done"]) for r in rows}


async def mid_build(probe: Probe, *, minimum: int = 1) -> bool:
    """Building, with some events applied and at least `minimum` lanes unfinished."""
    state, lanes = await build_state(probe)
    return (
        state == "building"
        and any(applied for _, applied, _ in lanes.values())
        and sum(1 for *_, done in lanes.values() if not done) >= minimum
    )


async def until(condition: Callable[[], Awaitable[bool]], within: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval)


async def recovered(probe: Probe, before: Lanes, fault_at: float, *, until_active: bool = False) -> float:
    """Seconds from the fault until every lane unfinished at the fault committed a chunk again, or the build
    ended (with `until_active`: until the newest generation is active)."""

    async def moved() -> bool:
        state, lanes = await build_state(probe)
        if until_active:
            return state == "active"
        if state is not None and state != "building":
            return True
        return bool(lanes) and all(lanes.get(lane) != was for lane, was in before.items() if not was[2])

    await until(moved, RECOVERY_LIMIT, "the replay to recover", interval=0.02)
    return time.monotonic() - fault_at


def watch_recovery(url: str, before: Lanes, fault_at: float, figures: Figures) -> asyncio.Task[None]:
    """Measure the fault's recovery in the background (with a connection of its own), so that the next fault
    may come before this one has recovered."""

    async def watch() -> None:
        probe = Probe(url)
        try:
            figures.recoveries.append(await recovered(probe, before, fault_at))
        finally:
            await probe.close()

    return asyncio.create_task(watch())


# -- processes ----------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def workers(
    settings: Settings, logs: Path, count: int, env: dict[str, str] = WORKER_ENV
) -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    """`count` worker processes with `env` (the list may be changed: every process in it is killed at the end)."""
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    running = [start_worker(settings, logs / f"worker-{n}.log", env) for n in range(count)]
    try:
        yield running
    finally:
        for worker in running:
            if worker.poll() is None:
                worker.kill()
            await asyncio.to_thread(worker.wait)
        for log in await asyncio.to_thread(lambda: sorted(logs.glob("*.log"))):
            print(f"--- {log.name} ---\n{log_tail(log, 15)}")  # shown by pytest when the test fails


async def replay(client: Client, settings: Settings) -> WorkflowHandle[ReplayWorkflow, ReplayResult]:
    return await start_replay(client, settings, ReplayInput(PROJECTION.name, **REPLAY))  # type: ignore[arg-type]


async def activity_retries(client: Client, workflow_id: str, activity_type: str) -> int:
    """Attempts after the first of `activity_type`, over every run of the workflow."""
    handle = client.get_workflow_handle(workflow_id)
    run_id: str | None = (await handle.describe()).raw_description.workflow_execution_info.first_run_id or None
    retried = 0
    while run_id:
        events = (await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()).events
        names: dict[int, str] = {}
        run_id = None
        for event in events:
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                names[event.event_id] = event.activity_task_scheduled_event_attributes.activity_type.name
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                started = event.activity_task_started_event_attributes
                if names.get(started.scheduled_event_id) == activity_type and started.attempt > 1:
                    retried += started.attempt - 1
            elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
                run_id = event.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    return retried


# -- 1. worker processes killed -----------------------------------------------------------------------------


async def test_worker_sigkill_five_times_in_one_replay(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path, figures: Figures
) -> None:
    """Three workers; five times, at a random moment while chunk transactions are open, one of them (at random)
    is SIGKILLed and a new one started in its place."""
    await load_history(store)
    rng = random.Random(5)
    probe = Probe(str(settings.database_url))
    watching: list[asyncio.Task[None]] = []
    try:
        async with workers(settings, tmp_path / "logs", 3) as running:
            handle = await replay(client, settings)
            for kill in range(5):
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                await until(lambda: mid_build(probe), 60, f"kill {kill + 1}: a build in the middle")
                await until(lambda: chunk_transactions_open(store.pool), 10, "an open chunk transaction", 0.005)
                _, before = await build_state(probe)
                victim = rng.choice([w for w in running if w.poll() is None])
                victim.send_signal(signal.SIGKILL)
                fault_at = time.monotonic()
                figures.faults_injected += 1
                watching.append(watch_recovery(probe.url, before, fault_at, figures))
                running.append(start_worker(settings, tmp_path / "logs" / f"worker-{len(running)}.log", WORKER_ENV))
                assert await asyncio.to_thread(victim.wait, 10) == -signal.SIGKILL
            result = await asyncio.wait_for(wait_for_replay(handle), 120)
            await asyncio.gather(*watching)
            await check(store.pool, figures, result.generation)
            assert await activity_retries(client, handle.id, "rehydrate.apply_chunk") >= 1
    finally:
        await probe.close()
    assert figures.faults_injected == 5
    assert_exact(figures)


# -- 2. Postgres restarted ----------------------------------------------------------------------------------


async def waiting_on_view(probe: Probe) -> int | None:
    """The backend of a swap that is inside its transaction, waiting for the read model's view (a reader holds
    it): it has taken the tail lock and the generation's row, applied the last delta, and not committed."""
    rows = await probe.fetch(
        """SELECT l.pid FROM pg_locks l
           WHERE NOT l.granted AND l.relation = 'public.account'::regclass AND l.mode = 'AccessExclusiveLock'"""
    )
    return rows[0]["pid"] if rows else None


async def test_postgres_restart_fast_and_immediate_mid_chunk_and_mid_swap(
    client: Client,
    temporal_address: str,
    private_postgres: PrivatePostgres,
    tmp_path: Path,
    figures: Figures,
) -> None:
    """Replay 1: a fast and an immediate restart, each while chunk transactions are open. Replay 2 (a rebuild,
    so that the swap has a live view to replace): a reader holds the view so that the swap waits for it inside
    its transaction; a fast restart then, and, when the retried swap waits again, an immediate restart."""
    settings = Settings(
        database_url=private_postgres.url,
        temporal_address=temporal_address,
        temporal_task_queue=f"rehydrate-faults-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path / "data",
        tails=False,
    )
    pool = await create_pool(private_postgres.url, max_size=4)
    async with pool.acquire() as conn:
        await ensure_schema(conn, "rehydrate")
    await load_history(EventStore(pool, "rehydrate"))
    await pool.close()  # the test's own pool would not survive the restarts: it uses probes
    probe = Probe(private_postgres.url)
    try:
        async with workers(settings, tmp_path / "logs", 2, SHORT_BUILD_ENV):
            # Replay 1: restarts mid-chunk.
            handle = await replay(client, settings)
            for mode in ("fast", "immediate"):
                await until(lambda: mid_build(probe, minimum=2), 60, f"a build in the middle ({mode})")
                await until(lambda: chunk_transactions_in(probe), 10, "an open chunk transaction", 0.005)
                _, before = await build_state(probe)
                fault_at = time.monotonic()
                await private_postgres.restart(mode)
                figures.faults_injected += 1
                figures.recoveries.append(await recovered(probe, before, fault_at))
            first = await asyncio.wait_for(wait_for_replay(handle), 120)

            # Replay 2: restarts mid-swap.
            handle = await replay(client, settings)
            reader = await hold_view(private_postgres.url, since=None)
            await until(lambda: swap_waiting(probe), 120, "the swap to wait for the view (fast)", 0.005)
            fault_at = time.monotonic()
            restarted_at = datetime.now(UTC)
            restart = asyncio.create_task(private_postgres.restart("fast"))
            figures.faults_injected += 1
            # A reader again as soon as the new server lets one in, before the swap's retry (a second later).
            reader = await hold_view(private_postgres.url, since=restarted_at)
            await restart
            swap_retries = 0
            waits = await swap_waits_or_replay_ends(probe, handle, 60)
            figures.recoveries.append(time.monotonic() - fault_at)  # back inside its transaction, or swapped
            if not waits:
                # The retry reached the view in the few milliseconds between the server letting connections in
                # and the reader's SELECT, and swapped: replay 2 recovered. Replay 3's swap waits for the reader.
                swap_retries += await activity_retries(client, handle.id, "rehydrate.swap")
                handle = await replay(client, settings)
                await until(lambda: swap_waiting(probe), 120, "the swap to wait for the view (immediate)", 0.005)
            fault_at = time.monotonic()
            await private_postgres.restart("immediate")
            figures.faults_injected += 1
            figures.recoveries.append(await recovered(probe, {}, fault_at, until_active=True))
            with contextlib.suppress(Exception):
                await reader.close()
            second = await asyncio.wait_for(wait_for_replay(handle), 60)
            swap_retries += await activity_retries(client, handle.id, "rehydrate.swap")
    finally:
        await probe.close()
        # A replay left running on the session's Temporal server would refuse every later test's replay.
        with contextlib.suppress(RPCError):
            await client.get_workflow_handle(
                replay_workflow_id(PROJECTION.name, None, settings.temporal_task_queue)
            ).terminate("the test ended")

    pool = await create_pool(private_postgres.url, max_size=2)
    try:
        await check(pool, figures, first.generation)
        await check(pool, figures, second.generation)
        active = await pool.fetchval("SELECT active_generation FROM rehydrate.projections WHERE name = $1", "accounts")
    finally:
        await pool.close()
    assert first.generation == 1 and second.generation in (2, 3) and second.generation == active
    assert swap_retries >= 2, "each restart failed an attempt of the swap"
    assert figures.faults_injected == 4
    assert_exact(figures)


async def chunk_transactions_in(probe: Probe) -> bool:
    rows = await probe.fetch(
        """SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
           WHERE c.relname = 'lane_checkpoints' AND l.mode = 'RowShareLock' AND l.granted
             AND l.pid <> pg_backend_pid()"""
    )
    return bool(rows)


async def hold_view(url: str, *, since: datetime | None) -> asyncpg.Connection:
    """A reader inside a transaction that has read the read model's view (it holds the view until it ends): on
    the server started after `since`, connecting as soon as that server lets it in."""
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "the restarted server never let a reader in"
        conn: asyncpg.Connection | None = None
        # A server that is shutting down can also leave a fresh connection mid-operation (InternalClientError).
        errors = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
        with contextlib.suppress(*errors):
            conn = await asyncpg.connect(url, timeout=2)
            if since is None or await conn.fetchval("SELECT pg_postmaster_start_time()") > since:
                await conn.execute("BEGIN")
                await conn.fetchval("SELECT count(*) FROM public.account")
                return conn
        if conn is not None:
            conn.terminate()
        await asyncio.sleep(0.005)


async def swap_waiting(probe: Probe) -> bool:
    return await waiting_on_view(probe) is not None


async def swap_waits_or_replay_ends(probe: Probe, handle: WorkflowHandle[Any, Any], within: float) -> bool:
    """True when the replay's swap waits for the view; False when the replay ended first."""
    ended = asyncio.ensure_future(wait_for_replay(handle))
    try:
        deadline = time.monotonic() + within
        while not await swap_waiting(probe):
            if ended.done():
                ended.result()  # a failed replay fails the test here
                return False
            assert time.monotonic() < deadline, "timed out waiting for the retried swap to wait for the view"
            await asyncio.sleep(0.005)
        return True
    finally:
        ended.cancel()


# -- 3. Temporal restarted ----------------------------------------------------------------------------------


async def test_temporal_dev_server_stopped_and_restarted_mid_replay(
    database_url: str, store: EventStore, tmp_path: Path, figures: Figures
) -> None:
    """A dev server with its state in a file, stopped (SIGTERM) twice mid-build for a second and started
    again on the same port from the same file; the workers reconnect and the replay finishes exactly."""
    await load_history(store)
    settings = Settings(
        database_url=database_url,
        temporal_address=f"127.0.0.1:{free_port()}",
        temporal_task_queue="rehydrate-faults",
        data_dir=tmp_path / "temporal",
        tails=False,
    )
    server: DevServer = await asyncio.to_thread(start_temporal, settings, log_path=tmp_path / "temporal.log")
    assert server.process is not None, "a Temporal server of someone else answered on our port"
    args = [str(arg) for arg in server.process.args]  # type: ignore[union-attr]
    assert DEV_SERVER_TUNING in itertools.pairwise(args), "the dev server runs without its dispatch tuning"
    probe = Probe(database_url)
    try:
        client = await Client.connect(settings.temporal_address)
        async with workers(settings, tmp_path / "logs", 2, SHORT_BUILD_ENV):
            handle = await replay(client, settings)
            for stop in range(2):
                await until(lambda: mid_build(probe, minimum=2), 60, f"a build in the middle (stop {stop + 1})")
                _, before = await build_state(probe)
                fault_at = time.monotonic()
                await asyncio.to_thread(server.stop)
                figures.faults_injected += 1
                await asyncio.sleep(TEMPORAL_DOWN_SECONDS)
                server = await asyncio.to_thread(start_temporal, settings, log_path=tmp_path / "temporal.log")
                assert server.process is not None, "a Temporal server of someone else answered on our port"
                figures.recoveries.append(await recovered(probe, before, fault_at))
            result = await asyncio.wait_for(wait_for_replay(handle), 120)
        await check(store.pool, figures, result.generation)
    finally:
        await probe.close()
        await asyncio.to_thread(server.stop)
    assert figures.faults_injected == 2
    assert_exact(figures)


# -- 4. a connection cut mid-transaction ----------------------------------------------------------------------


async def test_backend_terminated_inside_chunk_transactions(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path, figures: Figures
) -> None:
    """Five times, `pg_terminate_backend` on a worker's session that is inside a chunk's transaction (it holds a
    lane checkpoint's row lock), active or idle in transaction. A cut counts when the transaction it ended rolled
    back: a session ends some time after it is told to, and a COMMIT may complete meanwhile, letting the chunk
    succeed with no retry to count; such a cut is not counted, and another one is made."""
    await load_history(store)
    probe = Probe(str(settings.database_url))
    victims: list[str] = []
    missed = 0
    watching: list[asyncio.Task[None]] = []
    try:
        async with workers(settings, tmp_path / "logs", 2, SHORT_BUILD_ENV):
            handle = await replay(client, settings)
            while figures.faults_injected < 5:
                await asyncio.sleep(0.3)
                cut = figures.faults_injected + 1
                await until(lambda: mid_build(probe), 60, f"cut {cut}: a build in the middle")

                async def in_chunk() -> bool:
                    nonlocal missed
                    _, before = await build_state(probe)
                    fault_at = time.monotonic()
                    # The choice and the cut in one statement: the session is as seen when it is told to end.
                    rows = await probe.fetch(
                        """SELECT a.state, a.backend_xid::text AS xid, pg_terminate_backend(a.pid) AS told
                           FROM pg_stat_activity a
                           WHERE a.pid = (
                               SELECT a.pid FROM pg_stat_activity a
                               JOIN pg_locks l ON l.pid = a.pid JOIN pg_class c ON c.oid = l.relation
                               WHERE c.relname = 'lane_checkpoints' AND l.mode = 'RowShareLock' AND l.granted
                                 AND a.state IN ('active', 'idle in transaction') AND a.backend_xid IS NOT NULL
                                 AND a.pid <> pg_backend_pid() AND NOT (a.state = 'active' AND a.query ILIKE 'commit%')
                               LIMIT 1)"""
                    )
                    if not rows or not rows[0]["told"]:
                        return False
                    if not await rolled_back(store.pool, [rows[0]["xid"]]):
                        missed += 1
                        return False
                    victims.append(rows[0]["state"])
                    figures.faults_injected += 1
                    watching.append(watch_recovery(probe.url, before, fault_at, figures))
                    return True

                await until(in_chunk, 10, f"a chunk transaction to cut ({cut})", 0.005)
            result = await asyncio.wait_for(wait_for_replay(handle), 120)
            await asyncio.gather(*watching)
        await check(store.pool, figures, result.generation)
        assert await activity_retries(client, handle.id, "rehydrate.apply_chunk") >= figures.faults_injected
    finally:
        await probe.close()
    print(f"terminated backends in state: {victims}; cuts that met a committing chunk (not counted): {missed}")
    assert figures.faults_injected == 5
    assert_exact(figures)


# -- 5. writers with out-of-order commits -----------------------------------------------------------------------


async def test_out_of_order_commits_throughout_a_replay_swap_and_tail(
    client: Client, settings: Settings, store: EventStore, database_url: str, tmp_path: Path, figures: Figures
) -> None:
    """Writers append throughout the replay; half of their transactions take their id early and commit late,
    after others appended and committed with later ids. After the swap, the tail takes over; once the writers
    stop and the tail caught up, the read model equals the fold of every event in the store."""
    await load_history(store)
    stop = asyncio.Event()
    written = {"plain": 0, "late": 0}
    last_stream = ["acct-0"]  # the stream a plain writer appended to last
    extra = iter(domain.random_history(9090, streams=STREAMS, events=200_000))

    async def writer(seed: int, *, late: bool) -> None:
        rng = random.Random(seed)
        conn = await asyncpg.connect(database_url)
        try:
            while not stop.is_set():
                stream, event = next(extra)
                with contextlib.suppress(ConcurrencyError):  # another writer took that version: skip the event
                    await append(conn, stream, event, late=late, rng=rng)
                    written["late" if late else "plain"] += 1
                await asyncio.sleep(0.002)
        finally:
            await conn.close()

    async def append(conn: asyncpg.Connection, stream: str, event: NewEvent, *, late: bool, rng: random.Random) -> None:
        async with conn.transaction():
            if late:
                await conn.fetchval("SELECT pg_current_xact_id()")  # the id, taken now
                await asyncio.sleep(rng.uniform(0.02, 0.2))  # others commit with later ids meanwhile
                stream = last_stream[0]  # a version after theirs, from an earlier transaction id
            await store.append(stream, [event], connection=conn)
            if late:
                await asyncio.sleep(rng.uniform(0, 0.05))
            else:
                last_stream[0] = stream

    async with workers(settings, tmp_path / "logs", 2, SHORT_BUILD_ENV):
        tasks = [asyncio.create_task(writer(seed, late=seed % 2 == 1)) for seed in range(4)]
        try:
            await asyncio.sleep(0.5)
            handle = await replay(client, settings)
            result = await asyncio.wait_for(wait_for_replay(handle), 120)
            await client.start_workflow(
                TailWorkflow.run,
                TailInput(PROJECTION.name, batch_size=2_000, poll_seconds=0.2),
                id=tail_workflow_id(PROJECTION.name, settings.temporal_task_queue),
                task_queue=settings.temporal_task_queue,
            )
            await asyncio.sleep(1.0)  # the writers go on while the tail runs
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            late_pairs = await store.pool.fetchval(
                """SELECT count(*) FROM rehydrate.events a JOIN rehydrate.events b
                     ON b.stream_id = a.stream_id AND b.stream_version = a.stream_version + 1
                   WHERE b.tx_id < a.tx_id"""
            )
            figures.faults_injected = written["late"]

            async def caught_up() -> bool:
                applied = await store.pool.fetchval(
                    "SELECT events_applied FROM rehydrate.generations WHERE projection = $1 AND generation = $2",
                    PROJECTION.name,
                    result.generation,
                )
                handled = await store.pool.fetchval(
                    "SELECT count(*) FROM rehydrate.events WHERE event_type = ANY($1::text[])",
                    list(PROJECTION.handlers),
                )
                return bool(applied >= handled)

            began = time.monotonic()
            await until(caught_up, 30, "the tail to catch up", 0.1)
            figures.recoveries.append(time.monotonic() - began)
            await check(store.pool, figures, result.generation)
        finally:
            with contextlib.suppress(RPCError):
                await client.get_workflow_handle(
                    tail_workflow_id(PROJECTION.name, settings.temporal_task_queue)
                ).terminate("test finished")
    print(f"written during the test: {written}; {late_pairs} stream versions committed by an earlier transaction id")
    assert written["late"] > 20 and written["plain"] > 100, written
    assert late_pairs > 0, "some stream got a version from an earlier transaction id than the version before it"
    assert result.caught_up > 0, "the replay's catch-up and swap applied events appended during the build"
    assert_exact(figures)
