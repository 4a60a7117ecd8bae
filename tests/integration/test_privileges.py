"""A worker whose database role has exactly the grants `rehydrate db grants` prints: it replays, tails and swaps,
and it can do nothing more (write events, change rehydrate's schema)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid

import asyncpg
import pytest
from temporalio.client import Client
from temporalio.service import RPCError

from rehydrate import EventStore
from rehydrate.core.database import ensure_schema
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.models import ReplayInput
from rehydrate.models.names import tail_workflow_id
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.worker import running_worker
from tests.helpers import domain
from tests.helpers.roles import as_role
from tests.helpers.waiting import eventually, matches_oracle


def printed_grants(settings: Settings, role: str) -> list[str]:
    """What `rehydrate db grants ROLE` prints, as statements."""
    done = subprocess.run(
        [sys.executable, "-m", "rehydrate", "db", "grants", role],
        env={"PATH": "/usr/bin:/bin", "REHYDRATE_DATABASE_URL": str(settings.database_url)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [line.rstrip(";") for line in done.stdout.splitlines() if line.strip()]


async def test_a_worker_with_only_the_printed_grants_replays_tails_and_swaps_and_can_do_nothing_more(
    client: Client, settings: Settings, store: EventStore, database_url: str
) -> None:
    await domain.append_all(store, domain.random_history(71, streams=20, events=300))
    role, password = f"rh_worker_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    await store.pool.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' NOSUPERUSER NOCREATEDB NOCREATEROLE")
    worker_url = as_role(database_url, role, password)
    worker_settings = settings.model_copy(update={"database_url": worker_url, "tails": True})
    try:
        statements = printed_grants(settings, role)
        assert statements and all(s.startswith("GRANT ") for s in statements)
        async with store.pool.acquire() as conn, conn.transaction():
            for statement in statements:
                await conn.execute(statement)

        async with running_worker(worker_settings, domain.registry(), client=client):
            for name in ("accounts", "group_totals"):
                # A missing grant fails the replay at once (not retried): a bounded wait is only a safety net.
                await asyncio.wait_for(
                    wait_for_replay(await start_replay(client, worker_settings, ReplayInput(name))), 120
                )
            await domain.append_all(store, domain.random_history(72, streams=20, events=100))
            await eventually(lambda: matches_oracle(store))  # the tail, as the worker's role
            # A second replay swaps again and drops the generation before the retained one.
            await wait_for_replay(await start_replay(client, worker_settings, ReplayInput("accounts")))
            await eventually(lambda: matches_oracle(store))

        worker = await asyncpg.connect(worker_url)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await worker.execute(
                    """INSERT INTO rehydrate.events (stream_id, stream_version, event_type, payload)
                       VALUES ('x', 1, 'Opened', '{}')"""
                )
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await worker.execute("CREATE TABLE rehydrate.intruder (id int)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await worker.execute("ALTER TABLE rehydrate.generations ADD COLUMN intruder int")
            # Its schema up to date, a worker never needs to change it; when it is not, it says who must.
            await ensure_schema(worker, "rehydrate")
            await store.pool.execute("COMMENT ON SCHEMA rehydrate IS 'rehydrate schema 0000000000000000'")
            with pytest.raises(UserError, match="run `rehydrate db init` once as the schema's owner"):
                await ensure_schema(worker, "rehydrate")
        finally:
            await worker.close()
    finally:
        for name in domain.registry().names():
            with contextlib.suppress(RPCError):
                await client.get_workflow_handle(tail_workflow_id(name, settings.temporal_task_queue)).terminate(
                    "test finished"
                )
        await store.pool.execute(f"DROP OWNED BY {role}")
        await store.pool.execute(f"DROP ROLE {role}")
