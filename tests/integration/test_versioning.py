"""Event versioning: upcasters chain old payloads to the current version in replays, the tail and catch-up; an
event with no path fails clearly; `rehydrate events check` lists missing paths and handlers before a replay."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from temporalio.client import Client

from rehydrate import Event, EventStore, NewEvent
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.engine.projections import Registry
from rehydrate.models import ReplayInput
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.worker import running_worker
from tests.helpers import domain
from tests.helpers import versioned as vs
from tests.helpers.cli import rehydrate
from tests.helpers.waiting import eventually

PROJECTIONS = [vs.versioned_accounts, vs.versioned_groups]


def registry() -> Registry:
    return Registry(PROJECTIONS)


def upcast_all(events: list[Event]) -> list[Event]:
    return [vs.account_events.upcast(event) for event in events]


async def test_replay_over_mixed_v1_v2_v3_events_equals_the_oracle_over_upcast_events(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, vs.mixed_history(21, streams=30, events=700))
    events = await domain.all_events(store)
    assert {e.schema_version for e in events if e.type == "Deposited"} == {1, 2, 3}
    async with running_worker(settings, registry(), client=client):
        for projection in PROJECTIONS:
            handle = await start_replay(client, settings, ReplayInput(projection.name, lanes=3, chunk_size=23))
            await wait_for_replay(handle)
            expected = domain.oracle(projection, upcast_all(events))
            assert expected and await domain.read_model(store.pool, projection) == expected


async def test_the_tail_and_catch_up_upcast_mixed_version_events(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    history = vs.mixed_history(22, streams=20, events=600)
    await domain.append_all(store, history[:300])
    async with running_worker(tail_settings, registry(), client=client):
        for projection in PROJECTIONS:
            await wait_for_replay(await start_replay(client, tail_settings, ReplayInput(projection.name)))
        await domain.append_all(store, history[300:])  # applied by the tails

        async def tails_match() -> bool:
            events = upcast_all(await domain.all_events(store))
            for projection in PROJECTIONS:
                if await domain.read_model(store.pool, projection) != domain.oracle(projection, events):
                    return False
            return True

        await eventually(tails_match)


async def test_a_replay_meeting_an_event_with_no_upcaster_path_fails_naming_it(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, vs.mixed_history(23, streams=10, events=100))
    await store.append("acct-1", [NewEvent("Deposited", {"future": 1, "group": "g1"}, schema_version=4)])
    position = await store.head()
    async with running_worker(settings, registry(), client=client):
        handle = await start_replay(client, settings, ReplayInput("versioned_accounts"))
        with pytest.raises(UserError) as raised:
            await wait_for_replay(handle)
    message = str(raised.value)
    assert f"event {position}" in message and "'Deposited'" in message and "schema version 4" in message
    assert await store.pool.fetchval("SELECT state FROM rehydrate.generations") == "failed"


async def test_events_check_lists_missing_upcaster_paths_and_missing_handlers(
    settings: Settings, store: EventStore, tmp_path: Any
) -> None:
    await domain.append_all(store, vs.mixed_history(24, streams=10, events=200))
    env = {"REHYDRATE_PROJECTIONS": "tests.helpers.versioned", "REHYDRATE_AGGREGATES": "tests.helpers.versioned"}
    clean = await rehydrate(settings, tmp_path, "events", "check", "--json", **env)
    report = {(r["event_type"], r["schema_version"]): r for r in orjson.loads(clean.stdout)}
    # Audited is handled by nothing: the only problem so far.
    assert clean.code == 1, clean
    assert [key for key, r in report.items() if not r["ok"]] == [("Audited", 1)]
    assert report["Audited", 1]["no_handler"] and not report["Audited", 1]["no_upcaster_path"]
    assert report["Deposited", 1]["handled_by"] == [
        "projection versioned_accounts",
        "projection versioned_groups",
        "aggregate account",
    ]
    await store.append("acct-1", [NewEvent("Renamed", {"name": "x", "group": "g1"}, schema_version=5)])
    found = await rehydrate(settings, tmp_path, "events", "check", **env)
    assert found.code == 1, found
    assert "Renamed" in found.stdout and "v5" in found.stdout and "newer than its current version 2" in found.stdout
    assert "no handler in any projection or aggregate" in found.stdout
    # Without the unhandled type and the future version, every pair can be read.
    await store.pool.execute("DELETE FROM rehydrate.events WHERE event_type IN ('Audited') OR schema_version = 5")
    ok = await rehydrate(settings, tmp_path, "events", "check", **env)
    assert ok.code == 0, ok
    assert "all 10 (type, version) pairs can be read" in ok.stdout
