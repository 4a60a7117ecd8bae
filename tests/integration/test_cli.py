"""The `rehydrate` command on bad input: exit 1, one `error:` line (and its `fix:`) on stderr, no traceback, no
password, and nothing written. Each case runs the real command in a subprocess against the test's real Postgres
and Temporal dev server."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from temporalio.client import Client
from temporalio.service import RPCError

from rehydrate import EventStore, NewEvent
from rehydrate.core.settings import Settings
from rehydrate.examples import orders
from rehydrate.models.names import replay_workflow_id
from tests.helpers import domain
from tests.helpers.cli import UNREACHABLE_DATABASE, assert_one_clear_error, on_terminal, rehydrate


async def event_rows(pool: asyncpg.Pool) -> list[tuple[object, ...]]:
    rows = await pool.fetch(
        "SELECT global_position, tx_id::text, stream_id, stream_version, event_type, schema_version, payload, "
        "metadata, recorded_at FROM rehydrate.events ORDER BY global_position"
    )
    return [tuple(row) for row in rows]


# -- 2. a projection module that fails to import -------------------------------------------------------------------


async def test_worker_exits_1_naming_a_projection_module_that_fails_to_import(
    settings: Settings, tmp_path: Path
) -> None:
    run = await rehydrate(
        settings, tmp_path, "worker", REHYDRATE_PROJECTIONS="tests.helpers.domain,tests.helpers.bad_projection_module"
    )
    assert_one_clear_error(
        run,
        "projection module 'tests.helpers.bad_projection_module' failed to import: "
        "RuntimeError: the projection module is broken on purpose",
    )
    assert "REHYDRATE_PROJECTIONS" in run.stderr
    assert run.stdout == ""


# -- 1, 7. replay start with a bad name or out-of-range tuning -------------------------------------------------------


async def test_replay_start_with_an_unknown_name_or_out_of_range_tuning_exits_1_and_starts_nothing(
    settings: Settings, tmp_path: Path, client: Client, pool: asyncpg.Pool
) -> None:
    cases = [
        (["nope"], {}, "unknown projection 'nope' (registered: accounts, group_totals)"),
        (["accounts", "--lanes", "0"], {}, "lanes=0 is out of range"),
        (["accounts", "--chunk-size", "0"], {}, "chunk_size=0 is out of range"),
        (["accounts", "--max-parallel", "0"], {}, "max_parallel=0 is out of range"),
        (["accounts"], {"REHYDRATE_LANES": "0"}, "setting 'lanes' is invalid"),
        # Checked before Temporal is reached: the mistake is named even when Temporal is down.
        (["accounts", "--lanes", "0"], {"REHYDRATE_TEMPORAL_ADDRESS": "127.0.0.1:1"}, "lanes=0 is out of range"),
    ]
    runs = await asyncio.gather(
        *(rehydrate(settings, tmp_path, "replay", "start", *args, **env) for args, env, _ in cases)
    )
    for run, (_, _, expected) in zip(runs, cases, strict=True):
        assert_one_clear_error(run, expected)
    for name in ("accounts", "nope"):
        try:
            description = await client.get_workflow_handle(
                replay_workflow_id(name, None, settings.temporal_task_queue)
            ).describe()
        except RPCError:
            continue  # never started by anyone
        assert description.task_queue != settings.temporal_task_queue, f"a replay of {name} was started"
    assert await pool.fetchval("SELECT count(*) FROM rehydrate.generations") == 0


async def test_every_command_that_names_a_projection_refuses_an_unknown_one(
    settings: Settings, tmp_path: Path, store: EventStore
) -> None:
    """A typo is an error listing the known names (registered or built before), never an empty answer."""
    await store.pool.execute(
        """INSERT INTO rehydrate.generations (projection, generation, state, version, fingerprint, physical_table,
               target_xmin, checkpoint_xmin, lanes, chunk_size)
           VALUES ('retired_one', 1, 'dropped', 1, 'x', 'retired_one__g1', '1', '1', 1, 1)"""
    )
    commands = [
        ["replay", "status", "acounts"],
        ["replay", "list", "acounts"],
        ["replay", "cancel", "acounts"],
        ["replay", "pause", "acounts"],
        ["replay", "resume", "acounts"],
        ["replay", "tune", "acounts", "--max-parallel", "2"],
        ["replay", "plan", "acounts"],
        ["generations", "acounts"],
        ["rollback", "acounts"],
        ["tail", "start", "acounts"],
        ["tail", "stop", "acounts"],
        ["dead-letters", "list", "acounts"],
        ["dead-letters", "retry", "acounts"],
        ["verify", "acounts"],
    ]
    runs = await asyncio.gather(*(rehydrate(settings, tmp_path, *command) for command in commands))
    for run in runs:
        line = assert_one_clear_error(run, "unknown projection 'acounts'")
        assert "accounts" in line and "group_totals" in line, run
    # A projection built before and no longer registered is still known to the commands that read the catalog.
    listed = await rehydrate(settings, tmp_path, "generations", "retired_one")
    assert listed.code == 0 and "g1" in listed.stdout, listed


# -- 8, 9. unreachable database and Temporal -------------------------------------------------------------------------


async def test_an_unreachable_database_exits_1_in_one_line_without_the_password(
    settings: Settings, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"stream_id": "s", "type": "A", "data": {}}\n')
    cases = [
        (["db", "init"], UNREACHABLE_DATABASE),
        (["events", "import", str(events)], UNREACHABLE_DATABASE),
        (["db", "init"], "postgresql://nobody:secret@127.0.0.1:notaport/none"),  # not even a URL
    ]
    runs = await asyncio.gather(
        *(rehydrate(settings, tmp_path, *args, REHYDRATE_DATABASE_URL=url) for args, url in cases)
    )
    for run, (_, url) in zip(runs, cases, strict=True):
        line = assert_one_clear_error(run, "cannot connect to Postgres at postgresql://nobody:***@")
        assert "secret" not in run.stdout + run.stderr, run
        assert url.split("@")[1] in line, "names where it tried"
        assert "REHYDRATE_DATABASE_URL" in run.stderr


async def test_a_database_that_refuses_the_login_or_lacks_the_database_is_not_told_to_start_postgres(
    settings: Settings, tmp_path: Path
) -> None:
    parts = urlsplit(str(settings.database_url))
    where = parts.netloc.rsplit("@", 1)[-1]  # host and port (empty for the embedded server's socket)
    unknown_role = urlunsplit(parts._replace(netloc=f"nobody_{uuid.uuid4().hex[:6]}@{where}"))
    unknown_database = urlunsplit(parts._replace(path="/no_such_database"))
    login = await rehydrate(settings, tmp_path, "db", "init", REHYDRATE_DATABASE_URL=unknown_role)
    assert_one_clear_error(login, "cannot connect to Postgres at")
    assert "refused the login: check the user and password" in login.stderr, login
    missing = await rehydrate(settings, tmp_path, "db", "init", REHYDRATE_DATABASE_URL=unknown_database)
    assert_one_clear_error(missing, "cannot connect to Postgres at")
    assert "has no such database: create it" in missing.stderr, missing


async def test_an_unreachable_temporal_exits_1_in_one_line(settings: Settings, tmp_path: Path) -> None:
    run = await rehydrate(settings, tmp_path, "replay", "start", "accounts", REHYDRATE_TEMPORAL_ADDRESS="127.0.0.1:1")
    assert_one_clear_error(run, "cannot connect to Temporal at 127.0.0.1:1 (namespace 'default')")
    assert "REHYDRATE_TEMPORAL_ADDRESS" in run.stderr


# -- 10. events import ---------------------------------------------------------------------------------------------

GOOD = b'{"stream_id": "%s-1", "type": "Opened", "data": {"owner": "a"}}'
# Each case: the third line of a file (after a good line and a blank one), and what the error says about it.
BAD_LINES: dict[str, tuple[bytes, str]] = {
    "not-json": (b'{"stream_id": "x", "type": "Opened", "data": {', "not valid JSON"),
    "not-an-object": (b'["x", "Opened", {}]', "expected a JSON object, got list"),
    "data-not-an-object": (b'{"stream_id": "x", "type": "Opened", "data": [1, 2]}', "'data' must be a JSON object"),
    "stream-id-missing": (b'{"type": "Opened", "data": {}}', "'stream_id' must be a non-empty string"),
    "stream-id-not-a-string": (b'{"stream_id": ["x"], "type": "A", "data": {}}', "'stream_id' must be a non-empty"),
    "type-missing": (b'{"stream_id": "x", "data": {}}', "'type' must be a non-empty string"),
    "nul": (b'{"stream_id": "x", "type": "A", "data": {"note": "a\\u0000b"}}', "contains a NUL character"),
    "schema-version-a-string": (
        b'{"stream_id": "x", "type": "A", "data": {}, "schema_version": "2"}',
        "'schema_version' must be a positive integer, got '2'",
    ),
    "stream-version-skips": (
        b'{"stream_id": "pre-1", "type": "A", "data": {}, "stream_version": 4}',
        "'stream_version' 4 of stream 'pre-1' is not the next version (3)",
    ),
    "unknown-field": (b'{"stream_id": "x", "type": "A", "data": {}, "payload": {}}', "unknown field(s) ['payload']"),
    "markup-in-a-stream-id": (
        b'{"stream_id": "[/x] [bold]y", "type": "A", "data": {}, "stream_version": 7}',
        "'stream_version' 7 of stream '[/x] [bold]y' is not the next version (1)",
    ),
}


async def test_import_of_a_file_with_a_bad_line_exits_1_naming_file_and_line_and_writes_nothing(
    settings: Settings, tmp_path: Path, store: EventStore, subtests: pytest.Subtests
) -> None:
    await store.append("pre-1", [NewEvent("Opened", {"owner": "p"}), NewEvent("Renamed", {"owner": "q"})])
    before = await event_rows(store.pool)
    files = {}
    for case, (line, _) in BAD_LINES.items():
        path = tmp_path / f"{case}.jsonl"
        # A good line of its own stream first, then a blank line, the bad line 3, and a good line 4: with
        # --batch-size 1 the first line is already copied when line 3 fails, and must not stay.
        path.write_bytes(b"\n".join([GOOD % case.encode(), b"", line, GOOD % b"after"]) + b"\n")
        files[case] = path
    *runs, missing = await asyncio.gather(
        *(rehydrate(settings, tmp_path, "events", "import", str(path), "--batch-size", "1") for path in files.values()),
        rehydrate(settings, tmp_path, "events", "import", str(tmp_path / "missing.jsonl")),
    )
    for (case, (_, expected)), run in zip(BAD_LINES.items(), runs, strict=True):
        with subtests.test(case):
            assert_one_clear_error(run, f"{files[case]}:3: ", expected)
    assert_one_clear_error(missing, f"cannot read {tmp_path / 'missing.jsonl'}: No such file or directory")
    assert await event_rows(store.pool) == before, "nothing from any of the files was written"


async def test_import_of_a_good_file_writes_every_event_and_prints_the_rate(
    settings: Settings, tmp_path: Path, store: EventStore
) -> None:
    await store.append("pre-1", [NewEvent("Opened", {"owner": "p"})])
    lines = [
        {"stream_id": "pre-1", "type": "Renamed", "data": {"owner": "q"}},
        {"stream_id": "new-1", "type": "Opened", "data": {"owner": "n"}, "stream_version": 1},
        {
            "stream_id": "new-1",
            "type": "Deposited",
            "data": {"amount": 5},
            "schema_version": 2,
            "metadata": {"source": "import"},
            "recorded_at": "2025-01-02T03:04:05+00:00",
        },
    ]
    path = tmp_path / "good.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    run = await rehydrate(settings, tmp_path, "events", "import", str(path), "--batch-size", "2")
    assert run.code == 0, run
    assert "imported 3 events in 2 streams in " in run.stdout and "events/s)" in run.stdout, run
    assert [(e.stream_version, e.type) for e in await store.read_stream("pre-1")] == [(1, "Opened"), (2, "Renamed")]
    new = await store.read_stream("new-1")
    assert [(e.stream_version, e.type, e.schema_version, e.data) for e in new] == [
        (1, "Opened", 1, {"owner": "n"}),
        (2, "Deposited", 2, {"amount": 5}),
    ]
    assert new[1].metadata == {"source": "import"} and new[1].recorded_at.year == 2025


async def test_import_shows_a_progress_bar_on_a_terminal_and_none_under_json_or_into_a_pipe(
    settings: Settings, tmp_path: Path, store: EventStore
) -> None:
    """On a terminal the import draws a bar (the file read, events per second, time left) and clears it for its
    report; under --json, and when standard output is not a terminal, the output is the report alone."""
    path = tmp_path / "orders.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in orders.generate(3000)))
    shown = await on_terminal(settings, tmp_path, "events", "import", str(path))
    assert shown.code == 0, shown
    assert "ev/s" in shown.stdout and "\x1b[" in shown.stdout, shown  # drawn, then erased
    assert "imported 3,000 events in " in shown.stdout, shown

    as_json = await on_terminal(settings, tmp_path, "events", "import", str(path), "--json")
    assert as_json.code == 0, as_json
    assert "\x1b" not in as_json.stdout and "ev/s" not in as_json.stdout, as_json
    assert orjson.loads(as_json.stdout)["events"] == 3000

    piped = await rehydrate(settings, tmp_path, "events", "import", str(path))
    assert piped.code == 0, piped
    assert piped.stdout.startswith("imported 3,000 events in ") and piped.stdout.count("\n") == 1, piped
    assert piped.stderr == "", piped


async def test_the_demo_builds_both_read_models_and_prints_only_its_story(
    settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    """The README's first command, on a small history, against this test's Postgres and Temporal: both read models
    are built, swapped in and equal to the oracle, and the output is the demo's own (no worker log lines)."""
    run = await rehydrate(
        settings, tmp_path, "demo", "--events", "3000", REHYDRATE_PROJECTIONS="rehydrate.examples.orders"
    )
    assert run.code == 0, run
    for name in ("order_summary", "customer_stats"):
        assert f"✓ {name}: generation 1 active" in run.stdout, run
    assert " INFO " not in run.stdout + run.stderr, run
    events = await domain.all_events(store)
    assert len(events) == 3000
    for projection in (orders.order_summary, orders.customer_stats):
        assert await domain.read_model(store.pool, projection) == domain.oracle(projection, events)


async def test_replay_plan_prints_each_lane_and_its_chunks(
    settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    await domain.append_all(store, domain.random_history(5, streams=30, events=500))
    run = await rehydrate(settings, tmp_path, "replay", "plan", "accounts", "--lanes", "2", "--chunk-size", "1000")
    assert run.code == 0, run
    handled = sum(1 for e in await domain.all_events(store) if e.type in domain.accounts.handlers)
    text = " ".join(run.stdout.split())  # the console wraps long lines
    assert f"accounts: {handled:,} events to read" in text and ", 2 lanes, 2 chunks of up to 1,000 events" in text
    lanes = [line.strip() for line in run.stdout.splitlines() if line.strip().startswith("lane ")]
    assert len(lanes) == 2 and all(line.endswith("events, 1 chunk") for line in lanes), run
    assert sum(int(line.split(": ")[1].split(" events")[0].replace(",", "")) for line in lanes) == handled
    assert f"workers: 0 polling {settings.temporal_task_queue}" in run.stdout, run  # none runs in this test
