"""Generated bad input: hypothesis draws many malformed lines, payloads, identifiers, ranges, module names and
database URLs; each is refused with one clear error naming the input and its fix, and leaves the event store and
every active read model exactly as they were (row counts and checksums before and after).

The hand-written cases (one per kind, with their exact messages) are in test_bad_input.py and test_cli.py; this
module adds volume. Hypothesis is the generator here (derandomized, so CI draws the same cases each run); the
cases run against the test's real Postgres, many in-process and a handful through the real command.

The run writes its counts to `bad-input-report.json` in pytest's basetemp (and to $REHYDRATE_BAD_INPUT_REPORT when
set): per kind, the cases run and the cases refused safely. docs/errors.md gives the command and the figures.
"""

from __future__ import annotations

import asyncio
import os
import re
import string
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote as url_quote

import asyncpg
import orjson
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlmodel import Field, SQLModel
from temporalio.client import WorkflowFailureError

from rehydrate import Event, EventStore, NewEvent
from rehydrate.core.database import connect, ensure_schema, grants_sql
from rehydrate.core.errors import UserError
from rehydrate.core.identifiers import qualified
from rehydrate.core.settings import Settings, load_settings
from rehydrate.engine.catalog import Catalog
from rehydrate.engine.importer import import_events, read_jsonl
from rehydrate.engine.projections import Projection, Registry, Row, TableShape
from rehydrate.engine.snapshots import SnapshotStore
from rehydrate.engine.upcasting import Upcasters
from rehydrate.models import ReplayInput
from rehydrate.sources.log import log_position
from rehydrate.starter import check_replay_input, failure_cause, start_replay, wait_for_replay
from rehydrate.worker import running_worker
from tests.helpers import domain, kafka, legacy
from tests.helpers.cli import assert_one_clear_error, rehydrate
from tests.helpers.ledgers import REGISTRY, good_history
from tests.helpers.roles import as_role

T = TypeVar("T")

# -- the report ------------------------------------------------------------------------------------------------------

COUNTS: dict[str, dict[str, int]] = {}


def record(kind: str, safe: bool) -> None:
    counts = COUNTS.setdefault(kind, {"cases": 0, "refused_safely": 0})
    counts["cases"] += 1
    counts["refused_safely"] += int(safe)


