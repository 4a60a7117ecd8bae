"""Projections that read events rehydrate did not write: py-eventsourcing's table (written by the real library, the
oracle being the library's own fold of each aggregate), and a team's own table or view, in the read models' database
or another (the oracle being the plain fold of its events)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from dataclasses import replace
from datetime import UTC
from urllib.parse import urlsplit

import asyncpg
import orjson
import pytest
from temporalio.client import Client

from rehydrate import Event, EventStore
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.engine import operations
from rehydrate.engine.catalog import Catalog
from rehydrate.engine.generations import Generations
from rehydrate.engine.projections import Projection, Registry, Row
from rehydrate.models import ReplayInput
from rehydrate.sources import reading
from rehydrate.sources.declaration import Source
from rehydrate.sources.inspection import SourceCheck, check_source, prepare, prepare_sql
from rehydrate.sources.mapping import EventTable
from rehydrate.sources.pools import Sources
from rehydrate.sources.presets import outbox_table
from rehydrate.sources.reading import EventSource
from rehydrate.starter import start_replay, start_tail, tail_state, verify, wait_for_replay
from rehydrate.worker import running_worker
from tests.helpers import domain, es_bank, legacy, team_stores
from tests.helpers.ports import free_port
from tests.helpers.roles import as_role
from tests.helpers.waiting import eventually


@pytest.mark.parametrize(("compress", "lanes"), [(False, 1), (True, 4)], ids=["plain-1-lane", "zlib-4-lanes"])
async def test_a_projection_rebuilds_from_py_eventsourcing_and_its_tail_follows_new_events(
    client: Client, tail_settings: Settings, store: EventStore, compress: bool, lanes: int
) -> None:
    app = await asyncio.to_thread(es_bank.bank, str(tail_settings.database_url), compress=compress)
    ids = await asyncio.to_thread(es_bank.write_history, app, 3, 30, 400)
    projection = es_bank.projection(app)
    async with running_worker(tail_settings, Registry([projection]), client=client):
        result = await wait_for_replay(
            await start_replay(client, tail_settings, ReplayInput(projection.name, lanes=lanes, chunk_size=50))
        )
        assert result.events_applied == 400
        rows = await domain.read_model(store.pool, projection)
        assert rows == await asyncio.to_thread(es_bank.expected, app, ids)
        # New commands, saved by the library while the tail runs: they reach the read model.
        more = await asyncio.to_thread(es_bank.write_history, app, 4, 35, 150)

        async def caught_up() -> bool:
            want = await asyncio.to_thread(es_bank.expected, app, ids + more)
            return await domain.read_model(store.pool, projection) == want

        await eventually(caught_up, within=30)


async def test_a_source_whose_table_is_missing_is_one_clear_error(settings: Settings, store: EventStore) -> None:
    app = await asyncio.to_thread(es_bank.bank, str(settings.database_url))
    await store.pool.execute("DROP TABLE bank_events")
    projection = es_bank.projection(app)
    with pytest.raises(UserError, match=r"source .bank.: table or view .public\.bank_events. does not exist"):
        await operations.plan(store.pool, settings, projection)


async def test_a_mapping_that_does_not_fit_its_table_is_one_line_naming_the_fix(store: EventStore) -> None:
    """`sources check` on a missing column, a wrong type, an unindexed read order, an undecodable payload; an
    unreachable events database. Nothing is written to the team's table."""
    await store.pool.execute(legacy.CREATE)
    await legacy.write(store.pool, domain.random_history(93, streams=5, events=40))
    gap_free = legacy.table("gap_free")

    async def check(table: EventTable) -> SourceCheck:
        async with store.pool.acquire() as conn:
            return await check_source(conn, EventSource(store.pool, table, "legacy"))

    missing = await check(replace(gap_free, payload="data"))
    assert len(missing.problems) == 1
    assert "source 'legacy': 'public.legacy_events' has no column 'data'" in missing.problems[0]
    wrong = await check(replace(gap_free, payload_format="jsonb"))
    assert wrong.problems == [
        "source 'legacy': column 'body' (payload) of 'public.legacy_events' is text, not jsonb — set payload_format "
        "to the column's type (jsonb, json, text or bytea with a decoder)"
    ]
    await store.pool.execute(
        "ALTER TABLE legacy_events ADD COLUMN rehydrate_tx xid8 NOT NULL DEFAULT pg_current_xact_id()"
    )
    unindexed = await check(legacy.table("transaction"))
    assert unindexed.ok
    assert [w for w in unindexed.warnings if "CREATE INDEX" in w and '("rehydrate_tx", "id")' in w]
    assert (await check(gap_free)).ok
    before = await store.pool.fetch("SELECT * FROM legacy_events ORDER BY id")
    await store.pool.execute("UPDATE legacy_events SET body = '{broken' WHERE id = 38")
    undecodable = await check(gap_free)
    assert (
        len(undecodable.problems) == 1
        and "1 of the latest 40 payloads do not decode, e.g. event 38" in (undecodable.problems[0])
    )
    await store.pool.execute("UPDATE legacy_events SET body = $1 WHERE id = 38", before[37]["body"])
    assert await store.pool.fetch("SELECT * FROM legacy_events ORDER BY id") == before

    # An outbox whose order column its writers fill as they please: a warning that says how to get a real order.
    await store.pool.execute(
        """CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL,
           aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL, seq bigint NOT NULL UNIQUE,
           created timestamptz NOT NULL DEFAULT now())"""
    )
    outbox = await check(outbox_table("public.outbox", position="seq", recorded_at="created"))
    assert outbox.ok and [w for w in outbox.warnings if "position 'seq' is filled from no sequence" in w]
    unindexed_time = [w for w in outbox.warnings if "no index leads with 'created'" in w]
    assert unindexed_time and 'CREATE INDEX "outbox_created_idx" ON "public"."outbox" ("created")' in unindexed_time[0]
    await store.pool.execute("CREATE INDEX ON outbox (created)")
    indexed = await check(outbox_table("public.outbox", position="seq", recorded_at="created"))
    assert not [w for w in indexed.warnings if "no index leads with" in w]
    assert "position 'id' is filled from a sequence" in (await check(gap_free)).holds

    sources = Sources(store)
    nowhere = Source("legacy", gap_free, "postgresql://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(UserError, match=r"source 'legacy': .* — check REHYDRATE_SOURCE_LEGACY_URL"):
        await sources.of(nowhere)
    await sources.close()


async def test_an_undecodable_payload_is_a_dead_letter_not_a_crash(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await store.pool.execute(legacy.CREATE)
    await legacy.write(store.pool, domain.random_history(94, streams=8, events=150))
    events = await legacy.events(store.pool)
    broken = events[69]
    await store.pool.execute("UPDATE legacy_events SET body = 'not json' WHERE id = $1", broken.global_position)
    projection = legacy.accounts("gap_free", on_error="park")
    async with running_worker(settings, Registry([projection]), client=client):
        started = await start_replay(
            client, settings, ReplayInput("accounts", lanes=2, chunk_size=30, allow_dead_letters=True)
        )
        result = await wait_for_replay(started)
    parked = await Catalog(store.pool, "rehydrate").dead_letters("accounts", result.generation)  # type: ignore[arg-type]
    assert parked[0]["global_position"] == broken.global_position
    assert "source 'legacy' could not decode its payload: JSONDecodeError" in parked[0]["error"]
    assert {d["key"] for d in parked} == {broken.stream_id}
    live = await domain.read_model(store.pool, domain.accounts)
    clean = domain.oracle(domain.accounts, events)
    assert {k: v for k, v in live.items() if k != broken.stream_id} == {
        k: v for k, v in clean.items() if k != broken.stream_id
    }


async def test_a_view_over_an_archive_and_a_live_table_ordered_by_a_bigint_transaction_id_rebuilds_and_tails(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    """History split into an archive and a live table, read through a view of their union; transaction ids in a
    bigint column as Sequent writes them (`pg_current_xact_id()::text::bigint`)."""
    pool = store.pool
    await pool.execute(legacy.CREATE)
    await pool.execute(
        "ALTER TABLE legacy_events ADD COLUMN xact_id bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint"
    )
    await legacy.write(pool, domain.random_history(95, streams=20, events=400))
    await pool.execute("CREATE TABLE legacy_archive (LIKE legacy_events INCLUDING ALL)")
    await pool.execute(
        """WITH moved AS (DELETE FROM legacy_events WHERE id <= 250 RETURNING *)
           INSERT INTO legacy_archive SELECT * FROM moved"""
    )
    await pool.execute("CREATE INDEX ON legacy_archive (xact_id, id); CREATE INDEX ON legacy_events (xact_id, id)")
    await pool.execute("CREATE VIEW legacy_all AS SELECT * FROM legacy_archive UNION ALL SELECT * FROM legacy_events")
    view = Source("legacy", replace(legacy.table(), table="public.legacy_all", transaction="xact_id"))
    async with pool.acquire() as conn:
        assert (found := await check_source(conn, EventSource(pool, view.table, "legacy"))).ok, found
        with pytest.raises(UserError, match=r"'public\.legacy_all' is a view: a column cannot be added to it"):
            await prepare(conn, prepare_sql(view.table), view.table)
    projection = legacy.accounts(read=view)
    async with running_worker(tail_settings, Registry([projection]), client=client):
        await wait_for_replay(
            await start_replay(client, tail_settings, ReplayInput("accounts", lanes=2, chunk_size=60))
        )
        assert await domain.read_model(pool, domain.accounts) == domain.oracle(
            domain.accounts, await legacy.events(pool, "legacy_all")
        )
        await legacy.write(pool, domain.random_history(96, streams=25, events=100), counted_in="legacy_all")

        async def caught_up() -> bool:
            want = domain.oracle(domain.accounts, await legacy.events(pool, "legacy_all"))
            return await domain.read_model(pool, domain.accounts) == want

        await eventually(caught_up, within=30)


@pytest.mark.parametrize("lanes", [1, 4])
async def test_a_team_table_in_another_database_rebuilds_and_tails_like_the_own_store(
    client: Client, tail_settings: Settings, store: EventStore, other_database: str, lanes: int
) -> None:
    """The worker reads the team's database as a role with only what `rehydrate db grants ROLE --source legacy`
    prints: it can read the table and nothing more."""
    events_db = await asyncpg.connect(other_database)
    role, password = f"rh_reader_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    await events_db.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' NOSUPERUSER NOCREATEDB NOCREATEROLE")
    try:
        await events_db.execute(legacy.CREATE)
        await legacy.write(events_db, domain.random_history(70 + lanes, streams=30, events=500))
        await prepare(events_db, prepare_sql(legacy.table()))  # what `rehydrate sources prepare` runs
        printed = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "rehydrate", "db", "grants", role, "--source", "legacy", "--json"],
            env={
                "PATH": "/usr/bin:/bin",
                "REHYDRATE_DATABASE_URL": str(tail_settings.database_url),
                "REHYDRATE_SOURCES": orjson.dumps({"legacy": legacy.DECLARED}).decode(),
                "REHYDRATE_SOURCE_LEGACY_URL": other_database,
            },
            capture_output=True,
            timeout=60,
        )
        assert printed.returncode == 0, printed.stderr
        statements = orjson.loads(printed.stdout)["statements"]
        assert statements == [
            f'GRANT USAGE ON SCHEMA "public" TO "{role}"',
            f'GRANT SELECT ON "public"."legacy_events" TO "{role}"',
        ]
        for statement in statements:
            await events_db.execute(statement)
        reader_url = as_role(other_database, role, password)
        projection = legacy.accounts(url=reader_url)
        async with running_worker(tail_settings, Registry([projection]), client=client):
            result = await wait_for_replay(
                await start_replay(client, tail_settings, ReplayInput("accounts", lanes=lanes, chunk_size=40))
            )
            want = domain.oracle(domain.accounts, await legacy.events(events_db))
            assert await domain.read_model(store.pool, domain.accounts) == want
            assert result.events_applied == sum(
                1 for e in await legacy.events(events_db) if e.type in projection.handlers
            )

            await legacy.write(events_db, domain.random_history(90 + lanes, streams=35, events=120))

            async def caught_up() -> bool:
                want = domain.oracle(domain.accounts, await legacy.events(events_db))
                return await domain.read_model(store.pool, domain.accounts) == want

            await eventually(caught_up, within=30)
        # Nothing of rehydrate's was written into the team's database but the prepared column and index.
        tables = await events_db.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
        assert [t[0] for t in tables] == ["legacy_events"]
        reader = await asyncpg.connect(reader_url)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.execute(legacy.INSERT, "intruder", 1, "Opened", "{}")
        finally:
            await reader.close()
    finally:
        await events_db.execute(f"DROP OWNED BY {role}")
        await events_db.execute(f"DROP ROLE {role}")
        await events_db.close()


