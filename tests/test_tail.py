"""The tail: new events reach the active read model in order, exactly once, gap-safe under concurrent writers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Awaitable

import asyncpg
import pytest
from temporalio.client import Client

from rehydrate.models import ReplayInput
from rehydrate.settings import Settings
from rehydrate.starter import start_replay, tail_state, wait_for_replay
from rehydrate.store import EventStore, NewEvent
from rehydrate.worker import running_worker
from tests import support


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def matches_oracle(store: EventStore) -> bool:
    events = await support.all_events(store)
    return await support.read_model(store.pool, support.accounts) == support.oracle(support.accounts, events)


@pytest.fixture
def tail_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"tails": True})


async def test_the_tail_applies_new_events_after_the_swap(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    await support.append_all(store, support.random_history(41, events=300))
    async with running_worker(tail_settings, support.registry(), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("accounts")))
        await support.append_all(store, support.random_history(42, events=200))
        await eventually(lambda: matches_oracle(store))
        assert (await tail_state(client, "accounts"))[0] == "RUNNING"