@pytest.fixture(scope="module", autouse=True)
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    total = {
        "cases": sum(c["cases"] for c in COUNTS.values()),
        "refused_safely": sum(c["refused_safely"] for c in COUNTS.values()),
    }
    text = orjson.dumps({"total": total, "kinds": COUNTS}, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    paths = [tmp_path_factory.getbasetemp() / "bad-input-report.json"]
    if os.environ.get("REHYDRATE_BAD_INPUT_REPORT"):
        paths.append(Path(os.environ["REHYDRATE_BAD_INPUT_REPORT"]))
    for path in paths:
        path.write_bytes(text + b"\n")


def examples(strategy: st.SearchStrategy[T], count: int) -> list[T]:
    """`count` values drawn by hypothesis (derandomized: the same ones every run)."""
    drawn: list[T] = []

    @hypothesis_settings(
        max_examples=count,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(strategy)
    def draw(value: T) -> None:
        drawn.append(value)

    draw()
    return drawn


# -- the state that must not change ----------------------------------------------------------------------------------


async def state(pool: asyncpg.Pool) -> dict[str, tuple[int, str]]:
    """Row count and checksum of the events and of every view (the active read models), and the list of tables."""
    relations = [("rehydrate", "events")] + [
        (row["schemaname"], row["viewname"])
        for row in await pool.fetch(
            "SELECT schemaname, viewname FROM pg_views WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
    ]
    result = {}
    for schema, name in relations:
        row = await pool.fetchrow(
            f"SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) "
            f"FROM {qualified(schema, name)} t"
        )
        result[f"{schema}.{name}"] = (row[0], row[1])
    tables = await pool.fetch(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'v') AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
    )
    result["relations"] = (len(tables), ",".join(row[0] for row in tables))
    return result


async def with_active_read_models(settings: Settings, store: EventStore, client: Any) -> None:
    """A history and both of tests.helpers.domain's projections replayed: two active read models to keep unchanged."""
    await domain.append_all(store, domain.random_history(81, streams=12, events=150))
    async with running_worker(settings, domain.registry(), client=client):
        for name in ("accounts", "group_totals"):
            await asyncio.wait_for(wait_for_replay(await start_replay(client, settings, ReplayInput(name))), 60)


def refusal_problem(error: BaseException | None, *names: str) -> str | None:
    """Why `error` is not a clear refusal naming every one of `names` (None: it is one)."""
    if not isinstance(error, UserError):
        return f"not a UserError: {error!r}"
    if not error.fix and " — " not in error.message:  # a failed replay carries its fix after the dash
        return f"no fix: {error.message!r}"
    if "\n" in error.message:
        return f"more than one line: {error.message!r}"
    for name in names:
        if name not in error.message:
            return f"does not name {name!r}: {error.message!r}"
    return None


async def refused(call: Callable[[], Awaitable[Any]]) -> BaseException | None:
    try:
        await call()
    except Exception as error:
        return error
    return None


def refused_now(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except Exception as error:
        return error
    return None


# -- strategies ------------------------------------------------------------------------------------------------------

INT64 = st.integers(-(2**63), 2**63 - 1)  # what a JSON line can carry (orjson)
JSON_SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
NOT_OBJECTS = JSON_VALUES.filter(lambda value: not isinstance(value, dict))

INJECTIONS = [
    "x; DROP TABLE rehydrate.events; --",
    'x"; DROP TABLE rehydrate.events; --',
    "Robert'); DROP TABLE students;--",
    "' OR '1'='1",
    'a" OR "1"="1',
    "public.events",
    "rehydrate.events",
    "events--",
    "a b",
    "$1",
    "a\x00b",
    "Users",
    "1abc",
    "",
    "a" * 64,
    "näme",
    "x/*comment*/",
    "pg_catalog.pg_roles",
]
_PLAIN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
HOSTILE_NAMES = st.sampled_from(INJECTIONS) | st.text(min_size=0, max_size=70).filter(lambda s: not _PLAIN.match(s))

GOOD_LINE = {"stream_id": "imp-1", "type": "Opened", "data": {"owner": "a", "group": "g1"}}
INVALID_UTF8 = [
    b"\xff",
    b"\xfe",
    b"\xc3\x28",
    b"\xa0\xa1",
    b"\xe2\x28\xa1",
    b"\xf0\x28\x8c\xbc",
    b"\xed\xa0\x80",
    b"\x80",
]


def line_bytes(value: Any) -> bytes:
    return orjson.dumps(value)


def not_json(raw: bytes) -> bool:
    if not raw.strip():
        return False  # a blank line is skipped, not an error
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return True
    return False


@st.composite
def truncated_lines(draw: st.DrawFn) -> bytes:
    good = line_bytes(GOOD_LINE)
    return good[: draw(st.integers(1, len(good) - 1))]


@st.composite
def invalid_utf8_lines(draw: st.DrawFn) -> bytes:
    good = line_bytes({**GOOD_LINE, "data": {"owner": "abcdefgh"}})
    at = good.index(b"abcdefgh") + draw(st.integers(0, 8))
    return good[:at] + draw(st.sampled_from(INVALID_UTF8)) + good[at:]


@st.composite
def raw_nul_lines(draw: st.DrawFn) -> bytes:
    good = line_bytes(GOOD_LINE)
    at = draw(st.integers(0, len(good)))
    return good[:at] + b"\x00" + good[at:]


@st.composite
def nested_nul(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON object with "\\u0000" somewhere: in a key or a value, at some depth."""
    where = draw(st.sampled_from(["key", "value"]))
    text = draw(st.text(max_size=5)) + "\x00" + draw(st.text(max_size=5))
    inner: Any = {text: 1} if where == "key" else text
    for _ in range(draw(st.integers(0, 3))):
        inner = draw(st.sampled_from([lambda v: {"k": v}, lambda v: [v]]))(inner)
    return {"owner": "a", "x": inner}


@st.composite
def escaped_nul_lines(draw: st.DrawFn) -> bytes:
    field = draw(st.sampled_from(["data", "metadata", "stream_id", "type"]))
    line: dict[str, Any] = dict(GOOD_LINE)
    if field in ("data", "metadata"):
        line[field] = draw(nested_nul())
    else:
        line[field] = "a\x00b"
    return line_bytes(line)


@st.composite
def wrong_field_lines(draw: st.DrawFn) -> bytes:
    """A line with one field missing, of the wrong type, out of range or unknown."""
    line: dict[str, Any] = {**GOOD_LINE, "stream_id": f"imp-{draw(st.integers(2, 9))}"}
    field = draw(st.sampled_from(["stream_id", "type", "data", "metadata", "schema_version", "recorded_at", "extra"]))
    bad = {
        "stream_id": st.just(None) | st.just("") | INT64 | st.lists(st.text(max_size=3), max_size=2),
        "type": st.just(None) | st.just("") | INT64 | st.booleans() | st.dictionaries(st.text(), st.text()),
        "data": NOT_OBJECTS,
        "metadata": NOT_OBJECTS.filter(lambda v: v is not None),
        "schema_version": st.integers(-(2**63), 0)
        | st.integers(min_value=2**31, max_value=2**63 - 1)
        | st.text(max_size=3)
        | st.floats(allow_nan=False)
        | st.booleans(),
        "recorded_at": st.text(max_size=12).filter(lambda s: not _iso(s)) | INT64,
        "extra": JSON_VALUES,
    }[field]
    value = draw(bad)
    if field == "extra":
        line[draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in _IMPORT_FIELDS))] = value
    elif value is None and field in ("stream_id", "type", "data") and draw(st.booleans()):
        del line[field]  # missing rather than null
    else:
        line[field] = value
    return line_bytes(line)


_IMPORT_FIELDS = {"stream_id", "type", "data", "stream_version", "schema_version", "metadata", "recorded_at"}


def _iso(text: str) -> bool:
    from datetime import datetime

    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


IMPORT_KINDS: dict[str, tuple[st.SearchStrategy[bytes], int]] = {
    "import: malformed JSON line": (
        truncated_lines() | st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")).filter(not_json),
        120,
    ),
    "import: non-object line": (NOT_OBJECTS.map(line_bytes), 80),
    "import: invalid UTF-8": (invalid_utf8_lines(), 60),
    "import: raw NUL byte": (raw_nul_lines(), 40),
    "import: \\u0000 escape": (escaped_nul_lines(), 60),
    "import: missing or wrong-typed field": (wrong_field_lines(), 200),
}


# -- 1. import lines -------------------------------------------------------------------------------------------------


async def test_generated_bad_import_lines_are_refused_naming_file_and_line_and_write_nothing(
    settings: Settings, store: EventStore, client: Any, tmp_path: Path
) -> None:
    await with_active_read_models(settings, store, client)
    before = await state(store.pool)
    failures = []
    for kind, (strategy, count) in IMPORT_KINDS.items():
        for n, bad in enumerate(examples(strategy, count)):
            path = tmp_path / f"{abs(hash(kind))}-{n}.jsonl"
            # A good line first: with a batch of one it is already copied when line 2 fails, and must not stay.
            path.write_bytes(line_bytes(GOOD_LINE) + b"\n" + bad + b"\n")
            error = await refused(
                lambda path=path: import_events(store, read_jsonl(path), source=str(path), batch_size=1)
            )  # type: ignore[misc]
            problem = refusal_problem(error, f"{path}:2: ")
            if problem is None and await state(store.pool) != before:
                problem = "the event store or a read model changed"
            record(kind, problem is None)
            if problem:
                failures.append((kind, bad, problem))
    assert not failures, failures[:5]


# -- 2. appends ------------------------------------------------------------------------------------------------------


@st.composite
def bad_appends(draw: st.DrawFn) -> tuple[str, NewEvent]:
    kind = draw(st.sampled_from(["data", "metadata", "nul-data", "nul-metadata", "stream", "type", "version"]))
    stream = f"acct-{draw(st.integers(0, 20))}"
    if kind == "data":
        return stream, NewEvent("Deposited", draw(NOT_OBJECTS))
    if kind == "metadata":
        return stream, NewEvent("Deposited", {"amount": 1}, metadata=draw(NOT_OBJECTS.filter(lambda v: v is not None)))
    if kind == "nul-data":
        return stream, NewEvent("Deposited", draw(nested_nul()))
    if kind == "nul-metadata":
        return stream, NewEvent("Deposited", {"amount": 1}, metadata=draw(nested_nul()))
    if kind == "stream":
        return draw(st.just("") | st.text(max_size=4).map(lambda s: s + "\x00")), NewEvent("Deposited", {})
    if kind == "type":
        return stream, NewEvent(draw(st.just("") | st.text(max_size=4).map(lambda s: "\x00" + s)), {})
    return stream, NewEvent("Deposited", {}, schema_version=draw(st.integers(max_value=0)))


async def test_generated_bad_appends_are_refused_and_write_nothing(
    settings: Settings, store: EventStore, client: Any
) -> None:
    await with_active_read_models(settings, store, client)
    before = await state(store.pool)
    failures = []
    for stream, event in examples(bad_appends(), 300):
        error = await refused(lambda stream=stream, event=event: store.append(stream, [event]))  # type: ignore[misc]
        problem = refusal_problem(error)
        if problem is None and await state(store.pool) != before:
            problem = "the event store or a read model changed"
        record("append: malformed event", problem is None)
        if problem:
            failures.append((stream, event, problem))
    assert not failures, failures[:5]


# -- 3. identifiers --------------------------------------------------------------------------------------------------


def model_with_table(name: str, column: str = "id", key_type: sa.types.TypeEngine[Any] | None = None) -> type[Any]:
    """A table model as SQLModel makes one (only `__table__` is read), with any names at all."""
    table = sa.Table(name, sa.MetaData(), sa.Column(column, key_type or sa.String(), primary_key=True))
    return type("Hostile", (), {"__table__": table})


IDENTIFIER_PATHS: dict[str, Callable[[str], Any]] = {
    "projection name": lambda name: Projection(name, version=1, table=domain.Account),
    "table name": lambda model: TableShape.of(model, "p"),
    "column name": lambda model: TableShape.of(model, "p"),
    "REHYDRATE_SCHEMA": lambda name: load_settings(schema_name=name),
    "REHYDRATE_READ_MODEL_SCHEMA": lambda name: load_settings(read_model_schema=name),
    "sandbox label": lambda name: check_replay_input(ReplayInput("accounts", sandbox=name), domain.registry()),
    "db grants role": lambda name: grants_sql("rehydrate", "public", name),
    "db grants schema": lambda name: grants_sql(name, "public", "worker"),
}


async def test_generated_hostile_identifiers_are_refused_before_any_sql_runs(
    settings: Settings, store: EventStore, client: Any, database_url: str
) -> None:
    await with_active_read_models(settings, store, client)
    before = await state(store.pool)
    names = examples(HOSTILE_NAMES, 100)
    failures = []
    for path, call in IDENTIFIER_PATHS.items():
        for name in names:
            argument: Any = name
            if path in ("table name", "column name"):
                try:  # a table model as SQLModel would make it; a name SQLAlchemy refuses never reaches rehydrate
                    argument = model_with_table(name) if path == "table name" else model_with_table("t", name)
                except sa.exc.ArgumentError:
                    continue
            problem = refusal_problem(refused_now(lambda call=call, a=argument: call(a)), repr(name)[:20])  # type: ignore[misc]
            record(f"identifier: {path}", problem is None)
            if problem:
                failures.append((path, name, problem))
    # The paths that hold a connection: every statement the connection runs is logged; none may run.
    conn = await asyncpg.connect(database_url)
    statements: list[str] = []
    conn.add_query_logger(lambda record: statements.append(record.query))
    try:
        for name in names:
            for path, call in {
                "event store schema": lambda n: EventStore(store.pool, n),
                "snapshot store schema": lambda n: SnapshotStore(store.pool, n),
            }.items():
                problem = refusal_problem(refused_now(lambda call=call, name=name: call(name)), repr(name)[:20])  # type: ignore[misc]
                record(f"identifier: {path}", problem is None)
                if problem:
                    failures.append((path, name, problem))
            problem = refusal_problem(await refused(lambda name=name: ensure_schema(conn, name)), repr(name)[:20])  # type: ignore[misc]
            record("identifier: db init schema", problem is None and not statements)
            if problem or statements:
                failures.append(("db init schema", name, problem or statements))
    finally:
        await conn.close()
    # A key column whose type prints as SQL of its own (it is cast to in statements: `$1::type`).
    for spec in ("text); DROP TABLE rehydrate.events; --", "int[]; SELECT 1", 'varchar"'):
        hostile_type = type("Hostile", (sa.types.UserDefinedType,), {"get_col_spec": lambda self, spec=spec: spec})
        model = model_with_table("t", "id", hostile_type())
        problem = refusal_problem(refused_now(lambda model=model: TableShape.of(model, "p")), repr(spec))  # type: ignore[misc]
        record("identifier: key column type", problem is None)
        if problem:
            failures.append(("key column type", spec, problem))
    assert await state(store.pool) == before
    assert not failures, failures[:5]


async def test_hostile_stream_ids_are_data_stored_verbatim_and_never_sql(store: EventStore) -> None:
    """A stream id is a value, never part of a statement: any text without NUL is stored and read back as it is."""
    tables = (await state(store.pool))["relations"]
    ids = examples(st.sampled_from(INJECTIONS[:10]) | st.text(min_size=1, max_size=40), 60)
    failures = []
    for stream in {s for s in ids if "\x00" not in s}:
        try:
            await store.append(stream, [NewEvent("Opened", {"owner": stream, "group": stream})])
            stored = await store.read_stream(stream)
            ok = [(e.stream_id, e.data["owner"]) for e in stored] == [(stream, stream)]
        except UnicodeEncodeError:
            ok = False
        except UserError as error:
            ok = "surrogate" in error.message or "Unicode" in error.message  # a lone surrogate: refused clearly
        record("stream id: hostile text stored verbatim", ok)
        if not ok:
            failures.append(stream)
    assert (await state(store.pool))["relations"] == tables
    assert not failures, failures[:5]


# -- 4. ranges -------------------------------------------------------------------------------------------------------


RANGE_KINDS = ["lanes", "chunk_size", "max_parallel", "to_position", "as_of", "as_of_future", "position_and_time"]


@st.composite
def bad_ranges(draw: st.DrawFn, kind: str) -> tuple[dict[str, Any], str]:
    """(ReplayInput keywords, a text the error must contain)."""
    if kind == "lanes":
        value = draw(st.integers(max_value=0) | st.integers(min_value=257))
        return {"lanes": value}, f"lanes={value}"
    if kind == "chunk_size":
        value = draw(st.integers(max_value=0))
        return {"chunk_size": value}, f"chunk_size={value}"
    if kind == "max_parallel":
        value = draw(st.integers(max_value=0) | st.integers(min_value=501))
        return {"max_parallel": value}, f"max_parallel={value}"
    sandbox = {"sandbox": "s1"} if draw(st.booleans()) or kind != "to_position" else {}
    if kind == "to_position":
        value = draw(st.integers(max_value=-1))
        return {"to_position": value, **sandbox}, "--to-position"
    if kind == "as_of":
        text = draw(st.text(max_size=20).filter(lambda s: not _iso(s)))
        return {"as_of": text, "sandbox": "s1"}, f"--as-of {text!r}"
    if kind == "as_of_future":
        year = draw(st.integers(2100, 9999))
        return {"as_of": f"{year}-01-01T00:00:00+00:00", "sandbox": "s1"}, f"{year}-01-01"
    return {"to_position": draw(st.integers(0, 10)), "as_of": "2024-01-01", "sandbox": "s1"}, "--to-position"


def test_generated_out_of_range_tuning_and_cutoffs_are_refused_naming_the_value() -> None:
    failures = []
    cases = [(kind, *case) for kind in RANGE_KINDS for case in examples(bad_ranges(kind), 60)]
    for kind, keywords, named in cases:
        error = refused_now(lambda k=keywords: check_replay_input(ReplayInput("accounts", **k), domain.registry()))  # type: ignore[misc]
        problem = refusal_problem(error, named)
        record(f"range: {kind}", problem is None)
        if problem:
            failures.append((keywords, problem))
    assert not failures, failures[:5]


# -- 5. projection modules -------------------------------------------------------------------------------------------


def test_generated_projection_modules_that_cannot_be_loaded_are_named() -> None:
    names = examples(
        st.text(alphabet=string.ascii_lowercase + "._-/ \x00é", min_size=1, max_size=20).filter(
            lambda s: s.strip() and s.strip() == s
        ),
        60,
    )
    failures = []
    for name in names:
        module = f"tests.no_such_{name}" if name[0].isalpha() else name
        error = refused_now(lambda module=module: Registry.from_modules(["tests.helpers.domain", module]))  # type: ignore[misc]
        problem = refusal_problem(error, f"projection module {module!r}")
        record("projection module: cannot import", problem is None)
        if problem:
            failures.append((module, problem))
    assert not failures, failures[:5]


# -- 6. unreachable databases ----------------------------------------------------------------------------------------

PASSWORDS = st.text(alphabet=string.ascii_letters + string.digits + "!#$%&()*+,/:;=?@[]~-_. ", min_size=6, max_size=16)


@st.composite
def unreachable_urls(draw: st.DrawFn) -> tuple[str, str]:
    """(URL, its password): refused ports, ports out of range, a URL that is not one."""
    password = "pw" + draw(PASSWORDS)
    quoted = url_quote(password, safe="") if draw(st.booleans()) else password
    port = draw(st.sampled_from(["1", "9", "99999", "notaport", ""]))
    scheme = draw(st.sampled_from(["postgresql", "postgres"]))
    return f"{scheme}://nobody:{quoted}@127.0.0.1:{port}/none", password


async def test_generated_unreachable_database_urls_fail_in_one_line_without_the_password() -> None:
    failures = []
    for url, password in examples(unreachable_urls(), 100):
        error = await refused(lambda url=url: asyncio.wait_for(connect(url), 20))  # type: ignore[misc]
        problem = refusal_problem(error, "cannot connect to Postgres at ")
        if problem is None:
            message = str(error)
            leaked = [part for part in {password, url_quote(password, safe="")} if part in message]
            if leaked:
                problem = f"the password is in the error: {message!r}"
        record("database: unreachable URL", problem is None)
        if problem:
            failures.append((url, problem))
    assert not failures, failures[:5]


async def password_checked(database_url: str, role: str) -> bool:
    """Whether the server checks passwords on our connections (the embedded one may trust local logins)."""
    try:
        conn = await asyncpg.connect(as_role(database_url, role, "certainly-not-the-password"))
    except asyncpg.InvalidPasswordError:
        return True
    await conn.close()
    return False


# -- 7. the real command, a handful ----------------------------------------------------------------------------------


async def test_bad_input_through_the_command_exits_1_naming_it_and_changes_nothing(
    settings: Settings, store: EventStore, client: Any, tmp_path: Path, database_url: str
) -> None:
    await with_active_read_models(settings, store, client)
    before = await state(store.pool)
    injection = "x; DROP TABLE rehydrate.events; --"
    role = f"rh_cli_{uuid.uuid4().hex[:8]}"
    password = f"pw-{uuid.uuid4().hex}"
    await store.pool.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        cases: list[tuple[list[str], dict[str, str], list[str]]] = [
            (["replay", "start", "accounts", "--sandbox", "s1", "--to-position", "-1"], {}, ["--to-position -1"]),
            (["replay", "start", "accounts", "--sandbox", "s1", "--as-of", "yesterday"], {}, ["--as-of 'yesterday'"]),
            (["replay", "start", "accounts", "--sandbox", "s1", "--as-of", "2999-01-01"], {}, ["in the future"]),
            (["replay", "start", "accounts", "--chunk-size", "-5"], {}, ["chunk_size=-5"]),
            (["replay", "start", "accounts", "--sandbox", injection], {}, [f"sandbox label {injection!r}"]),
            (["db", "grants", injection], {}, [f"role {injection!r}"]),
            (["db", "init"], {"REHYDRATE_SCHEMA": injection}, [f"schema name {injection!r}"]),
            (["events", "check"], {"REHYDRATE_READ_MODEL_SCHEMA": 'public"; --'}, ["schema name 'public\"; --'"]),
            (
                ["worker"],
                {"REHYDRATE_PROJECTIONS": "tests.helpers.domain,tests.no_such_module"},
                ["tests.no_such_module"],
            ),
            (["db", "init"], {"REHYDRATE_DATABASE_URL": as_role(database_url, "nobody_here", "pw-x")}, []),
        ]
        if await password_checked(database_url, role):
            wrong = as_role(database_url, role, "wrong-" + password)
            cases.append((["db", "init"], {"REHYDRATE_DATABASE_URL": wrong}, ["password authentication failed"]))
        runs = await asyncio.gather(*(rehydrate(settings, tmp_path, *args, **env) for args, env, _ in cases))
        for run, (_, _, parts) in zip(runs, cases, strict=True):
            assert_one_clear_error(run, *parts)
            record("command: bad input", True)
        for run in runs:
            assert "pw-x" not in run.stderr + run.stdout and password not in run.stderr + run.stdout
    finally:
        await store.pool.execute(f"DROP ROLE {role}")
    assert await state(store.pool) == before


# -- 8. events a projection cannot apply, through real replays ------------------------------------------------------

MISBEHAVIOURS = {
    "raise": "handler 'added' raised ValueError: amount must be positive",
    "list": "handler returned list, not a dict or None",
    "int": "handler returned int, not a dict or None",
    "unknown_column": "handler returned unknown column(s) ['colour']",
    "required_empty": "column 'owner' of table 'bad_input_ledger' is required",
    "column_type": "its row cannot be stored in table 'bad_input_ledger'",
    "move_key": "handler set 'ledger_id' to 'elsewhere'",
}


ledger_events = Upcasters()


@ledger_events.upcaster("Added", from_version=1)
def amount_in_cents(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "cents": data.get("amount", 0) * 100}


class VersionedLedger(SQLModel, table=True):
    __tablename__ = "bad_input_versioned_ledger"
    ledger_id: str = Field(primary_key=True)
    cents: int = 0


versioned_ledger = Projection("versioned_ledger", version=1, table=VersionedLedger, upcasters=ledger_events)


@versioned_ledger.on("Added")
def added_cents(row: Row | None, event: Event) -> Row:
    return {"cents": (row or {}).get("cents", 0) + event.data["cents"]}


@st.composite
def poisoned_replays(draw: st.DrawFn, kind: str) -> tuple[str, str, str, NewEvent, str, dict[str, int]]:
    """(kind, projection, stream, the poison event, what the error must say, tuning)."""
    tuning = {"lanes": draw(st.integers(1, 4)), "chunk_size": draw(st.integers(1, 40))}
    ledger = f"ledger-{draw(st.integers(0, 3))}"
    if kind == "strict":
        handled = ("", "Opened", "Added", "Noted")
        event_type = draw(
            st.text(min_size=1, max_size=12).map(lambda s: s.replace("\x00", "")).filter(lambda s: s not in handled)
        )
        return kind, "strict_ledger", ledger, NewEvent(event_type, {"x": 1}), "no handler for this event type", tuning
    if kind == "no_upcaster":
        version = draw(st.integers(4, 2**31 - 1))
        event = NewEvent("Added", {"amount": 1}, schema_version=version)
        return kind, "versioned_ledger", ledger, event, f"schema version {version}", tuning
    event = NewEvent("Added", {"amount": -5 if kind == "raise" else 1, "misbehave": kind})
    return kind, "ledger", ledger, event, MISBEHAVIOURS[kind], tuning


async def test_generated_poisoned_replays_fail_naming_the_event_and_keep_every_read_model(
    settings: Settings, store: EventStore, client: Any
) -> None:

    registry = Registry([*REGISTRY, versioned_ledger])
    await domain.append_all(store, good_history())
    failures = []
    async with running_worker(settings, registry, client=client):
        for name in ("ledger", "strict_ledger", "versioned_ledger"):
            handle = await start_replay(client, settings, ReplayInput(name), registry=registry)
            await asyncio.wait_for(wait_for_replay(handle), 60)
        cases = [
            case for kind in [*MISBEHAVIOURS, "strict", "no_upcaster"] for case in examples(poisoned_replays(kind), 4)
        ]
        for kind, projection, stream, event, expected, tuning in cases:
            await store.append(stream, [event])
            position = await store.head()
            before = await state(store.pool)
            handle = await start_replay(client, settings, ReplayInput(projection, **tuning), registry=registry)
            try:
                await asyncio.wait_for(wait_for_replay(handle), 60)
                error: BaseException | None = None
            except TimeoutError:
                await handle.terminate("the test gave up: it should have failed")
                error = TimeoutError("kept retrying")
            except Exception as failure:
                error = failure
            problem = refusal_problem(error, f"failed at event {position} (stream {stream!r}", expected)
            if problem is None and await state(store.pool) != before:
                problem = "the event store or a read model changed"
            record(f"replay: {kind}", problem is None)
            if problem:
                failures.append((projection, event, problem))
            await store.pool.execute("DELETE FROM rehydrate.events WHERE global_position = $1", position)
    assert not failures, "\n".join(map(str, failures))


# -- 9. a 10 MB payload ----------------------------------------------------------------------------------------------

TEN_MB = 10 * 1024 * 1024


class Blob(SQLModel, table=True):
    __tablename__ = "bad_input_blob"
    n: int = Field(primary_key=True)
    size: int = 0


blobs = Projection("blobs", version=1, table=Blob, key="n")


@blobs.on("Blob")
def blob_size(row: Row | None, event: Event) -> Row:
    if event.data.get("explode"):
        raise ValueError(f"cannot take {event.data['blob']}")
    return {"size": len(event.data["blob"])}


async def test_a_10_mb_payload_is_stored_and_replayed_and_its_failures_stay_short(
    settings: Settings, store: EventStore, client: Any, tmp_path: Path
) -> None:
    """rehydrate sets no size limit of its own: Postgres takes a jsonb of up to 255 MB and events never travel
    through Temporal. A 10 MB event is appended, imported and replayed; an error about it quotes at most a
    bounded piece of it (a failure message travels through Temporal, whose payloads stop at 2 MB)."""
    blob = "x" * TEN_MB
    await store.append("blob-1", [NewEvent("Blob", {"n": 1, "blob": blob})])
    path = tmp_path / "big.jsonl"
    path.write_bytes(line_bytes({"stream_id": "blob-2", "type": "Blob", "data": {"n": 2, "blob": blob}}) + b"\n")
    await import_events(store, read_jsonl(path), source=str(path))
    registry = Registry([blobs])
    async with running_worker(settings, registry, client=client):
        handle = await start_replay(client, settings, ReplayInput("blobs", lanes=2), registry=registry)
        await asyncio.wait_for(wait_for_replay(handle), 120)
        assert await domain.read_model(store.pool, blobs) == {1: {"n": 1, "size": TEN_MB}, 2: {"n": 2, "size": TEN_MB}}
        for n, data in enumerate([{"n": blob, "blob": "b"}, {"n": 3, "blob": blob, "explode": True}], start=3):
            await store.append(f"blob-{n}", [NewEvent("Blob", data)])
            position = await store.head()
            before = await state(store.pool)
            handle = await start_replay(client, settings, ReplayInput("blobs"), registry=registry)
            with pytest.raises(UserError) as failure:
                await asyncio.wait_for(wait_for_replay(handle), 120)
            assert f"failed at event {position} (stream 'blob-{n}'" in failure.value.message
            assert len(failure.value.message) < 5000, len(failure.value.message)
            assert await state(store.pool) == before
            record("payload: 10 MB, failing", True)
            await store.pool.execute("DELETE FROM rehydrate.events WHERE global_position = $1", position)
    record("payload: 10 MB, accepted", True)


# -- 10. workflow inputs of the wrong shape, as the Web UI can send them -------------------------------------------

# Each workflow type, the field its input needs, and a tuning field of a given type.
WORKFLOW_INPUTS = [
    ("Replay", "projection", "lanes"),
    ("Verify", "projection", "lanes"),
    ("Repair", "projection", "batch_size"),
    ("Tail", "projection", "batch_size"),
    ("SnapshotRebuild", "aggregate_type", "partitions"),
]
NOT_TEXT = st.integers() | st.lists(st.text(max_size=3), max_size=2) | st.dictionaries(st.text(max_size=3), st.none())
NOT_INT = st.text(alphabet=string.ascii_letters, min_size=1, max_size=6) | st.lists(st.integers(), max_size=2)


@st.composite
def wrong_workflow_inputs(draw: st.DrawFn) -> tuple[str, Any, list[str]]:
    """(workflow type, its input from the UI, what the failure must name)."""
    workflow, required, tuning = draw(st.sampled_from(WORKFLOW_INPUTS))
    shape = draw(st.sampled_from(["not an object", "null", "no required field", "required of a wrong type", "tuning"]))
    name = "accounts" if workflow != "SnapshotRebuild" else "account"
    if shape == "not an object":
        return workflow, draw(st.text(max_size=8) | st.lists(st.integers(), max_size=3) | st.integers()), ["Input"]
    if shape == "null":
        return workflow, None, ["the input is not a", "start the workflow with"]
    if shape == "no required field":
        return workflow, {tuning: 2}, [required]
    if shape == "required of a wrong type":
        return workflow, {required: draw(NOT_TEXT)}, [required]
    return workflow, {required: name, tuning: draw(NOT_INT)}, [tuning]


async def test_generated_workflow_inputs_of_the_wrong_shape_fail_the_run_naming_the_field(
    settings: Settings, store: EventStore, client: Any
) -> None:
    """A start from the Web UI with an input that does not fit: the run fails at once (it does not wait for ever as
    a retried workflow task), its failure names the field, and nothing in the database changes."""
    await with_active_read_models(settings, store, client)
    before = await state(store.pool)
    cases = examples(wrong_workflow_inputs(), 30)
    failures = []
    async with running_worker(settings, domain.registry(), client=client):

        async def one(workflow: str, raw: Any, names: list[str]) -> None:
            handle = await client.start_workflow(
                workflow, raw, id=f"ui-{uuid.uuid4().hex[:10]}", task_queue=settings.temporal_task_queue
            )
            problem = None
            try:
                await asyncio.wait_for(handle.result(), 30)
                problem = "it completed"
            except WorkflowFailureError as error:
                message = failure_cause(error)
                missing = [name for name in names if name not in message]
                problem = f"does not name {missing}: {message!r}" if missing else None
            except TimeoutError:
                await handle.terminate("the test gave up: it should have failed")
                problem = "still running after 30 s"
            record(f"workflow input: {workflow}", problem is None)
            if problem:
                failures.append((workflow, raw, problem))

        await asyncio.gather(*(one(*case) for case in cases))
    assert await state(store.pool) == before
    assert not failures, "\n".join(map(str, failures))


# -- 11. Kafka messages that cannot be read as events -----------------------------------------------------------------

KAFKA_TYPES = ["Opened", "Deposited", "Withdrawn"]


@st.composite
def bad_kafka_messages(draw: st.DrawFn) -> tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """(what is wrong, key, value, headers) of a message a producer got wrong; its type is handled by `accounts`."""
    kind = draw(st.sampled_from(["no key", "key not UTF-8", "value not JSON", "value not an object", "no type"]))
    key: bytes | None = b"bad"  # made unique per message when written
    value: bytes | None = orjson.dumps({"owner": "x", "amount": 1})
    headers = [("event_type", draw(st.sampled_from(KAFKA_TYPES)).encode())]
    if kind == "no key":
        key = draw(st.sampled_from([None, b""]))
    elif kind == "key not UTF-8":
        key = b"\xff" + draw(st.binary(max_size=6))
    elif kind == "value not JSON":
        value = draw(st.binary(min_size=1, max_size=12).filter(lambda raw: not _is_json(raw)))
    elif kind == "value not an object":
        value = orjson.dumps(draw(NOT_OBJECTS))
    else:
        headers = draw(st.sampled_from([[], [("version", b"1")], [("event-type", b"Opened")]]))
    return kind, key, value, headers


def _is_json(raw: bytes) -> bool:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return True


async def test_generated_bad_kafka_messages_are_parked_naming_partition_and_offset(
    tail_settings: Settings, store: EventStore, client: Any, kafka_bootstrap: str
) -> None:
    """Messages without a key, with a key that is not text, a value that is not a JSON object, or no type, among
    good ones on a real broker: a replay that parks parks each one whose type it handles, naming its partition and
    offset; a message without a type is read as one and passed over (its projection is not strict); every key the bad
    messages do not touch equals the fold of its good messages."""
    topic = f"bad-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(kafka_bootstrap, topic, 2)
    good = domain.random_history(91, streams=10, events=120)
    bad = examples(bad_kafka_messages(), 30)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    written: list[tuple[str, int]] = []  # (what is wrong, position) of each bad message
    try:
        for n, (stream, event) in enumerate(good):
            await producer.send_and_wait(
                topic,
                key=stream.encode(),
                value=orjson.dumps(event.data),
                headers=[("event_type", event.type.encode())],
            )
            if n % 4 == 0 and bad:
                kind, key, value, headers = bad.pop()
                key = f"bad-{n}".encode() if key == b"bad" else key
                sent = await producer.send_and_wait(topic, key=key, value=value, headers=headers)
                written.append((kind, log_position(sent.partition, sent.offset)))
    finally:
        await producer.stop()
    projection = legacy.accounts(read=kafka.accounts(kafka_bootstrap, topic).source, on_error="park")
    settings = tail_settings.model_copy(update={"tails": False})
    async with running_worker(settings, Registry([projection]), client=client):
        handle = await start_replay(client, settings, ReplayInput("accounts", allow_dead_letters=True))
        result = await asyncio.wait_for(wait_for_replay(handle), 90)
    parked = {row["global_position"]: row for row in await Catalog(store.pool, "rehydrate").dead_letters("accounts", 1)}
    failures = []
    for kind, position in written:
        letter = parked.get(position)
        partition, offset = position >> 40, position & ((1 << 40) - 1)
        if kind == "no type":
            safe = letter is None  # read, typeless, and passed over like any type the projection does not handle
        else:  # parked naming it; or, after a bad message of the same (drawn) key, parked behind that one
            named = f"partition {partition}, offset {offset}"
            behind = kind in ("no key", "key not UTF-8") and "an earlier event of this key failed"
            safe = letter is not None and (named in letter["error"] or bool(behind and behind in letter["error"]))
        record(f"kafka message: {kind}", safe)
        if not safe:
            failures.append((kind, position, letter))
    assert len(parked) == sum(1 for kind, _ in written if kind != "no type"), parked
    expected = domain.oracle(domain.accounts, kafka.as_events(good))
    rows = await domain.read_model(store.pool, projection)
    assert rows == expected, "a good stream's row differs from its fold"
    assert result.generation == 1
    assert not failures, "\n".join(map(str, failures))


# -- 12. source mappings in settings ----------------------------------------------------------------------------------

TOML_VALUES = (
    st.text(max_size=12)
    | st.sampled_from(INJECTIONS)
    | st.integers(-5, 10**6)
    | st.booleans()
    | st.lists(st.text(max_size=4), max_size=2)
    | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
)
TABLE_KEYS = [
    "table",
    "url",
    "position",
    "stream_id",
    "stream_version",
    "event_type",
    "payload",
    "order",
    "transaction",
]
KAFKA_KEYS = ["topic", "bootstrap_servers", "type_header", "type_field", "version_header"]


@st.composite
def bad_source_settings(draw: st.DrawFn) -> dict[str, Any]:
    """A `[sources.legacy]` table someone got wrong: a value of the wrong type or shape, an unknown key, a kind that
    does not exist, a required key missing."""
    kind = draw(st.sampled_from(["table", "kafka", "unknown kind", "not a table"]))
    if kind == "not a table":
        return {"legacy": draw(TOML_VALUES)}
    keys = TABLE_KEYS if kind == "table" else KAFKA_KEYS
    values: dict[str, Any] = {"kind": kind if kind != "unknown kind" else draw(st.text(min_size=1, max_size=6))}
    values.update(draw(st.dictionaries(st.sampled_from(keys), TOML_VALUES, min_size=1, max_size=4)))
    if draw(st.booleans()):
        values[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in keys))] = draw(TOML_VALUES)
    return {"legacy": values}


def test_generated_bad_source_settings_are_refused_naming_the_source() -> None:
    """Each is read into a source when it happens to be valid, or refused with a UserError that names the source;
    never another exception (a crash deep in a replay, later, would be the alternative)."""
    from rehydrate.sources.declaration import sources_from_settings

    failures = []
    for declared in examples(bad_source_settings(), 400):
        error = refused_now(lambda declared=declared: sources_from_settings(declared))
        if error is None:
            continue  # a valid source after all (checked against its table or brokers when used)
        problem = refusal_problem(error, "'legacy'")
        record("source settings", problem is None)
        if problem:
            failures.append((declared, problem))
    assert not failures, "\n".join(map(str, failures[:20]))