@pytest.mark.parametrize("order", ["transaction", "gap_free"])
async def test_an_event_that_commits_late_is_never_skipped_on_a_mapped_table(
    client: Client, settings: Settings, store: EventStore, order: str
) -> None:
    """A writer holds its transaction open after inserting; a later writer commits (or, gap-free, waits for the table
    lock as py-eventsourcing's writers do); a replay runs meanwhile. Once all commit, a catch-up brings every event,
    each once, in stream order."""
    await store.pool.execute(legacy.CREATE)
    if order == "transaction":
        async with store.pool.acquire() as conn:
            await prepare(conn, prepare_sql(legacy.table()))
    history = domain.random_history(75, streams=10, events=200)
    rows = legacy.numbered(history)  # numbered up front: the late writers cannot see each other's versions
    await store.pool.executemany(legacy.INSERT, rows[:150])
    projection = legacy.accounts(order)  # type: ignore[arg-type]
    late = await store.pool.acquire()
    later = await store.pool.acquire()
    try:
        tx = late.transaction()
        await tx.start()
        if order == "gap_free":
            await late.execute("LOCK TABLE legacy_events IN EXCLUSIVE MODE")
        await late.executemany(legacy.INSERT, rows[150:175])
        writing = asyncio.create_task(_locked_write(later, rows[175:], order))
        await asyncio.sleep(0.3)
        async with running_worker(settings, Registry([projection]), client=client):
            await wait_for_replay(await start_replay(client, settings, ReplayInput("accounts", lanes=2, chunk_size=30)))
            partial = await domain.read_model(store.pool, domain.accounts)
            await tx.commit()
            await writing
            async with store.pool.acquire() as conn:
                generations = Generations(conn, store, settings.read_model_schema)
                await generations.tail_batch(projection, 10_000)
        everything = await legacy.events(store.pool)
        assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, everything)
        assert partial == domain.oracle(domain.accounts, [e for e in everything if e.global_position <= 150])
    finally:
        await store.pool.release(late)
        await store.pool.release(later)


