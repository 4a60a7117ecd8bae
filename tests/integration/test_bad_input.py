"""Bad input gets one clear error naming what and where (projection, event position, stream) and the fix, and
changes nothing: not the event store, not the active read model. Real Postgres and a real Temporal dev server.

The command line's side of the same promise (exit codes, one line on stderr) is in test_cli.py.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client
from temporalio.service import RPCError

from rehydrate import NO_STREAM, EventStore, NewEvent
from rehydrate.core.errors import ConcurrencyError, UserError
from rehydrate.core.settings import Settings
from rehydrate.engine.projections import Registry
from rehydrate.models import ReplayInput
from rehydrate.models.names import REPLAY, replay_workflow_id
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.worker import running_worker
from tests.helpers import domain
from tests.helpers.ledgers import REGISTRY, buckets, good_history, ledger, strict_ledger

# A replay that should fail but retries instead would hang: give up well before the session does.
FAILURE_TIMEOUT = 30


# -- projections that misbehave on request --------------------------------------------------------------------


# -- helpers ---------------------------------------------------------------------------------------------------------


async def replay_ok(client: Client, settings: Settings, projection: str) -> int:
    handle = await start_replay(client, settings, ReplayInput(projection), registry=REGISTRY)
    result = await asyncio.wait_for(wait_for_replay(handle), FAILURE_TIMEOUT)
    return result.generation


async def replay_fails(client: Client, settings: Settings, projection: str, **tuning: Any) -> str:
    """Start a replay that must fail, and return the one message the caller gets."""
    handle = await start_replay(client, settings, ReplayInput(projection, **tuning), registry=REGISTRY)
    try:
        with pytest.raises(UserError) as failure:
            await asyncio.wait_for(wait_for_replay(handle), FAILURE_TIMEOUT)
    except TimeoutError:
        await handle.terminate("the test gave up: it should have failed")  # don't block the next test's replay
        raise AssertionError(f"the replay of {projection} kept retrying instead of failing") from None
    assert "\n" not in failure.value.message, "one line"
    return failure.value.message


async def poison(store: EventStore, stream: str, event: NewEvent) -> int:
    """Append one bad event and return its global position."""
    await store.append(stream, [event])
    return (await store.read_stream(stream))[-1].global_position


async def generations(pool: asyncpg.Pool, projection: str) -> dict[int, asyncpg.Record]:
    rows = await pool.fetch(
        "SELECT generation, state, error, physical_table FROM rehydrate.generations WHERE projection = $1",
        projection,
    )
    return {row["generation"]: row for row in rows}


async def active_generation(pool: asyncpg.Pool, projection: str) -> int | None:
    return await pool.fetchval("SELECT active_generation FROM rehydrate.projections WHERE name = $1", projection)


async def table_exists(pool: asyncpg.Pool, name: str) -> bool:
    return await pool.fetchval("SELECT to_regclass($1)", f"public.{name}") is not None


async def assert_failed_generation_is_dropped(pool: asyncpg.Pool, projection: str, number: int, message: str) -> None:
    """The failed generation is marked failed with the same error the caller saw, and its table is gone."""
    failed = (await generations(pool, projection))[number]
    assert failed["state"] == "failed"
    assert failed["error"] and failed["error"] in message
    assert not await table_exists(pool, failed["physical_table"]), "the failed generation's table is dropped"


async def assert_nothing_started(client: Client, settings: Settings, pool: asyncpg.Pool, projection: str) -> None:
    """No replay workflow of `projection` on this test's task queue, and no generation in the database."""
    try:
        description = await client.get_workflow_handle(
            replay_workflow_id(projection, None, settings.temporal_task_queue)
        ).describe()
    except RPCError:
        pass  # never started by anyone
    else:
        assert description.task_queue != settings.temporal_task_queue, "a workflow was started"
    assert await pool.fetchval("SELECT count(*) FROM rehydrate.generations") == 0


# -- 1. unknown projection ---------------------------------------------------------------------------------------


async def test_start_replay_of_an_unknown_projection_names_it_and_the_registered_ones(
    client: Client, settings: Settings, pool: asyncpg.Pool
) -> None:
    with pytest.raises(UserError) as failure:
        await start_replay(client, settings, ReplayInput("nope"), registry=domain.registry())
    assert failure.value.message == "unknown projection 'nope' (registered: accounts, group_totals)"
    assert failure.value.fix and "REHYDRATE_PROJECTIONS" in failure.value.fix
    await assert_nothing_started(client, settings, pool, "nope")


