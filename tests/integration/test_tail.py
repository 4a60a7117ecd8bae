"""The tail: new events reach the active read model in order, exactly once, gap-safe under concurrent writers."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client

from rehydrate import EventStore, NewEvent
from rehydrate.core.errors import ConcurrencyError
from rehydrate.core.settings import Settings
from rehydrate.engine.operations import projection_statuses
from rehydrate.engine.projections import Registry
from rehydrate.models import ReplayInput
from rehydrate.models.names import tail_workflow_id
from rehydrate.starter import start_replay, start_tail, stop_tail, tail_state, wait_for_replay
from rehydrate.worker import running_worker
from tests.helpers import domain, release_b
from tests.helpers.waiting import eventually, matches_oracle


async def test_the_tail_applies_new_events_after_the_swap(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(41, events=300))
    async with running_worker(tail_settings, domain.registry(), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("accounts")))
        await domain.append_all(store, domain.random_history(42, events=200))
        await eventually(lambda: matches_oracle(store))
        assert (await tail_state(client, "accounts", tail_settings.temporal_task_queue))[0] == "RUNNING"


async def active_checkpoint(store: EventStore, projection: str) -> int:
    return int(
        await store.pool.fetchval(
            """SELECT g.checkpoint_xmin::text::bigint FROM rehydrate.generations g
               JOIN rehydrate.projections p ON p.name = g.projection AND p.active_generation = g.generation
               WHERE g.projection = $1""",
            projection,
        )
    )


async def test_the_tail_never_passes_an_event_whose_transaction_commits_late(
    client: Client, tail_settings: Settings, store: EventStore, database_url: str
) -> None:
    await domain.append_all(store, domain.random_history(43, events=100))
    async with running_worker(tail_settings, domain.registry(), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("accounts")))
        before = await domain.read_model(store.pool, domain.accounts)
        a = await asyncpg.connect(database_url)
        try:
            tx = a.transaction()
            await tx.start()
            await store.append("late-a", [NewEvent("Opened", {"owner": "a", "group": "g"})], connection=a)
            a_xid = int(await a.fetchval("SELECT pg_current_xact_id()::text::bigint"))
            await store.append("early-b", [NewEvent("Opened", {"owner": "b", "group": "g"})])
            await asyncio.sleep(2.5)  # more than two poll intervals, and B's NOTIFY has woken the tail
            assert await domain.read_model(store.pool, domain.accounts) == before
            assert await active_checkpoint(store, "accounts") <= a_xid
            await tx.commit()
        finally:
            await a.close()
        await eventually(lambda: matches_oracle(store))
    rows = await domain.read_model(store.pool, domain.accounts)
    assert rows["late-a"]["owner"] == "a" and rows["early-b"]["owner"] == "b"


async def test_the_tail_applies_a_stream_in_stream_order_when_transaction_order_differs(
    client: Client, tail_settings: Settings, store: EventStore, database_url: str
) -> None:
    await domain.append_all(store, domain.random_history(44, events=50))
    async with running_worker(tail_settings, domain.registry(), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("accounts")))
        # The stream exists in the read model, so a later version applied early would show (on a missing row
        # the handlers ignore Deposited and Withdrawn, and a redelivery would hide the mistake).
        await store.append("s", [NewEvent("Opened", {"owner": "x", "group": "g"})])
        await eventually(lambda: matches_oracle(store))
        opened = await domain.read_model(store.pool, domain.accounts)
        assert opened["s"]["history"] == "o"
        t1, blocker = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
        try:
            t1_tx, blocker_tx = t1.transaction(), blocker.transaction()
            await t1_tx.start()
            t1_xid = int(await t1.fetchval("SELECT pg_current_xact_id()::text::bigint"))  # the earlier id
            await blocker_tx.start()
            blocker_xid = int(await blocker.fetchval("SELECT pg_current_xact_id()::text::bigint"))
            # T2, with a later id than both, appends version 2 and commits.
            await store.append("s", [NewEvent("Withdrawn", {"amount": 3, "group": "g"})], expected_version=1)
            # T1 appends version 3 after it, and commits: version 3 is below the mark, version 2 is not.
            await store.append(
                "s", [NewEvent("Deposited", {"amount": 7, "group": "g"})], expected_version=2, connection=t1
            )
            await t1_tx.commit()
            assert t1_xid < blocker_xid
            await asyncio.sleep(2.5)  # more than two poll intervals, and both NOTIFYs have woken the tail
            assert await domain.read_model(store.pool, domain.accounts) == opened, "version 3 before version 2"
            assert await active_checkpoint(store, "accounts") <= blocker_xid
            await blocker_tx.commit()
        finally:
            await t1.close()
            await blocker.close()
        await eventually(lambda: matches_oracle(store))
    row = (await domain.read_model(store.pool, domain.accounts))["s"]
    assert (row["history"], row["balance"], row["changes"]) == ("oWD", 4, 2)


async def stream_version(store: EventStore, stream: str) -> int:
    return int(
        await store.pool.fetchval(
            "SELECT coalesce(max(stream_version), 0) FROM rehydrate.events WHERE stream_id = $1", stream
        )
    )


async def lag_of(store: EventStore, projection: str) -> int:
    checkpoint = await active_checkpoint(store, projection)
    async with store.pool.acquire() as conn:
        events, _ = await store.lag(conn, checkpoint, domain.registry().get(projection).event_types)
    return events


def members(rows: dict[str, dict[str, object]]) -> dict[str, object]:
    return {group: row["members"] for group, row in rows.items()}


async def test_concurrent_writers_during_a_replay_and_its_swap_end_equal_to_the_oracle(
    client: Client, tail_settings: Settings, store: EventStore, database_url: str
) -> None:
    async with store.pool.acquire() as conn, conn.transaction():  # one commit: quicker to set up
        for stream, event in domain.random_history(45, streams=40, events=1500):
            await store.append(stream, [event], connection=conn)
    stop = asyncio.Event()
    written = {"plain": 0, "late": 0}
    last_stream = ["acct-0"]  # the stream a plain writer appended to last

    async def append_retrying(stream: str, event: NewEvent, *, expect: bool) -> None:
        """Append one event, again after each conflict with another writer."""
        while True:
            try:
                if expect:
                    version = await stream_version(store, stream)
                    await store.append(stream, [event], expected_version=version)
                else:
                    await store.append(stream, [event])
                written["plain"] += 1
                last_stream[0] = stream
                return
            except ConcurrencyError:
                await asyncio.sleep(0.001)

    async def writer(seed: int, *, expect: bool) -> None:
        for stream, event in domain.random_history(seed, streams=40, events=100_000):
            if stop.is_set():
                return
            await append_retrying(stream, event, expect=expect)
            await asyncio.sleep(0.002)

    async def late_committer(seed: int) -> None:
        """Takes a transaction id, waits while the others append and commit with later ids, then appends to the
        stream written last (a version after theirs, with an earlier id), waits again and commits."""
        conn = await asyncpg.connect(database_url)
        rng = random.Random(seed)
        history = iter(domain.random_history(seed, streams=40, events=100_000))
        try:
            while not stop.is_set():
                _, event = next(history)
                tx = conn.transaction()
                await tx.start()
                try:
                    await conn.fetchval("SELECT pg_current_xact_id()")
                    await asyncio.sleep(rng.uniform(0.02, 0.1))
                    await store.append(last_stream[0], [event], connection=conn)
                    await asyncio.sleep(rng.uniform(0, 0.1))
                except ConcurrencyError:
                    await tx.rollback()
                    continue
                await tx.commit()
                written["late"] += 1
        finally:
            await conn.close()

    async with running_worker(tail_settings, domain.registry(), client=client):
        for name in ("accounts", "group_totals"):
            await wait_for_replay(await start_replay(client, tail_settings, ReplayInput(name)))
        writers = [
            asyncio.create_task(writer(46, expect=True)),
            asyncio.create_task(writer(47, expect=False)),
            asyncio.create_task(late_committer(48)),
            asyncio.create_task(late_committer(49)),
        ]
        try:
            await asyncio.sleep(0.5)  # the tail is applying the writers' events to generation 1
            during = dict(written)
            result = await wait_for_replay(
                await start_replay(client, tail_settings, ReplayInput("accounts", lanes=3, chunk_size=40))
            )
            await asyncio.sleep(0.5)  # and to generation 2 after the swap
        finally:
            stop.set()
            await asyncio.gather(*writers)
        # Writes went on throughout the replay, late commits included, and some streams got a version from an
        # earlier transaction than the version before it.
        assert written["plain"] > during["plain"] + 50 and written["late"] > during["late"] + 5, (during, written)
        assert await store.pool.fetchval(
            """SELECT count(*) FROM rehydrate.events a JOIN rehydrate.events b
                 ON b.stream_id = a.stream_id AND b.stream_version = a.stream_version + 1
               WHERE b.tx_id < a.tx_id"""
        )

        async def caught_up() -> bool:
            return await lag_of(store, "accounts") == 0 and await matches_oracle(store)

        await eventually(caught_up, within=30)
        assert (await tail_state(client, "accounts", tail_settings.temporal_task_queue))[0] == "RUNNING"
        events = await domain.all_events(store)
        assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, events)
        # group_totals is keyed across streams: only its commutative column is comparable with the position fold.
        await eventually(lambda: lag_is_zero(store, "group_totals"), within=30)
        groups = await domain.read_model(store.pool, domain.group_totals)
        assert members(groups) == members(domain.oracle(domain.group_totals, events))
    active = await store.pool.fetchval("SELECT active_generation FROM rehydrate.projections WHERE name = 'accounts'")
    assert active == result.generation == 2


async def lag_is_zero(store: EventStore, projection: str) -> bool:
    return await lag_of(store, projection) == 0


REPO = Path(__file__).resolve().parents[2]


async def projections_command(settings: Settings) -> str:
    """`rehydrate projections` run as a user would, against this test's Postgres and Temporal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REHYDRATE_", "TEMPORAL_"))}
    env.update(
        REHYDRATE_DATABASE_URL=str(settings.database_url),
        REHYDRATE_TEMPORAL_ADDRESS=settings.temporal_address,
        REHYDRATE_TEMPORAL_TASK_QUEUE=settings.temporal_task_queue,
        REHYDRATE_PROJECTIONS="tests.helpers.domain",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        COLUMNS="200",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rehydrate",
        "projections",
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, (stdout.decode(), stderr.decode())
    return stdout.decode()


async def test_a_poison_event_stops_that_projections_tail_with_a_clear_error_and_the_others_go_on(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(49, events=100))
    async with running_worker(tail_settings, domain.registry(), client=client):
        for name in ("accounts", "group_totals"):
            await wait_for_replay(await start_replay(client, tail_settings, ReplayInput(name)))
        groups_before = await domain.read_model(store.pool, domain.group_totals)
        # group_totals' handler raises on a Deposited without an amount; accounts ignores a Deposited on a stream
        # that was never opened, so for it the event is harmless.
        await store.append("poison", [NewEvent("Deposited", {"group": "g1"})])
        poison = (await store.read_stream("poison"))[0]

        async def tail_failed() -> bool:
            return (await tail_state(client, "group_totals", tail_settings.temporal_task_queue))[0] == "FAILED"

        await eventually(tail_failed)
        _, error = await tail_state(client, "group_totals", tail_settings.temporal_task_queue)
        assert error is not None
        for part in (f"event {poison.global_position}", "'poison'", "'Deposited'", "KeyError", "amount"):
            assert part in error, (part, error)
        recorded = await store.pool.fetchval("SELECT tail_error FROM rehydrate.projections WHERE name = 'group_totals'")
        assert recorded is not None
        for part in (f"event {poison.global_position}", "'poison'", "'Deposited'", "KeyError"):
            assert part in recorded, (part, recorded)
        assert await domain.read_model(store.pool, domain.group_totals) == groups_before
        # The other projection's tail goes on: it passed the event and applies later ones.
        await store.append("after", [NewEvent("Opened", {"owner": "z", "group": "g1"})])
        await eventually(lambda: matches_oracle(store))
        assert "after" in await domain.read_model(store.pool, domain.accounts)
        assert (await tail_state(client, "accounts", tail_settings.temporal_task_queue))[0] == "RUNNING"
        # The failed tail applies nothing more, and the CLI shows it stopped at the poison event.
        assert await domain.read_model(store.pool, domain.group_totals) == groups_before
        output = await projections_command(tail_settings)
    assert "FAILED" in output and f"event {poison.global_position}" in output, output
    failed_lines = [line for line in output.splitlines() if "FAILED" in line]
    assert len(failed_lines) == 1 and "group_total" in failed_lines[0], output


async def tail_run_id(client: Client, settings: Settings, projection: str) -> str | None:
    handle = client.get_workflow_handle(tail_workflow_id(projection, settings.temporal_task_queue))
    return (await handle.describe()).run_id


async def test_tail_stop_holds_new_events_back_and_tail_start_applies_them_exactly_once(
    client: Client, tail_settings: Settings, store: EventStore, pool: asyncpg.Pool
) -> None:
    await domain.append_all(store, domain.random_history(50, events=100))
    async with running_worker(tail_settings, domain.registry(), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("accounts")))
        await eventually(lambda: matches_oracle(store))
        await stop_tail(client, pool, tail_settings, "accounts")
        # Once `tail stop` has returned, the tail has stopped: nothing appended from now on is applied.
        assert (await tail_state(client, "accounts", tail_settings.temporal_task_queue))[0] == "CANCELED"
        before = await domain.read_model(store.pool, domain.accounts)
        checkpoint = await active_checkpoint(store, "accounts")
        await domain.append_all(store, domain.random_history(51, events=100))
        await asyncio.sleep(2.5)  # more than two poll intervals
        assert await domain.read_model(store.pool, domain.accounts) == before
        assert await active_checkpoint(store, "accounts") == checkpoint
        assert await lag_of(store, "accounts") > 0
    # A worker that starts again leaves a stopped tail stopped.
    async with running_worker(tail_settings, domain.registry(), client=client):
        await asyncio.sleep(1.5)
        assert (await tail_state(client, "accounts", tail_settings.temporal_task_queue))[0] == "CANCELED"
        assert await domain.read_model(store.pool, domain.accounts) == before
        await start_tail(client, pool, tail_settings, "accounts")
        # The oracle's counters and order-sensitive history would show an event applied twice or skipped.
        await eventually(lambda: matches_oracle(store))
        assert (await tail_state(client, "accounts", tail_settings.temporal_task_queue))[0] == "RUNNING"
        assert await lag_of(store, "accounts") == 0


