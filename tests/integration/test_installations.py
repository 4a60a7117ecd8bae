"""Two installations of rehydrate in one Temporal namespace, each with its own database and task queue, and a
projection of the same name: their replays, tails and verifies run side by side and never touch the other's."""

from __future__ import annotations

import asyncio
import contextlib

from temporalio.client import Client
from temporalio.service import RPCError

from rehydrate import EventStore
from rehydrate.core.database import create_pool, ensure_schema
from rehydrate.core.settings import Settings
from rehydrate.models import ReplayInput, VerifyInput
from rehydrate.models.names import replay_workflow_id, tail_workflow_id
from rehydrate.runs import replay_runs, started_by
from rehydrate.starter import replay_status, start_replay, start_verify, tail_state, wait_for_replay
from rehydrate.worker import running_worker
from tests.conftest import scratch_database
from tests.helpers import domain
from tests.helpers.waiting import eventually


async def test_two_installations_share_a_namespace_without_taking_each_others_runs(
    client: Client, settings: Settings, store: EventStore, server_url: str
) -> None:
    blue = settings.model_copy(update={"tails": True, "temporal_task_queue": f"{settings.temporal_task_queue}-blue"})
    async with scratch_database(server_url, "rh_green") as green_url:
        green = blue.model_copy(
            update={"database_url": green_url, "temporal_task_queue": f"{settings.temporal_task_queue}-green"}
        )
        green_pool = await create_pool(green_url, max_size=6)
        green_store = EventStore(green_pool, "rehydrate")
        stores = {"blue": (blue, store), "green": (green, green_store)}
        try:
            async with green_pool.acquire() as conn:
                await ensure_schema(conn, "rehydrate")
            await domain.append_all(store, domain.random_history(71, events=400))
            await domain.append_all(green_store, domain.random_history(72, events=300))

            async def matches(name: str) -> bool:
                _, own = stores[name]
                expected = domain.oracle(domain.accounts, await domain.all_events(own))
                return await domain.read_model(own.pool, domain.accounts) == expected

            async with (
                running_worker(blue, domain.registry(), client=client),
                running_worker(green, domain.registry(), client=client),
            ):
                # Started together: neither is refused as "already running" by the other's replay.
                handles = await asyncio.gather(
                    *(start_replay(client, s, ReplayInput("accounts", chunk_size=40)) for s, _ in stores.values())
                )
                assert {h.id for h in handles} == {
                    replay_workflow_id("accounts", None, blue.temporal_task_queue),
                    replay_workflow_id("accounts", None, green.temporal_task_queue),
                }
                results = await asyncio.gather(*(wait_for_replay(h) for h in handles))
                assert [r.generation for r in results] == [1, 1]
                for name in stores:
                    assert await matches(name), f"{name}'s read model is not the fold of its own events"

                # Each swap started its own tail; neither replaced the other's.
                for name, (s, own) in stores.items():
                    await eventually(lambda s=s: _running(client, s))
                    await domain.append_all(own, domain.random_history(73 if name == "blue" else 74, events=100))
                for name, (s, _) in stores.items():
                    await eventually(lambda name=name: matches(name))
                    assert await _running(client, s), f"{name}'s tail was stopped by the other installation"

                # A verify in each at once: each rebuilds its own sandbox from its own database.
                verifies = await asyncio.gather(
                    *(start_verify(client, s, VerifyInput("accounts", lanes=2)) for s, _ in stores.values())
                )
                outcomes = await asyncio.gather(*(v.result() for v in verifies))
                assert [(o.differing, o.skipped, o.live_generation) for o in outcomes] == [(0, None, 1)] * 2

                # Each installation's commands see its own runs only.
                for s, _ in stores.values():
                    status = await replay_status(client, "accounts", task_queue=s.temporal_task_queue)
                    assert status.workflow_id == replay_workflow_id("accounts", None, s.temporal_task_queue)
                    assert started_by(status.workflow_id, "accounts", s.temporal_task_queue) == "cli"
                    runs = await replay_runs(client, "accounts", task_queue=s.temporal_task_queue)
                    assert runs and all(run.workflow_id.startswith(s.temporal_task_queue + "-") for run in runs)
        finally:
            for s, _ in stores.values():
                with contextlib.suppress(RPCError):
                    tail = client.get_workflow_handle(tail_workflow_id("accounts", s.temporal_task_queue))
                    await tail.terminate("test finished")
            await green_pool.close()


async def _running(client: Client, settings: Settings) -> bool:
    return (await tail_state(client, "accounts", settings.temporal_task_queue))[0] == "RUNNING"


def test_ids_start_with_the_task_queue_and_read_as_before_on_the_default_one() -> None:
    assert replay_workflow_id("orders") == "rehydrate-replay-orders"
    assert replay_workflow_id("orders", None, "rehydrate") == "rehydrate-replay-orders"
    assert replay_workflow_id("orders", "v2", "billing") == "billing-sandbox-v2-orders"
    assert tail_workflow_id("orders", "billing") == "billing-tail-orders"
    assert started_by("billing-replay-orders", "orders", "billing") == "cli"
    assert started_by("billing-scheduled-replay-orders-2026-01-01T00:00:00Z", "orders", "billing") == "schedule"
    assert started_by("rehydrate-replay-orders", "orders", "billing") == "other"
