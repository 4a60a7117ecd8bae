"""The event store: optimistic concurrency, the high-water mark, held-back events, and bulk import."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from temporalio.client import Client

from rehydrate import NO_STREAM, EventStore, NewEvent
from rehydrate.core.database import create_pool
from rehydrate.core.errors import ConcurrencyError, UserError
from rehydrate.core.settings import Settings
from rehydrate.engine import importer
from rehydrate.engine.importer import ImportProgress, JsonLines, import_events, read_jsonl
from rehydrate.models import ReplayInput
from rehydrate.sources.events import KeySpec
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.worker import running_worker
from rehydrate.workflows.replay import ReplayWorkflow
from tests.helpers import domain


async def test_append_checks_the_expected_version_and_numbers_the_stream(store: EventStore) -> None:
    assert await store.append("s", [NewEvent("A", {}), NewEvent("B", {})], expected_version=NO_STREAM) == 2
    assert await store.append("s", [NewEvent("C", {})], expected_version=2) == 3
    with pytest.raises(ConcurrencyError, match="version 3, not the expected 1"):
        await store.append("s", [NewEvent("D", {})], expected_version=1)
    assert [e.stream_version for e in await store.read_stream("s")] == [1, 2, 3]


async def test_concurrent_appends_to_one_stream_let_exactly_one_win(store: EventStore) -> None:
    await store.append("s", [NewEvent("Opened", {})])
    results = await asyncio.gather(
        *(store.append("s", [NewEvent("Moved", {"n": n})], expected_version=1) for n in range(5)),
        return_exceptions=True,
    )
    assert sum(1 for r in results if r == 2) == 1
    assert all(isinstance(r, ConcurrencyError) for r in results if r != 2)
    assert len(await store.read_stream("s")) == 2


async def test_the_mark_never_passes_an_event_whose_transaction_commits_late(
    store: EventStore, database_url: str
) -> None:
    """A appends first (lower position) and stays open while B appends and commits: neither is below the mark
    until A commits, then both are, in position order."""
    a = await asyncpg.connect(database_url)
    try:
        tx = a.transaction()
        await tx.start()
        await store.append("late", [NewEvent("Opened", {"owner": "a"})], connection=a)
        await store.append("early", [NewEvent("Opened", {"owner": "b"})])
        mark = await store.high_water_mark()
        async with store.pool.acquire() as conn:
            delta = await store.read_delta(conn, from_mark=0, to_mark=mark, types=["Opened"])
        assert delta == [], "B committed, but it is not below the mark while A is open"
        await tx.commit()
    finally:
        await a.close()
    mark = await store.high_water_mark()
    async with store.pool.acquire() as conn:
        delta = await store.read_delta(conn, from_mark=0, to_mark=mark, types=["Opened"])
    assert [e.stream_id for e in delta] == ["late", "early"]


async def test_an_event_whose_predecessor_is_above_the_mark_is_held_back(
    store: EventStore, database_url: str, client: Client, settings: Settings
) -> None:
    """T1 takes its transaction id early and appends version 2 after T2 (a later id) appended version 1;
    while a transaction between them runs, version 2 is below the mark and version 1 is not. Version 2 must
    wait for version 1: applying it first would fold a stream out of order."""
    t1, blocker = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        t1_tx, blocker_tx = t1.transaction(), blocker.transaction()
        await t1_tx.start()
        xid1 = await t1.fetchval("SELECT pg_current_xact_id()::text::bigint")
        await blocker_tx.start()
        xid_blocker = await blocker.fetchval("SELECT pg_current_xact_id()::text::bigint")
        await store.append("acct-1", [NewEvent("Opened", {"owner": "x", "group": "g"})])  # T2, a later id
        await store.append(
            "acct-1", [NewEvent("Deposited", {"amount": 5, "group": "g"})], expected_version=1, connection=t1
        )
        await t1_tx.commit()
        assert xid1 < xid_blocker
        mark = await store.high_water_mark()
        assert mark == xid_blocker
        async with store.pool.acquire() as conn, conn.transaction():
            held = await store.held_back(conn, mark)
            delta = await store.read_delta(conn, from_mark=0, to_mark=mark, types=["Opened", "Deposited"])
            lane = [
                e
                async for batch in store.read_lane(
                    conn,
                    after_position=0,
                    mark=mark,
                    types=["Opened", "Deposited"],
                    key=KeySpec(),
                    lane=0,
                    lanes=1,
                    limit=100,
                )
                for e in batch
            ]
        assert held == {"acct-1": 1}
        assert delta == [], "version 2 is below the mark but held back until version 1 is"
        async with store.pool.acquire() as conn:
            lag, _ = await store.lag(conn, mark, ["Opened", "Deposited"])
        assert lag == 2, "a read model at the mark lacks version 1 and the held-back version 2"
        assert [e.stream_version for e in lane] == [2], "the lane read sees it; the chunk drops it (held)"

        # A replay now must not contain version 2 without version 1.
        async with running_worker(settings, domain.registry(), client=client):
            await wait_for_replay(await start_replay(client, settings, ReplayInput("accounts")))
            assert await domain.read_model(store.pool, domain.accounts) == {}
            await blocker_tx.commit()
            result = await wait_for_replay(await start_replay(client, settings, ReplayInput("accounts")))
        rows = await domain.read_model(store.pool, domain.accounts)
        assert rows["acct-1"]["history"] == "oD" and rows["acct-1"]["balance"] == 5
        assert result.events_applied == 2
    finally:
        await t1.close()
        await blocker.close()


async def test_catch_up_after_the_target_moves_the_held_back_event_in_after_its_predecessor(
    store: EventStore, database_url: str
) -> None:
    t1, blocker = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        t1_tx, blocker_tx = t1.transaction(), blocker.transaction()
        await t1_tx.start()
        await t1.fetchval("SELECT pg_current_xact_id()")
        await blocker_tx.start()
        await blocker.fetchval("SELECT pg_current_xact_id()")
        await store.append("s", [NewEvent("Opened", {})])
        await store.append("s", [NewEvent("Deposited", {"amount": 1})], expected_version=1, connection=t1)
        await t1_tx.commit()
        first = await store.high_water_mark()
        await blocker_tx.commit()
        second = await store.high_water_mark()
        async with store.pool.acquire() as conn:
            assert await store.read_delta(conn, from_mark=0, to_mark=first, types=["Opened", "Deposited"]) == []
            moved = await store.read_delta(conn, from_mark=first, to_mark=second, types=["Opened", "Deposited"])
        assert [(e.stream_version, e.type) for e in moved] == [(1, "Opened"), (2, "Deposited")]
    finally:
        await t1.close()
        await blocker.close()


async def test_import_streams_a_file_through_copy_and_continues_stream_versions(
    store: EventStore, tmp_path: Path
) -> None:
    await store.append("order-1", [NewEvent("OrderPlaced", {"customer_id": "c"})])
    lines = [
        {"stream_id": "order-1", "type": "ItemAdded", "data": {"sku": "a"}},
        {"stream_id": "order-2", "type": "OrderPlaced", "data": {"customer_id": "d"}, "stream_version": 1},
        {
            "stream_id": "order-1",
            "type": "OrderPaid",
            "data": {},
            "schema_version": 2,
            "metadata": {"by": "import"},
            "recorded_at": "2025-01-02T03:04:05+00:00",
        },
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n\n")
    report = await import_events(store, read_jsonl(path), source=str(path), batch_size=2)
    assert (report.events, report.streams) == (3, 2)
    order1 = await store.read_stream("order-1")
    assert [(e.stream_version, e.type, e.schema_version) for e in order1] == [
        (1, "OrderPlaced", 1),
        (2, "ItemAdded", 1),
        (3, "OrderPaid", 2),
    ]
    assert order1[2].metadata == {"by": "import"} and order1[2].recorded_at.year == 2025


async def test_every_read_gives_handlers_the_metadata_and_an_empty_dict_when_there_is_none(store: EventStore) -> None:
    await store.append("s-1", [NewEvent("Opened", {"n": 1}, metadata={"by": "ann", "trace": [1, 2]})])
    await store.append("s-2", [NewEvent("Opened", {"n": 2})])
    mark = await store.high_water_mark()
    expected = {"s-1": {"by": "ann", "trace": [1, 2]}, "s-2": {}}
    async with store.pool.acquire() as conn, conn.transaction():
        by_lane = [
            e
            async for batch in store.read_lane(
                conn, after_position=0, mark=mark, types=None, key=KeySpec(), lane=0, lanes=1, limit=10
            )
            for e in batch
        ]
        by_stream = [
            e
            async for batch in store.read_streams(
                conn, low=None, high=None, after=None, mark=mark, types=None, limit=10
            )
            for e in batch
        ]
        delta = await store.read_delta(conn, from_mark=0, to_mark=mark, types=None)
    for events in (by_lane, by_stream, delta):
        assert {e.stream_id: e.metadata for e in events} == expected
    assert [e.data for e in by_stream] == [{"n": 1}, {"n": 2}]


async def test_a_hash_lanes_chunks_read_the_table_by_the_position_index(
    store: EventStore,
) -> None:
    """Written as two conditions, a hash lane's filter had the planner scan the whole table and sort the lane's rows
    for every chunk in a lane's first half. A chunk is read in position order through the index, and gives the same
    events in one chunk or many."""
    await domain.append_all(store, domain.random_history(41, streams=30, events=600))
    await store.pool.execute("ANALYZE rehydrate.events")  # the plans from the same statistics, whatever autovacuum did
    mark = await store.high_water_mark()
    scans = "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relid = 'rehydrate.events'::regclass"

    async def lane_read(limit: int) -> tuple[list[tuple[int, str]], tuple[int, int]]:
        async with store.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow(scans)  # the backend's counts not yet reported include earlier transactions'
            events, position, fetched = [], 0, limit
            while fetched == limit:
                fetched = 0
                async for batch in store.read_lane(
                    conn, after_position=position, mark=mark, types=None, key=KeySpec(), lane=1, lanes=3, limit=limit
                ):
                    events += [(e.global_position, e.stream_id) for e in batch]
                    fetched, position = fetched + len(batch), batch[-1].global_position
            after = await conn.fetchrow(scans)
            return events, (after[0] - before[0], after[1] - before[1])

    by_index, index_scans = await lane_read(limit=20)  # chunks of 20: each needs about 3 x 20 rows of the 600
    whole, _ = await lane_read(limit=600)  # the whole lane in one chunk
    assert by_index == whole and 0 < len(whole) < 600
    assert [position for position, _ in by_index] == sorted(position for position, _ in by_index)
    assert index_scans[0] == 0 and index_scans[1] > 0, index_scans


async def test_import_keeps_every_character_that_copy_text_format_escapes(store: EventStore, tmp_path: Path) -> None:
    tricky = 'tab\there, newline\nthere, cr\r, backslash \\ and \\n literally, quote ", unicode é ✓ 🚀, \\u0000 text'
    lines = [
        {"stream_id": "s\\1\t2", "type": "T\\ype\n", "data": {"text": tricky, tricky: [tricky, 1.5, None, True]}},
        {"stream_id": "s\\1\t2", "type": "Other", "data": {}, "metadata": {"m": tricky}, "recorded_at": "2024-02-29"},
    ]
    path = tmp_path / "tricky.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    report = await import_events(store, read_jsonl(path), source=str(path))
    assert report.events == 2
    stored = await store.read_stream("s\\1\t2")
    assert [(e.stream_id, e.type, e.data) for e in stored] == [
        ("s\\1\t2", "T\\ype\n", lines[0]["data"]),
        ("s\\1\t2", "Other", {}),
    ]
    assert stored[1].metadata == {"m": tricky}
    assert stored[1].recorded_at.isoformat() == "2024-02-29T00:00:00+00:00"


async def test_a_plan_estimates_lane_sizes_from_a_sample_and_the_replay_reports_the_exact_counts(
    store: EventStore, settings: Settings, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay's plan does not count the store (that cost as much as a fifth of a replay): lane sizes come from
    the same sample that cuts the lanes. Each lane's total becomes exact when it is done, and so does the
    generation's."""
    history = domain.random_history(seed=11, streams=300, events=12_000)
    lines = [{"stream_id": stream, "type": e.type, "data": e.data} for stream, e in history]
    await import_events(store, enumerate(lines, start=1))
    await store.pool.execute("ANALYZE rehydrate.events")
    monkeypatch.setattr(EventStore, "sample_rows", 1_500)
    types = domain.accounts.event_types
    async with store.pool.acquire() as conn:
        mark = await store.high_water_mark(conn)
        boundaries, sampled = await store.stream_boundaries(conn, mark=mark, types=types, lanes=4)
        exact = await store.count_ranges(conn, mark=mark, types=types, boundaries=boundaries)
        estimated = await store.count_ranges(conn, mark=mark, types=types, boundaries=boundaries, estimate=True)
        by_hash = await store.count_lanes(conn, mark=mark, types=types, key=KeySpec(), lanes=4, estimate=True)
    assert estimated != exact, "the estimate is taken from a sample, not by counting"
    assert sum(estimated) == pytest.approx(sum(exact), rel=0.25)
    assert sampled == pytest.approx(sum(exact), rel=0.25)  # the boundaries' own sample, which the plan uses
    assert sum(by_hash) == pytest.approx(sum(exact), rel=0.25)

    async with running_worker(settings, domain.registry(), client=client):
        handle = await start_replay(client, settings, ReplayInput("accounts", lanes=4, chunk_size=1_000))
        result = await wait_for_replay(handle)
        progress = await handle.query(ReplayWorkflow.progress)
    applied = sum(1 for _, e in history if e.type in domain.accounts.handlers)
    assert result.events_applied == applied
    assert progress.events_total == applied and all(lane.total == lane.applied for lane in progress.lanes)
    total = await store.pool.fetchval(
        "SELECT events_total FROM rehydrate.generations WHERE projection = 'accounts' AND generation = $1",
        result.generation,
    )
    assert total == applied
    assert await domain.read_model(store.pool, domain.accounts) == domain.oracle(
        domain.accounts, await domain.all_events(store)
    )