async def test_an_event_that_commits_after_the_settle_window_is_found_by_the_gap_audit_and_applied_in_order(
    client: Client, tail_settings: Settings, store: EventStore
) -> None:
    """A settle-window table (1 s): a writer holds ten events open past the window while later ones commit; the replay
    misses them, as the window says, and records their positions as a gap. Once they commit, the tail's gap audit
    finds them and rebuilds their keys: every event lands in stream order, and nothing is left to look for."""
    pool = store.pool
    await pool.execute(legacy.CREATE)
    rows = legacy.numbered(domain.random_history(97, streams=10, events=200))
    await pool.executemany(legacy.INSERT, rows[:100])
    late = await pool.acquire()
    try:
        tx = late.transaction()
        await tx.start()
        await late.executemany(legacy.INSERT, rows[100:110])  # positions 101-110, open
        await pool.executemany(legacy.INSERT, rows[110:])  # 111-200, committed
        await asyncio.sleep(1.5)  # every position is older than the window now
        projection = legacy.accounts("settle")
        async with running_worker(tail_settings, Registry([projection]), client=client):
            replay = ReplayInput("accounts", lanes=2, chunk_size=30)
            result = await wait_for_replay(await start_replay(client, tail_settings, replay))
            early = await legacy.events(pool)
            assert [e.global_position for e in early] == [*range(1, 101), *range(111, 201)]
            assert await domain.read_model(pool, domain.accounts) == domain.oracle(domain.accounts, early)
            gaps = await pool.fetch(
                "SELECT low, high FROM rehydrate.source_gaps WHERE generation = $1", result.generation
            )
            assert [tuple(g) for g in gaps] == [(101, 110)]
            await tx.commit()

            async def caught_up() -> bool:
                everything = await legacy.events(pool)
                return await domain.read_model(pool, domain.accounts) == domain.oracle(domain.accounts, everything)

            await eventually(caught_up, within=30)
        assert await pool.fetchval("SELECT count(*) FROM rehydrate.source_gaps") == 0
    finally:
        await pool.release(late)


