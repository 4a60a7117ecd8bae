"""The replay and verify workflows' code stays deterministic against histories it has already written.

A worker that is upgraded while replays run must replay their histories without a nondeterminism error, so
besides a fresh history this replays one recorded by an earlier version of the code, committed in
tests/histories/. Record it again (only when a change to the workflow is meant to break running replays) with

    REHYDRATE_RECORD_HISTORY=1 /tmp/venv/bin/python -m pytest tests/integration/test_determinism.py -k NAME_OF_THE_TEST
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from rehydrate import EventStore
from rehydrate.core.settings import Settings
from rehydrate.models import ReplayInput, ReplayResult, VerifyInput
from rehydrate.models.names import replay_workflow_id, verify_workflow_id
from rehydrate.starter import start_replay, start_verify, wait_for_replay, wait_for_verify
from rehydrate.worker import passthrough_modules, running_worker, workflow_runner
from rehydrate.workflows import ReplayWorkflow, VerifyWorkflow
from tests.helpers import domain

RECORDED = Path(__file__).parent / "histories" / "replay_accounts.json"
WORKFLOW_ID = replay_workflow_id("accounts")


VERIFY_RECORDED = Path(__file__).parent / "histories" / "verify_accounts.json"


def replayer() -> Replayer:
    return Replayer(workflows=[ReplayWorkflow, VerifyWorkflow], workflow_runner=workflow_runner())


def recorded_history(path: Path = RECORDED, workflow_id: str = WORKFLOW_ID) -> WorkflowHistory:
    if not path.exists():
        pytest.fail(f"{path} is missing: record it with REHYDRATE_RECORD_HISTORY=1 (see this module's docstring)")
    return WorkflowHistory.from_json(workflow_id, path.read_text())


def event_types(history: WorkflowHistory) -> list[int]:
    return [event.event_type for event in history.events]


async def test_replay_workflow_is_deterministic_against_a_recorded_history(
    client: Client, settings: Settings, store: EventStore
) -> None:
    # Small enough to keep the committed JSON short, big enough for several chunks per lane, then finish,
    # catch-up and swap: every activity the workflow schedules.
    await domain.append_all(store, domain.random_history(41, streams=20, events=300))
    async with running_worker(settings, domain.registry(), client=client):
        handle = await start_replay(client, settings, ReplayInput("accounts", lanes=2, chunk_size=50))
        await wait_for_replay(handle)
    fresh = await handle.fetch_history()
    types = event_types(fresh)
    assert types[-1] == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    assert types.count(EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED) >= 6, "plan, chunks, finish, catch-up, swap"

    await replayer().replay_workflow(fresh)

    if os.environ.get("REHYDRATE_RECORD_HISTORY") == "1":
        RECORDED.parent.mkdir(parents=True, exist_ok=True)
        RECORDED.write_text(fresh.to_json())
    recorded = recorded_history()
    assert event_types(recorded)[-1] == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    await replayer().replay_workflow(recorded)


async def test_verify_workflow_is_deterministic_against_a_recorded_history(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(42, streams=20, events=200))
    histories = []
    async with running_worker(settings, domain.registry(), client=client):
        await wait_for_replay(await start_replay(client, settings, ReplayInput("accounts", lanes=2)))
        for tamper in (False, True):  # a clean run (completes) and a drifted one (fails as "Drift")
            if tamper:
                await store.pool.execute("UPDATE public.account__g1 SET balance = balance + 1")
            handle = await start_verify(client, settings, VerifyInput("accounts", lanes=2, chunk_size=50))
            assert ((await wait_for_verify(handle)).differing > 0) is tamper
            histories.append(await handle.fetch_history())
    clean, drifted = histories
    assert event_types(clean)[-1] == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    assert event_types(drifted)[-1] == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED
    assert EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED in event_types(clean)
    for fresh in histories:
        await replayer().replay_workflow(fresh)

    if os.environ.get("REHYDRATE_RECORD_HISTORY") == "1":
        VERIFY_RECORDED.write_text(clean.to_json())
    recorded = recorded_history(VERIFY_RECORDED, verify_workflow_id("accounts"))
    assert event_types(recorded)[-1] == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    await replayer().replay_workflow(recorded)


@workflow.defn(name="Replay")
class ReplayWithAnExtraTimer(ReplayWorkflow):
    """The replay workflow with one command added before its first activity: a change that breaks runs in flight."""

    @workflow.run
    async def run(self, input: ReplayInput) -> ReplayResult:
        await workflow.sleep(timedelta(seconds=1))
        return await super().run(input)


async def test_the_recorded_history_catches_a_nondeterministic_change() -> None:
    # Guards the test above: replaying the committed history must fail for a workflow that changed its commands.
    changed = Replayer(workflows=[ReplayWithAnExtraTimer], workflow_runner=UnsandboxedWorkflowRunner())
    with pytest.raises(workflow.NondeterminismError):
        await changed.replay_workflow(recorded_history())


def test_the_sandbox_shares_rehydrate_with_the_worker_but_not_its_workflows() -> None:
    """A run's sandbox imports its own copy of the workflows (their code keeps the sandbox's checks) and shares the
    rest of rehydrate; copying it too made every run's first workflow task take ~30 ms instead of ~8."""
    shared = set(passthrough_modules())

    def passed_through(module: str) -> bool:  # as the sandbox decides: the module or a package above it is listed
        parts = module.split(".")
        return any(".".join(parts[:end]) in shared for end in range(1, len(parts) + 1))

    for module in (
        "rehydrate.sources.store",
        "rehydrate.activities",
        "rehydrate.models",
        "rehydrate.engine.projections",
    ):
        assert passed_through(module), module
    assert all(passed_through(module) for module in ("asyncpg", "sqlalchemy", "orjson"))
    assert not passed_through("rehydrate.workflows.replay") and not passed_through("rehydrate"), shared