async def _index_oids(store: EventStore) -> dict[str, int]:
    rows = await store.pool.fetch(
        "SELECT indexname, (quote_ident(schemaname) || '.' || quote_ident(indexname))::regclass::oid AS oid "
        "FROM pg_indexes WHERE schemaname = 'rehydrate' AND tablename = 'events'"
    )
    return {row["indexname"]: row["oid"] for row in rows}


async def test_an_import_into_an_empty_store_builds_every_index_but_the_primary_key_after_the_load(
    store: EventStore, database_url: str
) -> None:
    """Into an empty store the readers' indexes and the unique (stream, version) are dropped and built again after
    the load (new index objects, same definitions), in the import's transaction: a bad line leaves them as they were.
    Into a store with events the import maintains them as it goes."""
    lines = [(n, {"stream_id": f"s-{n % 7}", "type": "Opened", "data": {"n": n}}) for n in range(1, 501)]
    before = await _index_oids(store)
    assert {"events_tx_position_idx", "events_type_position_idx"} <= before.keys()

    with pytest.raises(UserError, match="input:501"):
        await import_events(store, [*lines, (501, {"stream_id": "s", "type": "Opened", "data": []})])
    assert await _index_oids(store) == before and await store.head() == 0

    await import_events(store, lines)
    after = await _index_oids(store)
    assert after.keys() == before.keys()
    rebuilt = {name for name in after if after[name] != before[name]}
    assert rebuilt == {"events_tx_position_idx", "events_type_position_idx", "events_stream_version_key"}
    assert await store.pool.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'events_stream_version_key'"
    ) == ("UNIQUE (stream_id, stream_version)")
    assert [e.stream_version for e in await store.read_stream("s-3")] == list(range(1, 73))
    with pytest.raises(asyncpg.UniqueViolationError):  # the constraint is back
        await store.pool.execute(
            "INSERT INTO rehydrate.events (stream_id, stream_version, event_type, payload) "
            "VALUES ('s-3', 72, 'T', '{}')"
        )

    await import_events(store, lines[:10])  # the store has events: indexes maintained, not rebuilt
    assert await _index_oids(store) == after


