"""The fault suite, continued: the Temporal server SIGKILLed at each step of a replay and under its tail, and Postgres
stopped `immediate` while tails apply batches; checked against the oracle row for row.

Both tests run `python -m rehydrate worker` processes with tails on (a swap starts its projection's tail, as in
production) against a Temporal dev server of the test's own, while a writer appends events throughout: the writer is
what gives a catch-up and a tail something to do, and what a lost or doubled event would show in. `accounts.history`
and `group_totals.amount` are order- and count-sensitive, and each generation's `events_applied` must equal the
number of events its projection handles (test_faults.check). Figures go to bench/fault_report.py through the `figures`
fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest
from temporalio.client import Client

from rehydrate import EventStore, NewEvent
from rehydrate.core.database import create_pool, ensure_schema
from rehydrate.core.settings import Settings
from rehydrate.devstack import DevServer, start_temporal
from rehydrate.models import ReplayInput
from rehydrate.models.names import TAIL
from rehydrate.starter import start_replay, wait_for_replay
from tests.faults.test_faults import (
    PROJECTION,
    STREAMS,
    Probe,
    activity_retries,
    assert_exact,
    build_state,
    check,
    mid_build,
    recovered,
    until,
    workers,
)
from tests.faults.test_tail_crash import batch_in_fold
from tests.helpers import domain
from tests.helpers.faults import Figures, PrivatePostgres
from tests.helpers.ports import free_port
from tests.helpers.workers import blocked_by, frozen, rolled_back, start_worker

pytestmark = pytest.mark.slow

T = TypeVar("T")

# The history replayed by the first test (the `figures` fixture reports it). Small: the build's length comes from the
# cost per event.
FAULT_EVENTS = 40_000
# 300 µs per event in the workers (tests/helpers/slow_domain.py) stretches that build to ~6 s here, so that a kill
# lands in its middle with much of it still ahead; a chunk of 500 folds in 0.15 s, well inside its heartbeat timeout.
WORKER_ENV = {
    "REHYDRATE_PROJECTIONS": "tests.helpers.slow_domain",
    "REHYDRATE_TEST_EVENT_COST": "0.0003",
    "REHYDRATE_TAILS": "true",  # a swap starts its projection's tail
}
REPLAY = {"lanes": 4, "chunk_size": 500, "max_parallel": 4, "heartbeat_timeout_seconds": 2.0}
# How long a killed Temporal server stays down before it is started again.
TEMPORAL_DOWN_SECONDS = 1.0
# What the test's own database calls may meet right after Postgres started again.
TRANSIENT = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class Temporal:
    """A Temporal dev server of the test's own, its state in a file under the settings' data_dir (--db-filename),
    SIGKILLed and started again on the same port from the same file."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        self.log = log
        self.server: DevServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.to_thread(start_temporal, self.settings, log_path=self.log)
        assert self.server.process is not None, "a Temporal server of someone else answered on our port"

    async def sigkill(self) -> None:
        """Kill it at once: it flushes nothing and answers nothing more."""
        assert self.server is not None and self.server.process is not None
        self.server.process.kill()
        await asyncio.to_thread(self.server.process.wait)


@contextlib.asynccontextmanager
async def own_temporal(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[Temporal, Settings, Client]]:
    """A Temporal server of the test's own (killed at the end), settings for its workers, and a client."""
    settings = Settings(
        database_url=database_url,
        temporal_address=f"127.0.0.1:{free_port()}",
        temporal_task_queue="rehydrate-faults",
        data_dir=tmp_path / "temporal",
    )
    temporal = Temporal(settings, tmp_path / "temporal.log")
    await temporal.start()
    try:
        yield temporal, settings, await Client.connect(settings.temporal_address)
    finally:
        await temporal.sigkill()


async def load(store: EventStore, seed: int, events: int) -> None:
    await domain.import_all(store, domain.random_history(seed, streams=STREAMS, events=events))


@contextlib.asynccontextmanager
async def writing(store: EventStore, seed: int) -> AsyncIterator[Callable[[], int]]:
    """A writer appending one event a transaction, ~150 a second, until the block ends; yields its count so far.
    Through an outage of the database it waits and goes on (an append whose commit went unanswered may have
    committed: the oracle folds what the store holds, not what the writer meant)."""
    stop = asyncio.Event()
    appended = 0

    async def write(events: list[tuple[str, NewEvent]]) -> None:
        nonlocal appended
        for stream, event in events:
            while not stop.is_set():
                try:
                    await store.append(stream, [event])
                    break
                except TRANSIENT:
                    await asyncio.sleep(0.1)
            if stop.is_set():
                return
            appended += 1
            await asyncio.sleep(0.005)
        raise AssertionError("the writer ran out of events")

    task = asyncio.create_task(write(domain.random_history(seed, streams=STREAMS, events=100_000)))
    try:
        yield lambda: appended
    finally:
        stop.set()
        await task