async def _locked_write(conn: asyncpg.Connection, rows: list[tuple[str, int, str, str]], order: str) -> None:
    async with conn.transaction():
        if order == "gap_free":
            await conn.execute("LOCK TABLE legacy_events IN EXCLUSIVE MODE")
        await conn.executemany(legacy.INSERT, rows)


async def test_a_gap_past_its_horizon_is_looked_in_once_more_and_older_gaps_are_never_recorded(
    client: Client, settings: Settings, store: EventStore
) -> None:
    """A settle-window table (window 1 s, horizon 4 s). A position emptied by a rollback long ago is older than the
    horizon: the plan does not record it. Ten events held open past the window are recorded as a gap; they commit,
    and the next catch-up comes only after the gap's horizon has passed: it still looks in the gap once, applies
    them, and only then forgets it."""
    pool = store.pool
    await pool.execute(legacy.CREATE)
    rows = legacy.numbered(domain.random_history(98, streams=10, events=200))
    await pool.executemany(legacy.INSERT, rows[:50])  # positions 1-50
    async with pool.acquire() as conn:
        rolled_back = conn.transaction()
        await rolled_back.start()
        await conn.execute(legacy.INSERT, "nobody", 1, "Opened", "{}")  # takes position 51
        await rolled_back.rollback()
    await pool.executemany(legacy.INSERT, rows[50:100])  # 52-101
    await asyncio.sleep(4.5)  # all of it older than the horizon
    late = await pool.acquire()
    try:
        tx = late.transaction()
        await tx.start()
        await late.executemany(legacy.INSERT, rows[100:110])  # 102-111, open
        await pool.executemany(legacy.INSERT, rows[110:])  # 112-201, committed
        await asyncio.sleep(1.2)  # older than the window, younger than the horizon
        projection = legacy.accounts(read=Source("legacy", replace(legacy.table("settle"), gap_horizon_seconds=4.0)))
        async with running_worker(settings, Registry([projection]), client=client):
            replay = ReplayInput("accounts", lanes=2, chunk_size=30)
            result = await wait_for_replay(await start_replay(client, settings, replay))
        gaps = await pool.fetch("SELECT low, high FROM rehydrate.source_gaps WHERE generation = $1", result.generation)
        assert [tuple(g) for g in gaps] == [(102, 111)]
        await tx.commit()
    finally:
        await pool.release(late)
    await asyncio.sleep(4.5)  # the gap is older than the horizon now
    async with Sources(store) as sources, pool.acquire() as conn:
        await Generations(conn, sources, settings.read_model_schema).tail_batch(projection, 10_000)
    everything = await legacy.events(pool)
    assert len(everything) == 200
    assert await domain.read_model(pool, domain.accounts) == domain.oracle(domain.accounts, everything)
    assert await pool.fetchval("SELECT count(*) FROM rehydrate.source_gaps") == 0


