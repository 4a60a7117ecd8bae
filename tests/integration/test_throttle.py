"""A replay limited to a rate of events keeps to it over all its lanes, shows it, and goes at full speed once the
limit is lifted while it runs; the read model is the plain fold all the same."""

from __future__ import annotations

import asyncio
import time

import pytest
from temporalio.client import Client
from temporalio.worker import Replayer

from rehydrate import EventStore
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.models import ReplayInput
from rehydrate.starter import start_replay, throttle_replay, wait_for_replay
from rehydrate.worker import running_worker, workflow_runner
from rehydrate.workflows import ReplayWorkflow
from tests.helpers import domain
from tests.helpers.waiting import eventually

RATE = 300.0


async def test_a_throttled_replay_keeps_to_its_rate_and_runs_free_once_the_limit_is_lifted(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.import_all(store, domain.random_history(71, streams=40, events=8000))
    with pytest.raises(UserError, match=r"max_rate=-1 is not a positive number"):
        await start_replay(client, settings, ReplayInput("accounts", max_rate=-1))
    async with running_worker(settings, domain.registry(), client=client):
        handle = await start_replay(client, settings, ReplayInput("accounts", lanes=4, chunk_size=1000, max_rate=RATE))

        async def building() -> bool:
            progress = await handle.query(ReplayWorkflow.progress)
            return progress.phase == "building" and progress.events_applied > 0

        await eventually(building)
        before, started = await handle.query(ReplayWorkflow.progress), time.monotonic()
        await asyncio.sleep(6)
        after, ended = await handle.query(ReplayWorkflow.progress), time.monotonic()
        rate = (after.events_applied - before.events_applied) / (ended - started)
        assert after.max_rate == RATE and "throttled to 300 events/s" in after.summary()
        # Chunks of two seconds' events (600), their turns two seconds apart, counted as each ends: at most a chunk
        # over the rate in 6 s.
        assert RATE / 5 < rate < RATE * 1.4, rate
        assert after.events_applied < after.events_total / 2
        with pytest.raises(UserError, match="max_rate=0 is not a positive number"):
            await throttle_replay(client, "accounts", 0)
        assert await throttle_replay(client, "accounts", None) == RATE
        lifted = time.monotonic()
        await asyncio.wait_for(wait_for_replay(handle), 60)
    # The rest (most of the events) at full speed: far sooner than at the rate.
    remaining = after.events_total - after.events_applied
    assert time.monotonic() - lifted < remaining / RATE / 2
    assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(
        domain.accounts, await domain.all_events(store)
    )
    # Turns, waits, a rate lifted while lanes waited: the history replays as it ran.
    await Replayer(workflows=[ReplayWorkflow], workflow_runner=workflow_runner()).replay_workflow(
        await handle.fetch_history()
    )
