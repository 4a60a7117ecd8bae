"""The Verify workflow: started the way the Web UI starts it, drift ends the run as a "Drift" failure that carries
the result, one verify per projection at a time, cancel reaches the sandbox rebuild, and the `rehydrate verify`
command on top of it."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from rehydrate import EventStore
from rehydrate.core import search_attributes
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.models import ReplayInput, VerifyInput, VerifyResult
from rehydrate.models.names import replay_workflow_id, verify_label
from rehydrate.starter import start_replay, start_verify, verify, wait_for_replay
from rehydrate.worker import running_worker
from rehydrate.workflows import ReplayWorkflow, VerifyWorkflow
from tests.helpers import domain
from tests.helpers.cli import assert_one_clear_error, rehydrate
from tests.helpers.waiting import paused_replay

SANDBOXES = "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rehydrate_sandbox_%'"


async def build(client: Client, settings: Settings, projection: str) -> None:
    await wait_for_replay(await start_replay(client, settings, ReplayInput(projection)))


async def until(probe: Any, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not await probe():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_a_verify_started_like_the_web_ui_does_completes_clean_and_fails_as_drift(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(61, streams=25, events=400))
    async with running_worker(settings, domain.registry(), client=client):
        await build(client, settings, "group_totals")
        # Exactly what the UI's Start Workflow form sends: a workflow type, a task queue, one JSON payload.
        clean_id = f"ui-{uuid.uuid4().hex[:8]}"
        clean: dict[str, Any] = await client.execute_workflow(
            "Verify", {"projection": "group_totals"}, id=clean_id, task_queue=settings.temporal_task_queue
        )
        found = (await client.get_workflow_handle(clean_id).describe()).typed_search_attributes
        assert (found.get(search_attributes.PROJECTION), found.get(search_attributes.PHASE)) == (
            "group_totals",
            "clean",
        )
        rows = len(await domain.read_model(store.pool, domain.group_totals))
        assert (clean["differing"], clean["first"], clean["live_rows"], clean["rebuilt_rows"]) == (0, [], rows, rows)
        assert (clean["live_generation"], clean["sandbox"], clean["skipped"]) == (1, None, None)
        assert await store.pool.fetchval(SANDBOXES) == 0

        await store.pool.execute("UPDATE public.group_total__g1 SET amount = amount + 1 WHERE group_id = 'g3'")
        workflow_id = f"ui-{uuid.uuid4().hex[:8]}"
        with pytest.raises(WorkflowFailureError) as failed:
            await client.execute_workflow(
                "Verify",
                {"projection": "group_totals", "keep": True},
                id=workflow_id,
                task_queue=settings.temporal_task_queue,
            )
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and (cause.type, cause.non_retryable) == ("Drift", True)
    assert cause.message.startswith("drift: 1 key(s) of group_totals differ between generation 1"), cause.message
    assert cause.message.endswith("; first: g3 (differs)"), cause.message
    details = cause.details[0]
    assert (details["differing"], details["first"], details["sandbox"]) == (
        1,
        [{"key": "g3", "problem": "differs"}],
        "verify_group_totals",
    )
    assert (await client.get_workflow_handle(workflow_id).describe()).status == WorkflowExecutionStatus.FAILED
    # --keep: the rebuild stays, caught up to the live checkpoint, with the row as it should be.
    expected = domain.oracle(domain.group_totals, await domain.all_events(store))
    kept = await store.pool.fetchval(
        "SELECT amount FROM rehydrate_sandbox_verify_group_totals.group_total WHERE group_id = 'g3'"
    )
    assert kept == expected["g3"]["amount"]


async def test_one_verify_per_projection_a_second_is_refused_or_skipped_and_cancel_drops_the_rebuild(
    client: Client, settings: Settings, store: EventStore
) -> None:
    # Many small chunks: the rebuild is still running when the test pauses it.
    await domain.append_all(store, domain.random_history(62, streams=25, events=800))
    async with running_worker(settings, domain.registry(), client=client):
        await build(client, settings, "accounts")
        first = await start_verify(client, settings, VerifyInput("accounts", lanes=1, chunk_size=5))
        rebuild = client.get_workflow_handle(
            replay_workflow_id("accounts", verify_label("accounts"), settings.temporal_task_queue)
        )

        async def rebuilding() -> bool:
            try:
                return (await rebuild.describe()).status == WorkflowExecutionStatus.RUNNING
            except Exception:
                return False

        await until(rebuilding)
        await rebuild.signal(ReplayWorkflow.pause)  # the rebuild holds its slot until resumed or cancelled

        with pytest.raises(UserError, match="a verify of 'accounts' is already running"):
            await start_verify(client, settings, VerifyInput("accounts"))
        # Another id (a schedule's, the UI's): the rebuild's fixed id is the guard.
        scheduled = await client.execute_workflow(
            VerifyWorkflow.run,
            VerifyInput("accounts", skip_if_running=True),
            id=f"scheduled-{uuid.uuid4().hex[:6]}",
            task_queue=settings.temporal_task_queue,
        )
        assert scheduled.skipped == (
            f"skipped: a verify of accounts is already running (its rebuild is workflow {rebuild.id})"
        )
        with pytest.raises(WorkflowFailureError) as refused:
            await client.execute_workflow(
                VerifyWorkflow.run,
                VerifyInput("accounts"),
                id=f"manual-{uuid.uuid4().hex[:6]}",
                task_queue=settings.temporal_task_queue,
            )
        assert isinstance(refused.value.cause, ApplicationError)
        assert refused.value.cause.type == "VerifyFailed"
        assert "a verify of accounts is already running" in refused.value.cause.message

        await first.cancel()
        with pytest.raises(WorkflowFailureError):
            await first.result()
        assert (await first.describe()).status == WorkflowExecutionStatus.CANCELED
        assert (await rebuild.describe()).status == WorkflowExecutionStatus.CANCELED
        states = await store.pool.fetch("SELECT sandbox, state FROM rehydrate.generations ORDER BY generation")
        assert [(r["sandbox"], r["state"]) for r in states] == [("", "active")], "the rebuild's generation is gone"
        assert await store.pool.fetchval(SANDBOXES) == 0
        # Nothing left behind: the next verify runs.
        assert (await verify(client, settings, "accounts")).differing == 0


async def test_a_scheduled_style_verify_skips_while_a_replay_of_the_projection_builds(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(63, streams=20, events=300))
    async with running_worker(settings, domain.registry(), client=client):
        await build(client, settings, "accounts")
        manual = await paused_replay(client, settings, store, "accounts")
        skipped: VerifyResult = await client.execute_workflow(
            VerifyWorkflow.run,
            VerifyInput("accounts", skip_if_running=True),
            id=f"scheduled-{uuid.uuid4().hex[:6]}",
            task_queue=settings.temporal_task_queue,
        )
        assert skipped.skipped == (
            f"skipped: accounts is being rebuilt by {manual.id}; the next verify checks the generation it swaps in"
        )
        assert await store.pool.fetchval(SANDBOXES) == 0
        # From the CLI (no skip) it verifies the live generation all the same.
        assert (await verify(client, settings, "accounts")).differing == 0
        await manual.signal(ReplayWorkflow.resume)
        assert (await wait_for_replay(manual)).generation == 2


async def test_verify_bad_input_is_one_clear_error(client: Client, settings: Settings, store: EventStore) -> None:
    registry = domain.registry()
    with pytest.raises(UserError, match="unknown projection 'nope'"):
        await start_verify(client, settings, VerifyInput("nope"), registry=registry)
    with pytest.raises(UserError, match="lanes=0 is out of range"):
        await start_verify(client, settings, VerifyInput("accounts", lanes=0))
    with pytest.raises(UserError, match="show=5000 is out of range"):
        await start_verify(client, settings, VerifyInput("accounts", show=5000))
    await domain.append_all(store, domain.random_history(64, events=50))
    async with running_worker(settings, registry, client=client):
        # The worker checks too (the UI's input gets no client-side check); nothing is built.
        with pytest.raises(UserError, match="verify failed: projection 'accounts' has no active generation"):
            await verify(client, settings, "accounts")
        # A worker without the projection hands the step back for another worker; with none, the run fails once
        # its patience is spent, naming the worker it met and what that one serves.
        with pytest.raises(WorkflowFailureError) as unknown:
            await client.execute_workflow(
                "Verify",
                {"projection": "nope", "wrong_worker_patience_seconds": 2},
                id=f"ui-{uuid.uuid4().hex[:8]}",
                task_queue=settings.temporal_task_queue,
            )
        assert re.search(
            r"^no worker could run it for 2 s; the last one: worker \d+@\S+: unknown projection 'nope' "
            r"\(registered: accounts, group_totals\) — check the name, or add its module to REHYDRATE_PROJECTIONS",
            getattr(unknown.value.cause, "message", ""),
        ), unknown.value.cause
        with pytest.raises(WorkflowFailureError) as failed:
            await client.execute_workflow(
                "Verify",
                {"projection": "accounts", "show": -1},
                id=f"ui-{uuid.uuid4().hex[:8]}",
                task_queue=settings.temporal_task_queue,
            )
    assert "show=-1 is out of range" in str(failed.value.cause)
    assert await store.pool.fetchval("SELECT count(*) FROM rehydrate.generations") == 0


async def test_verify_command_prints_the_verdict_and_exits_1_on_drift(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    await domain.append_all(store, domain.random_history(65, streams=20, events=300))
    async with running_worker(settings, domain.registry(), client=client):
        await build(client, settings, "accounts")
        rows = len(await domain.read_model(store.pool, domain.accounts))
        clean = await rehydrate(settings, tmp_path, "verify", "accounts")
        assert clean.code == 0, clean
        assert clean.stdout.startswith("✓ accounts: generation 1 equals a fresh rebuild at mark"), clean
        assert clean.stdout.rstrip().endswith(f"({rows:,} rows)"), clean

        victim = await store.pool.fetchval("SELECT min(account_id) FROM public.account__g1")
        await store.pool.execute("UPDATE public.account__g1 SET owner = 'mallory' WHERE account_id = $1", victim)
        drifted = await rehydrate(settings, tmp_path, "verify", "accounts")
        assert drifted.code == 1, drifted
        assert drifted.stdout.startswith("✗ accounts: 1 key(s) differ between generation 1"), drifted
        assert drifted.stdout.splitlines()[-1] == f"  {victim}: differs", drifted
        as_json = await rehydrate(settings, tmp_path, "verify", "accounts", "--json", "--keep")
        assert as_json.code == 1, as_json
        found = orjson.loads(as_json.stdout)
        assert (found["differing"], found["first"], found["sandbox"]) == (
            1,
            [{"key": victim, "problem": "differs"}],
            "verify_accounts",
        )
        assert await store.pool.fetchval(SANDBOXES) == 1
        unknown = await rehydrate(settings, tmp_path, "verify", "nope")
        assert_one_clear_error(unknown, "unknown projection 'nope'")
