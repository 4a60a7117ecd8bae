"""Workers of two releases on one task queue (every rolling deploy), and workers that lack a projection.

Release A is `tests.helpers.slow_domain`, release B `tests.helpers.release_b`: the same projection `accounts` with one
handler changed. A generation built by both would match neither release's oracle; each test checks that the
generation equals one release's oracle, built with that release's fingerprint.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError

from rehydrate import EventStore
from rehydrate.core.settings import Settings
from rehydrate.deployment import current_build
from rehydrate.engine.projections import Registry
from rehydrate.models import ReplayInput, ReplayResult
from rehydrate.models.names import WRONG_WORKER
from rehydrate.starter import signal_replay, start_replay, wait_for_replay
from rehydrate.worker import running_worker
from rehydrate.workflows import ReplayWorkflow
from tests.helpers import domain, release_b, slow_domain
from tests.helpers.workers import log_tail, start_worker

RELEASE_B = {"REHYDRATE_PROJECTIONS": "tests.helpers.release_b"}
SLOWER = {"REHYDRATE_TEST_EVENT_COST": "0.002"}  # 2 ms an event: a replay of 3,000 lasts seconds, not a blink


async def load(store: EventStore, seed: int) -> None:
    await domain.import_all(store, domain.random_history(seed, streams=40, events=3000))


async def wrong_worker_failures(client: Client, handle: WorkflowHandle[Any, Any]) -> list[str]:
    """The messages of the activity attempts that reached a worker that must not run them."""
    history = await client.get_workflow_handle(handle.id, run_id=handle.result_run_id).fetch_history()
    return [
        event.activity_task_failed_event_attributes.failure.message
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED
        and event.activity_task_failed_event_attributes.failure.application_failure_info.type == WRONG_WORKER
    ]


async def until(check: Callable[[], Awaitable[Any]], what: str, seconds: float = 60.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + seconds
    while not (found := await check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(every)
    return found


async def applied(store: EventStore) -> int:
    """Events the lanes of the building generation have committed (asked of Postgres: no worker needed)."""
    return int(await store.pool.fetchval("SELECT coalesce(sum(events_applied), 0) FROM rehydrate.lane_checkpoints"))


async def current(client: Client, deployment: str) -> str | None:
    """The deployment's current build, asked at most once a second (the server rate-limits calls per deployment)."""
    try:
        return await current_build(client, deployment)
    except RPCError:
        return None


async def end(handle: WorkflowHandle[Any, Any] | None) -> None:
    """Terminate a run a failed test left going, so the next test's replay of the same projection can start."""
    if handle is None:
        return
    with contextlib.suppress(RPCError):
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("the test ended")


async def generation_of(store: EventStore, result: ReplayResult) -> tuple[str, str]:
    row = await store.pool.fetchrow(
        "SELECT state, fingerprint FROM rehydrate.generations WHERE projection = $1 AND generation = $2",
        result.projection,
        result.generation,
    )
    return row["state"], row["fingerprint"]


async def stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    await asyncio.to_thread(worker.wait)


async def test_a_chunk_on_a_worker_of_another_release_is_refused_and_the_generation_stays_one_release(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    """Unversioned workers (no deployment): the chunk's fingerprint check is what keeps the generation whole."""
    await load(store, 3)
    events = await domain.all_events(store)
    logs = {name: tmp_path / f"worker-{name}.log" for name in ("A", "B", "A2")}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    handle = None
    try:
        workers["A"] = start_worker(settings, logs["A"], SLOWER)
        handle = await start_replay(client, settings, ReplayInput("accounts", lanes=2, chunk_size=60, max_parallel=2))

        async def building() -> bool:
            return (await handle.query(ReplayWorkflow.progress)).events_applied > 0

        await until(building, "release A to apply some chunks")
        await signal_replay(client, "accounts", "pause", task_queue=settings.temporal_task_queue)
        await stop(workers["A"])  # it finishes its running chunks, then exits
        before = await applied(store)

        workers["B"] = start_worker(settings, logs["B"], {**SLOWER, **RELEASE_B})
        await signal_replay(client, "accounts", "resume", task_queue=settings.temporal_task_queue)
        refused = await until(lambda: wrong_worker_failures(client, handle), "release B to refuse a chunk")
        assert "is not the code generation 1 is built with" in refused[0], refused
        assert f"fingerprint {release_b.accounts.fingerprint}" in refused[0], refused
        await asyncio.sleep(2)  # B keeps being offered the chunks, and keeps refusing them
        assert await applied(store) == before
        assert workers["B"].poll() is None, log_tail(logs["B"])

        workers["A2"] = start_worker(settings, logs["A2"])  # release A is back: it finishes the generation
        result = await asyncio.wait_for(wait_for_replay(handle), 120)
    finally:
        await end(handle)
        for worker in workers.values():
            await stop(worker)
        for name, log in logs.items():
            print(f"--- worker {name} ---\n{log_tail(log)}")

    assert await generation_of(store, result) == ("active", slow_domain.accounts.fingerprint)
    assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, events)