async def test_a_bad_line_late_in_a_file_stops_an_import_into_an_empty_store_and_writes_nothing(
    store: EventStore, tmp_path: Path
) -> None:
    """Into an empty store one COPY takes the whole file while a thread parses ahead of it: a bad line after many
    batches have been sent ends the COPY, the import names the line, and the rollback leaves the store empty with its
    indexes; the connection goes back to the pool usable, and the fixed file imports."""
    before = await _index_oids(store)
    good = [{"stream_id": f"s-{n % 13}", "type": "Opened", "data": {"n": n}} for n in range(1, 5001)]
    bad_lines = {
        "not-json": (4901, b'{"stream_id": "s-1", "type": "Opened", "data": {'),
        "not-an-object": (4902, b"[1, 2]"),
        "wrong-version": (4990, orjson.dumps({**good[4989], "stream_version": 7})),
    }
    for case, (number, bad) in bad_lines.items():
        path = tmp_path / f"{case}.jsonl"
        path.write_bytes(b"\n".join([*map(orjson.dumps, good[: number - 1]), bad, *map(orjson.dumps, good[number:])]))
        with pytest.raises(UserError, match=f"{path}:{number}: "):
            await import_events(store, read_jsonl(path), source=str(path), batch_size=300)
        assert await store.head() == 0, case
        assert await store.pool.fetchval("SELECT count(*) FROM rehydrate.events") == 0, case
        assert await _index_oids(store) == before, case
    path = tmp_path / "fixed.jsonl"
    path.write_bytes(b"\n".join(map(orjson.dumps, good)))
    report = await import_events(store, read_jsonl(path), source=str(path), batch_size=300)
    assert (report.events, report.streams) == (5000, 13)
    assert [e.stream_version for e in await store.read_stream("s-5")] == list(range(1, 386))