async def test_a_uuid_stream_column_and_a_local_timestamp_are_read_by_their_types(
    settings: Settings, store: EventStore
) -> None:
    """Stream ids in a uuid column are found through its own index (a key's events, a stream's events); a recorded-at
    column without a time zone (and with a precision) is read as UTC, whatever the session's time zone, by the bulk
    reads (as text) and a stream's read (as a timestamp) alike."""
    pool = store.pool
    await pool.execute(
        """CREATE TABLE uuid_events (id bigserial PRIMARY KEY, stream uuid NOT NULL, version int NOT NULL,
           type varchar(40) NOT NULL, data jsonb NOT NULL, at timestamp(3) NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
           UNIQUE (stream, version))"""
    )
    streams = [uuid.uuid4() for _ in range(3)]
    await pool.executemany(
        "INSERT INTO uuid_events (stream, version, type, data) VALUES ($1, $2, 'Opened', '{}')",
        [(s, v) for s in streams for v in (1, 2)],
    )
    table = EventTable(
        table="public.uuid_events",
        position="id",
        stream_id="stream",
        stream_version="version",
        event_type="type",
        payload="data",
        recorded_at="at",
        order="gap_free",
    )
    source = EventSource(pool, table, "uuids")
    async with pool.acquire() as conn:
        await conn.execute("SET TIME ZONE 'America/New_York'")
        await source.inspect(conn)
        key = str(streams[1])
        found = await source.read_keys(conn, key=domain.accounts.key, keys=[key], mark=100, types=None)
        assert [(e.stream_id, e.stream_version) for e in found] == [(key, 1), (key, 2)]
        plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + source._sql(reading._READ_STREAM), key, 0, None)
        assert "uuid_events_stream_version_key" in str(plan), plan
        stream = await source.read_stream(key, conn=conn)
        assert [e.stream_version for e in stream] == [1, 2]
        now = await conn.fetchval("SELECT now()")
        assert all(abs((e.recorded_at - now).total_seconds()) < 60 for e in stream), (stream, now)
        assert [e.recorded_at for e in found] == [e.recorded_at for e in stream]
        assert all(e.recorded_at.tzinfo is UTC for e in found + stream)
        assert await source.lane_split(conn, domain.accounts.key, "range") == "hash"  # a range of uuid text: no index
        await conn.execute("ALTER TABLE uuid_events ALTER COLUMN stream TYPE varchar(64)")
        await source.inspect(conn)
        assert await source.lane_split(conn, domain.accounts.key, "range") == "range"  # varchar(64) is text