async def test_a_replay_started_from_the_temporal_ui_with_bad_input_fails_clearly_and_creates_no_generation(
    client: Client, settings: Settings, store: EventStore
) -> None:
    """The Web UI starts the workflow with a JSON input and no registry check: the worker's plan refuses it."""
    await domain.append_all(store, domain.random_history(1, events=20))
    before = await domain.all_events(store)
    cases = [
        # No worker serves it: each hands it back, and the run fails once its patience is spent.
        (
            {"projection": "nope", "wrong_worker_patience_seconds": 2},
            ["no worker could run it for 2 s", "unknown projection 'nope' (registered: ", "REHYDRATE_PROJECTIONS"],
        ),
        ({"projection": "accounts", "lanes": 0}, ["lanes=0 is out of range", "use 1..256"]),
        ({"projection": "accounts", "lanes": -1}, ["lanes=-1 is out of range"]),
        ({"projection": "accounts", "chunk_size": 0}, ["chunk_size=0 is out of range", "use at least 1"]),
        ({"projection": "accounts", "max_parallel": 0}, ["max_parallel=0 is out of range", "use 1..500"]),
    ]
    async with running_worker(settings, REGISTRY, client=client):
        for raw_input, parts in cases:
            handle = await client.start_workflow(
                REPLAY, raw_input, id=f"ui-start-{uuid.uuid4().hex[:8]}", task_queue=settings.temporal_task_queue
            )
            with pytest.raises(UserError) as failure:
                await asyncio.wait_for(wait_for_replay(handle), FAILURE_TIMEOUT)
            for part in parts:
                assert part in failure.value.message, (raw_input, failure.value.message)
    assert await store.pool.fetchval("SELECT count(*) FROM rehydrate.generations") == 0
    assert await domain.all_events(store) == before


# -- 2. a projection module that fails to import -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (
            "tests.helpers.bad_projection_module",
            "projection module 'tests.helpers.bad_projection_module' failed to import: "
            "RuntimeError: the projection module is broken on purpose",
        ),
        ("tests.no_such_module", "projection module 'tests.no_such_module' failed to import: ModuleNotFoundError"),
        ("rehydrate.core.errors", "projection module 'rehydrate.core.errors' defines no Projection"),
    ],
    ids=["raises-on-import", "missing", "no-projection"],
)
def test_a_projection_module_that_cannot_be_loaded_is_named_in_one_error(module: str, expected: str) -> None:
    with pytest.raises(UserError) as failure:
        Registry.from_modules(["tests.helpers.domain", module])
    assert failure.value.message.startswith(expected)
    assert failure.value.fix and "REHYDRATE_PROJECTIONS" in failure.value.fix


# -- 3, 4, 5. a projection that cannot apply an event ----------------------------------------------------------------


async def test_a_strict_projection_fails_on_an_event_type_without_handler_and_keeps_the_active_generation(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, good_history())
    async with running_worker(settings, REGISTRY, client=client):
        assert await replay_ok(client, settings, "strict_ledger") == 1
        before = await domain.read_model(store.pool, strict_ledger)
        position = await poison(store, "ledger-2", NewEvent("Renamed", {"owner": "x"}))
        events = await domain.all_events(store)
        message = await replay_fails(client, settings, "strict_ledger")
    assert (
        f"projection 'strict_ledger' failed at event {position} (stream 'ledger-2', type 'Renamed'): "
        "no handler for this event type and the projection is strict" in message
    )
    assert "add a handler with @strict_ledger.on('Renamed'), or list it in ignore=" in message
    assert before == {f"ledger-{n}": {"ledger_id": f"ledger-{n}", "owner": f"o{n}", "total": 6} for n in range(4)}
    assert await domain.read_model(store.pool, strict_ledger) == before
    assert await domain.all_events(store) == events
    assert await active_generation(store.pool, "strict_ledger") == 1
    assert {n: g["state"] for n, g in (await generations(store.pool, "strict_ledger")).items()} == {
        1: "active",
        2: "failed",
    }
    assert await table_exists(store.pool, "bad_input_strict_ledger__g1")
    await assert_failed_generation_is_dropped(store.pool, "strict_ledger", 2, message)


async def test_a_handler_that_raises_fails_the_replay_naming_handler_exception_and_event(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, good_history())
    async with running_worker(settings, REGISTRY, client=client):
        assert await replay_ok(client, settings, "ledger") == 1
        before = await domain.read_model(store.pool, ledger)
        position = await poison(store, "ledger-1", NewEvent("Added", {"amount": -5, "misbehave": "raise"}))
        events = await domain.all_events(store)
        message = await replay_fails(client, settings, "ledger")
        # Started again, with other tuning, it fails the same way: the fault is the event's, not the run's.
        again = await replay_fails(client, settings, "ledger", lanes=1)
    assert (
        f"projection 'ledger' failed at event {position} (stream 'ledger-1', type 'Added'): "
        "handler 'added' raised ValueError: amount must be positive" in message
    )
    assert "fix the handler (or the event), then start the replay again" in message
    assert again == message
    assert await domain.read_model(store.pool, ledger) == before
    assert await domain.all_events(store) == events
    assert await active_generation(store.pool, "ledger") == 1
    assert {n: g["state"] for n, g in (await generations(store.pool, "ledger")).items()} == {
        1: "active",
        2: "failed",
        3: "failed",
    }
    await assert_failed_generation_is_dropped(store.pool, "ledger", 2, message)
    await assert_failed_generation_is_dropped(store.pool, "ledger", 3, again)