async def test_an_import_reports_its_progress_after_each_batch_and_before_building_indexes(
    store: EventStore, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps({"stream_id": f"s-{n % 3}", "type": "T", "data": {}}) for n in range(95)))
    for into_empty in (True, False):
        reader = read_jsonl(path)
        seen: list[tuple[ImportProgress, int]] = []

        def note(progress: ImportProgress, reader: JsonLines = reader, seen: list[Any] = seen) -> None:
            seen.append((progress, reader.bytes_read))

        report = await import_events(store, reader, batch_size=10, progress=note)
        counts = [progress.events for progress, _ in seen]
        assert counts == sorted(counts) and counts[-1] == report.events == 95, into_empty
        assert [progress.indexing for progress, _ in seen][-2:] == ([False, True] if into_empty else [False, False])
        assert seen[-1][1] == reader.size
    assert await store.head() == 190


async def test_two_imports_into_an_empty_store_at_once_both_commit_one_after_the_other(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both find the store empty and both go for its exclusive lock: the first loads it with the readers' indexes
    deferred, the second waits, then finds events and imports as into any store with events. (A look at the table
    inside the transaction held a share lock that made the two wait for each other: a deadlock.)"""
    arrived: list[int] = []
    both = asyncio.Event()
    defer = EventStore.defer_indexes

    async def together(events: EventStore, conn: asyncpg.Connection) -> list[str]:
        arrived.append(1)
        if len(arrived) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), timeout=10)
        return await defer(events, conn)

    monkeypatch.setattr(EventStore, "defer_indexes", together)
    before = await _index_oids(store)

    def lines(stream: str) -> list[tuple[int, Any]]:
        return [(n, {"stream_id": f"{stream}-{n % 5}", "type": "Opened", "data": {"n": n}}) for n in range(1, 201)]

    reports = await asyncio.gather(import_events(store, lines("a")), import_events(store, lines("b")))
    assert [r.events for r in reports] == [200, 200] and len(arrived) == 2
    assert await store.head() == 400
    after = await _index_oids(store)
    assert after.keys() == before.keys() and after != before  # rebuilt once, by the first
    for stream in ("a-0", "b-4"):
        assert [e.stream_version for e in await store.read_stream(stream)] == list(range(1, 41))


async def test_an_import_hands_the_interpreter_between_its_threads_often_while_it_runs_and_only_then(
    store: EventStore,
) -> None:
    """The import parses in a thread while the event loop's thread feeds COPY: it shortens the interpreter's
    switch interval while it runs (two at once included) and restores it when the last ends, failed or not."""
    seen: list[float] = []

    def lines(count: int, bad: bool = False) -> Iterator[tuple[int, Any]]:
        for n in range(1, count + 1):
            seen.append(sys.getswitchinterval())  # read in the import's parsing thread
            yield n, {"stream_id": f"s-{n % 3}", "type": "Opened", "data": [] if bad and n == count else {"n": n}}

    before = sys.getswitchinterval()
    assert before > importer.SWITCH_INTERVAL
    await asyncio.gather(import_events(store, lines(300), batch_size=7), import_events(store, lines(50), batch_size=3))
    assert sys.getswitchinterval() == before
    with pytest.raises(UserError, match="input:20"):
        await import_events(store, lines(20, bad=True))
    assert sys.getswitchinterval() == before
    assert len(seen) == 370 and set(seen) == {importer.SWITCH_INTERVAL}
    assert [e.stream_version for e in await store.read_stream("s-1")] == list(range(1, 100 + 17 + 1))


async def test_an_import_by_a_role_that_may_only_insert_maintains_the_indexes(
    store: EventStore, database_url: str
) -> None:
    role, password = f"rh_importer_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    await store.pool.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' NOSUPERUSER")
    await store.pool.execute(
        f"GRANT USAGE ON SCHEMA rehydrate TO {role}; GRANT SELECT, INSERT ON rehydrate.events TO {role}; "
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA rehydrate TO {role}"
    )
    parts = urlsplit(database_url)
    url = urlunsplit(parts._replace(netloc=f"{role}:{password}@{parts.netloc.rpartition('@')[2]}"))
    before = await _index_oids(store)
    pool = await create_pool(url)
    try:
        lines = [(n, {"stream_id": f"s-{n % 3}", "type": "Opened", "data": {}}) for n in range(1, 31)]
        report = await import_events(EventStore(pool), lines)
    finally:
        await pool.close()
        await store.pool.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
    assert report.events == 30 and await store.head() == 30
    assert await _index_oids(store) == before


async def test_import_reads_every_iso_8601_form_of_recorded_at_as_python_does(store: EventStore) -> None:
    """Common forms go to Postgres as written; the rest (no offset, compact, week dates) as Python reads them."""
    forms = [
        "2025-03-04T05:06:07+00:00",
        "2025-03-04T05:06:07.123456+02:00",
        "2025-03-04 05:06:07Z",
        "2025-03-04T05:06-03",
        "2025-03-04T05:06:07",  # no offset: UTC
        "20250304T050607+0100",
        "2025-W10-2T05:06:07+00:00",
    ]
    lines = [(n, {"stream_id": f"s{n}", "type": "T", "data": {}, "recorded_at": f}) for n, f in enumerate(forms, 1)]
    await import_events(store, lines)
    for n, form in enumerate(forms, 1):
        (event,) = await store.read_stream(f"s{n}")
        expected = datetime.fromisoformat(form)
        assert event.recorded_at == (expected if expected.tzinfo else expected.replace(tzinfo=UTC)), form


async def test_recorded_at_reads_the_same_instant_in_utc_whatever_the_sessions_time_zone_and_date_style(
    store: EventStore,
) -> None:
    """A session with another DateStyle or time zone (a caller's own connection) reads the same instants, in UTC."""
    instants = [
        datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1890, 1, 1, tzinfo=UTC),  # a zone's local mean time then: an offset in seconds
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),  # a later year than 9999 in zones east of UTC
    ]
    await store.append("t", [NewEvent("T", {}, recorded_at=at) for at in instants])
    async with store.pool.acquire() as conn:
        for zone, style in [("UTC", "ISO, MDY"), ("America/St_Johns", "SQL, DMY"), ("Europe/Paris", "German")]:
            await conn.execute(f"SET TimeZone = '{zone}'; SET DateStyle = '{style}'")
            read = [e.recorded_at for e in await store.read_stream("t", conn=conn)]
            assert read == instants, (zone, style)
            assert all(at.tzinfo is UTC for at in read), (zone, style)