async def active(pool: asyncpg.Pool, projection: str = PROJECTION.name) -> tuple[int, int, int]:
    """The projection's active generation: (number, checkpoint, events applied); (0, 0, 0) when it has none."""
    row = await pool.fetchrow(
        """SELECT g.generation, g.checkpoint_xmin::text::bigint, g.events_applied
           FROM rehydrate.generations g JOIN rehydrate.projections p
             ON p.name = g.projection AND p.active_generation = g.generation
           WHERE p.name = $1""",
        projection,
    )
    return (0, 0, 0) if row is None else (row[0], row[1], row[2])


async def caught_up(pool: asyncpg.Pool, projection: str = PROJECTION.name) -> bool:
    """Whether the active generation has applied as many events as the store holds of the types it handles."""
    handled = await pool.fetchval(
        "SELECT count(*) FROM rehydrate.events WHERE event_type = ANY($1::text[])",
        list(domain.registry().get(projection).handlers),
    )
    return (await active(pool, projection))[2] >= int(handled)


async def settled(query: Callable[[], Awaitable[T]]) -> T:
    """`query`'s answer, asked again while the database cannot give one (just started again, connections cut)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await query()
        except TRANSIENT:
            assert time.monotonic() < deadline, "the database never answered again"
            await asyncio.sleep(0.1)


async def planned(probe: Probe) -> bool:
    """Whether the newest generation is building (its plan committed: its row and lanes exist)."""
    state, lanes = await build_state(probe)
    return state == "building" and bool(lanes)


async def running_tails(client: Client) -> list[str]:
    """The ids of the tail workflows running on the server."""
    query = f"WorkflowType = '{TAIL}' AND ExecutionStatus = 'Running'"
    return [execution.id async for execution in client.list_workflows(query)]


# -- 1. the Temporal server SIGKILLed ------------------------------------------------------------------------------


async def test_temporal_server_sigkilled_mid_build_catch_up_swap_and_tail(
    database_url: str, store: EventStore, tmp_path: Path, figures: Figures
) -> None:
    """One replay of `accounts` while a writer appends; the dev server SIGKILLed four times, down for a second each,
    and started again on the same port from the same file: mid-build; while the catch-up is inside its transaction;
    while the swap is inside its transaction; and while the tail that the swap started applies the writer's events.
    The catch-up and the swap are each held inside their transaction by a lock of the test's own, let go while the
    server is down: they commit with no server to report to (the swap starts the tail then), and the restarted
    server must take their results or run them again. Afterwards the replay has finished, one tail runs, and once
    the writer stops the tail catches up: the read model equals the oracle over every event in the store."""
    await load(store, 8080, FAULT_EVENTS)
    logs = tmp_path / "logs"
    # Two sessions of the test's own. `catch_up_gate` holds the generation's row FOR KEY SHARE: chunks and indexing
    # go on beside it, the catch-up's FOR UPDATE waits. `swap_gate` holds the projection's tail lock, which the swap
    # takes first and the catch-up never takes.
    async with (
        own_temporal(database_url, tmp_path) as (temporal, settings, client),
        workers(settings, logs, 0) as running,
    ):
        probe = Probe(database_url)
        catch_up_gate = await asyncpg.connect(database_url)
        swap_gate = await asyncpg.connect(database_url)

        async def sigkill_and_restart(while_down: Callable[[], Awaitable[object]] | None = None) -> float:
            """SIGKILL the server, run `while_down`, start it again TEMPORAL_DOWN_SECONDS after the kill; returns
            when it was killed."""
            await temporal.sigkill()
            killed_at = time.monotonic()
            figures.faults_injected += 1
            if while_down is not None:
                await while_down()
            await asyncio.sleep(max(0.0, killed_at + TEMPORAL_DOWN_SECONDS - time.monotonic()))
            await temporal.start()
            return killed_at

        try:
            running += [start_worker(settings, logs / f"worker-{n}.log", WORKER_ENV) for n in range(2)]
            async with writing(store, 9090) as appended:
                handle = await start_replay(client, settings, ReplayInput(PROJECTION.name, **REPLAY))  # type: ignore[arg-type]
                await until(lambda: planned(probe), 60, "the replay's plan")
                generation = await store.pool.fetchval(
                    "SELECT max(generation) FROM rehydrate.generations WHERE projection = $1", PROJECTION.name
                )
                await catch_up_gate.execute("BEGIN")
                await catch_up_gate.execute(
                    "SELECT 1 FROM rehydrate.generations WHERE projection = $1 AND generation = $2 FOR KEY SHARE",
                    PROJECTION.name,
                    generation,
                )
                await swap_gate.execute("BEGIN")
                await swap_gate.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended('rehydrate.tail:' || $1, 0))", PROJECTION.name
                )

                # 1. Mid-build: the chunks in flight commit with no server to report to.
                await until(lambda: mid_build(probe, minimum=2), 60, "a build in the middle")
                _, before = await build_state(probe)
                fault_at = await sigkill_and_restart()
                figures.recoveries.append(await recovered(probe, before, fault_at))

                # 2. Mid-catch-up: recovered once the replay reaches its swap.
                await until(lambda: blocked_by(store.pool, catch_up_gate), 90, "the catch-up to wait inside", 0.02)
                fault_at = await sigkill_and_restart(lambda: catch_up_gate.execute("COMMIT"))
                await until(lambda: blocked_by(store.pool, swap_gate), 60, "the swap to wait inside", 0.02)
                figures.recoveries.append(time.monotonic() - fault_at)

                # 3. Mid-swap: recovered once the replay has ended.
                fault_at = await sigkill_and_restart(lambda: swap_gate.execute("COMMIT"))
                result = await asyncio.wait_for(wait_for_replay(handle), 60)
                figures.recoveries.append(time.monotonic() - fault_at)
                assert result.generation == generation

                # 4. Under the tail, which goes on applying the writer's events through the outage: recovered once
                # it has applied every event committed before the server was back.
                swapped = await active(store.pool)

                async def tail_applied(beyond: int) -> bool:
                    now = await active(store.pool)
                    return now[0] == generation and now[2] > swapped[2] and now[1] > beyond

                await until(lambda: tail_applied(0), 60, "the tail to apply the writer's events", 0.05)
                fault_at = await sigkill_and_restart()
                restarted = await store.pool.fetchval("SELECT max(tx_id)::text::bigint FROM rehydrate.events")
                await until(lambda: tail_applied(restarted), 60, "the tail to go on after the restart", 0.05)
                figures.recoveries.append(time.monotonic() - fault_at)
            written = appended()
            await until(lambda: caught_up(store.pool), 60, "the tail to catch up", 0.1)

            async def one_tail() -> bool:  # (the server lists a workflow a moment after it started)
                return len(await running_tails(client)) == 1

            await until(one_tail, 30, "one tail to run, though the swap started it around a dead server", 0.1)
            # Whether the results of the activities that ended while the server was down reached it, or were retried.
            kinds = ("apply_chunk", "catch_up", "swap")
            retried = {kind: await activity_retries(client, handle.id, f"rehydrate.{kind}") for kind in kinds}
        finally:
            await probe.close()
            for gate in (catch_up_gate, swap_gate):
                await gate.close()
    await check(store.pool, figures, generation)
    print(f"{written} events appended during the test; recoveries {figures.recoveries}; attempts retried {retried}")
    assert figures.faults_injected == 4
    assert_exact(figures)


# -- 2. Postgres stopped `immediate` under the tails ---------------------------------------------------------------

# The history both projections are built from before their tails take over: small, the tails are what is tested.
TAIL_HISTORY = 1_000
# 2 ms per event: with the writer's ~150 events a second, each tail spends a good part of its time folding a batch
# (inside the batch's transaction), where the stop must land.
TAIL_WORKER_ENV = {**WORKER_ENV, "REHYDRATE_TEST_EVENT_COST": "0.002"}
# How long Postgres stays down.
POSTGRES_DOWN_SECONDS = 1.0


def tails_said(logs: Path, what: str, projection: str) -> int:
    """How many lines of the workers' logs say "tail of <projection> <what>"."""
    said = f"tail of {projection} {what}"
    return sum(line.count(said) for log in sorted(logs.glob("*.log")) for line in log.read_text().splitlines())