@pytest.mark.parametrize(
    ("misbehave", "problem", "fix"),
    [
        ("list", "handler returned list, not a dict or None", "return the new row as a dict, or None to delete it"),
        ("int", "handler returned int, not a dict or None", "return the new row as a dict, or None to delete it"),
        (
            "unknown_column",
            "handler returned unknown column(s) ['colour'] for table 'bad_input_ledger'",
            "return only the table's columns: ledger_id, owner, total",
        ),
        (
            "required_empty",
            "column 'owner' of table 'bad_input_ledger' is required but the row has no value",
            "set it in the handler that creates the row, or give the column a default",
        ),
        (
            "column_type",
            "its row cannot be stored in table 'bad_input_ledger'",
            "return values of the column types the table declares",
        ),
        ("move_key", "handler set 'ledger_id' to 'elsewhere', but the event's key is 'ledger-3'", "another key"),
    ],
)
async def test_a_handler_returning_a_bad_row_fails_the_replay_at_the_event_and_leaves_no_table(
    client: Client, settings: Settings, store: EventStore, misbehave: str, problem: str, fix: str
) -> None:
    await domain.append_all(store, good_history())
    position = await poison(store, "ledger-3", NewEvent("Added", {"amount": 1, "misbehave": misbehave}))
    await domain.append_all(store, [("ledger-0", NewEvent("Added", {"amount": 1}))])  # after the bad one
    events = await domain.all_events(store)
    async with running_worker(settings, REGISTRY, client=client):
        message = await replay_fails(client, settings, "ledger")
    assert f"projection 'ledger' failed at event {position} (stream 'ledger-3', type 'Added'): {problem}" in message
    assert fix in message
    assert await domain.all_events(store) == events
    assert await active_generation(store.pool, "ledger") is None
    assert not await table_exists(store.pool, "bad_input_ledger"), "no read model was published"
    await assert_failed_generation_is_dropped(store.pool, "ledger", 1, message)


# -- 6. a malformed payload for a payload-keyed projection -----------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "lanes"),
    [
        ({"amount": 1}, 3),
        ({"amount": 1}, 1),
        ({"amount": 1, "bucket": None}, 3),
        ({"amount": 1, "bucket": {"nested": "b0"}}, 3),
        ({"amount": 1, "bucket": ["b0"]}, 1),
    ],
    ids=["missing-3-lanes", "missing-1-lane", "null", "object", "list"],
)
async def test_an_event_without_a_usable_key_field_fails_the_replay_naming_the_field_and_position(
    client: Client, settings: Settings, store: EventStore, payload: dict[str, Any], lanes: int
) -> None:
    await domain.append_all(store, good_history())
    async with running_worker(settings, REGISTRY, client=client):
        assert await replay_ok(client, settings, "buckets") == 1
        before = await domain.read_model(store.pool, buckets)
        position = await poison(store, "ledger-2", NewEvent("Added", payload))
        events = await domain.all_events(store)
        message = await replay_fails(client, settings, "buckets", lanes=lanes)
    assert (
        f"projection 'buckets' failed at event {position} (stream 'ledger-2', type 'Added'): "
        "the payload has no usable key field 'bucket'" in message
    )
    assert "key the projection by another field" in message
    assert before == {"b0": {"bucket": "b0", "events": 6}, "b1": {"bucket": "b1", "events": 6}}
    assert await domain.read_model(store.pool, buckets) == before
    assert await domain.all_events(store) == events
    assert await active_generation(store.pool, "buckets") == 1
    await assert_failed_generation_is_dropped(store.pool, "buckets", 2, message)


# A lane's first chunk looks up no stored rows, so the bad key reaches the COPY; a later chunk's lookup meets it first.
@pytest.mark.parametrize("tuning", [{}, {"lanes": 1, "chunk_size": 1}], ids=["in-the-copy", "in-the-lookup"])
async def test_an_event_whose_key_does_not_fit_the_key_column_fails_the_replay_naming_it_and_the_position(
    client: Client, settings: Settings, store: EventStore, tuning: dict[str, int]
) -> None:
    await domain.append_all(store, good_history())
    position = await poison(store, "ledger-2", NewEvent("Added", {"amount": 1, "bucket": 5}))
    events = await domain.all_events(store)
    async with running_worker(settings, REGISTRY, client=client):
        message = await replay_fails(client, settings, "buckets", **tuning)
    assert (
        f"projection 'buckets' failed at event {position} (stream 'ledger-2', type 'Added'): "
        "its key 5 (field 'bucket') does not fit the key column 'bucket' (VARCHAR)" in message
    )
    assert "fix the event (or an upcaster)" in message
    assert await domain.all_events(store) == events
    await assert_failed_generation_is_dropped(store.pool, "buckets", 1, message)


