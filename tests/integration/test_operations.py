"""Operating replays: rollback, sandbox and point-in-time builds, verify, dead letters, stale detection, plan."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlmodel import Field, SQLModel
from temporalio.client import Client

from rehydrate import Event, EventStore, NewEvent
from rehydrate.core import settings as settings_module
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.engine import operations
from rehydrate.engine.catalog import Catalog
from rehydrate.engine.generations import Generations
from rehydrate.engine.projections import Projection, Registry, Row
from rehydrate.models import Drift, ReplayInput
from rehydrate.starter import start_replay, verify, wait_for_replay
from rehydrate.worker import running_worker
from tests.helpers import domain
from tests.helpers.cli import REPO, rehydrate


async def replay(client: Client, settings: Settings, input: ReplayInput) -> Any:
    return await wait_for_replay(await start_replay(client, settings, input))


# A second version of `accounts` whose deposits count double: a "bad deploy" to roll back from.
accounts_v2 = Projection("accounts", version=2, table=domain.Account, key="stream")
for event_type, handler in domain.accounts.handlers.items():
    if event_type != "Deposited":
        accounts_v2.on(event_type)(handler)


@accounts_v2.on("Deposited")
def doubled(row: Row | None, event: Event) -> Row | None:
    if row is None:
        return None
    row["balance"] += 2 * event.data["amount"]
    return row


async def test_rollback_restores_the_exact_previous_rows_and_catches_them_up(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(51, streams=20, events=400))
    async with running_worker(settings, domain.registry(), client=client):
        await replay(client, settings, ReplayInput("accounts"))
    first = await domain.read_model(store.pool, domain.accounts)
    async with running_worker(settings, Registry([accounts_v2]), client=client):
        await replay(client, settings, ReplayInput("accounts"))
    assert await domain.read_model(store.pool, domain.accounts) != first
    listed = await Catalog(store.pool, "rehydrate").generations("accounts")  # type: ignore[arg-type]
    assert [(g["generation"], g["state"], g["version"]) for g in listed] == [(2, "active", 2), (1, "retired", 1)]

    done = await operations.rollback(store.pool, settings, domain.accounts)
    assert (done.from_generation, done.to_generation, done.caught_up) == (2, 1, 0)
    assert await domain.read_model(store.pool, domain.accounts) == first

    # Rolled back again (to g2), then to g1 after more events: g1 goes on from its own checkpoint.
    await operations.rollback(store.pool, settings, accounts_v2)
    await domain.append_all(store, domain.random_history(52, streams=20, events=100))
    done = await operations.rollback(store.pool, settings, domain.accounts, to=1)
    assert done.to_generation == 1 and done.caught_up > 0
    events = await domain.all_events(store)
    assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, events)


async def test_rollback_without_a_retained_generation_says_so(
    client: Client, settings: Settings, store: EventStore
) -> None:
    settings = settings.model_copy(update={"retain_generations": 0})
    await domain.append_all(store, domain.random_history(53, events=100))
    async with running_worker(settings, domain.registry(), client=client):
        await replay(client, settings, ReplayInput("accounts"))
        await replay(client, settings, ReplayInput("accounts"))
    before = await domain.read_model(store.pool, domain.accounts)
    with pytest.raises(UserError, match="no retained generation") as error:
        await operations.rollback(store.pool, settings, domain.accounts)
    assert "REHYDRATE_RETAIN_GENERATIONS" in (error.value.fix or "")
    with pytest.raises(UserError, match="no retained generation"):
        await operations.rollback(store.pool, settings, domain.accounts, to=1)
    assert await domain.read_model(store.pool, domain.accounts) == before


async def test_point_in_time_sandboxes_equal_the_oracle_up_to_that_point_and_never_touch_live(
    client: Client, settings: Settings, store: EventStore
) -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    history = domain.random_history(54, streams=25, events=600)
    for n, (stream, event) in enumerate(history):
        timed = NewEvent(event.type, event.data, recorded_at=start + timedelta(minutes=n))
        await store.append(stream, [timed])
    events = await domain.all_events(store)
    cut = events[349].global_position
    as_of = start + timedelta(minutes=199)
    async with running_worker(settings, domain.registry(), client=client):
        live = await replay(client, settings, ReplayInput("accounts"))
        live_rows = await domain.read_model(store.pool, domain.accounts)
        # A sandbox build and a live replay of the same projection at once: neither blocks the other.
        sandbox = await start_replay(client, settings, ReplayInput("accounts", sandbox="then", to_position=cut))
        again = await start_replay(client, settings, ReplayInput("accounts"))
        by_position, second = await asyncio.gather(wait_for_replay(sandbox), wait_for_replay(again))
        by_time = await replay(
            client, settings, ReplayInput("group_totals", sandbox="then", as_of=as_of.isoformat(), lanes=2)
        )
    # Both planned at once: which one took the next generation number is up to the scheduling.
    assert by_position.sandbox == "then" and second.sandbox is None
    assert {by_position.generation, second.generation} == {live.generation + 1, live.generation + 2}
    expected = domain.oracle(domain.accounts, [e for e in events if e.global_position <= cut])
    assert await domain.rows_of(store.pool, "rehydrate_sandbox_then", "account", "account_id") == expected
    expected = domain.oracle(domain.group_totals, [e for e in events if e.recorded_at <= as_of])
    assert await domain.rows_of(store.pool, "rehydrate_sandbox_then", "group_total", "group_id") == expected
    assert by_time.rows == len(expected)
    assert await domain.read_model(store.pool, domain.accounts) == live_rows
    listed = await Catalog(store.pool, "rehydrate").sandboxes()  # type: ignore[arg-type]
    assert {(s["label"], s["projection"], s["state"]) for s in listed} == {
        ("then", "accounts", "sandbox"),
        ("then", "group_totals", "sandbox"),
    }
    async with store.pool.acquire() as conn:
        assert await Generations(conn, store, "public").drop_sandbox("then") == 2
        assert await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = 'rehydrate_sandbox_then'") is None
        with pytest.raises(UserError, match="no sandbox"):
            await Generations(conn, store, "public").drop_sandbox("then")
    assert await domain.read_model(store.pool, domain.accounts) == live_rows


async def test_point_in_time_without_a_sandbox_is_refused_before_anything_starts(
    client: Client, settings: Settings
) -> None:
    with pytest.raises(UserError, match="--to-position") as error:
        await start_replay(client, settings, ReplayInput("accounts", to_position=10))
    assert "--sandbox" in (error.value.fix or "")
    with pytest.raises(UserError, match="ISO 8601"):
        await start_replay(client, settings, ReplayInput("accounts", sandbox="x", as_of="yesterday"))
    with pytest.raises(UserError, match="sandbox label"):
        await start_replay(client, settings, ReplayInput("accounts", sandbox="No-Good"))


async def test_verify_finds_nothing_on_a_clean_generation_and_a_row_changed_behind_its_back(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(55, streams=25, events=500))
    async with running_worker(settings, domain.registry(), client=client):
        await replay(client, settings, ReplayInput("accounts"))
        # Events after the build that the live generation does not have yet: caught up, then compared at one point.
        await domain.append_all(store, domain.random_history(56, streams=25, events=60))
        async with store.pool.acquire() as conn:
            await Generations(conn, store, "public").tail_batch(domain.accounts, 10_000)
        clean = await verify(client, settings, "accounts")
        assert (clean.differing, clean.first, clean.stale) == (0, [], False)
        assert clean.live_rows == clean.rebuilt_rows > 0
        victim = await store.pool.fetchval("SELECT account_id FROM public.account__g1 ORDER BY account_id LIMIT 1")
        await store.pool.execute("UPDATE public.account__g1 SET balance = balance + 1 WHERE account_id = $1", victim)
        await store.pool.execute(
            "DELETE FROM public.account__g1 WHERE account_id = (SELECT max(account_id) FROM public.account__g1)"
        )
        drifted = await verify(client, settings, "accounts")
        counted = await verify(client, settings, "accounts", show=0)
    assert drifted.differing == 2
    assert drifted.first[0] == Drift(victim, "differs")
    assert [d.problem for d in drifted.first] == ["differs", "missing in live"]
    assert (counted.differing, counted.first) == (2, []), "show 0 still counts the drift"
    assert await store.pool.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rehydrate_sandbox_%'") == 0


class Wallet(SQLModel, table=True):
    __tablename__ = "wallet"
    wallet_id: str = Field(primary_key=True)
    balance: int = 0
    moves: str = ""


wallets = Projection("wallets", version=1, table=Wallet, key="stream", on_error="park")
BROKEN = {"on": True}


@wallets.on("Opened")
def wallet_opened(row: Row | None, event: Event) -> Row:
    return {"balance": 0, "moves": ""}


@wallets.on("Deposited", "Withdrawn")
def wallet_moved(row: Row | None, event: Event) -> Row | None:
    if row is None:
        return None
    row["moves"] = (row["moves"] + event.type[0])[-30:]  # changed in place before failing: must not leak
    if BROKEN["on"] and event.data["amount"] > 450:
        raise ValueError("amounts over 450 are not handled yet")
    row["balance"] += event.data["amount"] if event.type == "Deposited" else -event.data["amount"]
    return row


@wallets.on("Closed")
def wallet_closed(row: Row | None, event: Event) -> None:
    return None


async def test_parked_events_do_not_swap_unless_allowed_and_are_retried_into_the_clean_rows(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(57, streams=30, events=700))
    events = await domain.all_events(store)
    failing = [e for e in events if e.type in ("Deposited", "Withdrawn") and e.data["amount"] > 450]
    assert failing
    registry = Registry([wallets])
    BROKEN["on"] = True
    async with running_worker(settings, registry, client=client):
        with pytest.raises(UserError, match=r"parked \d+ event"):
            await replay(client, settings, ReplayInput("wallets", lanes=3, chunk_size=20))
        assert await store.pool.fetchval("SELECT to_regclass('public.wallet')") is None
        result = await replay(client, settings, ReplayInput("wallets", lanes=3, chunk_size=20, allow_dead_letters=True))
    parked = await Catalog(store.pool, "rehydrate").dead_letters("wallets", result.generation)  # type: ignore[arg-type]
    first_failures = {e.global_position for e in failing}
    assert {d["global_position"] for d in parked if not d["error"].startswith("parked:")} <= first_failures
    assert {d["key"] for d in parked} == {e.stream_id for e in failing}
    live = await domain.read_model(store.pool, wallets)
    BROKEN["on"] = False
    clean = domain.oracle(wallets, events)
    assert live != clean
    assert all(live.get(k) == v for k, v in clean.items() if k not in {d["key"] for d in parked})
    async with store.pool.acquire() as conn:
        assert await Generations(conn, store, "public").retry_dead_letters(wallets) == (
            len({d["key"] for d in parked}),
            0,
        )
    assert await domain.read_model(store.pool, wallets) == clean
    assert await Catalog(store.pool, "rehydrate").dead_letter_count("wallets", result.generation) == 0  # type: ignore[arg-type]


STALE_MODULE = """
from sqlmodel import Field, SQLModel
from rehydrate.engine.projections import Projection