def errors_logged(logs: Path) -> list[str]:
    """The lines of the workers' logs at level ERROR, and stack traces."""
    return [
        line
        for log in sorted(logs.glob("*.log"))
        for line in log.read_text().splitlines()
        if " ERROR " in line or "Traceback" in line
    ]


async def test_postgres_stopped_immediate_while_tails_apply_batches(
    private_postgres: PrivatePostgres, tmp_path: Path, figures: Figures
) -> None:
    """Both projections built and their tails applying a writer's events; with the workers frozen for a moment so
    that a batch is surely inside its transaction, folding, Postgres is stopped `immediate` (every session cut, no
    checkpoint), stays down 1 s and starts again (crash recovery). The batch rolled back; each tail waits the outage
    out inside its activity (no failed attempt), warns once, and says once when it applies batches again. After the
    writer stops, both read models equal the oracle and each generation counted each handled event once."""
    figures.events = TAIL_HISTORY
    projections = list(domain.registry())
    names = [projection.name for projection in projections]
    pool = await create_pool(private_postgres.url, max_size=4)
    async with pool.acquire() as conn:
        await ensure_schema(conn, "rehydrate")
    store = EventStore(pool, "rehydrate")
    await load(store, 8181, TAIL_HISTORY)
    logs = tmp_path / "logs"
    try:
        async with (
            own_temporal(private_postgres.url, tmp_path) as (_, settings, client),
            workers(settings, logs, 0) as running,
        ):
            running += [start_worker(settings, logs / f"worker-{n}.log", TAIL_WORKER_ENV) for n in range(2)]
            handles = [await start_replay(client, settings, ReplayInput(name, lanes=2)) for name in names]
            built = [(await wait_for_replay(handle)).generation for handle in handles]
            async with writing(store, 9191) as appended:
                swapped = {name: await active(pool, name) for name in names}

                async def tails_beyond(checkpoint: dict[str, int]) -> bool:
                    now = {name: await active(pool, name) for name in names}
                    return all(now[name][2] > swapped[name][2] and now[name][1] > checkpoint[name] for name in names)

                await until(lambda: tails_beyond(dict.fromkeys(names, 0)), 60, "both tails to apply events", 0.05)
                batch: asyncpg.Record | None = None
                deadline = time.monotonic() + 30
                while batch is None:
                    assert time.monotonic() < deadline, "no tail batch was caught folding"
                    async with frozen(running, lambda: batch_in_fold(pool, names)) as batch:
                        if batch is not None:
                            await private_postgres.stop("immediate")
                    await asyncio.sleep(0.02)
                fault_at = time.monotonic()
                figures.faults_injected += 1
                await asyncio.sleep(POSTGRES_DOWN_SECONDS)
                await private_postgres.start()
                restarted = await settled(
                    lambda: pool.fetchval("SELECT max(tx_id)::text::bigint FROM rehydrate.events")
                )
                beyond = dict.fromkeys(names, restarted)
                await until(lambda: settled(lambda: tails_beyond(beyond)), 60, "both tails to apply again", 0.05)
                figures.recoveries.append(time.monotonic() - fault_at)

                # The writer goes on until each tail says it applies batches again (5 s after its last failure).
                async def both_recovered() -> bool:
                    return all(tails_said(logs, "applies batches again", name) for name in names)

                await until(both_recovered, 60, "the tails to say they apply batches again", 0.1)
            written = appended()

            async def both_caught_up() -> bool:
                return all([await caught_up(pool, name) for name in names])

            await until(both_caught_up, 60, "the tails to catch up", 0.1)
            attempts = []
            for tail in await running_tails(client):
                description = await client.get_workflow_handle(tail).describe()
                attempts.append([activity.attempt for activity in description.raw_description.pending_activities])
        assert await rolled_back(pool, [batch["xid"]]), "the batch Postgres was stopped under committed"
        for projection, generation in zip(projections, built, strict=True):
            await check(pool, figures, generation, projection)
        events = await domain.all_events(store)
        members = sum(row["members"] for row in (await domain.read_model(pool, domain.group_totals)).values())
    finally:
        await pool.close()
    print(f"stopped inside a batch of {batch['projection']}; {written} events appended during the test")
    assert members == sum(1 for event in events if event.type == "Opened"), "an Opened applied twice, or never"
    assert attempts == [[1], [1]], "each tail waited the outage out in its first attempt"
    for name in names:
        assert tails_said(logs, "cannot apply batches", name) == 1, f"one warning from the tail of {name}"
        assert tails_said(logs, "applies batches again", name) == 1, f"one recovery line from the tail of {name}"
    assert not errors_logged(logs)
    assert_exact(figures)
