"""The fault suite, continued: a silent network partition between one worker and Postgres, mid-chunk and mid-swap.

Worker A reaches Postgres through a proxy (tests/helpers/proxy.py) that is told to stop forwarding without closing
anything: no FIN, no RST, the bytes are held, so only timeouts notice. The test's own checks connect directly. What
must hold while A is cut off:

- mid-chunk: A's chunk attempt is given up (Temporal times it out when its heartbeats stop, and A drops the dead
  connection instead of waiting on it), Postgres ends A's session (idle in its transaction) so that the lane's row
  lock no longer blocks the retry, and worker B builds the lane;
- mid-swap: A's session holds the read model's view lock when the partition comes; readers of the view wait no
  longer than the swap's idle bound (generations.SWAP_IDLE_TIMEOUT_MS) before Postgres ends that session, and the
  replay still finishes, another attempt swapping.

Each replay's read model equals the oracle row for row, with each handled event applied once, and afterwards A runs
on with no session of it in a transaction and no lane locked. The workers end a transaction left idle for 3 s
(REHYDRATE_DB_IDLE_IN_TRANSACTION_TIMEOUT; 60 s by default) so that the test is short, as they time a chunk out
after 2 s without a heartbeat (8 s by default): a chunk here folds in 0.1-0.6 s. Figures go to
bench/fault_report.py through the `figures` fixture (tests/faults/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import asyncpg
import pytest
from temporalio.client import Client

from rehydrate import EventStore
from rehydrate.core.settings import Settings
from rehydrate.engine.generations import SWAP_IDLE_TIMEOUT_MS
from rehydrate.starter import wait_for_replay
from tests.faults.test_faults import (
    PROJECTION,
    STREAMS,
    WORKER_ENV,
    Probe,
    assert_exact,
    build_state,
    check,
    hold_view,
    mid_build,
    replay,
    swap_waiting,
    until,
)
from tests.helpers import domain
from tests.helpers.faults import Figures
from tests.helpers.proxy import Proxy
from tests.helpers.workers import chunk_transactions_open, lanes_locked_by, log_tail, rolled_back, start_worker

pytestmark = pytest.mark.slow

# The history replayed (the `figures` fixture reports it): a build of a few seconds here.
FAULT_EVENTS = 40_000
# Worker A's sessions, as pg_stat_activity names them.
PARTITIONED = "rehydrate-partitioned-worker"
IDLE_IN_TRANSACTION_SECONDS = 3
TIMEOUTS_ENV = {"REHYDRATE_DB_IDLE_IN_TRANSACTION_TIMEOUT": str(IDLE_IN_TRANSACTION_SECONDS)}
# Bound on anything the test waits for; it fails rather than hang.
LIMIT = 60.0


async def load(store: EventStore, seed: int, events: int) -> None:
    await domain.import_all(store, domain.random_history(seed, streams=STREAMS, events=events))


def through(proxy: Proxy, database_url: str) -> str:
    """The database URL of worker A: through the proxy, its sessions named PARTITIONED."""
    url = proxy.url(database_url)
    return f"{url}{'&' if '?' in url else '?'}{urlencode({'application_name': PARTITIONED})}"


@contextlib.asynccontextmanager
async def started(
    settings: Settings, logs: Path, **urls: str | None
) -> AsyncIterator[dict[str, subprocess.Popen[bytes]]]:
    """Worker processes by name, each on its database URL (None: the test's), killed at the end."""
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    running: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, url: str | None) -> None:
        env = {**WORKER_ENV, **TIMEOUTS_ENV, **({"REHYDRATE_DATABASE_URL": url} if url else {})}
        running[name] = start_worker(settings, logs / f"worker-{name}.log", env)

    for name, url in urls.items():
        start(name, url)
    try:
        yield running
    finally:
        for worker in running.values():
            if worker.poll() is None:
                worker.kill()
            await asyncio.to_thread(worker.wait)
        for name in running:
            print(f"--- worker {name} ---\n{log_tail(logs / f'worker-{name}.log', 20)}")