class Counter(SQLModel, table=True):
    __tablename__ = "counter"
    stream: str = Field(primary_key=True)
    n: int = 0


counters = Projection("counters", version=1, table=Counter, key="stream")


@counters.on("Opened", "Deposited")
def counted(row, event):
    return {"n": (row or {"n": 0})["n"] + STEP}
"""


async def test_editing_a_handler_marks_its_projection_stale(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    import importlib
    import sys

    module = tmp_path / "stale_counters.py"
    module.write_text(textwrap.dedent(STALE_MODULE).replace("STEP", "1"))
    sys.path.insert(0, str(tmp_path))
    try:
        loaded = importlib.import_module("stale_counters")
    finally:
        sys.path.remove(str(tmp_path))
    await domain.append_all(store, domain.random_history(58, events=100))
    async with running_worker(settings, Registry([loaded.counters]), client=client):
        await replay(client, settings, ReplayInput("counters"))
    env = {"REHYDRATE_PROJECTIONS": "stale_counters", "PYTHONPATH": f"{tmp_path}:{REPO}"}

    async def listed() -> dict[str, Any]:
        run = await rehydrate(settings, tmp_path, "projections", "--json", **env)
        assert run.code == 0, run
        return {row["name"]: row for row in orjson.loads(run.stdout)}

    assert (await listed())["counters"]["stale"] is False
    module.write_text(textwrap.dedent(STALE_MODULE).replace("STEP", "2"))  # the handler's code changed
    assert (await listed())["counters"]["stale"] is True
    run = await rehydrate(settings, tmp_path, "projections", **env)
    assert "STALE" in run.stdout


async def test_plan_counts_lanes_and_chunks_and_changes_nothing(settings: Settings, store: EventStore) -> None:
    await domain.append_all(store, domain.random_history(59, streams=20, events=300))
    before = await store.pool.fetch("SELECT table_schema, table_name FROM information_schema.tables ORDER BY 1, 2")
    p = await operations.plan(store.pool, settings, domain.accounts, lanes=3, chunk_size=40)
    handled = sum(1 for e in await domain.all_events(store) if e.type in domain.accounts.handlers)
    assert p.events == sum(lane.events for lane in p.lanes) == handled
    assert [lane.chunks for lane in p.lanes] == [lane.events // 40 + 1 for lane in p.lanes]
    assert p.sample_events == 40 and p.estimated_seconds is not None and p.estimated_seconds > 0
    assert (p.estimated_from, p.measured_events_per_second) == ("sample", None)  # never built: the sample decides
    assert (
        await store.pool.fetch("SELECT table_schema, table_name FROM information_schema.tables ORDER BY 1, 2") == before
    )
    assert await store.pool.fetchval("SELECT count(*) FROM rehydrate.generations") == 0
    # Two worker processes polling: at most two chunks at once, so the sample's rate is doubled, not tripled.
    two = await operations.plan(store.pool, settings, domain.accounts, lanes=3, chunk_size=40, workers=2)
    assert two.workers == 2 and two.estimated_seconds == two.events / two.events_per_second / 2


async def test_plan_estimates_from_the_latest_build_once_there_is_one(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(60, streams=20, events=300))
    async with running_worker(settings, domain.registry(), client=client):
        await replay(client, settings, ReplayInput("accounts"))
    built = await store.pool.fetchrow(
        "SELECT events_applied, extract(epoch FROM built_at - started_at)::float8 AS seconds FROM rehydrate.generations"
    )
    p = await operations.plan(store.pool, settings, domain.accounts, workers=1)
    assert (p.estimated_from, p.measured_generation) == ("measured", 1)
    assert p.measured_events_per_second == built["events_applied"] / built["seconds"]
    assert p.estimated_seconds == p.events / p.measured_events_per_second


async def test_lanes_left_unset_are_8_by_stream_range_and_4_by_hash_and_fewer_on_a_small_store(
    client: Client, settings: Settings, store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await domain.append_all(store, domain.random_history(61, streams=40, events=600))
    unset = settings.model_copy(update={"lanes": None, "lane_split": "auto"})
    # 600 events: one range lane repays a chunk's cost, more would not; hash lanes are not sized.
    by_stream = await operations.plan(store.pool, unset, domain.accounts)
    by_field = await operations.plan(store.pool, unset, domain.group_totals)
    assert (len(by_stream.lanes), len(by_field.lanes)) == (1, 4)
    hashed = await operations.plan(store.pool, unset.model_copy(update={"lane_split": "hash"}), domain.accounts)
    assert len(hashed.lanes) == 4
    assert len((await operations.plan(store.pool, settings, domain.accounts)).lanes) == settings.lanes == 3
    async with running_worker(unset, domain.registry(), client=client):
        small = await replay(client, unset, ReplayInput("accounts"))
        # The same events as a big store in miniature: each lane's share of the events sets the lanes, halving
        # from 8 until each holds at least EVENTS_PER_LANE.
        monkeypatch.setattr(settings_module, "EVENTS_PER_LANE", by_stream.events // 4)
        assert len((await operations.plan(store.pool, unset, domain.accounts)).lanes) == 4
        monkeypatch.setattr(settings_module, "EVENTS_PER_LANE", by_stream.events // 8)
        assert len((await operations.plan(store.pool, unset, domain.accounts)).lanes) == 8
        # The replay's own plan decides the same way: 8 lanes, each a range of stream ids.
        result = await replay(client, unset, ReplayInput("accounts"))
    async with store.pool.acquire() as conn:
        catalog = Catalog(conn, "rehydrate")
        assert await catalog.lane_bounds("accounts", small.generation) == [(None, None)]
        ranges = await catalog.lane_bounds("accounts", result.generation)
    assert ranges is not None and len(ranges) == 8
    assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(
        domain.accounts, await domain.all_events(store)
    )