async def test_verify_a_point_in_time_sandbox_and_rollback_work_on_a_table_in_another_database(
    client: Client, settings: Settings, store: EventStore, other_database: str
) -> None:
    """The operations around a replay, on a source in another database: verify finds no drift (and finds a tampered
    row), an as-of sandbox holds the fold of the events recorded by then, and a rollback to the earlier code catches
    up from the source."""
    events_db = await asyncpg.connect(other_database)
    try:
        await events_db.execute(legacy.CREATE)
        await prepare(events_db, prepare_sql(legacy.table()))
        await legacy.write(events_db, domain.random_history(81, streams=20, events=300))
        as_of = await events_db.fetchval("SELECT max(created) FROM legacy_events")
        await asyncio.sleep(0.05)
        await legacy.write(events_db, domain.random_history(82, streams=25, events=200))
        first = legacy.accounts(url=other_database)
        doubled = Projection("accounts", version=2, table=domain.Account, key="stream", source=first.event_source)
        for event_type, handler in first.handlers.items():
            doubled.on(event_type)(_twice if event_type == "Deposited" else handler)
        async with running_worker(settings, Registry([first]), client=client):
            await wait_for_replay(await start_replay(client, settings, ReplayInput("accounts", lanes=2)))
            assert (await verify(client, settings, "accounts")).differing == 0
            await store.pool.execute(
                "UPDATE public.account__g1 SET balance = balance + 1 "
                "WHERE account_id = (SELECT min(account_id) FROM public.account__g1)"
            )
            assert (await verify(client, settings, "accounts")).differing == 1
            then = ReplayInput("accounts", sandbox="then", as_of=as_of.isoformat(), lanes=2)
            await wait_for_replay(await start_replay(client, settings, then))
        events = await legacy.events(events_db)
        assert await domain.rows_of(store.pool, "rehydrate_sandbox_then", "account", "account_id") == domain.oracle(
            domain.accounts, [e for e in events if e.recorded_at <= as_of]
        )
        async with running_worker(settings, Registry([doubled]), client=client):
            await wait_for_replay(await start_replay(client, settings, ReplayInput("accounts", lanes=2)))
        await legacy.write(events_db, domain.random_history(83, streams=25, events=100))
        done = await operations.rollback(store.pool, settings, first)
        assert done.to_generation == 1 and done.caught_up > 0
        everything = await legacy.events(events_db)
        assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(domain.accounts, everything)
    finally:
        await events_db.close()


def _twice(row: Row | None, event: Event) -> Row | None:
    """Deposits counted twice: a bad release to roll back from."""
    if row is not None:
        row["balance"] += 2 * event.data["amount"]
    return row