async def test_the_bulk_reads_take_recorded_at_as_text_and_give_the_same_instants_in_utc(store: EventStore) -> None:
    """A replay's, a tail's and a repair's reads take recorded_at as ISO text (cheaper to parse than asyncpg's
    timestamp): the same instants as a stream's read, in UTC, in any session time zone; an infinity as asyncpg
    reads it; and, on a session whose DateStyle is not ISO (a pool not made by rehydrate), one clear error."""
    instants = [
        datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2024, 3, 1, 0, 0, 0, 120000, tzinfo=UTC),
        datetime(1890, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
    ]
    await store.append("t", [NewEvent("T", {}, recorded_at=at) for at in instants])
    await store.append("t", [NewEvent("T", {})])
    await store.pool.execute("UPDATE rehydrate.events SET recorded_at = 'infinity' WHERE stream_version = 5")
    expected = [*instants, datetime.max]
    async with store.pool.acquire() as conn, conn.transaction():
        mark = await store.high_water_mark(conn)
        await conn.execute("SET LOCAL TimeZone = 'America/St_Johns'")
        by_stream = [
            e
            async for b in store.read_streams(conn, low=None, high=None, after=None, mark=mark, types=None, limit=10)
            for e in b
        ]
        by_lane = [
            e
            async for b in store.read_lane(
                conn, after_position=0, mark=mark, types=None, key=KeySpec(), lane=0, lanes=1, limit=10
            )
            for e in b
        ]
        by_key = await store.read_keys(conn, key=KeySpec(), keys=["t"], mark=mark, types=None)
        delta = await store.read_delta(conn, from_mark=1, to_mark=mark, types=None)
        for read in (by_stream, by_lane, by_key, delta):
            assert [e.recorded_at for e in read] == expected
            assert all(e.recorded_at.tzinfo is UTC for e in read[:4])
        await conn.execute("SET LOCAL DateStyle = 'SQL, DMY'")
        with pytest.raises(UserError, match="DateStyle is not ISO") as failed:
            await store.read_keys(conn, key=KeySpec(), keys=["t"], mark=mark, types=None)
        assert "position" in str(failed.value) and "create_pool" in (failed.value.fix or "")
    async with store.pool.acquire() as conn:  # a pool's RESET ALL returns to the session's ISO
        await conn.execute("SET DateStyle = 'German'")
    async with store.pool.acquire() as conn, conn.transaction():
        assert [
            e.recorded_at for e in await store.read_keys(conn, key=KeySpec(), keys=["t"], mark=mark, types=None)
        ] == expected


