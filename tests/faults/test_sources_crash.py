"""A replay from events rehydrate did not write survives its worker being SIGKILLed in the middle of a chunk while
the team's application goes on writing, through the build and the swap: a mapped table (transaction-ordered by the
column `rehydrate sources prepare` adds), py-eventsourcing's table (written by the real library, compressed),
message-db's messages and an outbox, all in another database than the read models. A tail batch afterwards brings
the read model to the plain fold of every event, each applied once (the balances are sums: an event applied twice or
skipped shows)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client

from rehydrate import EventStore
from rehydrate.core.settings import Settings
from rehydrate.engine.generations import Generations
from rehydrate.engine.projections import Projection
from rehydrate.models import ReplayInput
from rehydrate.sources.inspection import prepare, prepare_sql
from rehydrate.sources.pools import Sources
from tests.helpers import domain, es_bank, legacy, team_stores
from tests.helpers.workers import kill_workers, replay_killing_a_worker_mid_chunk

TIME_LIMIT = 150.0


class TeamTable:
    """The team's own table in `url`, written as its application writes it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.projection = legacy.accounts("transaction", url=url)
        self.worker_env = {"REHYDRATE_SOURCE_LEGACY_URL": url}
        self.seed = 200

    async def setup(self) -> None:
        self.conn = await asyncpg.connect(self.url)
        await self.conn.execute(legacy.CREATE)
        await prepare(self.conn, prepare_sql(legacy.table()))
        await legacy.write(self.conn, domain.random_history(81, streams=60, events=5000))

    async def write_more(self) -> None:
        self.seed += 1
        await legacy.write(self.conn, domain.random_history(self.seed, streams=70, events=15))

    async def want(self) -> dict[Any, dict[str, Any]]:
        return domain.oracle(domain.accounts, await legacy.events(self.conn))

    async def close(self) -> None:
        await self.conn.close()


class PresetTable:
    """message-db's messages or an outbox (see `team_stores`) in `url`, written as their writers write."""

    kind: team_stores.Kind

    def __init__(self, url: str) -> None:
        self.url = url
        self.projection = team_stores.accounts(self.kind, url)
        name = self.projection.event_source.name.upper()
        self.worker_env = {"REHYDRATE_TEST_TEAM_STORE": self.kind, f"REHYDRATE_SOURCE_{name}_URL": url}
        self.seed = 200

    async def setup(self) -> None:
        self.conn = await asyncpg.connect(self.url)
        await team_stores.create(self.conn, self.kind)
        await team_stores.write(self.conn, self.kind, domain.random_history(82, streams=60, events=5000))

    async def write_more(self) -> None:
        self.seed += 1
        await team_stores.write(self.conn, self.kind, domain.random_history(self.seed, streams=70, events=15))

    async def want(self) -> dict[Any, dict[str, Any]]:
        return domain.oracle(domain.accounts, await team_stores.events(self.conn, self.kind))

    async def close(self) -> None:
        await self.conn.close()


class MessageDb(PresetTable):
    kind = "message-db"


class Outbox(PresetTable):
    kind = "outbox"


class EventsourcingApp:
    """py-eventsourcing's application on `url`, its stored events compressed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worker_env = {"REHYDRATE_TEST_BANK_URL": url, "REHYDRATE_SOURCE_BANK_URL": url}
        self.seed = 200

    async def setup(self) -> None:
        self.app = await asyncio.to_thread(es_bank.bank, self.url, compress=True)
        self.projection = es_bank.projection(self.app, self.url)
        self.ids = await asyncio.to_thread(es_bank.write_history, self.app, 5, 60, 2500)

    async def write_more(self) -> None:
        self.seed += 1
        self.ids += await asyncio.to_thread(es_bank.write_history, self.app, self.seed, 2, 15)

    async def want(self) -> dict[Any, dict[str, Any]]:
        return await asyncio.to_thread(es_bank.expected, self.app, self.ids)

    async def close(self) -> None:
        await asyncio.to_thread(self.app.close)


@pytest.mark.parametrize(
    "kind",
    [TeamTable, EventsourcingApp, MessageDb, Outbox],
    ids=["mapped-table", "py-eventsourcing", "message-db", "outbox"],
)
async def test_a_replay_from_a_team_source_survives_a_worker_kill_while_the_team_writes(
    client: Client,
    settings: Settings,
    store: EventStore,
    other_database: str,
    tmp_path: Path,
    kind: Callable[[str], TeamTable | EventsourcingApp | PresetTable],
) -> None:
    team = kind(other_database)
    await team.setup()
    projection: Projection = team.projection
    env = {"REHYDRATE_PROJECTIONS": "tests.helpers.slow_sources", **team.worker_env}
    logs = {"A": tmp_path / "worker-a.log", "B": tmp_path / "worker-b.log"}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    writing = True

    async def writer() -> int:
        batches = 0
        while writing:
            await team.write_more()
            batches += 1
            await asyncio.sleep(0.05)
        return batches

    writes = asyncio.create_task(writer())
    try:
        died, retried = await asyncio.wait_for(
            replay_killing_a_worker_mid_chunk(
                client,
                settings,
                store.pool,
                ReplayInput(projection.name, lanes=3, chunk_size=100, max_parallel=3, heartbeat_timeout_seconds=2),
                workers,
                logs,
                env,
            ),
            TIME_LIMIT,
        )
        writing = False
        batches = await writes
        sources = Sources(store)
        try:
            async with store.pool.acquire() as conn:
                while await Generations(conn, sources, settings.read_model_schema).tail_batch(projection, 100_000):
                    if await domain.read_model(store.pool, projection) == await team.want():
                        break
        finally:
            await sources.close()
        assert await domain.read_model(store.pool, projection) == await team.want()
    finally:
        writing = False
        with contextlib.suppress(BaseException):
            await writes
        await kill_workers(workers, logs)
        await team.close()
    assert workers["A"].returncode == -signal.SIGKILL
    assert died and died <= retried, f"the chunks that died with worker A were retried: {died} in {retried}"
    assert batches >= 5, "the team's application wrote during the build and the swap"