async def test_a_worker_without_the_projection_hands_its_work_to_one_that_has_it(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(8, events=400))
    events = await domain.all_events(store)
    handle = None
    try:
        async with running_worker(settings, Registry([domain.group_totals]), client=client):
            handle = await start_replay(client, settings, ReplayInput("accounts"))
            refused = await until(lambda: wrong_worker_failures(client, handle), "the worker to refuse the plan")
            assert "unknown projection 'accounts' (registered: group_totals)" in refused[0], refused
            # A worker with the projection joins (its own client: one client runs one worker per task queue).
            async with running_worker(settings, domain.registry()):
                result = await asyncio.wait_for(wait_for_replay(handle), 120)
    finally:
        await end(handle)
    assert await generation_of(store, result) == ("active", domain.accounts.fingerprint)
    assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, events)


async def test_with_worker_versioning_a_running_replay_finishes_on_its_release_and_the_next_runs_on_the_new_one(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    await load(store, 4)
    events = await domain.all_events(store)
    deployment = {"REHYDRATE_WORKER_DEPLOYMENT": f"rehydrate-test-{uuid.uuid4().hex[:8]}"}
    name = deployment["REHYDRATE_WORKER_DEPLOYMENT"]
    logs = {name: tmp_path / f"worker-{name}.log" for name in ("A", "B")}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    first = second = None
    try:
        workers["A"] = start_worker(settings, logs["A"], {**SLOWER, **deployment})
        build_a = await until(lambda: current(client, name), "release A to become current", every=1.0)
        first = await start_replay(client, settings, ReplayInput("accounts", lanes=2, chunk_size=20, max_parallel=1))

        async def building() -> bool:
            return (await first.query(ReplayWorkflow.progress)).events_applied > 0

        await until(building, "the first replay to apply chunks on release A")
        # The rolling deploy: release B starts and makes itself current while the first replay is building. Only
        # release A needs to be slow (the first replay must outlast the deploy); B builds the second at its own pace.
        workers["B"] = start_worker(settings, logs["B"], {**deployment, **RELEASE_B})

        async def b_current() -> str | None:
            build = await current(client, name)
            return build if build != build_a else None

        build_b = await until(b_current, "release B to become current", every=1.0)
        assert (await first.query(ReplayWorkflow.progress)).phase == "building", "the deploy came too late to test"
        result = await asyncio.wait_for(wait_for_replay(first), 120)
        # Pinned to release A: no task of it ever reached B, so none was refused.
        assert await wrong_worker_failures(client, first) == []
        assert await generation_of(store, result) == ("active", slow_domain.accounts.fingerprint)
        assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, events)

        second = await start_replay(client, settings, ReplayInput("accounts", lanes=2, chunk_size=200))
        rebuilt = await asyncio.wait_for(wait_for_replay(second), 120)
        assert await generation_of(store, rebuilt) == ("active", release_b.accounts.fingerprint)
        assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(release_b.accounts, events)
        assert build_a != build_b and await current_build(client, name) == build_b
    finally:
        await end(first)
        await end(second)
        for worker in workers.values():
            await stop(worker)
        for worker_name, log in logs.items():
            print(f"--- worker {worker_name} ---\n{log_tail(log)}")