async def partitioned_sessions(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """Worker A's sessions as the server sees them: pid, state, transaction id."""
    return list(
        await pool.fetch(
            "SELECT pid, state, backend_xid::text AS xid FROM pg_stat_activity WHERE application_name = $1",
            PARTITIONED,
        )
    )


async def lane_locks_of_a(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """Worker A's sessions inside a chunk's transaction (they hold a lane checkpoint's row lock)."""
    return list(
        await pool.fetch(
            """SELECT DISTINCT a.pid, a.backend_xid::text AS xid, a.state, a.wait_event, left(a.query, 30) AS query
               FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid JOIN pg_class c ON c.oid = l.relation
               WHERE a.application_name = $1 AND c.relname = 'lane_checkpoints'
                 AND l.mode IN ('RowShareLock', 'RowExclusiveLock') AND l.granted AND a.backend_xid IS NOT NULL""",
            PARTITIONED,
        )
    )


async def test_partition_mid_chunk_another_worker_builds_the_lane(
    client: Client, settings: Settings, store: EventStore, database_url: str, tmp_path: Path, figures: Figures
) -> None:
    """A is cut off while it holds a lane's chunk transaction. The lane must be built by B while A stays cut off:
    Postgres ends A's idle transaction (its row lock goes), Temporal gives A's attempt up, and A drops the dead
    connection. Then the network heals and A runs on."""
    await load(store, 41, FAULT_EVENTS)
    figures.events = FAULT_EVENTS
    proxy = Proxy(database_url).start()
    probe = Probe(database_url)
    pool = store.pool
    missed = 0
    mid_input: list[str] = []

    async def a_in_chunk() -> bool:
        return bool(await lane_locks_of_a(pool))

    try:
        async with started(settings, tmp_path / "logs", A=through(proxy, database_url), B=None) as running:
            handle = await replay(client, settings)
            while True:
                assert missed + len(mid_input) < 20, "A never held a chunk transaction at the partition"
                await until(lambda: mid_build(probe, minimum=2), LIMIT, "a build in the middle")
                await until(a_in_chunk, LIMIT, "A inside a chunk transaction", 0.005)
                _, before = await build_state(probe)
                proxy.partition()
                fault_at = time.monotonic()
                # What A sent before the partition reaches the server and is answered (into the proxy): then A's
                # sessions are idle, and those inside a chunk's transaction hold their lane.
                await asyncio.sleep(0.2)
                held = await lane_locks_of_a(pool)
                if held and not any(row["state"] == "active" and row["wait_event"] == "ClientRead" for row in held):
                    break
                # A's chunk committed just before the cut (none is held), or a session was cut in the middle of a
                # statement's input (a COPY's rows), where no timeout of the server applies: over a real network
                # the TCP keepalives end it, but the proxy's own TCP stack answers them (see docs/reliability.md).
                if held:
                    mid_input += [row["query"] for row in held if row["state"] == "active"]
                else:
                    missed += 1
                proxy.heal()
            figures.faults_injected += 1
            xids = [row["xid"] for row in held]
            lanes = {lane for _, lane in await lanes_locked_by(pool, xids)}
            assert lanes, "the held transactions lock lanes"
            pids = {row["pid"] for row in held}

            async def ended() -> bool:
                return not pids & {row["pid"] for row in await partitioned_sessions(pool)}

            await until(ended, LIMIT, "Postgres to end A's sessions that held lanes", 0.05)
            given_up = time.monotonic() - fault_at
            assert await rolled_back(pool, xids), "a transaction of A committed after the partition"

            async def lanes_moved() -> bool:
                state, now = await build_state(probe)
                return state != "building" or all(now.get(lane) != before[lane] for lane in lanes)

            await until(lanes_moved, LIMIT, "B to commit the lanes A held", 0.05)
            figures.recoveries.append(time.monotonic() - fault_at)

            async def dropped() -> bool:
                return proxy.closed_while_partitioned > 0

            # A's side: the attempt was cancelled (its heartbeats stopped) and the connection closed, not waited on.
            await until(dropped, LIMIT, "A to drop its connection to the unreachable server", 0.05)
            dropped_at = time.monotonic() - fault_at
            assert proxy.partitioned, "everything above happened while A was cut off"
            proxy.heal()

            result = await asyncio.wait_for(wait_for_replay(handle), LIMIT)
            await check(pool, figures, result.generation)
            assert running["A"].poll() is None, f"worker A exited:\n{log_tail(tmp_path / 'logs' / 'worker-A.log')}"
            assert await chunk_transactions_open(pool) == 0, "a lane is still locked"
            assert not [row for row in await partitioned_sessions(pool) if row["state"] != "idle"]
    finally:
        await probe.close()
        proxy.close()
    print(
        f"lanes held by A: {sorted(lanes)}; A's sessions ended by the server after {given_up:.2f} s, the lanes "
        f"committed by B after {figures.recoveries[0]:.2f} s, A's dead connection dropped after {dropped_at:.2f} s; "
        f"partitions that met a committing chunk (not counted): {missed}; that met a statement's input (not "
        f"counted): {mid_input}"
    )
    assert_exact(figures)


async def test_partition_mid_swap_readers_wait_a_bounded_time(
    client: Client, settings: Settings, store: EventStore, database_url: str, tmp_path: Path, figures: Figures
) -> None:
    """Replay 1 builds the read model. Replay 2's swap, on A, waits for a reader holding the view; A is cut off
    and the reader lets go, so A's session takes the view's lock and then never hears back. Readers polling the
    view must answer again within the swap's idle bound; after the heal the replay finishes with another attempt
    of the swap."""
    await load(store, 42, FAULT_EVENTS // 2)
    figures.events = FAULT_EVENTS // 2
    proxy = Proxy(database_url).start()
    probe = Probe(database_url)
    pool = store.pool
    latencies: list[float] = []
    stop = asyncio.Event()

    async def read_the_view() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            while not stop.is_set():
                began = time.monotonic()
                await conn.fetchval("SELECT count(*) FROM public.account")
                latencies.append(time.monotonic() - began)
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    async def a_holds_the_view() -> bool:
        rows = await pool.fetch(
            """SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE a.application_name = $1 AND l.relation = 'public.account'::regclass
                 AND l.mode = 'AccessExclusiveLock' AND l.granted""",
            PARTITIONED,
        )
        return bool(rows)

    reading: asyncio.Task[None] | None = None
    missed = 0
    try:
        async with started(settings, tmp_path / "logs", A=through(proxy, database_url)) as running:
            first = await asyncio.wait_for(wait_for_replay(await replay(client, settings)), LIMIT)
            await check(pool, figures, first.generation)
            reader = await hold_view(database_url, since=None)
            handle = await replay(client, settings)
            while True:
                assert missed < 10, "A's swap never took the view's lock at the partition"
                await until(lambda: swap_waiting(probe), LIMIT, "the swap to wait for the view", 0.005)
                proxy.partition()
                fault_at = time.monotonic()
                await reader.execute("COMMIT")  # the swap (on the server) takes the lock; A never hears of it
                with contextlib.suppress(AssertionError):
                    await until(a_holds_the_view, 0.5, "A's session to hold the view's lock", 0.01)
                if await a_holds_the_view():
                    break
                # The swap's lock wait timed out just before the cut (it retries): hold the view again, and let
                # A's next attempt through to wait for it.
                missed += 1
                await reader.execute("BEGIN")
                await reader.fetchval("SELECT count(*) FROM public.account")
                proxy.heal()
            figures.faults_injected += 1
            reading = asyncio.create_task(read_the_view())

            async def released() -> bool:
                return not await a_holds_the_view()

            await until(released, LIMIT, "Postgres to end A's session holding the view", 0.02)
            figures.recoveries.append(time.monotonic() - fault_at)
            count = len(latencies)

            async def answering() -> bool:
                return len(latencies) > count + 5

            await until(answering, LIMIT, "readers to answer again", 0.02)
            stop.set()
            await reading
            assert proxy.partitioned, "the readers were released while A was cut off"
            proxy.heal()

            second = await asyncio.wait_for(wait_for_replay(handle), LIMIT)
            await check(pool, figures, second.generation)
            active = await pool.fetchval(
                "SELECT active_generation FROM rehydrate.projections WHERE name = $1", PROJECTION.name
            )
            assert second.generation == active == first.generation + 1
            assert running["A"].poll() is None, f"worker A exited:\n{log_tail(tmp_path / 'logs' / 'worker-A.log')}"
            assert not [row for row in await partitioned_sessions(pool) if row["state"] != "idle"]
            with contextlib.suppress(Exception):
                await reader.close()
    finally:
        stop.set()
        if reading is not None:
            reading.cancel()  # (a reader still queued behind the view's lock, when the test failed)
            await asyncio.gather(reading, return_exceptions=True)
        await probe.close()
        proxy.close()
    slowest = max(latencies)
    print(
        f"view lock held by cut-off A for {figures.recoveries[0]:.2f} s; {len(latencies)} reads of the view during "
        f"it, the slowest {slowest:.2f} s; swaps that took no lock at the cut (not counted): {missed}"
    )
    assert slowest < SWAP_IDLE_TIMEOUT_MS / 1000 + 3, "a reader waited longer than the swap's idle bound"
    assert_exact(figures)
