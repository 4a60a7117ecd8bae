"""Event versioning: upcasters chain old payloads to the current version in replays, the tail and catch-up; an
event with no path fails clearly; `rehydrate events check` lists missing paths and handlers before a replay."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from temporalio.client import Client

from rehydrate.errors import UserError
from rehydrate.models import ReplayInput
from rehydrate.projections import Registry
from rehydrate.settings import Settings
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.store import Event, EventStore, NewEvent
from rehydrate.upcasting import UpcastError, Upcasters
from rehydrate.worker import running_worker
from rehydrate.workflows import tail_workflow_id
from tests import support
from tests import versioned_support as vs
from tests.test_cli import rehydrate
from tests.test_tail import eventually

PROJECTIONS = [vs.versioned_accounts, vs.versioned_groups]


def registry() -> Registry:
    return Registry(PROJECTIONS)


def upcast_all(events: list[Event]) -> list[Event]:
    return [vs.account_events.upcast(event) for event in events]


def event(type: str, version: int, data: dict[str, Any], position: int = 7) -> Event:
    from datetime import UTC, datetime

    return Event(position, "acct-1", 1, type, version, data, {}, datetime.now(UTC))


def test_upcasters_chain_to_the_highest_version_reached() -> None:
    assert vs.account_events.current_version("Deposited") == 3
    assert vs.account_events.current_version("Renamed") == 2
    assert vs.account_events.current_version("Opened") == 1  # not versioned
    up = vs.account_events.upcast(event("Deposited", 1, {"amount": 5, "group": "g1"}))
    assert (up.schema_version, up.data) == (3, {"money": {"cents": 5}, "group": "g1"})
    current = event("Deposited", 3, {"money": {"cents": 5}, "group": "g1"})
    assert vs.account_events.upcast(current) is current  # no copy on the hot path
    typed = vs.account_events.parse(up)
    assert isinstance(typed, vs.DepositedV3) and typed.money == {"cents": 5}
    with pytest.raises(UpcastError, match="does not fit DepositedV3"):
        vs.account_events.parse(event("Deposited", 3, {"money": "lots", "group": "g1"}))


def test_a_version_without_a_path_is_an_error_naming_type_version_and_position() -> None:
    gappy = Upcasters()
    gappy.upcaster("Shipped", from_version=1)(lambda data: data)
    gappy.upcaster("Shipped", from_version=3)(lambda data: data)
    assert gappy.current_version("Shipped") == 4
    with pytest.raises(UpcastError) as raised:
        gappy.upcast(event("Shipped", 2, {}, position=42))
    message = str(raised.value)
    assert "event 42" in message and "'Shipped'" in message and "schema version 2" in message
    assert "v2→v3 is missing" in message and "from_version=2" in message
    with pytest.raises(UpcastError, match="newer than this code knows"):
        gappy.upcast(event("Shipped", 9, {}))
    with pytest.raises(UserError, match="two upcasters"):
        gappy.upcaster("Shipped", from_version=1)(lambda data: data)


async def test_replay_over_mixed_v1_v2_v3_events_equals_the_oracle_over_upcast_events(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await support.append_all(store, vs.mixed_history(21, streams=30, events=700))
    events = await support.all_events(store)
    assert {e.schema_version for e in events if e.type == "Deposited"} == {1, 2, 3}
    async with running_worker(settings, registry(), client=client):
        for projection in PROJECTIONS:
            handle = await start_replay(client, settings, ReplayInput(projection.name, lanes=3, chunk_size=23))
            await wait_for_replay(handle)
            expected = support.oracle(projection, upcast_all(events))
            assert expected and await support.read_model(store.pool, projection) == expected


@pytest.fixture
async def tail_settings(settings: Settings, client: Client) -> AsyncIterator[Settings]:
    yield settings.model_copy(update={"tails": True})
    for projection in PROJECTIONS:
        with contextlib.suppress(Exception):
            await client.get_workflow_handle(tail_workflow_id(projection.name)).terminate("test finished")


async def test_the_tail_and_catch_up_upcast_mixed_version_events(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    history = vs.mixed_history(22, streams=20, events=600)
    await support.append_all(store, history[:300])
    async with running_worker(tail_settings, registry(), client=client):
        for projection in PROJECTIONS:
            await wait_for_replay(await start_replay(client, tail_settings, ReplayInput(projection.name)))
        await support.append_all(store, history[300:])  # applied by the tails

        async def tails_match() -> bool:
            events = upcast_all(await support.all_events(store))
            for projection in PROJECTIONS:
                if await support.read_model(store.pool, projection) != support.oracle(projection, events):
                    return False
            return True

        await eventually(tails_match)


async def test_a_replay_meeting_an_event_with_no_upcaster_path_fails_naming_it(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await support.append_all(store, vs.mixed_history(23, streams=10, events=100))
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
    await support.append_all(store, vs.mixed_history(24, streams=10, events=200))
    env = {"REHYDRATE_PROJECTIONS": "tests.versioned_support", "REHYDRATE_AGGREGATES": "tests.versioned_support"}
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