@pytest.mark.parametrize("lanes", [1, 4])
@pytest.mark.parametrize("kind", team_stores.KINDS)
async def test_a_preset_table_rebuilds_while_its_writers_write_and_its_tail_follows(
    client: Client, tail_settings: Settings, store: EventStore, other_database: str, kind: team_stores.Kind, lanes: int
) -> None:
    """message-db's messages and an outbox, in another database, written the way their writers write, also during
    the build and the swap: the read model ends equal to the plain fold of every event. Messages without data
    (message-db allows them) are read as empty payloads, and `sources check` finds nothing wrong."""
    events_db = await asyncpg.connect(other_database)
    try:
        await team_stores.create(events_db, kind)
        await team_stores.write(events_db, kind, domain.random_history(60 + lanes, streams=30, events=600))
        if kind == "message-db":
            await team_stores.write_empty_messages(events_db, 5)
        projection = team_stores.accounts(kind, other_database)
        checked = await check_source(events_db, EventSource(store.pool, projection.event_source.table, kind))
        assert checked.ok, checked.problems
        writing = True

        async def writer() -> int:
            seed, batches = 700, 0
            while writing:
                seed += 1
                await team_stores.write(events_db, kind, domain.random_history(seed, streams=35, events=10))
                batches += 1
                await asyncio.sleep(0.02)
            return batches

        writes = asyncio.create_task(writer())
        try:
            async with running_worker(tail_settings, Registry([projection]), client=client):
                replay = ReplayInput("accounts", lanes=lanes, chunk_size=60)
                await wait_for_replay(await start_replay(client, tail_settings, replay))
                writing = False
                assert await writes >= 1

                async def caught_up() -> bool:
                    want = domain.oracle(domain.accounts, await team_stores.events(events_db, kind))
                    return await domain.read_model(store.pool, domain.accounts) == want

                await eventually(caught_up, within=30)
        finally:
            writing = False
            await writes
    finally:
        await events_db.close()


async def test_a_tail_waits_out_a_source_database_that_does_not_answer_when_it_starts(
    client: Client,
    tail_settings: Settings,
    store: EventStore,
    other_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The team's database is down when the tail first opens it: the tail records that it is retrying, keeps
    running, and once the database answers it applies what was written meanwhile (it does not stop for good as it
    does on a poison event)."""
    events_db = await asyncpg.connect(other_database)
    try:
        await events_db.execute(legacy.CREATE)
        await prepare(events_db, prepare_sql(legacy.table()))
        await legacy.write(events_db, domain.random_history(91, streams=15, events=200))
        projection = legacy.accounts()  # its database: REHYDRATE_SOURCE_LEGACY_URL
        monkeypatch.setenv("REHYDRATE_SOURCE_LEGACY_URL", other_database)
        settings = tail_settings.model_copy(update={"tails": False})
        async with running_worker(settings, Registry([projection]), client=client):
            await wait_for_replay(await start_replay(client, settings, ReplayInput("accounts", lanes=2)))
        # Nothing listens there: the connection is refused, as while the database restarts.
        down = f"postgresql://postgres@127.0.0.1:{free_port()}{urlsplit(other_database).path}"
        monkeypatch.setenv("REHYDRATE_SOURCE_LEGACY_URL", down)
        await legacy.write(events_db, domain.random_history(92, streams=15, events=100))
        async with running_worker(tail_settings, Registry([projection]), client=client):
            await start_tail(client, store.pool, tail_settings, "accounts")

            async def retrying() -> bool:
                error = await store.pool.fetchval(
                    "SELECT tail_error FROM rehydrate.projections WHERE name = 'accounts'"
                )
                return str(error or "").startswith("retrying: DatabaseUnreachable")

            await eventually(retrying)
            assert (await tail_state(client, "accounts", tail_settings.temporal_task_queue))[0] == "RUNNING"
            monkeypatch.setenv("REHYDRATE_SOURCE_LEGACY_URL", other_database)

            async def caught_up() -> bool:
                expected = domain.oracle(domain.accounts, await legacy.events(events_db))
                return await domain.read_model(store.pool, domain.accounts) == expected

            await eventually(caught_up, within=60)
    finally:
        await events_db.close()
