"""Waiting for what happens elsewhere (a worker, the tail, a schedule) without sleeping longer than needed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from temporalio.client import Client, WorkflowHandle

from rehydrate import EventStore, Settings
from rehydrate.models import ReplayInput, ReplayResult
from rehydrate.starter import start_replay
from rehydrate.workflows import ReplayWorkflow
from tests.helpers import domain


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Wait until `check` holds; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def matches_oracle(store: EventStore) -> bool:
    """Whether the accounts read model equals the oracle fold of every stored event."""
    events = await domain.all_events(store)
    return await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, events)


T = TypeVar("T")


async def poll_until(probe: Callable[[], Awaitable[T]], check: Callable[[T], bool], seconds: float = 60) -> T:
    """Probe until `check` holds or `seconds` pass; the last value either way."""
    deadline = time.monotonic() + seconds
    while True:
        value = await probe()
        if check(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.3)


async def paused_replay(
    client: Client, settings: Settings, store: EventStore, projection: str
) -> WorkflowHandle[ReplayWorkflow, ReplayResult]:
    """A manual replay of `projection`, paused once its generation is building: it stays so until resumed."""
    manual = await start_replay(client, settings, ReplayInput(projection))
    await manual.signal(ReplayWorkflow.pause)
    await poll_until(
        lambda: store.pool.fetchval(
            "SELECT count(*) FROM rehydrate.generations WHERE projection = $1 AND state = 'building'", projection
        ),
        lambda count: count == 1,
    )
    return manual