# -- 7. out-of-range tuning ------------------------------------------------------------------------------------------


async def test_out_of_range_tuning_is_refused_before_anything_is_started(
    client: Client, settings: Settings, pool: asyncpg.Pool
) -> None:
    cases = [
        ({"lanes": 0}, "lanes=0 is out of range", "use 1..256"),
        ({"lanes": -1}, "lanes=-1 is out of range", "use 1..256"),
        ({"lanes": 257}, "lanes=257 is out of range", "use 1..256"),
        ({"chunk_size": 0}, "chunk_size=0 is out of range", "use at least 1"),
        ({"max_parallel": 0}, "max_parallel=0 is out of range", "use 1..500"),
        ({"max_parallel": 501}, "max_parallel=501 is out of range", "use 1..500"),
    ]
    for tuning, message, fix in cases:
        for registry in (domain.registry(), None):
            with pytest.raises(UserError) as failure:
                await start_replay(client, settings, ReplayInput("accounts", **tuning), registry=registry)
            assert (failure.value.message, failure.value.fix) == (message, fix)
    await assert_nothing_started(client, settings, pool, "accounts")


# -- 11. the event store's append ------------------------------------------------------------------------------------


async def test_append_with_a_wrong_expected_version_raises_concurrency_error_and_writes_nothing(
    store: EventStore,
) -> None:
    await store.append("acct-1", [NewEvent("Opened", {"owner": "a"})], expected_version=NO_STREAM)
    before = await domain.all_events(store)
    with pytest.raises(ConcurrencyError) as stale:
        await store.append(
            "acct-1", [NewEvent("Deposited", {"amount": 1}), NewEvent("Deposited", {"amount": 2})], expected_version=0
        )
    assert str(stale.value) == (
        "stream 'acct-1' is at version 1, not the expected 0 — reload the stream and retry the command"
    )
    assert (stale.value.stream_id, stale.value.expected, stale.value.actual) == ("acct-1", 0, 1)
    with pytest.raises(ConcurrencyError, match="stream 'acct-2' is at version 0, not the expected 3"):
        await store.append("acct-2", [NewEvent("Opened", {"owner": "b"})], expected_version=3)
    assert await domain.all_events(store) == before


NOT_AN_OBJECT: Any = [1, 2]  # typed Any: the caller's mistake the type checker would have caught


@pytest.mark.parametrize(
    ("stream", "events", "expected"),
    [
        (
            "acct-1",
            [NewEvent("Deposited", {"amount": 1}), NewEvent("Deposited", NOT_AN_OBJECT)],
            "event 'Deposited' in stream 'acct-1': data must be a JSON object, not list",
        ),
        ("acct-1", [NewEvent("Deposited", "5" if NOT_AN_OBJECT else {})], "data must be a JSON object, not str"),
        ("acct-1", [NewEvent("Deposited", {"note": "a\x00b"})], "data or metadata contains a NUL character"),
        ("acct-1", [NewEvent("Deposited", {}, metadata={"by": ["\x00"]})], "contains a NUL character"),
        ("acct-1", [NewEvent("Deposited", {}, metadata=NOT_AN_OBJECT)], "metadata must be a JSON object, not list"),
        ("acct-1", [NewEvent("", {})], "event type '' in stream 'acct-1' is not valid"),
        ("acct-1", [NewEvent("Deposited", {}, schema_version=0)], "schema_version 0 is not a positive integer"),
        ("", [NewEvent("Opened", {})], "stream id '' is not valid"),
        ("acct-1", [], "nothing to append to stream 'acct-1'"),
    ],
    ids=[
        "list-data",
        "str-data",
        "nul-in-data",
        "nul-in-metadata",
        "list-metadata",
        "empty-type",
        "schema-version",
        "empty-stream",
        "no-events",
    ],
)
async def test_append_of_a_malformed_event_raises_user_error_and_writes_nothing(
    store: EventStore, stream: str, events: list[NewEvent], expected: str
) -> None:
    await store.append("acct-1", [NewEvent("Opened", {"owner": "a"})])
    before = await domain.all_events(store)
    with pytest.raises(UserError) as failure:
        await store.append(stream, events)
    assert expected in failure.value.message
    assert failure.value.fix
    assert await domain.all_events(store) == before