async def test_tail_start_right_after_tail_stop_starts_a_new_tail_that_keeps_running(
    client: Client, tail_settings: Settings, store: EventStore, pool: asyncpg.Pool
) -> None:
    await domain.append_all(store, domain.random_history(52, events=100))
    async with running_worker(tail_settings, domain.registry(), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("accounts")))
        first = await tail_run_id(client, tail_settings, "accounts")
        await stop_tail(client, pool, tail_settings, "accounts")
        await start_tail(client, pool, tail_settings, "accounts")
        # Not the run being cancelled (which would end CANCELED soon after): a new one.
        assert await tail_run_id(client, tail_settings, "accounts") != first
        assert (await tail_state(client, "accounts", tail_settings.temporal_task_queue))[0] == "RUNNING"
        await domain.append_all(store, domain.random_history(53, events=100))
        await eventually(lambda: matches_oracle(store))
        assert (await tail_state(client, "accounts", tail_settings.temporal_task_queue))[0] == "RUNNING"


async def test_a_running_tail_never_takes_a_replay_chunks_slot(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    # One slot for replay activities: were the tail's minutes-long activity in it, the second replay would wait
    # for the tail to end its run. Tails have a task queue and slots of their own.
    settings = tail_settings.model_copy(update={"max_concurrent_activities": 1})
    await domain.append_all(store, domain.random_history(45, events=300))
    async with running_worker(settings, domain.registry(), client=client):
        await wait_for_replay(await start_replay(client, settings, ReplayInput("accounts")))
        await eventually(lambda: _tail_running(client, settings))
        second = await asyncio.wait_for(
            wait_for_replay(await start_replay(client, settings, ReplayInput("accounts"))), 60
        )
        assert second.generation == 2
        await domain.append_all(store, domain.random_history(46, events=50))
        await eventually(lambda: matches_oracle(store))


async def _tail_running(client: Client, settings: Settings) -> bool:
    return (await tail_state(client, "accounts", settings.temporal_task_queue))[0] == "RUNNING"


async def tail_code_is(store: EventStore, fingerprint: str) -> bool:
    """Whether the accounts tail last started with the code of this fingerprint."""
    found = await store.pool.fetchval("SELECT tail_fingerprint FROM rehydrate.projections WHERE name = 'accounts'")
    return bool(found == fingerprint)


async def test_a_tail_that_moves_to_other_code_marks_the_projection_stale(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    """Workers of a new release take the tail over: it applies new events with their code, and `projections` says the
    read model is STALE (its generation was built with the old code) although the command's own code is the new."""
    await domain.append_all(store, domain.random_history(47, events=300))
    async with running_worker(tail_settings, domain.registry(), client=client):
        await wait_for_replay(await start_replay(client, tail_settings, ReplayInput("accounts")))
        await eventually(lambda: tail_code_is(store, domain.accounts.fingerprint))
    release_b_registry = Registry([release_b.accounts, domain.group_totals])
    async with running_worker(tail_settings, release_b_registry, client=client):
        await eventually(lambda: tail_code_is(store, release_b.accounts.fingerprint), within=60)
        await domain.append_all(store, domain.random_history(48, events=100))
        async with store.pool.acquire() as conn:
            # As a shell that still has the old release's code sees it.
            statuses = {s.name: s for s in await projection_statuses(conn, store, domain.registry(), "public")}
    accounts = statuses["accounts"]
    assert accounts.stale and accounts.stale_reason is not None and "the tail applies" in accounts.stale_reason
    assert not statuses["group_totals"].stale
    # Rows are counted when asked, not taken from the build.
    assert accounts.rows_exact and accounts.rows == len(await domain.read_model(store.pool, domain.accounts))


CUT = """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
    WHERE application_name = 'rh_tail_cut' AND datname = current_database()"""
TAIL_ERROR = "SELECT tail_error FROM rehydrate.projections WHERE name = 'accounts'"


async def test_a_tail_waits_out_cut_connections_with_one_warning_and_catches_up(
    client: Client, tail_settings: Settings, store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Every connection of the worker is cut again and again for two seconds while events are appended: the tail's
    activity backs off inside (no failed attempt), says so once, records the error on the projection, and when the
    connections hold again applies every event exactly once and clears the error."""
    caplog.set_level(logging.INFO, logger="rehydrate.tail")
    await domain.append_all(store, domain.random_history(53, events=200))
    url = str(tail_settings.database_url)
    tagged_url = f"{url}{'&' if '?' in url else '?'}application_name=rh_tail_cut"
    tagged = tail_settings.model_copy(update={"database_url": tagged_url})
    async with running_worker(tagged, domain.registry(), client=client):
        await wait_for_replay(await start_replay(client, tagged, ReplayInput("accounts")))
        await eventually(lambda: matches_oracle(store))
        cutting = True

        async def cut() -> int:
            cuts = 0
            while cutting:
                cuts += await store.pool.fetchval(CUT)
                await asyncio.sleep(0.05)
            return cuts

        cutter = asyncio.create_task(cut())
        try:
            await domain.append_all(store, domain.random_history(54, events=100))

            async def recorded() -> bool:
                return str(await store.pool.fetchval(TAIL_ERROR) or "").startswith("retrying: ")

            await eventually(recorded)
            await asyncio.sleep(2)
        finally:
            cutting = False
            cuts = await cutter
        await eventually(lambda: matches_oracle(store))
        await eventually(lambda: _no_tail_error(store))
        tail = await client.get_workflow_handle(
            tail_workflow_id("accounts", tail_settings.temporal_task_queue)
        ).describe()
        assert [a.attempt for a in tail.raw_description.pending_activities] == [1]
    assert cuts > 0
    messages = [r.getMessage() for r in caplog.records if r.name == "rehydrate.tail"]
    # One warning per outage and one line when it is over. Batches can slip through between cuts: when they do for
    # 5 s while the error is still being recorded, that outage is over and the next cut starts another, so the lines
    # alternate rather than number exactly one each; a stream of warnings would show as two in a row.
    kinds = [("down" if "cannot apply" in m else "up") for m in messages if "apply batches" in m or "applies b" in m]
    assert kinds and kinds == ["down", "up"] * (len(kinds) // 2), messages


async def _no_tail_error(store: EventStore) -> bool:
    return await store.pool.fetchval(TAIL_ERROR) is None
