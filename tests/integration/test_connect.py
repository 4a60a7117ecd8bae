"""Connecting to real clusters: TLS and API key from settings, Temporal's own profile configuration, a password
checked by scram-sha-256, and no credential in a replay's workflow history."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.service import RPCError

from rehydrate import EventStore
from rehydrate.core.database import connect, grants_sql
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.core.temporal import connect_client, connect_options
from rehydrate.models import ReplayInput
from rehydrate.models.names import tail_workflow_id
from rehydrate.starter import start_replay, wait_for_replay
from tests.helpers import domain
from tests.helpers.cli import command_env
from tests.helpers.roles import as_role
from tests.helpers.waiting import eventually, matches_oracle


async def test_temporal_profile_file_and_variables_are_honoured(
    temporal_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in (
        "REHYDRATE_TEMPORAL_ADDRESS",
        "TEMPORAL_ADDRESS",
        "TEMPORAL_NAMESPACE",
        "REHYDRATE_TEMPORAL_NAMESPACE",
    ):
        monkeypatch.delenv(variable, raising=False)
    config = tmp_path / "temporal.toml"
    config.write_text(f'[profile.staging]\naddress = "{temporal_address}"\nnamespace = "default"\n')
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(config))
    monkeypatch.setenv("TEMPORAL_PROFILE", "staging")
    monkeypatch.chdir(tmp_path)  # no stray .env
    client = await connect_client(Settings())
    assert client.service_client.config.target_host == temporal_address
    monkeypatch.setenv("TEMPORAL_PROFILE", "missing")
    with pytest.raises(UserError, match="client configuration is invalid"):
        connect_options(Settings())


async def test_no_credential_reaches_a_history_search_attribute_log_line_or_error(
    client: Client, settings: Settings, store: EventStore, database_url: str, tmp_path: Path
) -> None:
    """Workers log in with a password (and a Temporal API key, sent in the clear to the dev server, which ignores
    it): a replay and a tail run under a worker process logging text, then one logging JSON. Neither secret is in
    any workflow history of the run (payloads decoded), its search attributes and memos, the workers' logs, or the
    errors of a failing connection."""
    role, password, api_key = f"rh_sec_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}", f"tk-{uuid.uuid4().hex}"
    await store.pool.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    url = as_role(database_url, role, password)
    worker_settings = settings.model_copy(
        update={"database_url": url, "temporal_api_key": SecretStr(api_key), "temporal_tls": False, "tails": True}
    )
    env = command_env(
        settings,
        REHYDRATE_DATABASE_URL=url,
        TEMPORAL_API_KEY=api_key,
        TEMPORAL_TLS="false",
        REHYDRATE_TAILS="true",
    )
    logs: list[str] = []
    scram = contextlib.AsyncExitStack()
    try:
        # On the embedded server, the role must log in with SCRAM: the password is checked, not ignored.
        checked = await scram.enter_async_context(scram_only(store, role))
        assert checked or os.environ.get("REHYDRATE_TEST_DATABASE_URL"), "the embedded server checks the password"
        async with store.pool.acquire() as conn, conn.transaction():
            for statement in grants_sql(settings.schema_name, settings.read_model_schema, role):
                await conn.execute(statement)
        await domain.append_all(store, domain.random_history(51, events=200))
        keyed = await connect_client(worker_settings)  # the API key goes along with every call
        for n, flags in enumerate([[], ["--log-json"]]):
            log = tmp_path / f"worker-{n}.log"
            worker = start_worker(env, log, flags)
            try:
                handle = await start_replay(keyed, worker_settings, ReplayInput("accounts", lanes=2, chunk_size=40))
                await asyncio.wait_for(wait_for_replay(handle), 120)
                await domain.append_all(store, domain.random_history(52 + n, events=50))
                await eventually(lambda: matches_oracle(store), within=60)  # the tail, in this worker
            finally:
                worker.send_signal(signal.SIGTERM)
                await asyncio.to_thread(worker.wait, 30)
            logs.append(log.read_text())
        assert "accounts" in logs[0] and "accounts" in logs[1], logs
        assert all(orjson.loads(line) for line in logs[1].splitlines() if line.startswith("{")), "JSON lines"

        # Failing connections, in-process and through the command.
        unreachable = as_role("postgresql://x@127.0.0.1:1/none", role, password)
        errors = []
        for bad in (unreachable, unreachable.replace("127.0.0.1:1", "127.0.0.1:notaport")):
            with pytest.raises(UserError) as failure:
                await connect(bad)
            errors.append(str(failure.value))
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "rehydrate", "generations", "accounts"],
            env={**env, "REHYDRATE_DATABASE_URL": unreachable},
            capture_output=True,
            text=True,
            timeout=60,
        )
        errors.append(done.stdout + done.stderr)
        assert all(f"{role}:***@" in error for error in errors), errors  # the URL is named, its password is not
        if checked:
            wrong = as_role(database_url, role, f"wrong-{password}")
            with pytest.raises(UserError, match=f'password authentication failed for user "{role}"') as failure:
                await connect(wrong)
            errors.append(str(failure.value))

        histories = []
        async for execution in client.list_workflows(f'TaskQueue="{settings.temporal_task_queue}"'):
            history = await client.get_workflow_handle(execution.id, run_id=execution.run_id).fetch_history()
            histories.append(decoded(history.to_json()))
            histories.append(
                f"{execution.search_attributes} {execution.typed_search_attributes} {await execution.memo()}"
            )
        assert len(histories) >= 4, "the replays and the tail"
        assert "accounts" in "".join(histories)
    finally:
        for name in domain.registry().names():
            with contextlib.suppress(RPCError):
                await client.get_workflow_handle(tail_workflow_id(name, settings.temporal_task_queue)).terminate(
                    "test finished"
                )
        await scram.aclose()
        await store.pool.execute(f"DROP OWNED BY {role}")
        await store.pool.execute(f"DROP ROLE {role}")
    for where, texts in (("a history", histories), ("a log", logs), ("an error", errors)):
        for text in texts:
            for secret in (password, api_key):
                assert secret not in text, f"a secret is in {where}: {text[:2000]}"


@contextlib.asynccontextmanager
async def scram_only(store: EventStore, role: str) -> AsyncIterator[bool]:
    """Make `role` log in with scram-sha-256 (rules put first in the server's pg_hba.conf, then reloaded); yields
    whether it could: only for a server of the test's own (in the temporary directory), never a system's."""
    hba = Path(await store.pool.fetchval("SHOW hba_file"))
    if not hba.is_relative_to(tempfile.gettempdir()) or not os.access(hba, os.W_OK):
        yield False
        return
    assert await store.pool.fetchval(
        "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = $1", role
    ), "the password is stored as a SCRAM verifier"
    original = await asyncio.to_thread(hba.read_text)
    rules = f"local all {role} scram-sha-256\nhost all {role} all scram-sha-256\n"
    await asyncio.to_thread(hba.write_text, rules + original)
    await store.pool.execute("SELECT pg_reload_conf()")
    try:
        yield True
    finally:
        await asyncio.to_thread(hba.write_text, original)
        await store.pool.execute("SELECT pg_reload_conf()")


def start_worker(env: dict[str, str], log: Path, flags: list[str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rehydrate", "worker", *flags],
            cwd=log.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def decoded(history_json: str) -> str:
    """A history as JSON with every payload's data (base64 in the JSON) decoded next to it."""
    parts = [history_json]

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "data" and isinstance(item, str):
                    with contextlib.suppress(ValueError):
                        parts.append(base64.b64decode(item, validate=True).decode(errors="replace"))
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(orjson.loads(history_json))
    return "\n".join(parts)