async def test_a_read_by_stream_range_streams_through_the_index_even_when_its_range_exceeds_the_limit(
    store: EventStore,
) -> None:
    """A chunk of a lane by stream range reads its events in (stream id, version) order up to its limit. At the
    planner's default page cost, a range holding somewhat more events than the limit was read by a bitmap scan
    of the whole range and sorted (spilling to disk at real chunk sizes): slower, and nothing streams until the
    sort ends. The read tells the planner the events are cached, which they are whenever lanes split by range."""
    history = domain.random_history(seed=5, streams=400, events=20_000)
    lines = [{"stream_id": stream, "type": e.type, "data": e.data} for stream, e in history]
    await import_events(store, enumerate(lines, start=1))
    await store.pool.execute("ANALYZE rehydrate.events")
    async with store.pool.acquire() as conn, conn.transaction():
        mark = await store.high_water_mark(conn)
        (low, high, *_), _ = await store.stream_boundaries(conn, mark=mark, types=None, lanes=4)
        in_range = await conn.fetchval(
            "SELECT count(*) FROM rehydrate.events WHERE stream_id >= $1 AND stream_id < $2", low, high
        )
        limit = in_range * 2 // 3
        read = [
            e
            async for batch in store.read_streams(
                conn, low=low, high=high, after=None, mark=mark, types=None, limit=limit, fetch_size=1_000
            )
            for e in batch
        ]
        # The read's own prepared statement, planned again as its first executions are (with these values).
        name = await conn.fetchval(
            "SELECT name FROM pg_prepared_statements "
            """WHERE statement LIKE 'SELECT "global_position"%ORDER BY "stream_id", "stream_version" LIMIT%'"""
        )
        explain = await conn.fetchval(
            "SELECT format('EXPLAIN EXECUTE %I(%L, NULL, %s, %L, %L)', "
            "$1::text, $2::text, $3::int, $4::text, $5::text)",
            name,
            str(mark),
            limit,
            low,
            high,
        )
        explained = await conn.fetch(explain)
        plan = "\n".join(row[0] for row in explained)
    assert len(read) == limit
    assert [(e.stream_id, e.stream_version) for e in read] == sorted((e.stream_id, e.stream_version) for e in read)
    assert "Index Scan using events_stream_version_key" in plan, plan
    assert "Sort" not in plan, plan
